"""Named sites inside the forward pass, where interventions change activations and captures
read them.

    out = forward(config, params, tokens, interventions=[AddVector("resid_post", v, layers=(3,))],
                  capture=["attn_out", Capture("resid_post", layers=(0, 3))])
    out.captured["attn_out"]     [L, B, T, D]   every layer
    out.captured["resid_post"]   [2, B, T, D]   layers 0 and 3, in that order

An intervention is any pytree object with two static fields, `site` (a name below) and
`layers` (a tuple of layer indices, or None for every layer), that is called as
`intervention(activation, layer_index, context) -> activation`. Its arrays (a steering vector,
cached activations to patch in) are pytree leaves, so a jitted caller does not recompile when
they change. `jaxpost.whitebox` has ready-made ones; `Fn` wraps a plain function.

Per-layer sites, with their shapes (T: the tokens of this call; S: the key slots, T without a
KV cache, else the cache length; H query heads, K KV heads, Dh head size, F MLP width):

    resid_pre   [B, T, D]        the layer's input (the residual stream before the layer)
    q           [B, T, H, Dh]    queries after QK-norm, before RoPE (TransformerLens' hook_q)
    k, v        [B, T, K, Dh]    this call's keys (as q) and values, before the cache
    attn_probs  [B, H, T, S]     attention probabilities (dense attention only)
    head_out    [B, T, H, Dh]    each head's output, before the output projection
    attn_out    [B, T, D]        the attention block's output (after the output projection
                                 and, for Gemma, its post-norm): what is added to the stream
    resid_mid   [B, T, D]        the residual stream between attention and MLP
    mlp_hidden  [B, T, F]        act(gate) * up, the MLP's hidden units
    mlp_out     [B, T, D]        the MLP block's output, added to the stream
    resid_post  [B, T, D]        the layer's output

Inside the scanned layers the layer index is a traced scalar: an intervention on some layers
is computed at every layer and selected with `jnp.where` (exact: the other layers keep their
activation bit for bit). With no intervention and no capture the forward traces exactly the
program it traces without this module (tested on the lowered HLO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

SITES = ("resid_pre", "q", "k", "v", "attn_probs", "head_out", "attn_out", "resid_mid",
         "mlp_hidden", "mlp_out", "resid_post")


@struct.dataclass
class Context:
  """What an intervention may look at besides the activation.

  positions:    [B, T] RoPE positions of this call's tokens
  segment_ids:  [B, T] 0 = padding; packed examples have distinct ids
  slots:        [T] each token's index in the row (or in the KV cache when there is one):
                e.g. `context.slots >= prompt_len` selects generated tokens
  """

  positions: jax.Array
  segment_ids: jax.Array
  slots: jax.Array


@struct.dataclass
class Fn:
  """An intervention from a plain function `fn(activation, layer_index, context)`, or, when
  `data` is given, `fn(activation, layer_index, context, data)`: `data` is any pytree of
  arrays it needs (leaves, so they can change without a recompile).

      Fn("mlp_out", lambda x, i, ctx: 0.5 * x, layers=(1,))
      Fn("mlp_out", lambda x, i, ctx, scale: x * scale, layers=(1,), data=jnp.float32(0.5))
  """

  site: str = struct.field(pytree_node=False)
  fn: Callable = struct.field(pytree_node=False)
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
  data: Any = None

  def __call__(self, x, layer, context):
    if self.data is None:
      return self.fn(x, layer, context)
    return self.fn(x, layer, context, self.data)


@struct.dataclass
class Capture:
  """Ask `forward` to return a site's activations at `layers` (None: every layer), stacked in
  that order on a leading axis. Memory is what is asked for: selected layers are written into
  a buffer of their own size, not sliced out of all of them."""

  site: str = struct.field(pytree_node=False)
  layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


def layer_slot(layers: tuple[int, ...], layer) -> jax.Array:
  """Index of `layer` in `layers` (for per-layer arrays stacked in the order of `layers`);
  0 when absent (the result is then masked out by the caller)."""
  return jnp.argmax(jnp.asarray(layers, jnp.int32) == layer)


def per_layer(value, layers: tuple[int, ...] | None, layer, ndim: int):
  """`value` as it applies at `layer`: arrays of rank `ndim` apply at every layer; one more
  leading axis holds one entry per selected layer (in the order of `layers`, or of all layers
  when `layers` is None)."""
  value = jnp.asarray(value)
  if value.ndim <= ndim:
    return value
  index = layer if layers is None else layer_slot(layers, layer)
  return jax.lax.dynamic_index_in_dim(value, index, keepdims=False)


def _check_site(name: str, what: str) -> None:
  if name not in SITES:
    raise ValueError(f"{what}: unknown site {name!r}; the sites are {', '.join(SITES)}")


def _check_layers(layers, num_layers: int, what: str) -> None:
  if layers is None:
    return
  if not isinstance(layers, tuple) or not layers:
    raise ValueError(f"{what}: layers must be a non-empty tuple of ints or None, got {layers!r}")
  bad = [i for i in layers if not 0 <= int(i) < num_layers]
  if bad:
    raise ValueError(f"{what}: layer {bad[0]} is out of range; the model has {num_layers} "
                     "layers")


class Sites:
  """The interventions and captures of one forward call, applied inside each layer.

  `apply(site, x, layer)` runs the site's interventions in the order given and records the
  (post-intervention) activation when the site is captured. `layer` is a Python int in the
  unstacked path (selection is static) or a traced scalar inside the scan.
  """

  def __init__(self, interventions: Sequence[Any] | None, capture: Sequence[Any] | None,
               num_layers: int):
    self.by_site: dict[str, list[Any]] = {}
    for iv in interventions or ():
      what = f"intervention {type(iv).__name__}"
      _check_site(getattr(iv, "site", None), what)
      _check_layers(iv.layers, num_layers, what)
      self.by_site.setdefault(iv.site, []).append(iv)
    self.captures: dict[str, Capture] = {}
    for c in capture or ():
      c = Capture(c) if isinstance(c, str) else c
      _check_site(c.site, "capture")
      _check_layers(c.layers, num_layers, "capture")
      if c.site in self.captures:
        raise ValueError(f"capture: site {c.site!r} is asked for twice")
      self.captures[c.site] = c
    self.num_layers = num_layers
    self.context: Context | None = None

  @property
  def active(self) -> bool:
    return bool(self.by_site or self.captures)

  def wants(self, site: str) -> bool:
    return site in self.by_site or site in self.captures

  def apply(self, site: str, x, layer, record: dict | None):
    if not self.wants(site):
      return x
    # Barriers make the activation one materialised value, before and after the
    # interventions, that the interventions, the rest of the layer and the capture all read.
    # Without them XLA may recompute it inside each consumer's fusion, where floating-point
    # contraction can round it differently from the stored copy, and patching a captured
    # activation back in would not reproduce the logits bit for bit.
    ivs = self.by_site.get(site, ())
    if ivs:
      x = jax.lax.optimization_barrier(x)
    for iv in ivs:
      x = _select(iv.layers, layer, lambda x=x, iv=iv: iv(x, layer, self.context), x)
    x = jax.lax.optimization_barrier(x)
    if record is not None and site in self.captures:
      record[site] = x
    return x

  # Captures: all layers ride out as scan outputs; a subset goes into a buffer in the carry.
  def empty_buffers(self, shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    return {s: jnp.zeros((len(c.layers),) + shapes[s].shape, shapes[s].dtype)
            for s, c in self.captures.items() if c.layers is not None}

  def write_buffers(self, buffers: dict, record: dict, layer) -> dict:
    out = {}
    for s, buf in buffers.items():
      layers = self.captures[s].layers
      if isinstance(layer, int):
        out[s] = buf.at[layers.index(layer)].set(record[s]) if layer in layers else buf
        continue
      hit = jnp.any(jnp.asarray(layers) == layer)
      row = jnp.where(hit, record[s], jax.lax.dynamic_index_in_dim(
          buf, layer_slot(layers, layer), keepdims=False))
      out[s] = jax.lax.dynamic_update_index_in_dim(buf, row, layer_slot(layers, layer), 0)
    return out

  def all_layer_outputs(self, record: dict) -> dict:
    return {s: record[s] for s, c in self.captures.items() if c.layers is None}


def _select(layers, layer, compute: Callable[[], jax.Array], x):
  if layers is None:
    return compute()
  if isinstance(layer, int):
    return compute() if layer in layers else x
  hit = jnp.any(jnp.asarray(layers, jnp.int32) == layer)
  return jnp.where(hit, compute(), x)
