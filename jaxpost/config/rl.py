"""The `rl:` section: online reinforcement learning (`algorithm: grpo`, `online_dpo`, `ppo`).

Kept beside `sections.py` (the loader walks it like any other section).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import ConfigError, Section, _require

Aggregation = Literal["grpo", "dr_grpo", "dapo", "bnpo", "seq_mean_token_sum", "token_mean"]
KLKind = Literal["k1", "k2", "k3", "k3+", "low_var_kl"]


@dataclasses.dataclass(frozen=True)
class RLSection(Section):
  """Online RL from the policy's own samples (`jaxpost.algorithms.grpo`, `jaxpost.losses.rl`).

  Rollouts: each rollout batch takes `train.batch_size * mini_batches / num_generations`
  prompts and samples `num_generations` completions of each (`temperature`, `top_p`, `top_k`,
  `max_new_tokens`; the chat end-of-turn and EOS tokens stop a completion). The batch is then
  used for `num_iterations` passes of `mini_batches` optimizer steps (of `train.batch_size`
  completions each).

  Rewards: `reward_funcs`, comma-separated built-in names (`answer`, `math_verify`, `format`,
  `overlong`, `reward_model`) or `module:function` (TRL's signature
  `fn(prompts, completions, **columns) -> list[float | None]`), weighted by `reward_weights`
  (comma-separated numbers, default 1 each). `format_pattern` is the `format` reward's regex;
  `overlong_buffer` the soft overlong penalty's buffer in tokens (DAPO); `reward_model` a
  reward model folder (an `algorithm: reward` run or its export).

  Advantages: `advantage` `group` (GRPO: (r - group mean) / (std + `std_eps`), std over the
  group, the batch or none by `scale_rewards`), `rloo` (leave-one-out baseline) or
  `reinforce_pp` (REINFORCE++: batch-whitened returns; with `num_generations` > 1 the group
  mean is subtracted first, REINFORCE++-baseline).

  Loss (`jaxpost.losses.policy_loss`): `clip_low`, `clip_high` (DAPO's clip-higher; None: same
  as clip_low), `dual_clip`, `importance_level` (`sequence` is GSPO), `aggregation`, and the KL
  penalty `beta` * `kl` against the reference model (none when beta is 0). `tis_cap` truncates
  the importance weight old / sampler (a sampler in another dtype than the trainer).

  `dynamic_sampling` (DAPO) drops groups whose raw rewards are all equal and samples further
  prompts to fill the batch, up to `max_sampling_tries` rounds per rollout batch.

  PPO with a critic (`algorithm: ppo`, `jaxpost.algorithms.ppo`; `advantage`, `scale_rewards`,
  `beta` and `aggregation` are GRPO's and unused): the critic starts from `critic_from`
  (`policy`: a copy of the policy's trunk with a new value head; or a reward model folder, whose
  score head becomes the value head). Per-token rewards are -`kl_coef` * (logp_old - logp_ref)
  plus the sequence score at the last token; `gae` with `gamma`, `lam` gives advantages
  (whitened over the rollout batch when `whiten_advantages`) and returns. The loss adds
  `vf_coef` * the value loss clipped at `value_clip` (None: unclipped). `adaptive_kl` moves
  kl_coef towards a sequence KL of `target_kl` over `kl_horizon` samples (Ziegler et al. 2019).
  For the first `value_warmup_steps` steps only the critic trains.
  """
  num_generations: int = 8
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_p: float | None = None
  top_k: int | None = None
  num_iterations: int = 1
  mini_batches: int = 1
  reward_funcs: str = "answer"
  reward_weights: str | None = None
  format_pattern: str = r"^\s*\S+\s*$"
  overlong_buffer: int = 0
  reward_model: str | None = None
  advantage: Literal["group", "rloo", "reinforce_pp"] = "group"
  scale_rewards: Literal["group", "batch", "none"] = "group"
  std_eps: float = 1e-6
  beta: float = 0.0
  kl: KLKind = "k3"
  clip_low: float = 0.2
  clip_high: float | None = None
  dual_clip: float | None = None
  importance_level: Literal["token", "sequence"] = "token"
  aggregation: Aggregation = "dapo"
  tis_cap: float | None = None
  dynamic_sampling: bool = False
  max_sampling_tries: int = 4
  samples_per_log: int = 4
  critic_from: str = "policy"
  vf_coef: float = 0.1
  value_clip: float | None = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  kl_coef: float = 0.05
  adaptive_kl: bool = False
  target_kl: float = 6.0
  kl_horizon: int = 10000
  value_warmup_steps: int = 0
  whiten_advantages: bool = True

  def weights(self) -> list[float]:
    names = self.names()
    if self.reward_weights is None:
      return [1.0] * len(names)
    return [float(w) for w in self.reward_weights.split(",")]

  def names(self) -> list[str]:
    return [n.strip() for n in self.reward_funcs.split(",") if n.strip()]

  def validate(self, prefix: str) -> None:
    _require(self.num_generations >= 1,
             f"{prefix}num_generations must be >= 1, got {self.num_generations}")
    _require(self.max_new_tokens >= 1,
             f"{prefix}max_new_tokens must be >= 1, got {self.max_new_tokens}")
    _require(self.temperature > 0,
             f"{prefix}temperature must be > 0 for RL (the policy's log-probs are those of the "
             f"distribution sampled from), got {self.temperature}")
    _require(self.top_p is None or 0 < self.top_p <= 1,
             f"{prefix}top_p must be in (0, 1], got {self.top_p}")
    _require(self.top_k is None or self.top_k >= 1, f"{prefix}top_k must be >= 1, got {self.top_k}")
    for name in ("num_iterations", "mini_batches", "max_sampling_tries"):
      _require(getattr(self, name) >= 1, f"{prefix}{name} must be >= 1, got {getattr(self, name)}")
    _require(bool(self.names()), f"{prefix}reward_funcs names no reward function")
    if self.reward_weights is not None:
      parts = self.reward_weights.split(",")
      try:
        [float(w) for w in parts]
      except ValueError:
        raise ConfigError(f"{prefix}reward_weights must be comma-separated numbers, got "
                     f"{self.reward_weights!r}") from None
      _require(len(parts) == len(self.names()),
               f"{prefix}reward_weights has {len(parts)} weights for {len(self.names())} "
               f"reward_funcs ({self.reward_funcs!r})")
    _require(self.overlong_buffer >= 0,
             f"{prefix}overlong_buffer must be >= 0, got {self.overlong_buffer}")
    _require(self.overlong_buffer < self.max_new_tokens or "overlong" not in self.names(),
             f"{prefix}overlong_buffer={self.overlong_buffer} must be below "
             f"{prefix}max_new_tokens={self.max_new_tokens}")
    _require(self.std_eps >= 0, f"{prefix}std_eps must be >= 0, got {self.std_eps}")
    _require(self.beta >= 0, f"{prefix}beta must be >= 0, got {self.beta}")
    _require(0 <= self.clip_low < 1, f"{prefix}clip_low must be in [0, 1), got {self.clip_low}")
    _require(self.clip_high is None or self.clip_high >= 0,
             f"{prefix}clip_high must be >= 0, got {self.clip_high}")
    _require(self.dual_clip is None or self.dual_clip > 1,
             f"{prefix}dual_clip must be > 1, got {self.dual_clip}")
    _require(self.tis_cap is None or self.tis_cap >= 1,
             f"{prefix}tis_cap must be >= 1, got {self.tis_cap}")
    _require(not self.dynamic_sampling or self.num_generations >= 2,
             f"{prefix}dynamic_sampling needs {prefix}num_generations >= 2")
    _require("reward_model" not in self.names() or self.reward_model is not None,
             f"{prefix}reward_funcs names reward_model: set {prefix}reward_model to its folder")
    _require(bool(self.critic_from.strip()),
             f"{prefix}critic_from must be 'policy' or a reward model folder, got ''")
    _require(self.vf_coef >= 0, f"{prefix}vf_coef must be >= 0, got {self.vf_coef}")
    _require(self.value_clip is None or self.value_clip > 0,
             f"{prefix}value_clip must be > 0 (or null: no clipping), got {self.value_clip}")
    for name in ("gamma", "lam"):
      _require(0 <= getattr(self, name) <= 1,
               f"{prefix}{name} must be in [0, 1], got {getattr(self, name)}")
    _require(self.kl_coef >= 0, f"{prefix}kl_coef must be >= 0, got {self.kl_coef}")
    _require(self.target_kl > 0, f"{prefix}target_kl must be > 0, got {self.target_kl}")
    _require(self.kl_horizon >= 1, f"{prefix}kl_horizon must be >= 1, got {self.kl_horizon}")
    _require(self.value_warmup_steps >= 0,
             f"{prefix}value_warmup_steps must be >= 0, got {self.value_warmup_steps}")

  def validate_advantage(self, prefix: str) -> None:
    """The advantage estimator's needs (GRPO's `advantage`; PPO's critic has none)."""
    _require(self.advantage != "group" or self.num_generations >= 2,
             f"{prefix}advantage=group needs {prefix}num_generations >= 2 (a group of one has "
             "no baseline; use advantage=reinforce_pp for one sample per prompt)")
    _require(self.advantage != "rloo" or self.num_generations >= 2,
             f"{prefix}advantage=rloo needs {prefix}num_generations >= 2")

