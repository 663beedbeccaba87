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

Plain-array projections run through `dense`, an einsum with its own backward pass: both
gradients are written as 2-D matmuls in the orientation that makes XLA transpose the narrow
operand (x, width D) for the weight gradient rather than the wide output gradient (width F).
Left to its autodiff rule, XLA:CPU copied every [B*T, F] MLP gradient into transposed layout
inside the elementwise fusion that produced it: 16% of a full SFT step (benchmarks/README.md).
The price: `dense` is a `jax.custom_vjp`, so forward-mode autodiff (`jax.jvp`, `jax.jacfwd`)
through the model is unavailable; reverse-over-reverse (Hessian-vector products via two
`jax.grad`s) works.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


def is_weight_object(x: Any) -> bool:
  return hasattr(x, "project") and hasattr(x, "materialize")


def project(eqn: str, x: jax.Array, w: Any, dtype: Any, **einsum_kwargs) -> jax.Array:
  """`einsum(eqn, x, w)` with w in `dtype`, or the weight object's own projection."""
  if is_weight_object(w):
    return w.project(eqn, x, dtype, **einsum_kwargs)
  if set(einsum_kwargs) - {"preferred_element_type"}:
    return jnp.einsum(eqn, x, w.astype(dtype), **einsum_kwargs)
  return dense(eqn, x, w.astype(dtype), einsum_kwargs.get("preferred_element_type"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def dense(eqn: str, x: jax.Array, w: jax.Array, preferred_element_type: Any = None) -> jax.Array:
  """`einsum(eqn, x, w)` for a projection `eqn` (see `split_eqn`), with a matmul-shaped VJP."""
  return jnp.einsum(eqn, x, w, preferred_element_type=preferred_element_type)


def _dense_fwd(eqn, x, w, preferred_element_type):
  # x and w arrive as CustomVJPPrimal (symbolic_zeros): keep only what the gradients that are
  # needed read (dW reads x, dx reads w), so a frozen weight costs neither a residual nor a
  # dW matmul, not even in the traced program.
  y = dense(eqn, x.value, w.value, preferred_element_type)
  dx_like = jnp.zeros((0,), x.value.dtype) if x.perturbed else None  # dtypes of the gradients
  dw_like = jnp.zeros((0,), w.value.dtype) if w.perturbed else None
  return y, (x.value if w.perturbed else None, w.value if x.perturbed else None, dx_like, dw_like)


def _dense_bwd(eqn, preferred_element_type, residuals, g):
  x, w, dx_like, dw_like = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None
  xs, ins, outs, kept, out = split_eqn(eqn)
  # As 2-D matmuls: x2 [M, K] @ w2 [K, N] = g2 [M, N], M = kept axes, K = ins, N = outs.
  g_kept_outs = g if out == kept + outs else jnp.einsum(f"{out}->{kept}{outs}", g)
  M = math.prod(g_kept_outs.shape[:len(kept)])
  g2 = g_kept_outs.reshape(M, -1)
  acc = preferred_element_type
  dx = dw = None
  if w is not None:  # x is differentiated
    w2 = w.reshape(-1, g2.shape[1])
    dx2 = jax.lax.dot_general(g2, w2, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    kept_ins_shape = g_kept_outs.shape[:len(kept)] + w.shape[:len(ins)]
    dx = dx2.reshape(kept_ins_shape).astype(dx_like.dtype)
    if xs != kept + ins:
      dx = jnp.einsum(f"{kept}{ins}->{xs}", dx)
  if x is not None:  # w is differentiated
    x_kept_ins = x if xs == kept + ins else jnp.einsum(f"{xs}->{kept}{ins}", x)
    x2 = x_kept_ins.reshape(M, -1)
    dw2 = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    dw = dw2.reshape(x_kept_ins.shape[len(kept):] + g_kept_outs.shape[len(kept):])
    dw = dw.astype(dw_like.dtype)
  return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)


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
