"""Parameter layout: every parameter's shape, logical axis names and initialiser.

Parameters are a plain nested dict of arrays. Per-layer weights are stacked along a leading
"layers" axis so the forward pass can `lax.scan` over layers (one compiled layer body,
whatever the depth). Each array carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `layers`); `jaxpost.sharding` maps them onto a device mesh.

Layout (L layers, D hidden, H heads, K kv heads, Dh head_dim, F mlp, V vocab)::

    embed               [V, D]           (vocab, embed)
    final_norm          [D]              (embed,)
    lm_head             [D, V]           (embed, vocab)          untied models only
    layers/attn_pre_norm, mlp_pre_norm, [attn_post_norm, mlp_post_norm]   [L, D]
    layers/attn/q       [L, D, H, Dh]    (layers, embed, heads, head_dim)
    layers/attn/k, v    [L, D, K, Dh]    (layers, embed, kv_heads, head_dim)
    layers/attn/o       [L, H, Dh, D]    (layers, heads, head_dim, embed)
    layers/attn/{q,k,v}_bias [L, H|K, Dh]; o_bias [L, D]; q_norm, k_norm [L, Dh]
    layers/mlp/gate, up [L, D, F]        (layers, embed, mlp)
    layers/mlp/down     [L, F, D]        (layers, mlp, embed)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxpost.models.config import ModelConfig

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Shape, logical axes and initialiser of one parameter."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str = "normal"  # "normal" (std 0.02), "zeros" or "ones"

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def param_specs(config: ModelConfig) -> dict:
  """The parameter tree of `config` with a `ParamSpec` at every leaf."""
  c = config
  L, D, H, K, Dh, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                          c.head_dim, c.intermediate_size, c.vocab_size)
  norm_init = "zeros" if c.norm_plus_one else "ones"

  def norm(*shape_axes):
    shape, axes = zip(*shape_axes)
    return ParamSpec(tuple(shape), tuple(axes), norm_init)

  attn = {
      "q": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
      "k": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "v": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "o": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
  }
  if c.qkv_bias:
    attn["q_bias"] = ParamSpec((L, H, Dh), ("layers", "heads", "head_dim"), "zeros")
    attn["k_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
    attn["v_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
  if c.o_bias:
    attn["o_bias"] = ParamSpec((L, D), ("layers", "embed"), "zeros")
  if c.qk_norm:
    attn["q_norm"] = norm((L, "layers"), (Dh, "head_dim"))
    attn["k_norm"] = norm((L, "layers"), (Dh, "head_dim"))
  mlp = {
      "gate": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
      "up": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
      "down": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
  }
  if c.mlp_bias:
    mlp["gate_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
    mlp["up_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
    mlp["down_bias"] = ParamSpec((L, D), ("layers", "embed"), "zeros")
  layers = {
      "attn_pre_norm": norm((L, "layers"), (D, "embed")),
      "mlp_pre_norm": norm((L, "layers"), (D, "embed")),
      "attn": attn,
      "mlp": mlp,
  }
  if c.sandwich_norm:
    layers["attn_post_norm"] = norm((L, "layers"), (D, "embed"))
    layers["mlp_post_norm"] = norm((L, "layers"), (D, "embed"))
  tree = {
      "embed": ParamSpec((V, D), ("vocab", "embed")),
      "layers": layers,
      "final_norm": norm((D, "embed")),
  }
  if not c.tie_embeddings:
    tree["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
  return tree


def logical_axes(config: ModelConfig) -> dict:
  """The parameter tree of `config` with a tuple of logical axis names at every leaf."""
  return jax.tree.map(lambda s: s.axes, param_specs(config), is_leaf=is_spec)


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s (for ahead-of-time work, no allocation)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(config),
                      is_leaf=is_spec)


def num_params(config: ModelConfig) -> int:
  """Number of parameters of `config`, counting a tied embedding once."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(config), is_leaf=is_spec))


_CONSTANT: dict[str, Callable] = {"zeros": jnp.zeros, "ones": jnp.ones}


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32, *,
                shardings=None) -> dict:
  """Random parameters for `config` (normal(0, 0.02) matrices, unit norms, zero biases).

  All normal leaves come from one draw of their total size, split in tree order: one random
  op compiles in about a second where one per leaf took several on a small CPU. Runs as one
  compiled function; `shardings` (a matching tree) creates every array on its devices.
  """
  return _init(config, jnp.dtype(dtype), shardings)(rng)


@functools.lru_cache(maxsize=32)
def _init_fn(config: ModelConfig, dtype):
  specs = param_specs(config)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  normal = [s for s in leaves if s.init == "normal"]
  total = sum(math.prod(s.shape) for s in normal)

  def init(rng):
    flat = INIT_STD * jax.random.normal(rng, (total,), jnp.float32)
    out, offset = [], 0
    for spec in leaves:
      if spec.init == "normal":
        n = math.prod(spec.shape)
        out.append(flat[offset:offset + n].reshape(spec.shape).astype(dtype))
        offset += n
      else:
        out.append(_CONSTANT[spec.init](spec.shape, dtype))
    return jax.tree.unflatten(treedef, out)

  return init


def _init(config, dtype, shardings):
  return jax.jit(_init_fn(config, dtype), out_shardings=shardings)
