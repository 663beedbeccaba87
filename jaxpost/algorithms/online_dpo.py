"""Online DPO (`algorithm: online_dpo`): the DPO family's loss on pairs the policy samples itself.

Each rollout samples `rl.num_generations` (>= 2) completions of each prompt with the current
policy, scores them with the reward functions (`rl.reward_funcs`: built-ins, a reward model,
or any TRL-signature function, e.g. a judge), and pairs the best (chosen) with the worst
(rejected); prompts whose completions all score the same are ties, skipped and counted
(`ties_fraction`), and more prompts are sampled in their place. The loss is `dpo_loss` with the
`dpo:` section's `loss_type` and `beta` against the reference model (the start model, frozen;
under PEFT the base with adapters off). This is TRL's `OnlineDPOTrainer` (Guo et al. 2024,
"Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792) with a reward
function or reward model as the annotator.
"""

from __future__ import annotations

import functools

from jaxpost.algorithms.base import Algorithm, reference_sync
from jaxpost.losses.dpo import dpo_loss


def make(run) -> Algorithm:
  """Online DPO for a built run (`jaxpost.train.build`); sampling and rewards from `rl:`, the
  loss from `dpo:`, the reference from `reference:`."""
  from jaxpost.rl.prompts import read_prompts  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rewards import load_reward_funcs  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rollout import RolloutSource  # pylint: disable=import-outside-toplevel
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel

  p, d, ref = run.cfg.dpo, run.cfg.data, run.cfg.reference
  loss = functools.partial(dpo_loss, config=run.config, loss_type=p.loss_type, beta=p.beta,
                           label_smoothing=p.label_smoothing, gamma=p.gamma,
                           length_normalize=p.length_normalize, sft_weight=p.sft_weight,
                           **run.model_kwargs)

  def batches(split, policy):
    del policy
    if split != "train":
      return None  # judged by generation: the task's exact match, and the reward
    prompts = read_prompts(run.data.path("sft", "train"), run.tokenizer,
                           max_prompt_length=d.max_prompt_length, on_bad_row=d.on_bad_row)
    return RolloutSource(run, prompts, load_reward_funcs(run.cfg.rl, tokenizer=run.tokenizer),
                         log=log, pairs=True)

  moving = p.needs_reference and ref.sync_every > 0
  return Algorithm(
      name="online_dpo",
      loss=lambda params, batch, rng, frozen: loss(params, batch, rng,
                                                   ref_params=frozen.reference),
      batches=batches, headline="reward", needs_reference=p.needs_reference,
      moving_reference=moving,
      after_step=reference_sync(ref.sync_every, ref.sync_alpha) if moving else None)
