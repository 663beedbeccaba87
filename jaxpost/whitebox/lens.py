"""The logit lens (nostalgebraist 2020): read any layer's residual stream through the final norm
and the LM head, as if the model stopped there.

    out = forward(cfg, params, tokens, capture=["resid_post"])
    logits_LxBxTxV = logit_lens(cfg, params, out.captured["resid_post"])
    # logits_LxBxTxV[-1] equals out.logits

Memory is L x B x T x V floats; pass `positions` (a [B] index per row, e.g. the last prompt
token) to read one token per row instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig, lm_head, rms_norm


def logit_lens(config: ModelConfig, params: dict, resid_LxBxTxD: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
  """Logits [L, B, T, V] (or [L, B, V] with `positions`) of each layer's residual stream."""
  if positions is not None:
    index = jnp.asarray(positions, jnp.int32)[None, :, None, None]
    resid_LxBxTxD = jnp.take_along_axis(resid_LxBxTxD, index, axis=2)
  L, B, T, D = resid_LxBxTxD.shape
  h = rms_norm(config, resid_LxBxTxD.reshape(L * B, T, D),
               params["final_norm"].astype(resid_LxBxTxD.dtype))
  logits = lm_head(config, params, h).reshape(L, B, T, -1)
  return logits[:, :, 0] if positions is not None else logits
