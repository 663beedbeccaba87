"""Projection weights: plain arrays, or weight objects that compute their own projection.

Every matmul of the model with a weight goes through `project(eqn, x, w, dtype)`. A weight is
either an array (the einsum runs as written) or a *weight object*: a pytree node with

    project(eqn, x, dtype, **einsum_kwargs) -> y     the same result shape as the einsum
    materialize(dtype) -> array                      the effective weight as a plain array
    lookup(tokens, dtype) -> embeddings              (embedding weights only)
    dtype                                            the dtype the weight stands for

This is how adapters and quantised weights enter the forward pass without the model knowing
them: `jaxpost.peft` rewrites the parameter tree, replacing a weight by a LoRA/DoRA object
(x @ W + s * (x @ A) @ B, never forming W + s * A @ B) or a quantised one (dequantised inside
the layer, in the compute dtype). Because weight objects are pytrees, `lax.scan` slices their
stacked arrays per layer like any other parameter.

In an einsum `eqn` such as "btd,dhk->bthk" the weight's subscripts are its input axes (those
shared with x, here d) followed by its output axes (h, k), which end the result.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_weight_object(x: Any) -> bool:
  return hasattr(x, "project") and hasattr(x, "materialize")


def project(eqn: str, x: jax.Array, w: Any, dtype: Any, **einsum_kwargs) -> jax.Array:
  """`einsum(eqn, x, w)` with w in `dtype`, or the weight object's own projection."""
  if is_weight_object(w):
    return w.project(eqn, x, dtype, **einsum_kwargs)
  return jnp.einsum(eqn, x, w.astype(dtype), **einsum_kwargs)


def materialize(w: Any, dtype: Any = None) -> jax.Array:
  """The effective weight as an array (in `dtype`, default the weight's own)."""
  if is_weight_object(w):
    return w.materialize(dtype or w.dtype)
  return w if dtype is None else w.astype(dtype)


def lookup(w: Any, tokens: jax.Array, dtype: Any) -> jax.Array:
  """Embedding rows of `tokens` from an embedding weight [V, D]."""
  if is_weight_object(w):
    if hasattr(w, "lookup"):
      return w.lookup(tokens, dtype)
    return jnp.take(w.materialize(dtype), tokens, axis=0)
  return jnp.take(w, tokens, axis=0).astype(dtype)


def base_of(w: Any) -> Any:
  """The weight underneath any adapter (e.g. the tied LM head reads the base embedding)."""
  while is_weight_object(w) and hasattr(w, "base"):
    w = w.base
  return w


def cast_tree(tree: Any, dtype: Any) -> Any:
  """Every array of `tree` in `dtype`; weight objects are left to cast themselves."""
  return jax.tree.map(lambda a: a if is_weight_object(a) else a.astype(dtype), tree,
                      is_leaf=is_weight_object)


def materialize_tree(tree: Any, dtype: Any = None) -> Any:
  """`tree` with every weight object replaced by its effective weight (an array)."""
  return jax.tree.map(lambda a: materialize(a, dtype) if is_weight_object(a) else a, tree,
                      is_leaf=is_weight_object)


def split_eqn(eqn: str) -> tuple[str, str, str, str, str]:
  """"btd,dhk->bthk" -> (x subscripts "btd", inputs "d", outputs "hk", kept "bt", out)."""
  lhs, out = eqn.replace(" ", "").split("->")
  xs, ws = lhs.split(",")
  ins = "".join(c for c in ws if c in xs)
  outs = "".join(c for c in ws if c not in xs)
  if ws != ins + outs or not out.endswith(outs):
    raise ValueError(f"weight subscripts of {eqn!r} must be its inputs then its outputs")
  kept = "".join(c for c in xs if c not in ins)
  return xs, ins, outs, kept, out
