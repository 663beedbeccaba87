"""Ready-made interventions for `forward(..., interventions=[...])` and `generate`.

Each is a pytree (flax struct): `site` and `layers` are static, the arrays are leaves, so a new
steering vector or coefficient reuses the compiled program. Per-layer arrays are stacked on a
leading axis in the order of `layers` (or of all layers when `layers` is None), the same
layout `forward(..., capture=[Capture(site, layers)])` returns, so a capture feeds a patch.

    cached = forward(cfg, params, clean, capture=[Capture("resid_post", (2,))]).captured
    patched = forward(cfg, params, corrupt,
                      interventions=[Patch("resid_post", cached["resid_post"], layers=(2,))])
    steered = generate(cfg, params, prompts, max_new_tokens=20, temperature=0.0,
                       interventions=[AddVector("resid_post", v, coef=4.0, layers=(1,))])

`where` (optional, broadcastable to [B, T]) limits an intervention to some tokens: e.g.
`context.slots`-based masks are built inside an `Fn`; a fixed [B, T] mask is given here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost.models.sites import per_layer

# Sites whose activations have a head axis at position 2 ([B, T, heads, Dh]).
_HEAD_SITES = ("q", "k", "v", "head_out")


def _lead(a, ndim: int):
  """`a` with leading unit axes up to rank `ndim` (explicit broadcasting)."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _where(where, new, old):
  """`new` at the tokens `where` selects ([B, T] or broadcastable), `old` elsewhere."""
  if where is None:
    return new
  mask = jnp.asarray(where, bool)
  mask = mask.reshape(mask.shape + (1,) * (new.ndim - mask.ndim))
  return jnp.where(mask, new, old)


@struct.dataclass
class Patch:
  """Replace the activation with `values` (activation patching, Meng et al. 2022; Vig et al.
  2020): [B, T, ...] for every selected layer, or one more leading axis with one entry per
  selected layer. Patching a site with its own captured activation gives the same logits
  bit for bit."""

  site: str = struct.field(pytree_node=False)
  values: jax.Array
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  where: jax.Array | None = None

  def __call__(self, x, layer, context):
    del context
    values = per_layer(self.values, self.layers, layer, x.ndim).astype(x.dtype)
    return _where(self.where, jnp.broadcast_to(values, x.shape), x)


@struct.dataclass
class Ablate:
  """Zero ablation (`value=None`) or mean ablation (`value` = the site's mean activation,
  broadcastable to it, optionally per layer) of a whole site, or of some heads at a head
  site (`q`, `k`, `v`, `head_out`: `heads` indexes axis 2)."""

  site: str = struct.field(pytree_node=False)
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  heads: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  value: jax.Array | None = None
  where: jax.Array | None = None

  def __post_init__(self):
    if self.heads is not None and self.site not in _HEAD_SITES:
      raise ValueError(f"Ablate: heads are only for the sites {', '.join(_HEAD_SITES)}, "
                       f"not {self.site!r}")

  def __call__(self, x, layer, context):
    del context
    if self.value is None:
      replacement = jnp.zeros_like(x)
    else:
      replacement = jnp.broadcast_to(
          per_layer(self.value, self.layers, layer, x.ndim - 2).astype(x.dtype), x.shape)
    if self.heads is not None:
      chosen = jnp.zeros((x.shape[2],), bool).at[jnp.asarray(self.heads)].set(True)
      replacement = jnp.where(_lead(chosen[:, None], x.ndim), replacement, x)
    return _where(self.where, replacement, x)


@struct.dataclass
class AddVector:
  """Activation addition (Turner et al. 2023; contrastive activation addition, Rimsky et al.
  2024): x + coef * vector, the vector [D] (or per selected layer [L, D]) along the last
  axis. `coef` is a traced scalar: sweeping it does not recompile."""

  site: str = struct.field(pytree_node=False)
  vector: jax.Array
  coef: jax.Array | float = 1.0
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  where: jax.Array | None = None

  def __call__(self, x, layer, context):
    del context
    v = per_layer(self.vector, self.layers, layer, 1)
    shift = jnp.asarray(self.coef, jnp.float32) * _lead(v.astype(jnp.float32), x.ndim)
    added = (x.astype(jnp.float32) + shift).astype(x.dtype)
    return _where(self.where, added, x)


@struct.dataclass
class ProjectOut:
  """Directional ablation (Arditi et al. 2024, "Refusal is mediated by a single direction"):
  x - (x . u) u with u = direction / |direction|, [D] or per selected layer [L, D]."""

  site: str = struct.field(pytree_node=False)
  direction: jax.Array
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  where: jax.Array | None = None

  def __call__(self, x, layer, context):
    del context
    d = per_layer(self.direction, self.layers, layer, 1).astype(jnp.float32)
    u = d / jnp.linalg.norm(d)
    xf = x.astype(jnp.float32)
    projected = (xf - (xf @ u)[..., None] * _lead(u, x.ndim)).astype(x.dtype)
    return _where(self.where, projected, x)


@struct.dataclass
class LowRankEdit:
  """x + (x A) B along the last axis, A [D, r] and B [r, D] (or per selected layer [L, D, r]
  and [L, r, D]): a low-rank edit of the representation (cf. ReFT, Wu et al. 2024). With B = 0
  it is the identity, which is how `edit: {kind: low_rank}` starts training."""

  site: str = struct.field(pytree_node=False)
  a: jax.Array
  b: jax.Array
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  where: jax.Array | None = None

  def __call__(self, x, layer, context):
    del context
    a = per_layer(self.a, self.layers, layer, 2).astype(jnp.float32)
    b = per_layer(self.b, self.layers, layer, 2).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    edited = (xf + (xf @ a) @ b).astype(x.dtype)
    return _where(self.where, edited, x)
