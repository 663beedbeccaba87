"""Supervised fine-tuning: token-level cross-entropy on the masked (completion) tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.fused_nll import token_nll
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import ModelConfig, forward


def sft_loss(params: dict, batch: dict, rng: jax.Array, *, config: ModelConfig,
             compute_dtype=None, remat: bool = False, attention: str = "auto", chunk: int = 512,
             fused: bool = True):
  """Mean negative log-likelihood of `batch["targets"]` over `batch["loss_mask"]`.

      loss = - sum_t mask_t log p(target_t | tokens_<=t) / sum_t mask_t

  Batch: tokens, targets, loss_mask, segment_ids, positions, each [B, T] (see jaxpost.data).
  Returns (loss, metrics) with metrics["weight"] = the masked-token count, which the update
  step uses to normalise by the token count of *all* micro-batches together.

  `fused` (default) takes the LM head's gradient in the forward pass (`token_nll`: three
  head matmuls instead of four); False differentiates `target_logprobs` as written.
  """
  del rng
  out = forward(config, params, batch["tokens"], positions=batch["positions"],
                segment_ids=batch["segment_ids"], compute_dtype=compute_dtype, remat=remat,
                attention=attention, compute_logits=False)
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  n = jnp.sum(mask_BxT)
  if fused:
    nll = token_nll(config, params, out.final_hidden, batch["targets"], mask_BxT, chunk=chunk)
  else:
    logp_BxT = target_logprobs(config, params, out.final_hidden, batch["targets"], chunk=chunk)
    nll = -jnp.sum(logp_BxT * mask_BxT)
  loss = nll / jnp.maximum(n, 1.0)
  return loss, {"weight": n}
