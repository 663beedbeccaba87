"""PPO with a critic (`algorithm: ppo`, settings in `rl:`): the RLHF recipe of Ziegler et al.
2019 ("Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593) and Ouyang et al.
2022 (InstructGPT), as TRL's `PPOTrainer` and verl's PPO with GAE; full fine-tuning.

    rollout: sample -> score -> old log-probs, reference log-probs, old values (no grad)
             r_t = -kl_coef * (logp_old_t - logp_ref_t)  (+ the score at the last token)
             A, R = gae(r, V_old, gamma, lam); A whitened over the rollout batch
    update:  policy_loss(clipped surrogate, token mean) + vf_coef * value_loss(V, V_old, R)

The critic lives inside the trained tree, beside the policy:

    params = {**policy, "critic": {**trunk, "value": w_D}}     # trunk: the decoder, no lm_head
    V(prefix up to t) = w . h_critic(tokens[<= t])[t]          # h after the final norm

so the one update step trains both with one optimizer: the loss is a sum of the two terms,
whose gradients reach only their own part of the tree, and the optimizer state, checkpoints and
exact resume of the critic come for free. The critic starts as a copy of the policy's trunk
with a new value head (`rl.critic_from: policy`) or as a reward model (`rl.critic_from: PATH`,
a `*ForSequenceClassification` folder or an `algorithm: reward` run; its score head becomes the
value head, as TRL initialises the value model from the reward model). The export is the
policy alone, a Hugging Face causal LM.

Values are aligned with the targets: the value at position t is that of the state before
`targets[t]` is generated, the same position as its log-prob. The clipped surrogate is PPO's
(Schulman et al. 2017, arXiv 1707.06347, eq. 7), the value loss its clipped squared error, the
advantages GAE (Schulman et al. 2016, arXiv 1506.02438); conventions as verl's
(`jaxpost.losses.rl`). `rl.value_warmup_steps` trains only the critic at first (the policy
term multiplied by the batch's `policy_on`, 0 during the warm-up).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost.algorithms.base import Algorithm
from jaxpost.algorithms.grpo import old_logps_and_weights
from jaxpost.losses.fused_nll import token_nll
from jaxpost.losses.rl import policy_loss, value_loss
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import ModelConfig, forward, param_specs, save_hf
from jaxpost.models.hf_reward import SCORE, score_spec

CRITIC = "critic"
VALUE = "value"


def policy_of(params: dict) -> dict:
  """The policy's params: the tree without its critic."""
  return {k: v for k, v in params.items() if k != CRITIC}


def critic_values(config: ModelConfig, critic: dict, tokens_BxT: jax.Array, *,
                  positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  compute_dtype=None, remat: bool = False, attention: str = "auto") -> jax.Array:
  """V [B, T] float32: the value head on the critic's final hidden state at every position.

  `critic` is the decoder's params without the LM head plus "value" [D]; position t's value is
  V(tokens[<= t]), the state before the target tokens[t + 1] is generated."""
  out = forward(config, critic, tokens_BxT, positions=positions, segment_ids=segment_ids,
                compute_dtype=compute_dtype, remat=remat, attention=attention, compute_logits=False)
  return jnp.einsum("btd,d->bt", out.final_hidden.astype(jnp.float32),
                    critic[VALUE].astype(jnp.float32))


def ppo_param_specs(config: ModelConfig) -> dict:
  """The policy's `param_specs` plus the critic's: the trunk's specs and the value head's."""
  specs = param_specs(config)
  trunk = {k: v for k, v in specs.items() if k != "lm_head"}
  return {**specs, CRITIC: {**trunk, VALUE: score_spec(config)}}


def with_critic(config: ModelConfig, params: dict, rng: jax.Array, *,
                reward_model: dict | None = None) -> dict:
  """`params` plus a critic: a copy of the policy's trunk (every key but "lm_head") with a
  value head [D] initialised as a reward head (`jaxpost.reward.init_score`, std 0.02), or,
  given `reward_model` (reward params: the decoder plus "score"), that model with its score
  head as the value head. The critic's arrays are never the policy's (the step donates the
  tree, so no buffer may appear in it twice)."""
  from jaxpost.reward import init_score  # pylint: disable=import-outside-toplevel
  if reward_model is None:
    trunk = jax.tree.map(jnp.copy, {k: v for k, v in policy_of(params).items() if k != "lm_head"})
    critic = {**trunk, VALUE: init_score(config, rng, dtype=params["embed"].dtype)}
  else:  # freshly loaded: its own arrays
    critic = {k: v for k, v in reward_model.items() if k not in (SCORE, "lm_head")}
    critic[VALUE] = reward_model[SCORE]
  return {**policy_of(params), CRITIC: critic}


def ppo_objective(logps_BxT: jax.Array, values_BxT: jax.Array, batch: dict, *,
                  vf_coef: float = 0.1, value_clip: float | None = 0.2,
                  tis_cap: float | None = None, **policy_loss_kwargs):
  """PPO's loss from the current log-probs and values of a mini-batch: `(loss, metrics)`,

      loss = policy_on * policy_loss(logp, old, A, mask; token mean, no KL term)
             + vf_coef * value_loss(V, V_old, R, mask, clip=value_clip),

  old = stop_gradient(logp) on `fresh` rows (the ratio exactly 1), else `old_logps`. `batch`
  holds `loss_mask`, `advantages`, `returns`, `old_values`, `old_logps` [N, T], `fresh` [N],
  optional `policy_on` [N] (0 during the critic's warm-up; one value per batch) and
  `sampler_logps` [N, T] (with `tis_cap`: truncated importance weights, as `grpo_loss`).
  Other keywords (`clip_low`, `clip_high`, `dual_clip`, `log_ratio_clamp`) go to
  `jaxpost.losses.policy_loss`. Metrics as `ppo_loss`, but for the entropy.
  """
  mask_BxT = batch["loss_mask"].astype(jnp.float32)
  old_BxT, weights_BxT = old_logps_and_weights(logps_BxT, batch, mask_BxT, tis_cap)
  p_loss, p_metrics = policy_loss(logps_BxT, old_BxT, batch["advantages"], mask_BxT,
                                  beta=0.0, aggregation="token_mean",
                                  importance_weights=weights_BxT, **policy_loss_kwargs)
  v_loss, v_metrics = value_loss(values_BxT, batch["old_values"], batch["returns"], mask_BxT,
                                 clip=value_clip)
  on = jnp.max(batch["policy_on"]).astype(jnp.float32) if "policy_on" in batch else 1.0
  loss = on * p_loss + vf_coef * v_loss

  tokens = jnp.maximum(jnp.sum(mask_BxT), 1.0)
  mean = lambda x_BxT: jnp.sum(jnp.where(mask_BxT > 0, x_BxT, 0.0)) / tokens  # noqa: E731
  v_BxT = jax.lax.stop_gradient(values_BxT).astype(jnp.float32)
  ret_BxT = batch["returns"].astype(jnp.float32)
  diff_BxT = ret_BxT - v_BxT
  var_ret = mean(jnp.square(ret_BxT - mean(ret_BxT)))
  var_diff = mean(jnp.square(diff_BxT - mean(diff_BxT)))
  metrics = {
      "weight": p_metrics["weight"],
      "policy/clipfrac": p_metrics["clip_ratio/region_mean"],
      "policy/approxkl": p_metrics["approx_kl"],
      "ratio/mean": p_metrics["ratio/mean"],
      "loss/policy_avg": jax.lax.stop_gradient(p_loss),
      "loss/value_avg": jax.lax.stop_gradient(v_loss),
      "val/clipfrac": v_metrics["vf_clipfrac"],
      "val/vpred": v_metrics["vpred"],
      "val/error": mean(jnp.square(diff_BxT)),
      "val/explained_variance": 1.0 - var_diff / (var_ret + 1e-8),
  }
  if weights_BxT is not None:
    metrics["tis/weight_mean"] = jnp.sum(weights_BxT) / tokens
  return loss, metrics


def ppo_loss(params: dict, batch: dict, rng: jax.Array, *, config: ModelConfig,
             temperature: float = 1.0, vf_coef: float = 0.1, value_clip: float | None = 0.2,
             on_policy: bool = False, compute_dtype=None, remat: bool = False,
             attention: str = "auto",
             **policy_loss_kwargs):
  """PPO's loss of a rollout mini-batch: `(loss, metrics)`; `ppo_objective` of the policy's
  log-probs and the critic's values.

  params: the policy and its critic (`with_critic`). batch: `tokens`, `targets`, `loss_mask`,
  `segment_ids`, `positions` [N, T] (prompt + completion rows) and `ppo_objective`'s keys. The
  log-probs are those of softmax(logits / temperature), the distribution sampled from; the
  values are `critic_values`, aligned with the targets. Other keywords go to `ppo_objective`.

  Metrics (TRL's / verl's names; `objective/entropy` is the rollout's, from the sampler):
  `policy/clipfrac`, `policy/approxkl`,
  `ratio/mean`, `loss/policy_avg`, `loss/value_avg`, `val/clipfrac`, `val/vpred`, `val/error`
  (mean (V - R)^2), `val/explained_variance` (1 - var(R - V) / var(R) over the masked tokens;
  averaged over micro-batches by tokens, so approximate under accumulation) and `weight`, the
  token count: both terms are token means, so accumulation is exact.
  """
  del rng
  policy, critic = policy_of(params), params[CRITIC]
  rows = dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
              compute_dtype=compute_dtype, remat=remat, attention=attention)
  out = forward(config, policy, batch["tokens"], compute_logits=False, **rows)
  values_BxT = critic_values(config, critic, batch["tokens"], **rows)
  objective = functools.partial(ppo_objective, batch=batch, vf_coef=vf_coef,
                                value_clip=value_clip, **policy_loss_kwargs)
  if (on_policy and not config.final_logit_softcap
      and policy_loss_kwargs.get("tis_cap") is None):
    # Every row fresh (ratio exactly 1): the policy term's gradient is sum_t g_t grad log p_t
    # with g = d(objective)/d(logps), which does not depend on the parameters, taken through
    # `token_nll` (the LM head's gradient in the forward pass), as `grpo_loss(on_policy=True)`.
    zeros_BxT = jnp.zeros_like(batch["loss_mask"], jnp.float32)
    g_BxT = jax.grad(lambda lp: objective(lp, jax.lax.stop_gradient(values_BxT))[0])(zeros_BxT)
    loss, metrics = objective(zeros_BxT, values_BxT)  # the value; the critic's gradient
    hidden = out.final_hidden if temperature == 1.0 else out.final_hidden / temperature
    nll = token_nll(config, policy, hidden, batch["targets"], -g_BxT)
    return loss + (nll - jax.lax.stop_gradient(nll)), metrics
  logps_BxT = target_logprobs(config, policy, out.final_hidden, batch["targets"],
                              temperature=temperature)
  return objective(logps_BxT, values_BxT)


@dataclasses.dataclass
class LoraCritic:
  """A LoRA trainable (`jaxpost.train.trainable.Lora`) with PPO's critic beside it: the critic
  is its own LoRA adapters on the *same* frozen base (no second base in memory) plus a value
  head, trained by the same step and optimizer. The trained tree is

      {**policy_adapters, "critic": {"adapters": critic_adapters, "value": w_D}}

  and `model` gives `{**policy, "critic": {**trunk, "value": w_D}}` as under full fine-tuning,
  so `ppo_loss` and the rollout are unchanged. Both adapter sets start at B = 0: the critic's
  trunk starts as the base's. Export and reference are the policy's (`inner`'s)."""

  inner: Any

  def __getattr__(self, name):  # kind, describe, lora, config, ... of the inner trainable
    if name == "inner":
      raise AttributeError(name)
    return getattr(self.inner, name)

  @property
  def shardings(self):
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
    inner = self.inner.shardings
    return {**inner, CRITIC: {"adapters": inner,
                              VALUE: NamedSharding(self.inner.mesh, PartitionSpec())}}

  def init(self, params, rng, **kw):
    from jaxpost.peft import init_lora  # pylint: disable=import-outside-toplevel
    from jaxpost.reward import init_score  # pylint: disable=import-outside-toplevel
    adapters, frozen = self.inner.init(params, rng, **kw)
    critic = jax.jit(lambda k, b: init_lora(self.config, self.lora, k, self.inner.dtype, base=b),
                     out_shardings=self.inner.shardings)(jax.random.fold_in(rng, 7), frozen.base)
    value = init_score(self.config, jax.random.fold_in(rng, 8), dtype=self.inner.dtype)
    self.inner.describe += " (+ a LoRA critic of the same rank and a value head)"
    return {**adapters, CRITIC: {"adapters": critic, VALUE: value}}, frozen

  def model(self, tree, frozen, dropout_key=None):
    from jaxpost.peft import attach_lora  # pylint: disable=import-outside-toplevel
    policy = self.inner.model(policy_of(tree), frozen, dropout_key)
    trunk = attach_lora(frozen.base, tree[CRITIC]["adapters"], self.lora, dropout_key)
    critic = {k: v for k, v in trunk.items() if k != "lm_head"}
    return {**policy, CRITIC: {**critic, VALUE: tree[CRITIC][VALUE]}}

  def reference(self, tree, frozen):
    return self.inner.reference(policy_of(tree), frozen)

  def export(self, tree, frozen, out_dir, model_dir) -> None:
    self.inner.export(policy_of(tree), frozen, out_dir, model_dir)


def _same_architecture(a: ModelConfig, b: ModelConfig) -> list[str]:
  """The fields in which two configs' forward passes differ (token ids and names aside)."""
  skip = {"model_type", "bos_token_id", "eos_token_id", "pad_token_id", "hf_source",
          "max_position_embeddings"}
  return [f.name for f in dataclasses.fields(a)
          if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)]


def load_critic(run, path: str, dtype) -> dict:
  """The reward model at `path` (a folder or an `algorithm: reward` run) as reward params for
  `with_critic`, on the run's mesh. Raises ConfigError (naming `rl.critic_from`) for a missing
  or unusable folder, or a model whose architecture is not the policy's."""
  # pylint: disable=import-outside-toplevel
  from jaxpost.config import ConfigError
  from jaxpost.models import CheckpointError
  from jaxpost.reward import load_reward_model_hf
  from jaxpost.rl.builtin_rewards import reward_model_folder
  try:
    folder = reward_model_folder(path)
    config, params = load_reward_model_hf(folder, dtype=dtype, mesh=run.mesh)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    raise ConfigError(f"rl.critic_from: {e}") from e
  differ = _same_architecture(config, run.config)
  if differ:
    raise ConfigError(
        f"rl.critic_from: the reward model in {folder} is not the policy's architecture "
        f"(differs in {', '.join(differ)}); the critic runs with the policy's config, so start "
        "it from a reward model trained on this model (or rl.critic_from=policy)")
  return params


def _has_checkpoint(run) -> bool:
  """Whether the run folder holds a finalised checkpoint (a step folder's metadata)."""
  folder = Path(run.run_dir) / "checkpoints"
  return folder.is_dir() and any(p.name.isdigit() and any(p.iterdir())
                                 for p in folder.iterdir() if p.is_dir())


def make(run) -> Algorithm:
  """PPO for a built run (`jaxpost.train.build`); settings from `rl:`."""
  from jaxpost.rl.ppo_rollout import PPOTargets  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.prompts import read_prompts  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rewards import load_reward_funcs  # pylint: disable=import-outside-toplevel
  from jaxpost.rl.rollout import RolloutSource  # pylint: disable=import-outside-toplevel
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel

  rl, d = run.cfg.rl, run.cfg.data
  loss = functools.partial(
      ppo_loss, config=run.config, temperature=rl.temperature, vf_coef=rl.vf_coef,
      value_clip=rl.value_clip, tis_cap=rl.tis_cap, clip_low=rl.clip_low,
      on_policy=rl.num_iterations * rl.mini_batches == 1,
      clip_high=rl.clip_high, dual_clip=rl.dual_clip, **run.model_kwargs)

  lora = run.cfg.lora is not None

  def init(params, rng):
    if lora:  # the critic is LoRA on the same base (`LoraCritic`), made by the trainable
      return params
    reward_model = None
    if rl.critic_from != "policy":
      if not Path(rl.critic_from).exists() and _has_checkpoint(run):
        # Resuming or exporting: the checkpoint holds the trained critic (same shapes as a
        # copy of the trunk), so the reward model it started from is not needed any more.
        log(f"rl.critic_from {rl.critic_from} is gone: the critic comes from the checkpoint")
      else:
        reward_model = load_critic(run, rl.critic_from, params["embed"].dtype)
        log(f"critic from the reward model {rl.critic_from}")
    return with_critic(run.config, params, rng, reward_model=reward_model)

  def batches(split, policy):
    del policy
    if split != "train":
      return None  # judged by generation (the task's exact match)
    prompts = read_prompts(run.data.path("sft", "train"), run.tokenizer,
                           max_prompt_length=d.max_prompt_length, on_bad_row=d.on_bad_row)
    return RolloutSource(run, prompts, load_reward_funcs(rl, tokenizer=run.tokenizer), log=log,
                         ppo=PPOTargets(run))

  def export(model_params, folder):
    save_hf(run.config, policy_of(model_params), folder)

  return Algorithm(name="ppo", loss=lambda params, batch, rng, frozen: loss(params, batch, rng),
                   batches=batches, headline="reward", needs_reference=True,
                   reference_of=policy_of, init=init,
                   param_specs=None if lora else ppo_param_specs,
                   export=None if lora else export,
                   wrap_trainable=LoraCritic if lora else None)
