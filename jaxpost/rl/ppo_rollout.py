"""PPO's part of a rollout (`algorithm: ppo`): the critic's values, per-token rewards with the
KL penalty, GAE, whitening, and the adaptive KL coefficient.

`RolloutSource` (given `ppo=PPOTargets(run)`) samples, scores and computes the old and the
reference log-probs as for GRPO, then `PPOTargets.finish` turns the rollout batch into PPO's:

    V_old = critic_values(critic, rows)                       one no-grad forward
    k1_t = logp_old_t - logp_ref_t                            per completion token
    r_t = -kl_coef * k1_t  (+ score at the last completion token)
    A, R = gae(r, V_old, mask, gamma, lam);  A = masked_whiten(A) over the rollout batch

as Ziegler et al. 2019 (arXiv 1909.08593, sec. 2.2: the reward R(x, y) - beta log pi / rho) and
TRL's `PPOTrainer` (a k1 penalty on every token, the score added at the last one). With
`rl.adaptive_kl`, the coefficient follows Ziegler et al.'s proportional controller (TRL's
`AdaptiveKLController`) after each rollout, from the measured mean sequence KL:

    e = clip(KL / target - 1, -0.2, 0.2),   kl_coef <- kl_coef * (1 + e * n / horizon)

with n the rollout's number of samples. The coefficient is part of the source's state (exact
resume).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.ppo import CRITIC, critic_values
from jaxpost.losses.rl import gae, masked_whiten
from jaxpost.multihost import host_tree

_ROW_KEYS = ("tokens", "segment_ids", "positions")


def token_rewards(scores_N: np.ndarray, old_logps_NxT: np.ndarray, ref_logps_NxT: np.ndarray,
                  mask_NxT: np.ndarray, kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [N, T], k1 [N, T]) float32: r_t = -kl_coef * k1_t on every masked token, plus
  the row's score at its last masked token; k1_t = logp_old_t - logp_ref_t there, 0 on
  padding. A row without masked tokens gets nothing."""
  m_NxT = np.asarray(mask_NxT) > 0
  k1_NxT = np.where(m_NxT, np.asarray(old_logps_NxT, np.float32)
                    - np.asarray(ref_logps_NxT, np.float32), 0.0).astype(np.float32)
  rewards_NxT = (-np.float32(kl_coef) * k1_NxT).astype(np.float32)
  T = m_NxT.shape[1]
  has_N = m_NxT.any(axis=1)
  last_N = T - 1 - np.argmax(m_NxT[:, ::-1], axis=1)
  rows_N = np.flatnonzero(has_N)
  rewards_NxT[rows_N, last_N[rows_N]] += np.asarray(scores_N, np.float32)[rows_N]
  return rewards_NxT, k1_NxT


def adaptive_kl_update(kl_coef: float, current_kl: float, *, target: float, horizon: int,
                       n_steps: int) -> float:
  """One step of the adaptive KL controller (Ziegler et al. 2019; TRL's
  `AdaptiveKLController.update`): kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""
  error = float(np.clip(current_kl / target - 1.0, -0.2, 0.2))
  return float(kl_coef * (1.0 + error * n_steps / horizon))


@functools.lru_cache(maxsize=None)
def _values_fn(config, compute_dtype):
  """The compiled no-grad `(critic params, rows) -> [N, T]` values."""

  def values(critic, rows):
    return critic_values(config, critic, rows["tokens"], positions=rows["positions"],
                         segment_ids=rows["segment_ids"], compute_dtype=compute_dtype)

  return jax.jit(values)


class PPOTargets:
  """PPO's rollout targets and the KL coefficient (see the module docstring).

  `RolloutSource` computes old and reference log-probs for it (`needs_logps`), calls `finish`
  once per rollout and `policy_on(step)` per queued mini-batch, and keeps `state()` in its own.
  """

  needs_logps = True

  def __init__(self, run):
    self.run, self.rl = run, run.cfg.rl
    self.kl_coef = float(self.rl.kl_coef)
    self._values = _values_fn(run.config, run.model_kwargs["compute_dtype"])

  def policy_on(self, step: int) -> float:
    """1 where the policy trains, 0 during the critic's warm-up (`rl.value_warmup_steps`)."""
    return float(step >= self.rl.value_warmup_steps)

  def finish(self, batch: dict[str, np.ndarray], model, scores_N: np.ndarray,
             valid_N: np.ndarray, samples: list[dict[str, Any]]) -> dict[str, float]:
    """Adds `old_values`, `advantages` and `returns` to `batch` (and drops `ref_logps`), adds
    each sample's KL and advantage, updates the KL coefficient; returns the host metrics."""
    rl = self.rl
    mask_NxT = batch["loss_mask"].astype(np.float32)
    rows = self.run.place({k: batch[k] for k in _ROW_KEYS})
    values_NxT = np.asarray(host_tree(self._values(model[CRITIC], rows)), np.float32)
    values_NxT = values_NxT * mask_NxT
    scores_N = np.where(valid_N, scores_N, 0.0).astype(np.float32)
    kl_coef = self.kl_coef
    rewards_NxT, k1_NxT = token_rewards(scores_N, batch["old_logps"], batch.pop("ref_logps"),
                                        mask_NxT, kl_coef)
    adv_NxT, returns_NxT = gae(jnp.asarray(rewards_NxT), jnp.asarray(values_NxT),
                               jnp.asarray(mask_NxT), gamma=rl.gamma, lam=rl.lam)
    if rl.whiten_advantages:
      adv_NxT = masked_whiten(adv_NxT, jnp.asarray(mask_NxT))
    batch.update(advantages=np.asarray(adv_NxT, np.float32),
                 returns=np.asarray(returns_NxT, np.float32), old_values=values_NxT)

    has_N = mask_NxT.any(axis=1)
    kl_N = k1_NxT.sum(axis=1)
    kl = float(kl_N[has_N].mean()) if has_N.any() else 0.0
    score = float(scores_N[valid_N].mean()) if valid_N.any() else 0.0
    if rl.adaptive_kl:
      self.kl_coef = adaptive_kl_update(kl_coef, kl, target=rl.target_kl,
                                        horizon=rl.kl_horizon, n_steps=len(scores_N))
    for n, sample in enumerate(samples):
      first = np.flatnonzero(mask_NxT[n])
      sample["advantage"] = float(batch["advantages"][n, first[0]]) if first.size else 0.0
      sample["kl"] = float(kl_N[n])
    return {"objective/kl": kl, "objective/scores": score,
            "objective/non_score_reward": -kl_coef * kl,
            "objective/rlhf_reward": score - kl_coef * kl, "kl_coef": kl_coef}

  def state(self) -> dict[str, Any]:
    return {"kl_coef": self.kl_coef}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.kl_coef = float(state["kl_coef"])
