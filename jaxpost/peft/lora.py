"""LoRA, rsLoRA and DoRA adapters as their own pytree beside a frozen base.

LoRA (Hu et al. 2021, arXiv:2106.09685). For a target weight W (a linear map from its input
axes to its output axes) the adapter holds A (inputs -> rank) and B (rank -> outputs):

    y = x @ W + s * (dropout(x) @ A) @ B,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

DoRA (Liu et al. 2024, arXiv:2402.09353) adds a learned magnitude m per output feature and
renormalises the adapted weight's direction, with the norm treated as a constant (section 4.3
of the paper, and PEFT):

    y = (m / ||W + s A B||_c) * (x @ W + s * (x @ A) @ B),   m initialised to ||W||_c

where ||.||_c is the norm over the input axes, per output feature. At initialisation A is
random and B zero, so the adapted model equals the base exactly (LoRA and DoRA).

Adapters live under the same paths as the weights they adapt (`layers/attn/q` ->
`{a, b[, m]}`), stacked over layers like the base. Only the adapter tree is trained: the update
step gets it as `params` and the base as a frozen input, so gradients and optimizer state
exist for the adapters alone. `attach_lora` rewrites the base tree so every target becomes a
`LoraWeight` (a weight object, see `jaxpost.models.weights`): the forward pass computes the
low-rank path as two small matmuls and never forms W + s A B, so the base may stay quantised
(QLoRA). `merge_lora` folds adapters into plain weights for export.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost.models import ModelConfig
from jaxpost.models.params import ParamSpec, is_spec, param_specs
from jaxpost.models.weights import materialize, materialize_tree, project, split_eqn

# target -> (group under "layers", or None for a top-level weight; number of input axes)
TARGETS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
            "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1),
            "embed": (None, 1), "lm_head": (None, 1)}
LAYER_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which weights get adapters, their rank, scale and variant. Hashable (static under jit).

  targets: any of q, k, v, o, gate, up, down (per layer), embed, lm_head (untied models).
  dropout: applied to the input of the low-rank path while training (not to embeddings).
  dora: weight-decomposed LoRA (a magnitude vector per output feature).
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = LAYER_TARGETS
  rslora: bool = False
  dropout: float = 0.0
  dora: bool = False

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if self.dora and "embed" in self.targets:
      raise ValueError("DoRA adapts linear layers only; remove 'embed' from the targets")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _path(name: str) -> tuple[str, ...]:
  group = TARGETS[name][0]
  return ("layers", group, name) if group else (name,)


def get_target(tree: dict, name: str) -> Any:
  for key in _path(name):
    tree = tree[key]
  return tree


def _set_target(tree: dict, name: str, value: Any) -> None:
  *parents, last = _path(name)
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def lora_specs(config: ModelConfig, lora: LoraConfig) -> dict:
  """The adapter tree with a `ParamSpec` (shape, logical axes) at every leaf.

  A keeps the input axes of its weight and B the output axes, with the same logical names, so
  adapters shard along with their base weights on any mesh; the rank axis is replicated.
  DoRA's magnitude `m` has the weight's output axes.
  """
  if "lm_head" in lora.targets and config.tie_embeddings:
    raise ValueError("the model ties its LM head to the embedding; target 'embed' instead of "
                     "'lm_head'")
  base = param_specs(config)
  tree: dict = {}
  for name in lora.targets:
    w: ParamSpec = get_target(base, name)
    n_lead = 1 if TARGETS[name][0] else 0
    n_in = TARGETS[name][1]
    lead, ins, outs = w.shape[:n_lead], w.shape[n_lead:n_lead + n_in], w.shape[n_lead + n_in:]
    ax_lead, ax_in, ax_out = w.axes[:n_lead], w.axes[n_lead:n_lead + n_in], w.axes[n_lead + n_in:]
    node = {"a": ParamSpec((*lead, *ins, lora.rank), (*ax_lead, *ax_in, "lora_rank"), "normal"),
            "b": ParamSpec((*lead, lora.rank, *outs), (*ax_lead, "lora_rank", *ax_out), "zeros")}
    if lora.dora:
      node["m"] = ParamSpec((*lead, *outs), (*ax_lead, *ax_out), "magnitude")
    _set_target(tree, name, node)
  return tree


def _column_norm(w: jax.Array, n_lead: int, n_in: int) -> jax.Array:
  """The norm of `w` over its input axes: one value per output feature (and leading axis)."""
  wf = w.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(wf * wf, axis=tuple(range(n_lead, n_lead + n_in))))


def init_lora(config: ModelConfig, lora: LoraConfig, rng: jax.Array, dtype=jnp.float32, *,
              base: dict | None = None) -> dict:
  """Adapters with A ~ N(0, 1 / fan_in) and B = 0: the adapted model equals the base.

  DoRA's magnitudes start at the base weights' column norms, so `base` is required for it.
  """
  specs = lora_specs(config, lora)
  leaves, treedef = jax.tree.flatten_with_path(specs, is_leaf=is_spec)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for key, (path, spec) in zip(keys, leaves):
    name = path[-2].key
    n_lead = 1 if TARGETS[name][0] else 0
    if spec.init == "zeros":
      out.append(jnp.zeros(spec.shape, dtype))
    elif spec.init == "magnitude":
      if base is None:
        raise ValueError("DoRA magnitudes start from the base weights: pass base=params")
      w = materialize(get_target(base, name), jnp.float32)
      out.append(_column_norm(w, n_lead, TARGETS[name][1]).astype(dtype))
    else:
      fan_in = math.prod(spec.shape[n_lead:-1])
      out.append((jax.random.normal(key, spec.shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def _trailing(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


@struct.dataclass
class LoraWeight:
  """A weight with its LoRA/DoRA adapter: a weight object for `jaxpost.models.weights`.

  base: the frozen weight [..., *ins, *outs] (an array, or a quantised weight object)
  a: [..., *ins, r];  b: [..., r, *outs];  m: [..., *outs] (DoRA) or None
  dropout_key: a key per leading index (dropout on the low-rank input) or None
  The leading axes (the stacked layer axis) are sliced away by `lax.scan`.
  """

  base: Any
  a: jax.Array
  b: jax.Array
  m: jax.Array | None = None
  dropout_key: jax.Array | None = None
  scale: float = struct.field(pytree_node=False, default=1.0)
  dropout: float = struct.field(pytree_node=False, default=0.0)
  n_in: int = struct.field(pytree_node=False, default=1)

  @property
  def dtype(self):
    return self.base.dtype

  @property
  def _n_lead(self) -> int:
    return self.a.ndim - self.n_in - 1

  def _drop(self, x: jax.Array) -> jax.Array:
    if self.dropout_key is None or self.dropout == 0.0:
      return x
    keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))

  def _delta(self) -> jax.Array:
    """s * A @ B in float32, shaped like the base."""
    n = self._n_lead
    lead, r = self.a.shape[:n], self.a.shape[-1]
    a2 = self.a.astype(jnp.float32).reshape(*lead, -1, r)
    b2 = self.b.astype(jnp.float32).reshape(*lead, r, -1)
    ins = self.a.shape[n:-1]
    outs = self.b.shape[n + 1:]
    return self.scale * jnp.matmul(a2, b2).reshape(*lead, *ins, *outs)

  def _dora_gain(self) -> jax.Array:
    """m / ||W + s A B||_c with the norm held constant (no gradient): [..., *outs]."""
    w = materialize(self.base, jnp.float32) + self._delta()
    norm = jax.lax.stop_gradient(_column_norm(w, self._n_lead, self.n_in))
    return self.m.astype(jnp.float32) / norm

  def project(self, eqn: str, x: jax.Array, dtype: Any, **kw) -> jax.Array:
    xs, ins, outs, kept, out = split_eqn(eqn)
    y = project(eqn, x, self.base, dtype, **kw)
    xd = self._drop(x)
    # plain-array projections (`weights.dense`): gradients as matmuls in the cheap orientation
    xa = project(f"{xs},{ins}r->{kept}r", xd, self.a, dtype)
    low = project(f"{kept}r,r{outs}->{out}", xa, self.b, dtype, **kw)
    low = low * jnp.asarray(self.scale, low.dtype)
    if self.m is None:
      return y + low
    gain = _trailing(self._dora_gain(), y.ndim)
    if xd is x:
      return (gain * (y + low)).astype(y.dtype)
    # With dropout, as PEFT: the base path keeps x, the DoRA correction sees dropout(x).
    y_drop = project(eqn, xd, self.base, dtype, **kw)
    return (y + (gain - 1.0) * y_drop + gain * low).astype(y.dtype)

  def lookup(self, tokens: jax.Array, dtype: Any) -> jax.Array:
    """Embedding rows: W[tokens] + s * A[tokens] @ B (an adapter on the embedding)."""
    rows = jnp.take(materialize(self.base, dtype), tokens, axis=0)
    low = jnp.einsum("...r,rd->...d", jnp.take(self.a.astype(dtype), tokens, axis=0),
                     self.b.astype(dtype))
    return rows + low * jnp.asarray(self.scale, dtype)

  def materialize(self, dtype: Any) -> jax.Array:
    w = materialize(self.base, jnp.float32) + self._delta()
    if self.m is not None:
      n, g = self._n_lead, self._dora_gain()
      w = w * g.reshape(g.shape[:n] + (1,) * self.n_in + g.shape[n:])
    return w.astype(dtype)


def attach_lora(params: dict, adapters: dict, lora: LoraConfig,
                dropout_rng: jax.Array | None = None) -> dict:
  """The base tree with every target weight replaced by a `LoraWeight` over it.

  `dropout_rng` (training only) gives each target and layer its own dropout key; None (or
  `lora.dropout == 0`) disables dropout.
  """
  out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: x is None)  # fresh dict structure
  for i, name in enumerate(lora.targets):
    ad = get_target(adapters, name)
    w = get_target(params, name)
    key = None
    if dropout_rng is not None and lora.dropout > 0 and name != "embed":
      key = jax.random.fold_in(dropout_rng, i)
      if TARGETS[name][0]:
        key = jax.random.split(key, ad["a"].shape[0])
    _set_target(out, name, LoraWeight(base=w, a=ad["a"], b=ad["b"], m=ad.get("m"),
                                      dropout_key=key, scale=lora.scale, dropout=lora.dropout,
                                      n_in=TARGETS[name][1]))
  return out


def merge_lora(params: dict, adapters: dict, lora: LoraConfig) -> dict:
  """The base parameters with every adapted weight replaced by its effective weight
  (W + s A B, DoRA-rescaled), as plain arrays in the base weight's dtype. A quantised base
  comes back dequantised."""
  return materialize_tree(attach_lora(params, adapters, lora))


def dropout_rng(rng: jax.Array | None) -> jax.Array | None:
  """The adapters' dropout key of a step (None when evaluating: no dropout)."""
  return None if rng is None else jax.random.fold_in(rng, 0x10AA)


def lora_loss(loss_fn: Callable, lora: LoraConfig) -> Callable:
  """`loss_fn(params, batch, rng, **frozen)` turned into a loss over adapters:
  `(adapters, batch, rng, *, base, **frozen)`. The base arrives frozen (no gradient, no
  optimizer state); the adapters ride on it as `LoraWeight`s. Dropout is on when an `rng` is
  given (training) and off for `rng=None` (evaluation)."""

  def adapted(adapters, batch, rng, *, base, **frozen):
    return loss_fn(attach_lora(base, adapters, lora, dropout_rng(rng)), batch, rng, **frozen)

  return adapted
