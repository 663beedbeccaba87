"""Losses as pure functions `(params, batch, rng, **frozen) -> (loss, metrics)`.

A loss may report `metrics["weight"]` (e.g. its token count); the update step then averages
micro-batches by that weight, so accumulation equals one big batch. The preference objectives
(`preference_loss`, `kto_loss`) are also public as functions of per-sequence log-probs, for
users composing their own losses.
"""

from jaxpost.losses.dpo import dpo_loss, kto_loss, pair_logps, sequence_scores
from jaxpost.losses.preference import LOSS_TYPES, preference_loss, weighted_mean
from jaxpost.losses.preference import kto_loss as kto_objective
from jaxpost.losses.sft import sft_loss
from jaxpost.losses.tokens import sequence_logprobs, target_logprobs

__all__ = ["LOSS_TYPES", "dpo_loss", "kto_loss", "kto_objective", "pair_logps",
           "preference_loss", "sequence_logprobs", "sequence_scores", "sft_loss",
           "target_logprobs", "weighted_mean"]
