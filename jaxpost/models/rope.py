"""Rotary position embeddings (RoPE) with the scalings real checkpoints use.

Convention: Hugging Face's "rotate half" layout, where dimension i is paired with i + Dh/2
(checkpoints on the Hub are stored permuted for it), so no weight permutation is needed.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxpost.models.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale for `rope`.

  default:  inv_freq_i = theta ** (-2i / d)
  linear:   inv_freq_i / factor
  llama3:   long wavelengths (> original_max / low_freq_factor) divided by `factor`, short ones
            (< original_max / high_freq_factor) kept, a smooth blend in between
            (Llama 3.1 report, sec. 3.1; HF `_compute_llama3_parameters`).
  yarn:     per-dimension blend of interpolated and extrapolated frequencies by a linear ramp
            between the correction dims of `beta_fast` and `beta_slow`; cos/sin scaled by
            `attention_factor` (default 0.1 ln(factor) + 1). Peng et al. 2023, arXiv:2309.00071.
  """
  d = head_dim
  exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
  pos_freqs = np.power(np.float32(rope.theta), exponent, dtype=np.float32)
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  scale = 1.0
  if rope.rope_type == "default":
    pass
  elif rope.rope_type == "linear":
    inv_freq = (inv_freq / np.float32(rope.factor)).astype(np.float32)
  elif rope.rope_type == "llama3":
    inv_freq = _llama3(inv_freq, rope)
  elif rope.rope_type == "yarn":
    inv_freq, scale = _yarn(pos_freqs, rope, d)
  else:
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")
  return inv_freq.astype(np.float32), float(scale)


def _llama3(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
  old_len = rope.original_max_position_embeddings
  low_wavelen = old_len / rope.low_freq_factor
  high_wavelen = old_len / rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(pos_freqs: np.ndarray, rope: RopeConfig, d: int) -> tuple[np.ndarray, float]:
  factor = rope.factor
  attention_factor = rope.attention_factor
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

  def correction_dim(rotations):
    return (d * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            ) / (2 * math.log(rope.theta))

  low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
  if rope.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = (1 - ramp).astype(np.float32)
  extrapolated = np.float32(1.0) / pos_freqs
  interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
  return inv_freq.astype(np.float32), attention_factor


def rope_tables(rope: RopeConfig, head_dim: int, positions_BxT: jnp.ndarray):
  """cos and sin tables [B, T, head_dim] (float32) for integer positions."""
  inv_freq, scale = inv_frequencies(rope, head_dim)
  freqs_BxTxH = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb_BxTxDh = jnp.concatenate([freqs_BxTxH, freqs_BxTxH], axis=-1)
  return jnp.cos(emb_BxTxDh) * scale, jnp.sin(emb_BxTxDh) * scale


def apply_rope(x_BxTxNxDh: jnp.ndarray, cos_BxTxDh: jnp.ndarray, sin_BxTxDh: jnp.ndarray):
  """x * cos + rotate_half(x) * sin, computed in float32 and cast back to x's dtype."""
  x = x_BxTxNxDh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_BxTxDh[:, :, None, :], sin_BxTxDh[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_BxTxNxDh.dtype)
