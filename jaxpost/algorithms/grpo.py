"""Online RL, the GRPO family (`algorithm: grpo`, settings in `rl:`): GRPO, Dr. GRPO, DAPO,
GSPO, RLOO and REINFORCE++ are options of one loss and one batch source, not classes.

    rollout (sample G per prompt) -> rewards -> advantages -> update (policy_loss)

The batches come from `jaxpost.rl.rollout.RolloutSource` (it samples with the current policy);
the loss is `grpo_loss`, the policy's per-token log-probs at the sampling temperature fed to
`jaxpost.losses.policy_loss`. The update step is the one every algorithm uses.

| variant      | overrides                                                                   |
|--------------|-----------------------------------------------------------------------------|
| GRPO         | rl.aggregation=grpo (the paper's per-sequence mean; the default is dapo)     |
| Dr. GRPO     | rl.scale_rewards=none rl.aggregation=dr_grpo                                |
| DAPO         | rl.clip_high=0.28 rl.dynamic_sampling=true rl.reward_funcs=answer,overlong   |
| GSPO         | rl.importance_level=sequence rl.clip_low=3e-4 rl.clip_high=4e-4              |
| RLOO         | rl.advantage=rloo                                                           |
| REINFORCE++  | rl.advantage=reinforce_pp                                                   |
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost.algorithms.base import Algorithm
from jaxpost.losses.fused_nll import token_nll
from jaxpost.losses.rl import policy_loss
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import ModelConfig, forward


def grpo_loss(params: dict, batch: dict, rng: jax.Array, *, config: ModelConfig,
              temperature: float = 1.0, tis_cap: float | None = None, on_policy: bool = False,
              compute_dtype=None, remat: bool = False, attention: str = "auto",
              **policy_loss_kwargs):
  """The policy-gradient loss of a rollout mini-batch: `(loss, metrics)`.

  batch: `tokens`, `targets`, `loss_mask`, `segment_ids`, `positions` [N, T] (prompt +
  completion rows); `advantages` [N, T]; `old_logps` [N, T] and `fresh` [N] (1: the policy has
  not moved since sampling, so the old log-probs are the current ones, without gradient, and
  the ratio is exactly 1); optional `ref_logps` [N, T] (beta > 0) and `sampler_logps` [N, T]
  (with `tis_cap`: truncated importance sampling, weight min(exp(old - sampler), tis_cap),
  Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").
  The log-probs are those of softmax(logits / temperature), the distribution sampled from.
  Other keywords go to `jaxpost.losses.policy_loss`.

  `on_policy=True` says every row is fresh and there is no KL term and no importance weight
  (one update per rollout, beta = 0: GRPO's usual setting). The ratio is then exactly 1, so
  the loss's gradient is sum_t g_t grad(log p_t) with weights g = d(policy_loss)/d(logps) that
  do not depend on the parameters: the loss goes through `token_nll`, which takes the LM
  head's gradient in the forward pass (three head matmuls instead of four, nothing
  recomputed). Same value and gradients as the general route (tested).
  """
  del rng
  out = forward(config, params, batch["tokens"], positions=batch["positions"],
                segment_ids=batch["segment_ids"], compute_dtype=compute_dtype, remat=remat,
                attention=attention, compute_logits=False)
  mask = batch["loss_mask"].astype(jnp.float32)
  if on_policy and not config.final_logit_softcap:
    return _on_policy_loss(config, params, out.final_hidden, batch, mask, temperature,
                           policy_loss_kwargs)
  logps = target_logprobs(config, params, out.final_hidden, batch["targets"],
                          temperature=temperature)
  old, weights = old_logps_and_weights(logps, batch, mask, tis_cap)
  loss, metrics = policy_loss(logps, old, batch["advantages"], mask,
                              ref_logps=batch.get("ref_logps"), importance_weights=weights,
                              **policy_loss_kwargs)
  if weights is not None:
    metrics = dict(metrics, **{"tis/weight_mean": jnp.sum(weights) / jnp.maximum(jnp.sum(mask),
                                                                                  1.0)})
  return loss, metrics


def old_logps_and_weights(logps_BxT, batch, mask_BxT, tis_cap):
  """The old policy's log-probs (the current ones without gradient on `fresh` rows, so the
  ratio is exactly 1; else the batch's `old_logps`) and the truncated importance weights
  min(exp(old - sampler), tis_cap) (None without `tis_cap`)."""
  fresh_Bx1 = batch["fresh"][:, None] > 0
  old_BxT = jnp.where(fresh_Bx1, jax.lax.stop_gradient(logps_BxT), batch["old_logps"])
  if tis_cap is None:
    return old_BxT, None
  return old_BxT, jnp.minimum(jnp.exp(old_BxT - batch["sampler_logps"]), tis_cap) * mask_BxT


def _on_policy_loss(config, params, hidden_BxTxD, batch, mask_BxT, temperature, kwargs):
  """`grpo_loss` when the ratio is exactly 1: the value and weights g from `policy_loss` at
  any log-probs (zeros), the gradient from `token_nll` with weights -g (sum_t -g_t * -log p_t
  = sum_t g_t log p_t)."""

  def surrogate(logps_BxT):
    return policy_loss(logps_BxT, jax.lax.stop_gradient(logps_BxT), batch["advantages"],
                       mask_BxT, **kwargs)

  (value, metrics), g_BxT = jax.value_and_grad(surrogate, has_aux=True)(jnp.zeros_like(mask_BxT))
  hidden = hidden_BxTxD if temperature == 1.0 else hidden_BxTxD / temperature  # logits / T
  nll = token_nll(config, params, hidden, batch["targets"], -g_BxT)
  return value + (nll - jax.lax.stop_gradient(nll)), metrics


def make(run) -> Algorithm:
  """The GRPO family for a built run (`jaxpost.train.build`); settings from `rl:`."""
  from jaxpost.rl.prompts import read_prompts  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rewards import load_reward_funcs  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rollout import RolloutSource  # pylint: disable=import-outside-toplevel
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel

  rl, d = run.cfg.rl, run.cfg.data
  on_policy = (rl.num_iterations * rl.mini_batches == 1 and rl.beta == 0 and rl.tis_cap is None)
  loss = functools.partial(
      grpo_loss, config=run.config, temperature=rl.temperature, tis_cap=rl.tis_cap,
      on_policy=on_policy,
      beta=rl.beta, kl=rl.kl, clip_low=rl.clip_low, clip_high=rl.clip_high,
      dual_clip=rl.dual_clip, importance_level=rl.importance_level, aggregation=rl.aggregation,
      max_completion_length=rl.max_new_tokens, **run.model_kwargs)

  def batches(split, policy):
    del policy
    if split != "train":
      return None  # held out, RL is judged by generation (the task's exact match)
    prompts = read_prompts(run.data.path("sft", "train"), run.tokenizer,
                           max_prompt_length=d.max_prompt_length, on_bad_row=d.on_bad_row)
    return RolloutSource(run, prompts, load_reward_funcs(rl, tokenizer=run.tokenizer), log=log)

  return Algorithm(name="grpo", loss=lambda params, batch, rng, frozen: loss(params, batch, rng),
                   batches=batches, headline="reward", needs_reference=rl.beta > 0)
