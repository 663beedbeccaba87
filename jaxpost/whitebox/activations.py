"""Cached activations at the last token of each prompt: what steering vectors and probes read.

    acts_LxNxD = last_token_activations(cfg, params, prompts, site="resid_post")
    acts_LxNxD[l, i]     site's activation at layer l, at the last token of prompts[i]

Prompts (token-id lists of any lengths) are right-padded into rows of `batch_size` x a
power-of-two width (padding has segment id 0, so it is never attended to and, being after the
last token, never changes it under the causal mask): one compiled forward serves every batch of
a width. Only the selected layers' activations are captured, and only the last token's are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig, forward
from jaxpost.models.sites import Capture


def pad_right(prompts: Sequence[Sequence[int]], pad_id: int = 0, *, rows: int | None = None,
              min_width: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [B, W], segment_ids [B, W], lengths [B]): `prompts` right-padded to a power-of-two
  width W >= min_width; `rows` (>= len(prompts)) adds filler rows (one pad token) so a batch
  has a fixed size. Raises ValueError for an empty prompt."""
  if any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  rows = len(prompts) if rows is None else rows
  longest = max((len(p) for p in prompts), default=1)
  width = max(min_width, 1 << (longest - 1).bit_length())
  tokens = np.full((rows, width), pad_id, np.int32)
  segments = np.zeros((rows, width), np.int32)
  segments[:, 0] = 1  # filler rows are one-token prompts, never an all-padding row
  lengths = np.ones((rows,), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = np.asarray(p, np.int32)
    segments[i, :len(p)] = 1
    lengths[i] = len(p)
  return tokens, segments, lengths


def gather_last(acts_LxBxTxD: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """[L, B, D]: each row's activation at its last real token (index length - 1)."""
  index = (jnp.asarray(lengths_B, jnp.int32) - 1)[None, :, None, None]
  return jnp.take_along_axis(acts_LxBxTxD, index, axis=2)[:, :, 0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _last_token_batch(config, site, layers, params, tokens_BxT, segments_BxT, lengths_B):
  out = forward(config, params, tokens_BxT, segment_ids=segments_BxT, compute_logits=False,
                capture=[Capture(site, layers)])
  acts = out.captured[site]
  acts = acts.reshape(acts.shape[:3] + (-1,))  # head sites [L, B, T, H, Dh] -> [L, B, T, H*Dh]
  return gather_last(acts, lengths_B).astype(jnp.float32)


def last_token_activations(config: ModelConfig, params: dict,
                           prompts: Sequence[Sequence[int]], *, site: str = "resid_post",
                           layers: tuple[int, ...] | None = None, batch_size: int = 32,
                           pad_id: int = 0) -> np.ndarray:
  """[L, N, D] float32: `site`'s activation at the last token of each of the N prompts, at
  `layers` (None: every layer; L is their count, in that order). Sites with a head axis are
  flattened to H * Dh features; `attn_probs` is not a per-token vector and is refused."""
  if site == "attn_probs":
    raise ValueError("site attn_probs has no per-token vector; choose e.g. resid_post")
  if not prompts:
    raise ValueError("no prompts to read activations from")
  chunks = []
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start:start + batch_size]
    tokens, segments, lengths = pad_right(batch, pad_id, rows=batch_size)
    acts = _last_token_batch(config, site, layers, params, tokens, segments, lengths)
    chunks.append(np.asarray(acts)[:, :len(batch)])
  return np.concatenate(chunks, axis=1)
