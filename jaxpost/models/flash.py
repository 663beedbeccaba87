"""Attention whose memory grows linearly with the sequence: blockwise (flash-style) in JAX,
and cuDNN's fused kernel on GPU.

    out_BxTxHxDh = blockwise_attend(config, q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh,
                                    q_slots_T, k_slots_S, q_seg_BxT, k_seg_BxS, window)

The same function as `attend(config, q, k, v, attention_mask(...))`, never holding a [T, S]
array: queries and keys are cut into blocks of `block_q` x `block_k`; the forward keeps, per
query row, the running maximum m, the running sum l of exp(logit - m) and the running
weighted sum of values (online softmax, Milakov & Gimelshein 2018), and saves only the output
and the log-sum-exp lse = m + log l. The backward (a `jax.custom_vjp`) recomputes each
block's probabilities from lse, as FlashAttention-2 does (Dao 2023, Algorithm 2):

    P = exp(S - lse)      dV += P^T dO      dP = dO V^T      dS = P * (dP - rowsum(dO * O))
    dQ += dS K * scale    dK += dS^T Q * scale      (dS also times 1 - tanh^2 with soft-capping)

Masks are built per block from slot indices, segment ids and branch ids with
`attention_mask` itself, so the semantics are those of dense attention. Key blocks a query
block cannot see (after it: causal; before its window) are skipped, in both passes.

Padding rows (segment 0, and any row whose every key is masked) come out as 0 with zero
gradient; dense attention gives them the uniform average of all values instead. Neither
reaches a real token (padding keys are masked for every query, and losses mask padding), so
real tokens agree with dense attention (to float rounding, ~1e-7 in float32).

Slots must be non-decreasing (they are: `arange`, offset by a prefix), which is what makes
the visible key blocks of a query block one contiguous range.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from jaxpost.models.attention import attention_mask
from jaxpost.models.config import ModelConfig

ATTENTION = ("auto", "dense", "blockwise", "cudnn")
# "auto" turns blockwise at T * S >= this (1024 x 1024). On 2 CPU cores an SFT step (4 layers,
# width 256, 4 x T) took 9.8 s blockwise vs 12-14 s dense at T = 1024 (the dense [T, S]
# float32 logits, 4 MiB a head, no longer fit the caches), 3.4-3.6 vs 3.9-4.5 s at T = 512.
AUTO_BLOCKWISE_MIN = 1024 * 1024
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static part of a blockwise attention call."""
  scale: float
  softcap: float | None
  groups: int  # G query heads per KV head
  windowed: bool
  branched: bool


def choose_attention(attention: str, *, T: int, S: int, cached: bool, wants_probs: bool,
                     config: ModelConfig, dtype, prefixed: bool = False) -> str:
  """Resolves `forward`'s `attention` argument to "dense", "blockwise" or "cudnn".

  "auto": dense below `AUTO_BLOCKWISE_MIN` (T * S) and whenever a KV cache is read (decode
  is T = 1) or the `attn_probs` site is wanted; blockwise above. "cudnn" falls back to
  blockwise (with a one-line warning) where cuDNN's kernel lacks a feature: not on a GPU,
  float32, soft-capping, a prefix or a cache.
  """
  if attention not in ATTENTION:
    raise ValueError(f"attention: unknown {attention!r}; choose one of {', '.join(ATTENTION)}")
  if cached or attention == "dense":
    return "dense"
  if wants_probs:
    if attention != "auto":
      raise ValueError(f"attention={attention!r} does not form the probabilities the "
                       "attn_probs site reads; use attention='dense' (or 'auto')")
    return "dense"
  if attention == "auto":
    return "blockwise" if T * S >= AUTO_BLOCKWISE_MIN else "dense"
  if attention == "cudnn":
    lacking = cudnn_lacks(config, dtype, prefixed=prefixed)
    if lacking:
      warnings.warn(f"attention='cudnn': {lacking}; using the blockwise JAX attention",
                    stacklevel=3)
      return "blockwise"
  return attention


def cudnn_lacks(config: ModelConfig, dtype, *, prefixed: bool = False) -> str | None:
  """Why cuDNN's fused attention cannot run this call (None when it can)."""
  if jax.default_backend() != "gpu":
    return f"no GPU (backend {jax.default_backend()})"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN attention needs bfloat16 or float16, not {jnp.dtype(dtype).name}"
  if config.attn_logit_softcap:
    return "cuDNN attention has no logit soft-capping"
  if prefixed:
    return "queries offset from the keys (prefix tuning)"
  return None


def cudnn_attend(config: ModelConfig, q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, slots_T, seg_BxT,
                 window=None, q_branch_BxT=None, k_branch_BxS=None, *,
                 implementation: str = "cudnn"):
  """Self-attention (no cache, no prefix) through `jax.nn.dot_product_attention`.

  Causality and a static window go to the kernel (`is_causal`, `local_window_size`, so it
  skips masked blocks); segments, branches and a traced window go in a boolean [B, 1, T, T]
  mask (cuDNN turns it into a bias: O(T^2) memory, but one byte or two per entry, not the
  float32 logits). `implementation="xla"` runs the same call on any backend (for tests).
  """
  static_window = window if isinstance(window, int) else None
  mask_BxTxS = attention_mask(slots_T, slots_T, seg_BxT, seg_BxT,
                              None if static_window is not None else window,
                              q_branch_BxT, k_branch_BxS)
  out = jax.nn.dot_product_attention(
      q_BxTxHxDh, k_BxKxSxDh.transpose(0, 2, 1, 3), v_BxKxSxDh.transpose(0, 2, 1, 3),
      mask=mask_BxTxS[:, None], scale=config.attn_scale, is_causal=True,
      local_window_size=(static_window - 1, 0) if static_window is not None else None,
      implementation=implementation)
  return out.astype(q_BxTxHxDh.dtype)


def blockwise_attend(config: ModelConfig, q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, q_slots_T,
                     k_slots_S, q_seg_BxT, k_seg_BxS, window=None, q_branch_BxT=None,
                     k_branch_BxS=None, *, block_q: int = 512, block_k: int = 512):
  """`attend(config, q, k, v, attention_mask(q_slots, k_slots, q_seg, k_seg, window,
  q_branch, k_branch))` in memory linear in T and S (see the module docstring).

  `window` may be None, an int or a traced int scalar (Gemma's sliding and full layers in
  one scan). T and S need not be multiples of the block sizes (the tails are padded with
  masked slots).
  """
  B, T, H, Dh = q_BxTxHxDh.shape
  K, G = config.num_kv_heads, config.q_per_kv
  S = k_BxKxSxDh.shape[2]
  bq, bk = min(block_q, T), min(block_k, S)
  nQ, nK = -(-T // bq), -(-S // bk)
  pq, pk = nQ * bq - T, nK * bk - S

  def pad_slots(s, n):
    return jnp.concatenate([s, s[-1] + 1 + jnp.arange(n, dtype=s.dtype)]) if n else s

  def rows(x, n, blk):  # [B, L] int -> [nblocks, B, blk], padded with 0
    x = jnp.pad(x.astype(jnp.int32), ((0, 0), (0, n)))
    return x.reshape(x.shape[0], -1, blk).transpose(1, 0, 2)

  q = jnp.pad(q_BxTxHxDh, ((0, 0), (0, pq), (0, 0), (0, 0)))
  q = q.reshape(B, nQ, bq, K, G, Dh).transpose(1, 0, 3, 4, 2, 5).reshape(nQ, B, K, G * bq, Dh)
  kv_pad = ((0, 0), (0, 0), (0, pk), (0, 0))
  k = jnp.pad(k_BxKxSxDh, kv_pad).reshape(B, K, nK, bk, Dh).transpose(2, 0, 1, 3, 4)
  v = jnp.pad(v_BxKxSxDh, kv_pad).reshape(B, K, nK, bk, Dh).transpose(2, 0, 1, 3, 4)
  q_slots = pad_slots(q_slots_T.astype(jnp.int32), pq).reshape(nQ, bq)
  k_slots = pad_slots(k_slots_S.astype(jnp.int32), pk).reshape(nK, bk)
  q_seg, k_seg = rows(q_seg_BxT, pq, bq), rows(k_seg_BxS, pk, bk)
  branched = q_branch_BxT is not None
  q_br = rows(q_branch_BxT, pq, bq) if branched else jnp.zeros((nQ, 1, 1), jnp.int32)
  k_br = rows(k_branch_BxS, pk, bk) if branched else jnp.zeros((nK, 1, 1), jnp.int32)
  win = jnp.asarray(window if window is not None else 0, jnp.int32)
  spec = _Spec(scale=config.attn_scale, softcap=config.attn_logit_softcap or None, groups=G,
               windowed=window is not None, branched=branched)
  o = _flash(spec, q, k, v, q_slots, k_slots, q_seg, k_seg, win, q_br, k_br)
  o = o.reshape(nQ, B, K, G, bq, Dh).transpose(1, 0, 4, 2, 3, 5).reshape(B, nQ * bq, H, Dh)
  return o[:, :T]


def _block_mask(spec: _Spec, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br):
  """[B, 1, G * bq, bk] from one query block's and one key block's slots and ids."""
  mask_Bxqxk = attention_mask(q_slots, k_slots, q_seg, k_seg,
                              window if spec.windowed else None,
                              q_br if spec.branched else None, k_br if spec.branched else None)
  B, bq, bk = mask_Bxqxk.shape
  G = spec.groups
  return jnp.broadcast_to(mask_Bxqxk[:, None, None], (B, 1, G, bq, bk)).reshape(B, 1, G * bq, bk)


def _logits(spec: _Spec, q_BxKxQxDh, k_BxKxkxDh):
  """float32 logits after scaling and soft-capping, and tanh(z / cap) (None without it)."""
  s = jnp.einsum("bkqd,bksd->bkqs", q_BxKxQxDh, k_BxKxkxDh,
                 preferred_element_type=jnp.float32) * spec.scale
  if spec.softcap:
    t = jnp.tanh(s / spec.softcap)
    return t * spec.softcap, t
  return s, None


def _ranges(spec: _Spec, q_slots, k_slots, window):
  """For each query block, the key blocks [lo, hi) it can see; for each key block, the query
  blocks [lo, hi) that can see it (slots non-decreasing)."""
  q_min, q_max = q_slots[:, 0], q_slots[:, -1]
  k_min, k_max = k_slots[:, 0], k_slots[:, -1]
  count = functools.partial(jnp.sum, axis=1, dtype=jnp.int32)
  k_hi = count(k_min[None, :] <= q_max[:, None])
  q_lo = count(q_max[None, :] < k_min[:, None])
  if spec.windowed:  # blocks wholly before the window: key k is seen by q when q - k < window
    k_lo = count(k_max[None, :] <= q_min[:, None] - window)
    q_hi = count(q_min[None, :] < k_max[:, None] + window)
  else:
    k_lo = jnp.zeros_like(k_hi)
    q_hi = jnp.full_like(q_lo, q_slots.shape[0])
  return (k_lo, k_hi), (q_lo, q_hi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, q, k, v, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br):
  return _flash_fwd(spec, q, k, v, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br)[0]


def _flash_fwd(spec, q, k, v, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br):
  (k_lo, k_hi), _ = _ranges(spec, q_slots, k_slots, window)
  _, B, K, Q, Dh = q.shape

  def query_block(i):
    q_i = q[i]

    def step(j, carry):
      m, l, acc = carry
      s, _ = _logits(spec, q_i, k[j])
      mask = _block_mask(spec, q_slots[i], k_slots[j], q_seg[i], k_seg[j], window, q_br[i],
                         k_br[j])
      s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v[j],
                      preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    init = (jnp.full((B, K, Q), _NEG, jnp.float32), jnp.zeros((B, K, Q), jnp.float32),
            jnp.zeros((B, K, Q, Dh), jnp.float32))
    m, l, acc = jax.lax.fori_loop(k_lo[i], k_hi[i], step, init)
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return o.astype(q.dtype), lse

  o, lse = jax.lax.map(query_block, jnp.arange(q.shape[0]))
  return o, (q, k, v, o, lse, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br)


def _flash_bwd(spec, res, do):
  q, k, v, o, lse, q_slots, k_slots, q_seg, k_seg, window, q_br, k_br = res
  _, (q_lo, q_hi) = _ranges(spec, q_slots, k_slots, window)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [nQ, B, K, Q]

  def key_block(dq, j):
    k_j, v_j = k[j], v[j]

    def step(i, carry):
      dq, dk, dv = carry
      q_i, do_i = q[i], do[i]
      s, t = _logits(spec, q_i, k_j)
      mask = _block_mask(spec, q_slots[i], k_slots[j], q_seg[i], k_seg[j], window, q_br[i],
                         k_br[j])
      p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
      dv = dv + jnp.einsum("bkqs,bkqd->bksd", p.astype(v.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkqd,bksd->bkqs", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta[i][..., None])
      if t is not None:
        ds = ds * (1.0 - t * t)
      ds = (ds * spec.scale).astype(q.dtype)
      dq_i = jnp.einsum("bkqs,bksd->bkqd", ds, k_j, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
      dk = dk + jnp.einsum("bkqs,bkqd->bksd", ds, q_i, preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(q_lo[j], q_hi[j], step, (dq, zeros, zeros))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32),
                              jnp.arange(k.shape[0]))
  return (dq.astype(q.dtype), dk, dv) + (None,) * 7


_flash.defvjp(_flash_fwd, _flash_bwd)
