"""QLoRA base-weight quantisation: block-wise NF4 or int8 codes for the frozen base.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) trains LoRA adapters over a base whose weights
are stored in 4 bits and dequantised on the fly. This module does the storage side, as in
bitsandbytes, as pure functions over pytrees:

  * Each per-layer weight W is flattened and cut into blocks of `block_size` (64) consecutive
    values. A block b keeps its absmax a_b = max |W_b| and one code per value:

        nf4:  c_i = argmin_k |W_i / a_b - NF4[k]|    (4 bits, two codes per uint8)
        int8: c_i = round(127 W_i / a_b)             (int8 in [-127, 127])

    and dequantises as W_i ~ NF4[c_i] a_b (nf4) or c_i a_b / 127 (int8). NF4 is the 16-value
    NormalFloat table of bitsandbytes: quantiles of N(0, 1) rescaled to [-1, 1] with an exact 0.
  * Double quantisation (on by default) stores the absmax scales themselves in 8 bits: with
    m = mean_b a_b (one float32 offset per tensor), the centred scales a_b - m are cut into
    blocks of `scale_block_size` (256, the last one zero-padded) and each block j is stored as
    symmetric linear int8 codes e_b = round((a_b - m) / s_j) with one float32 step
    s_j = max_{b in j} |a_b - m| / 127, so a_b ~ e_b s_j + m. bitsandbytes quantises the
    centred scales with its dynamic (non-linear) 8-bit map instead; the linear map used here
    costs the same 8 bits and adds an error far below the NF4 error of the weights.

Storage per parameter: NF4 + double quantisation is 4 + 8/64 + 32/(64 * 256) ~ 4.127 bits
(3.9x smaller than bf16); without double quantisation 4 + 32/64 = 4.5 bits; int8 is 8.127 or
8.5 bits.

    q = quantize(w_LxDxF, "nf4", leading=1)        # one quantisation per layer
    w_LxDxF = dequantize(q, jnp.bfloat16)
    y_BxTxF = qeinsum("btd,df->btf", x_BxTxD, q_layer)  # inside the layer scan

    qparams = quantize_params(params)               # layers/attn/{q,k,v,o}, layers/mlp/*
    params = dequantize_params(qparams, jnp.float32)

Use under autodiff: a frozen weight used in `x @ W` is needed again by the backward pass (to
form dL/dx), so JAX saves the dequantised W as a residual of the forward pass. Under a
`lax.scan` over layers that stacks the full-precision base of every layer in memory during
training, which is exactly what QLoRA avoids. `jax.checkpoint` around `dequantize` alone does
not prevent it (its inputs are not differentiated, so its output is an ordinary primal value
that the consumer's backward saves); the consumer must sit inside the checkpoint. `qeinsum`
does that: it runs the dequantisation and the einsum under one `jax.checkpoint`, so the
backward keeps only the codes (already in memory) and recomputes W, one layer at a time. A
forward whose whole layer body is checkpointed (`forward(..., remat=True)`) gets the same
effect with plain `dequantize`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.weights import project

Kind = Literal["nf4", "int8"]

# bitsandbytes' NF4 code book (functional.py, get_4bit_type("nf4")).
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236816, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2
_INT8_MAX = 127.0

# target -> group under params["layers"]
TARGETS = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
           "gate": "mlp", "up": "mlp", "down": "mlp"}


@flax.struct.dataclass
class QuantizedWeight:
  """A block-quantised weight of per-layer shape `shape`, with any number of leading axes.

  Every array field has the same leading axes `[...]` (e.g. the stacked layer axis L), so
  slicing every leaf along axis 0 (as `lax.scan` does) leaves a valid node for one slice. With
  n = prod(shape) and nb = n / block_size:

  Attributes:
    codes: `[..., n / 2]` uint8 (nf4, first code in the high nibble) or `[..., n]` int8.
    scale_codes: `[..., nb]` int8 codes of the centred block absmax (double quantisation), or
      the float32 absmax itself.
    scale_scales: `[..., ceil(nb / scale_block_size)]` float32 steps of the scale codes
      (`[..., 0]` without double quantisation).
    offset: `[...]` float32 mean absmax added back to the scales (`[..., 0]` without double
      quantisation).
    shape: per-layer weight shape.
    kind: "nf4" or "int8".
    block_size: values per absmax block.
    scale_block_size: absmax scales per double-quantisation block.
    double_quant: whether the scales are double-quantised.
  """

  codes: jax.Array
  scale_codes: jax.Array
  scale_scales: jax.Array
  offset: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False)
  block_size: int = flax.struct.field(pytree_node=False, default=64)
  scale_block_size: int = flax.struct.field(pytree_node=False, default=256)
  double_quant: bool = flax.struct.field(pytree_node=False, default=True)
  stored_dtype: str = flax.struct.field(pytree_node=False, default="float32")

  # A weight object for `jaxpost.models.weights`: the forward pass projects through it.
  @property
  def dtype(self):
    """The dtype of the weight this stands for (what `materialize` gives by default)."""
    return jnp.dtype(self.stored_dtype)

  def project(self, eqn: str, x: jax.Array, dtype, **einsum_kwargs) -> jax.Array:
    return qeinsum(eqn, x, self, dtype=dtype, **einsum_kwargs)

  def materialize(self, dtype) -> jax.Array:
    return dequantize(self, dtype)

  @property
  def leading_shape(self) -> tuple[int, ...]:
    """The leading axes in front of `shape` (inferred from `codes`)."""
    return tuple(self.codes.shape[:-1])

  @property
  def size(self) -> int:
    """Number of weights represented (leading axes included)."""
    return math.prod(self.leading_shape) * math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Total bytes of the stored arrays."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))

  @property
  def bits_per_param(self) -> float:
    """Storage bits per represented weight, scales and offsets included."""
    return 8 * self.nbytes / self.size


def is_quantized(x) -> bool:
  """Whether `x` is a `QuantizedWeight` (use as `is_leaf` in tree maps)."""
  return isinstance(x, QuantizedWeight)


def quantize(w: jax.Array, kind: Kind = "nf4", *, leading: int = 0, double_quant: bool = True,
             block_size: int = 64, scale_block_size: int = 256) -> QuantizedWeight:
  """Block-wise quantisation of `w` (see the module docstring for the maths).

  Args:
    w: `[*lead, *shape]` weights, any float dtype; quantisation works in float32.
    kind: "nf4" (4-bit NormalFloat) or "int8" (symmetric absmax).
    leading: number of leading axes quantised separately (1 for the stacked layer axis).
    double_quant: store the per-block absmax in 8 bits (plus a per-tensor float32 offset and
      a float32 step per `scale_block_size` scales) instead of float32.
    block_size: consecutive values sharing one absmax; must divide prod(shape).
    scale_block_size: absmax scales sharing one step under double quantisation.

  Returns:
    The `QuantizedWeight` with leading axes `w.shape[:leading]` and `shape=w.shape[leading:]`.

  Raises:
    ValueError: unknown kind, leading out of range, or prod(shape) not a multiple of
      `block_size` (even for nf4).
  """
  if kind not in ("nf4", "int8"):
    raise ValueError(f"unknown quantisation kind {kind!r}; choose 'nf4' or 'int8'")
  if not 0 <= leading <= w.ndim:
    raise ValueError(f"leading={leading} out of range for a weight of shape {w.shape}")
  if kind == "nf4" and block_size % 2:
    raise ValueError(f"nf4 packs two codes per byte: block_size must be even, got {block_size}")
  lead, shape = tuple(w.shape[:leading]), tuple(w.shape[leading:])
  n = math.prod(shape)
  if n == 0 or n % block_size:
    raise ValueError(f"cannot quantise a weight of per-layer shape {shape} (size {n}) in "
                     f"blocks of {block_size}: the size must be a positive multiple of it")
  w_NxS = jnp.reshape(w, (math.prod(lead), n))
  codes, scale_codes, scale_scales, offset = _quantize_rows(
      w_NxS, kind, double_quant, block_size, scale_block_size)
  unflat = lambda a: a.reshape(*lead, *a.shape[1:])  # noqa: E731
  return QuantizedWeight(codes=unflat(codes), scale_codes=unflat(scale_codes),
                         scale_scales=unflat(scale_scales), offset=unflat(offset), shape=shape,
                         kind=kind, block_size=block_size, scale_block_size=scale_block_size,
                         double_quant=double_quant, stored_dtype=jnp.dtype(w.dtype).name)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_rows(w_NxS, kind, double_quant, block_size, scale_block_size):
  """Quantises each row of `w_NxS` separately; returns the four array fields."""
  N, S = w_NxS.shape
  w_NxBxK = w_NxS.astype(jnp.float32).reshape(N, S // block_size, block_size)
  absmax_NxB = jnp.max(jnp.abs(w_NxBxK), axis=-1)
  safe_NxBx1 = jnp.where(absmax_NxB == 0, 1.0, absmax_NxB)[..., None]
  x_NxBxK = w_NxBxK / safe_NxBx1  # in [-1, 1]
  if kind == "nf4":
    # Nearest code: the number of midpoints below x (a value on a midpoint takes the lower code).
    idx_NxS = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), x_NxBxK.reshape(N, S)).astype(
        jnp.uint8)
    pairs_NxPx2 = idx_NxS.reshape(N, S // 2, 2)
    codes = (pairs_NxPx2[..., 0] << 4) | pairs_NxPx2[..., 1]
  else:
    codes = jnp.round(x_NxBxK * _INT8_MAX).astype(jnp.int8).reshape(N, S)
  if not double_quant:
    empty = jnp.zeros((N, 0), jnp.float32)
    return codes, absmax_NxB, empty, empty
  offset_N = jnp.mean(absmax_NxB, axis=-1)
  nb = absmax_NxB.shape[1]
  nsb = -(-nb // scale_block_size)
  centred_NxB = absmax_NxB - offset_N[:, None]
  centred_NxJxC = jnp.pad(centred_NxB, ((0, 0), (0, nsb * scale_block_size - nb))).reshape(
      N, nsb, scale_block_size)
  step_NxJ = jnp.max(jnp.abs(centred_NxJxC), axis=-1) / _INT8_MAX
  safe_NxJx1 = jnp.where(step_NxJ == 0, 1.0, step_NxJ)[..., None]
  scale_codes = jnp.round(centred_NxJxC / safe_NxJx1).astype(jnp.int8).reshape(N, -1)[:, :nb]
  return codes, scale_codes, step_NxJ, offset_N


def _absmax(q: QuantizedWeight) -> jax.Array:
  """The float32 per-block absmax `[..., nb]` (decoding the double quantisation)."""
  if not q.double_quant:
    return q.scale_codes
  *lead, nb = q.scale_codes.shape
  nsb = q.scale_scales.shape[-1]
  pad = [(0, 0)] * len(lead) + [(0, nsb * q.scale_block_size - nb)]
  codes_JxC = jnp.pad(q.scale_codes, pad).reshape(*lead, nsb, q.scale_block_size)
  centred = (codes_JxC.astype(jnp.float32) * q.scale_scales[..., None]).reshape(*lead, -1)
  return centred[..., :nb] + q.offset[..., None]


@functools.partial(jax.jit, static_argnums=1)
def dequantize(q: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """The weight `[..., *q.shape]` in `dtype`, for any number of leading axes.

  The full-size work is one table lookup (nf4: `jnp.take` on the 16-entry table) or cast
  (int8) and one multiply by the block scale, both in `dtype`; only the small per-block
  scales are decoded in float32. Under autodiff use `qeinsum` (see the module docstring).
  """
  dtype = jnp.dtype(dtype)
  lead = q.leading_shape
  nb = math.prod(q.shape) // q.block_size
  absmax = _absmax(q)  # [..., nb] float32
  if q.kind == "nf4":
    idx = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-1)  # [..., n / 2, 2]
    values = jnp.take(jnp.asarray(NF4_TABLE, dtype), idx.reshape(*lead, nb, q.block_size),
                      mode="clip")  # 4-bit codes are always in [0, 16): no fill mask
    scale = absmax.astype(dtype)
  elif q.kind == "int8":
    values = q.codes.reshape(*lead, nb, q.block_size).astype(dtype)
    scale = (absmax / _INT8_MAX).astype(dtype)
  else:
    raise ValueError(f"unknown quantisation kind {q.kind!r}")
  return (values * scale[..., None]).reshape(*lead, *q.shape)


def qeinsum(subscripts: str, x: jax.Array, w: jax.Array | QuantizedWeight, *,
            dtype=None, **einsum_kwargs) -> jax.Array:
  """`jnp.einsum(subscripts, x, w)` where `w` may be a `QuantizedWeight`.

  A quantised `w` is dequantised to `dtype` (default `x.dtype`) inside one `jax.checkpoint`
  with the einsum, so under autodiff the backward recomputes it from the codes instead of
  keeping a full-precision copy as a residual. Plain arrays go straight to `jnp.einsum`.
  """
  if not is_quantized(w):
    return jnp.einsum(subscripts, x, w, **einsum_kwargs)
  dtype = x.dtype if dtype is None else jnp.dtype(dtype)

  @jax.checkpoint
  def apply(x, q):
    return project(subscripts, x, dequantize(q, dtype), dtype, **einsum_kwargs)

  return apply(x, w)


def quantize_params(params: dict, targets: tuple[str, ...] = tuple(TARGETS),
                    kind: Kind = "nf4", double_quant: bool = True) -> dict:
  """jaxpost parameters with the `targets` weights replaced by `QuantizedWeight` nodes.

  Targets are `layers/attn/{q,k,v,o}` and `layers/mlp/{gate,up,down}`, stacked over layers,
  so each is quantised per layer (`leading=1`). Everything else (embeddings, norms, biases,
  the LM head) is kept as it is. The input tree is not modified.
  """
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ValueError(f"unknown quantisation target {unknown[0]!r}; choose from "
                     f"{', '.join(TARGETS)}")
  out = jax.tree.map(lambda x: x, params, is_leaf=is_quantized)  # new dicts, shared arrays
  for name in targets:
    group = out["layers"][TARGETS[name]]
    if name not in group:
      raise ValueError(f"no weight layers/{TARGETS[name]}/{name} to quantise")
    if not is_quantized(group[name]):
      group[name] = quantize(group[name], kind, leading=1, double_quant=double_quant)
  return out


def dequantize_params(tree: dict, dtype=jnp.float32) -> dict:
  """The inverse of `quantize_params` (up to quantisation error): every `QuantizedWeight`
  becomes a plain `dtype` array of its stacked shape; other leaves are unchanged."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)
