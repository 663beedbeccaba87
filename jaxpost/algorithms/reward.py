"""Bradley-Terry reward models (`jaxpost.reward`): a score head on the decoder, trained on
preference pairs, exported as a Hugging Face `*ForSequenceClassification` model."""

from __future__ import annotations

import functools

from jaxpost.algorithms.base import Algorithm
from jaxpost.algorithms.preference import preference_batches
from jaxpost.reward import reward_loss, reward_param_specs, save_reward_model_hf, with_score_head
from jaxpost.errors import TrainingError


def reward_pad_id(run) -> int:
  """The pad id a SequenceClassification export needs: one that never ends a sequence."""
  tok = run.tokenizer
  if tok.pad_id is not None and tok.pad_id not in tok.eos_ids:
    return tok.pad_id
  raise TrainingError(f"the tokenizer in {run.model_dir} has no pad token distinct from EOS; "
                      "transformers reads a reward at the last non-pad token, so add a pad token "
                      "to the tokenizer before training a reward model")


def make(run) -> Algorithm:
  """A reward model for a built run (`jaxpost.train.build`); settings from `reward:`."""
  r = run.cfg.reward
  loss = functools.partial(reward_loss, config=run.config, margin=r.margin or None,
                           center_coefficient=r.center_coefficient, **run.model_kwargs)

  def export(params, folder):
    save_reward_model_hf(run.config, params, folder, pad_token_id=reward_pad_id(run))

  return Algorithm(
      name="reward",
      loss=lambda params, batch, rng, frozen: loss(params, batch, rng),
      batches=lambda split, policy: preference_batches(run, split, "paired", policy=policy),
      headline="accuracy",
      init=lambda params, rng: with_score_head(run.config, params, rng),
      param_specs=reward_param_specs,
      export=export,
      generates=False)
