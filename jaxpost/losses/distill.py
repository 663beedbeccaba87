"""Knowledge distillation: divergences between the student's and the teacher's next-token
distributions, per token, and the batch loss that never holds full [B, T, V] logits.

    loss = distill_loss(student_logits, teacher_logits, mask, kind="jsd", beta=0.5)
    loss, metrics = distill_batch_loss(params, batch, rng, frozen, config=student_config,
                                       teacher_config=teacher_config, kind="forward_kl")
    loss, metrics = distill_topk_batch_loss(params, batch_with_teacher_topk, rng,
                                            config=student_config, kind="forward_kl")

`kind` (with p_T, p_S the tempered teacher and student distributions, softmax(logits / tau)):

    forward_kl   KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   (Hinton et al. 2015; mode covering)
    reverse_kl   KL(p_S || p_T)                                    (MiniLLM; mode seeking)
    jsd          beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S
                 (the generalized Jensen-Shannon divergence of GKD, Agarwal et al. 2024,
                 arXiv 2306.13649, eq. 1; beta = 0 and beta = 1 are taken as forward and
                 reverse KL, as TRL's `GKDTrainer.generalized_jsd_loss` defines them)

The loss is the token mean over the mask of the per-token divergence summed over the
vocabulary: TRL's "batchmean" over the labelled tokens.

Top-K support (`distill.cache_top_k`, an offline teacher cache). The teacher's distribution is
kept only as its K most likely ids with their log-probs, plus the log of the mass of all other
ids (`topk_support`). Both distributions are then read on K + 1 categories, the K teacher ids
and one "rest" bucket, and `topk_divergence` is the divergence `kind` between those two
coarsened distributions:

    p_T = (p_T(v_1), ..., p_T(v_K), 1 - sum_k p_T(v_k))     v_1..v_K the teacher's top K
    p_S = (p_S(v_1), ..., p_S(v_K), 1 - sum_k p_S(v_k))

The rest buckets are log-sums over the other ids (not 1 minus a sum, which cancels), so a tail
far below float32's epsilon keeps its size. Both are proper distributions, so the value is a
true divergence: >= 0, 0 when the student equals the teacher. It is exact when K = V (the
rest is empty) and, by the data-processing inequality, never above the full-vocabulary
divergence: what is lost is the shape of the tail. The student is pushed to put the right
total mass outside the top K, not to spread it as the teacher does (Hinton et al.'s "dark
knowledge" below the top K).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpost.losses.fused_nll import token_nll
from jaxpost.losses.tokens import chunked
from jaxpost.models import ModelConfig, forward, lm_head

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probabilities; 0 where p is 0."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def token_divergence(student_logp: jax.Array, teacher_logp: jax.Array, *, kind: str = "jsd",
                     beta: float = 0.5) -> jax.Array:
  """The divergence `kind` (module docstring) between two distributions given as
  log-probabilities over the last axis: [..., V] -> [...]."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta}")
  if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
    return _kl(teacher_logp, student_logp)
  if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
    return _kl(student_logp, teacher_logp)
  mixture = jnp.logaddexp(student_logp + math.log(1.0 - beta), teacher_logp + math.log(beta))
  return beta * _kl(teacher_logp, mixture) + (1.0 - beta) * _kl(student_logp, mixture)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                 kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0) -> jax.Array:
  """The token mean over `mask` [B, T] of `token_divergence` between softmax(student_logits
  / temperature) and softmax(teacher_logits / temperature), logits [B, T, V]. Equals TRL's
  `GKDTrainer.generalized_jsd_loss(..., reduction="batchmean")` with labels masked where
  `mask` is 0. (Training uses `distill_batch_loss`, which chunks the vocabulary work.)"""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  d = token_divergence(s, t, kind=kind, beta=beta)
  m = mask.astype(jnp.float32)
  return jnp.sum(d * m) / jnp.maximum(jnp.sum(m), 1.0)


def chunked_divergence(config: ModelConfig, params, hidden_BxTxD: jax.Array,
                       teacher_config: ModelConfig, teacher_params, teacher_hidden_BxTxD,
                       mask_BxT: jax.Array, *, kind: str, beta: float, temperature: float,
                       chunk: int = 256) -> jax.Array:
  """The summed divergence over the masked positions, computing both models' logits `chunk`
  positions at a time under `jax.checkpoint`: memory is [B, chunk, V] per model, never
  [B, T, V] (the backward recomputes one chunk's logits at a time). The teacher gets no
  gradient."""
  h_s, h_t, m = chunked(chunk, hidden_BxTxD, teacher_hidden_BxTxD,
                        mask_BxT.astype(jnp.float32))

  @jax.checkpoint
  def one(total, xs):
    hs, ht, mk = xs
    ls = lm_head(config, params, hs).astype(jnp.float32) / temperature
    lt = lm_head(teacher_config, teacher_params, ht).astype(jnp.float32) / temperature
    d = token_divergence(jax.nn.log_softmax(ls, -1),
                         jax.lax.stop_gradient(jax.nn.log_softmax(lt, -1)), kind=kind, beta=beta)
    return total + jnp.sum(d * mk), None

  total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (h_s, h_t, m))
  return total


def distill_batch_loss(params, batch: dict, rng: jax.Array, teacher_params, *,
                       config: ModelConfig, teacher_config: ModelConfig, kind: str = "jsd",
                       beta: float = 0.5, temperature: float = 1.0, sft_weight: float = 0.0,
                       chunk: int = 256, compute_dtype=None, remat: bool = False,
                       attention: str = "auto"):
  """Distillation on a batch of rows (`tokens`, `targets`, `loss_mask`, `segment_ids`,
  `positions` [B, T]; packed or not): `(loss, metrics)` with

      loss = divergence (token mean over loss_mask) + sft_weight * cross-entropy (token mean)

  The teacher runs in the same step on the same rows without gradient; it may be another
  size or family (`teacher_config`) with the same vocabulary. `metrics["weight"]` is the
  token count (exact accumulation over micro-batches)."""
  del rng
  rows = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
              compute_dtype=compute_dtype, compute_logits=False)
  hidden = forward(config, params, batch["tokens"], remat=remat, attention=attention,
                   **rows).final_hidden
  teacher = jax.lax.stop_gradient(teacher_params)
  t_hidden = jax.lax.stop_gradient(forward(teacher_config, teacher, batch["tokens"],
                                           **rows).final_hidden)
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  div = chunked_divergence(config, params, hidden, teacher_config, teacher, t_hidden, mask,
                           kind=kind, beta=beta, temperature=temperature, chunk=chunk) / tokens
  return _with_sft(div, config, params, hidden, batch["targets"], mask, sft_weight)


def _with_sft(div, config, params, hidden, targets, mask, sft_weight):
  """(div + sft_weight * cross-entropy, metrics): the batch losses' shared ending; `mask` is
  float [B, T] and `div` already a token mean."""
  tokens = jnp.maximum(jnp.sum(mask), 1.0)
  loss, metrics = div, {"divergence": jax.lax.stop_gradient(div), "weight": jnp.sum(mask)}
  if sft_weight:
    nll = token_nll(config, params, hidden, targets, mask) / tokens
    loss = loss + sft_weight * nll
    metrics["nll"] = jax.lax.stop_gradient(nll)
  return loss, metrics


def topk_support(logp: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A distribution given as log-probs [..., V] read on the K + 1 categories of `ids`
  [..., K] (distinct ids) and the rest: (log-probs at `ids` [..., K], log of the mass outside
  them [...]). The rest is a log-sum-exp over the other ids (-inf when K = V)."""
  picked = jnp.take_along_axis(logp, ids, axis=-1)
  V, K = logp.shape[-1], ids.shape[-1]
  if K >= V:
    return picked, jnp.full(logp.shape[:-1], -jnp.inf, logp.dtype)
  ids_NxK = ids.reshape(-1, K)
  n = ids_NxK.shape[0]
  hit = jnp.zeros((n, V), jnp.bool_).at[jnp.arange(n)[:, None], ids_NxK].set(True)
  rest = jax.nn.logsumexp(jnp.where(hit.reshape(logp.shape), -jnp.inf, logp), axis=-1)
  return picked, rest


def topk_divergence(student_logp: jax.Array, student_rest: jax.Array,
                    teacher_logp: jax.Array, teacher_rest: jax.Array, *, kind: str = "jsd",
                    beta: float = 0.5) -> jax.Array:
  """`token_divergence` over the K + 1 categories of the teacher's top K and the rest bucket
  (module docstring): log-probs at the teacher's ids [..., K] and the rests' log-masses [...]
  of each side -> [...]."""
  s = jnp.concatenate([student_logp, student_rest[..., None]], axis=-1)
  t = jnp.concatenate([teacher_logp, teacher_rest[..., None]], axis=-1)
  return token_divergence(s, t, kind=kind, beta=beta)


def distill_topk_batch_loss(params, batch: dict, rng: jax.Array, *, config: ModelConfig,
                            kind: str = "jsd", beta: float = 0.5, temperature: float = 1.0,
                            sft_weight: float = 0.0, chunk: int = 256, compute_dtype=None,
                            remat: bool = False, attention: str = "auto"):
  """`distill_batch_loss` against a cached teacher: the rows (`tokens`, `targets`,
  `loss_mask`, `segment_ids`, `positions` [B, T]) carry the teacher's top K at every position,
  `teacher_ids` [B, T, K] int32, `teacher_logp` [B, T, K] and `teacher_rest` [B, T] float32
  (log-probs at `temperature`, `topk_support`), so no teacher runs. `(loss, metrics)` with

      loss = topk_divergence (token mean over loss_mask) + sft_weight * cross-entropy

  The student's LM head runs `chunk` positions at a time under `jax.checkpoint` ([B, chunk,
  V] float32 at most). Positions outside `loss_mask` are not counted (their teacher entries
  must be finite or a real position's). `metrics["weight"]` is the token count."""
  del rng
  hidden = forward(config, params, batch["tokens"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], compute_dtype=compute_dtype,
                   compute_logits=False, remat=remat, attention=attention).final_hidden
  mask = batch["loss_mask"].astype(jnp.float32)
  teacher = jax.lax.stop_gradient((batch["teacher_ids"], batch["teacher_logp"],
                                   batch["teacher_rest"]))
  h, ids, t_logp, t_rest, m = chunked(chunk, hidden, *teacher, mask)

  @jax.checkpoint
  def one(total, xs):
    h_BxCxD, ids_BxCxK, t_logp_BxCxK, t_rest_BxC, m_BxC = xs
    logits = lm_head(config, params, h_BxCxD).astype(jnp.float32) / temperature
    s_logp, s_rest = topk_support(jax.nn.log_softmax(logits, -1), ids_BxCxK)
    d = topk_divergence(s_logp, s_rest, t_logp_BxCxK, t_rest_BxC, kind=kind, beta=beta)
    # where, not a product: a padded chunk's zeros are no distribution (at K = V their
    # divergence is infinite) and must not reach the sum
    return total + jnp.sum(jnp.where(m_BxC > 0, d, 0.0)), None

  total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (h, ids, t_logp, t_rest, m))
  div = total / jnp.maximum(jnp.sum(mask), 1.0)
  return _with_sft(div, config, params, hidden, batch["targets"], mask, sft_weight)
