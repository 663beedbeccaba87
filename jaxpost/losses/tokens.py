"""Per-token log-probabilities of targets, computed in sequence chunks.

Full float32 logits are [B, T, V]: at vocab 128k and 8 x 4096 tokens that is 16 GiB. Here the LM
head and log-softmax run on `chunk` positions at a time under `jax.checkpoint`, so the forward
keeps only [B, T] results and the backward recomputes one chunk's logits at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig, lm_head


def target_logprobs(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array,
                    targets_BxT: jax.Array, *, chunk: int = 512,
                    temperature: float = 1.0, with_entropy: bool = False):
  """log p(targets[t] | tokens[<= t]) for every position: [B, T] float32.

  `hidden_BxTxD` is `forward(..., compute_logits=False).final_hidden`. Positions whose target
  is meaningless (padding, segment ends) get a value too: mask them in the loss. With
  `temperature`, p is the tempered distribution softmax(logits / temperature): the one an RL
  sampler drew from (TRL and verl score the policy at the sampling temperature, trl#4159).
  `with_entropy` also returns each position's entropy of that distribution, [B, T], without
  gradient (a metric: RL's entropy collapse).
  """
  B, T, D = hidden_BxTxD.shape
  h_NxBxCxD, t_NxBxC = chunked(chunk, hidden_BxTxD, targets_BxT)
  n, chunk = t_NxBxC.shape[0], t_NxBxC.shape[2]

  @jax.checkpoint
  def one(h_BxCxD, t_BxC):
    logits_BxCxV = lm_head(config, params, h_BxCxD)
    if temperature != 1.0:
      logits_BxCxV = logits_BxCxV / temperature
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    picked_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    if not with_entropy:
      return picked_BxC - lse_BxC
    logits_BxCxV = jax.lax.stop_gradient(logits_BxCxV)
    probs_BxCxV = jnp.exp(logits_BxCxV - jax.lax.stop_gradient(lse_BxC)[..., None])
    entropy_BxC = jax.lax.stop_gradient(lse_BxC) - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)
    return picked_BxC - lse_BxC, entropy_BxC

  if n == 1:
    out = jax.tree.map(lambda x: x[None], one(h_NxBxCxD[0], t_NxBxC[0]))
  else:
    out = jax.lax.map(lambda args: one(*args), (h_NxBxCxD, t_NxBxC))
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], out)


def chunked(chunk: int, *arrays_BxT):
  """Each [B, T, ...] array as [N, B, C, ...] chunks of C = min(chunk, T) positions (the last
  chunk zero-padded)."""
  B, T = arrays_BxT[0].shape[:2]
  chunk = min(chunk, T)
  pad = -T % chunk
  n = (T + pad) // chunk

  def split(a):
    if pad:
      a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return a.reshape(B, n, chunk, *a.shape[2:]).swapaxes(0, 1)

  return tuple(split(a) for a in arrays_BxT)


def sequence_logprobs(logp_BxT: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed log-probs and token counts per row over `mask`: ([B], [B])."""
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(logp_BxT * mask, axis=-1), jnp.sum(mask, axis=-1)
