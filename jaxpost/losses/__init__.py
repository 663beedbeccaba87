"""Losses as pure functions `(params, batch, rng, **frozen) -> (loss, metrics)`.

A loss may report `metrics["weight"]` (e.g. its token count); the update step then averages
micro-batches by that weight, so accumulation equals one big batch. The preference objectives
(`preference_loss`, `kto_loss`) are also public as functions of per-sequence log-probs, for
users composing their own losses. The RL pieces (`jaxpost.losses.rl`) are functions of per-token
log-probs: advantage estimators, `kl_penalty`, `policy_loss` and `value_loss`.
"""

from jaxpost.losses.distill import (chunked_divergence, distill_batch_loss, distill_loss,
                                    distill_topk_batch_loss, token_divergence, topk_divergence,
                                    topk_support)
from jaxpost.losses.dpo import dpo_loss, kto_loss, pair_logps, sequence_scores
from jaxpost.losses.preference import LOSS_TYPES, preference_loss, weighted_mean
from jaxpost.losses.preference import kto_loss as kto_objective
from jaxpost.losses.rl import (
  AGGREGATIONS,
  KL_KINDS,
  gae,
  group_advantages,
  kl_penalty,
  masked_whiten,
  policy_loss,
  reinforce_pp_advantages,
  rloo_advantages,
  value_loss,
)
from jaxpost.losses.sft import sft_loss
from jaxpost.losses.tokens import sequence_logprobs, target_logprobs

__all__ = ["AGGREGATIONS", "KL_KINDS", "LOSS_TYPES", "chunked_divergence", "distill_batch_loss",
           "distill_loss", "distill_topk_batch_loss", "dpo_loss", "token_divergence",
           "topk_divergence", "topk_support", "gae", "group_advantages",
           "kl_penalty", "kto_loss", "kto_objective", "masked_whiten", "pair_logps",
           "policy_loss", "preference_loss", "reinforce_pp_advantages", "rloo_advantages",
           "sequence_logprobs", "sequence_scores", "sft_loss", "target_logprobs", "value_loss",
           "weighted_mean"]
