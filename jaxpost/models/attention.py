"""Attention: masks (causal, packed segments, sliding window), GQA, soft-capping, KV cache.

Masks are built from *slot indices* (a token's index in the row, or in the cache) and segment
ids, never from RoPE positions: packed rows restart positions per example, left-padded prompts
start them after the padding, and both stay correct. Segment id 0 marks padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost.models.config import ModelConfig

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class KVCache:
  """Keys and values of every layer for `max_len` slots.

  k, v:         [L, B, S, K, Dh]
  segment_ids:  [B, S]  segment of the token in each slot; 0 = empty or padding
  next_pos:     [B]     RoPE position the next real token of each row gets
  index:        []      next slot to write (shared by the batch: rows are left-padded)
  """

  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  next_pos: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      segment_ids=jnp.zeros((batch, max_len), jnp.int32),
      next_pos=jnp.zeros((batch,), jnp.int32),
      index=jnp.zeros((), jnp.int32),
  )


def attention_mask(q_slots_T, k_slots_S, q_seg_BxT, k_seg_BxS, window: int | None):
  """Boolean [B, T, S]: causal by slot, same non-zero segment, within `window` if given."""
  q = q_slots_T[:, None]
  k = k_slots_S[None, :]
  allowed_TxS = k <= q
  if window is not None:
    allowed_TxS = allowed_TxS & (q - k < window)
  same_BxTxS = (q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
  return allowed_TxS[None, :, :] & same_BxTxS


def attend(config: ModelConfig, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxTxS):
  """Scaled dot-product attention with grouped KV heads; logits and softmax in float32."""
  B, T, H, Dh = q_BxTxHxDh.shape
  K, G = config.num_kv_heads, config.q_per_kv
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(B, T, K, G, Dh)
  logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxDh, k_BxSxKxDh,
                                preferred_element_type=jnp.float32) * config.attn_scale
  if config.attn_logit_softcap:
    cap = config.attn_logit_softcap
    logits_BxKxGxTxS = jnp.tanh(logits_BxKxGxTxS / cap) * cap
  mask = mask_BxTxS[:, None, None, :, :]
  logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, _MASKED)
  probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(v_BxSxKxDh.dtype)
  out_BxTxKxGxDh = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDh)
  return out_BxTxKxGxDh.reshape(B, T, H, Dh)
