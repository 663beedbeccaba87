"""Losses as pure functions `(params, batch, rng, **frozen) -> (loss, metrics)`.

A loss may report `metrics["weight"]` (e.g. its token count); the update step then averages
micro-batches by that weight, so accumulation equals one big batch.
"""

from jaxpost.losses.sft import sft_loss
from jaxpost.losses.tokens import sequence_logprobs, target_logprobs

__all__ = ["sequence_logprobs", "sft_loss", "target_logprobs"]
