"""Rollouts: the batch source of online RL. Sample with the current policy, score, take
advantages, and hand the update step its mini-batches.

    source = RolloutSource(run, prompts, rewards)
    batch = source.next(policy)          # a rollout every num_iterations x mini_batches steps

One rollout, for P = batch_size * mini_batches / G prompts:
1. wait for the policy's params (the time the previous updates took), then sample G
   completions of each prompt with `jaxpost.sampling.generate` (each prompt prefilled once,
   its KV cache shared by its G samples; adapters attached, never merged);
2. score them with the reward functions (`jaxpost.rl.rewards`), on the host;
3. DAPO's dynamic sampling, when on: drop the groups whose rewards are all equal and sample
   further prompts until P groups are kept (at most `max_sampling_tries` rounds; then the
   batch is filled with dropped groups, whose advantages are 0, and a warning says so);
4. advantages from the rewards (`jaxpost.losses`: group, RLOO or REINFORCE++);
5. with more than one update per rollout, the old policy's log-probs from one no-grad forward;
   with beta > 0, the reference's; both at the sampling temperature;
6. rows of prompt + completion, right-padded to one fixed width (one compiled step), split
   into `mini_batches` mini-batches, queued `num_iterations` times.

PPO (`ppo=`, `jaxpost.rl.ppo_rollout`) replaces step 4: after step 5 (both log-probs always),
the critic's values, KL-penalised per-token rewards and GAE give the advantages and returns.

The first mini-batch of a rollout is marked `fresh`: the policy has not moved since it was
sampled, and the loss takes its old log-probs as the current ones without gradient, so the
importance ratio is exactly 1 (as TRL does when there is one update per rollout).

Exact resume: the prompt order's position, the queued mini-batches (stored in `state()`), and
sampling keys derived from the step: a killed run continues as if never stopped.
"""

from __future__ import annotations

import base64
import functools
import io
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.data import pad_id_of
from jaxpost.losses.rl import group_advantages, reinforce_pp_advantages, rloo_advantages
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import forward
from jaxpost.algorithms.replay import prompt_order
from jaxpost.multihost import host_tree
from jaxpost.rl.prompts import Prompt
from jaxpost.sampling import generate

STATE_VERSION = 1
_ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def completion_rows(prompt_ids: Sequence[Sequence[int]], completions_NxM: np.ndarray,
                    lengths_N: np.ndarray, group_size: int, width: int) -> dict[str, np.ndarray]:
  """Rows of prompt + completion, right-padded to `width`, for the training forward.

  Row n is prompt n // group_size followed by its completion's first lengths[n] tokens.
  `loss_mask[n, t]` is 1 where `targets[n, t]` (= tokens[n, t + 1]) is a completion token, so
  per-token arrays aligned with targets (log-probs) hold completion token j at t = P_n - 1 + j.
  """
  N = completions_NxM.shape[0]
  rows = {k: np.zeros((N, width), np.int32) for k in _ROW_KEYS}
  for n in range(N):
    p = prompt_ids[n // group_size]
    c = completions_NxM[n, :lengths_N[n]]
    seq = np.concatenate([np.asarray(p, np.int32), c.astype(np.int32)])
    L = len(seq)
    rows["tokens"][n, :L] = seq
    rows["targets"][n, :L - 1] = seq[1:]
    rows["loss_mask"][n, len(p) - 1:L - 1] = 1
    rows["segment_ids"][n, :L] = 1
    rows["positions"][n, :L] = np.arange(L)
  return rows


def place_completion_values(values_NxM: np.ndarray, prompt_lengths_N: np.ndarray,
                            lengths_N: np.ndarray, width: int) -> np.ndarray:
  """Per-completion-token values [N, M] -> [N, width] aligned with `completion_rows`' targets."""
  out = np.zeros((values_NxM.shape[0], width), np.float32)
  for n in range(values_NxM.shape[0]):
    start = prompt_lengths_N[n] - 1
    out[n, start:start + lengths_N[n]] = values_NxM[n, :lengths_N[n]]
  return out


@functools.lru_cache(maxsize=None)
def _logps_fn(config, temperature: float, compute_dtype):
  """The compiled no-grad `(model params, rows) -> [N, T]` log-probs at `temperature`."""

  def logps(params, rows):
    out = forward(config, params, rows["tokens"], positions=rows["positions"],
                  segment_ids=rows["segment_ids"], compute_dtype=compute_dtype,
                  compute_logits=False)
    return target_logprobs(config, params, out.final_hidden, rows["targets"],
                           temperature=temperature)

  return jax.jit(logps)


def _encode(batches: list[dict[str, np.ndarray]]) -> str:
  """Queued mini-batches as one base64 string (for the JSON of a checkpoint's data state)."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode(text: str) -> list[dict[str, np.ndarray]]:
  with np.load(io.BytesIO(base64.b64decode(text))) as z:
    out: dict[int, dict[str, np.ndarray]] = {}
    for name in z.files:
      i, k = name.split("/", 1)
      out.setdefault(int(i), {})[k] = z[name]
  return [out[i] for i in sorted(out)]


class RolloutSource:
  """The `BatchSource` of an RL run (see the module docstring).

  Args:
    run: the built run (`jaxpost.train.build.Run`): model config, tokenizer, settings (`rl:`),
      batch placement, and the reference model under PEFT.
    prompts: the prompts (`jaxpost.rl.prompts.read_prompts`).
    rewards: the reward functions (`jaxpost.rl.rewards.RewardFns`).
    log: where warnings go (printed on the first process).
    pairs: online DPO's batches (each prompt's best and worst completion, ties skipped).
    ppo: PPO's targets (`jaxpost.rl.ppo_rollout.PPOTargets`): values, KL-penalised rewards,
      GAE advantages and returns in place of the reward-only advantages.
  """

  def __init__(self, run, prompts: Sequence[Prompt], rewards, *, log=print, pairs: bool = False,
               ppo=None):
    rl, t = run.cfg.rl, run.cfg.train
    self.pairs, self.ppo = pairs, ppo
    self.run, self.rl, self.prompts, self.rewards, self.log = run, rl, list(prompts), rewards, log
    self.group = rl.num_generations
    self.rows_per_rollout = t.batch_size * rl.mini_batches
    # a pair per prompt (online DPO), else G rows per prompt
    self.num_prompts = self.rows_per_rollout // (1 if pairs else self.group)
    self.prompts, self.order = prompt_order(run, self.prompts, batch_size=self.num_prompts,
                                            shuffle=run.cfg.data.shuffle,
                                            max_prompt_length=run.cfg.data.max_prompt_length)
    self.prompt_width = _round_up(max(len(p.ids) for p in self.prompts), 8)
    self.width = _round_up(self.prompt_width + rl.max_new_tokens, 8)
    self.key = jax.random.fold_in(jax.random.key(t.seed), 0x5EED)
    self.queue: list[dict[str, np.ndarray]] = []
    self.rollouts = 0
    self._metrics: dict[str, float] = {}
    self._samples: list[dict[str, Any]] = []
    self._last_ready: float | None = None  # when the last rollout handed over its batches
    self._queued_tokens = 0
    self._compute_dtype = run.model_kwargs["compute_dtype"]
    self._logps = _logps_fn(run.config, float(rl.temperature), self._compute_dtype)

  # -- BatchSource ---------------------------------------------------------------------------

  def next(self, policy) -> dict[str, np.ndarray]:
    if not self.queue:
      self._rollout(policy)
    return self.queue.pop(0)

  def host_metrics(self) -> dict[str, float]:
    return dict(self._metrics)

  def samples(self) -> list[dict[str, Any]]:
    return list(self._samples)

  def state(self) -> dict[str, Any]:
    state = {"version": STATE_VERSION, "prompts": self.order.state(), "rollouts": self.rollouts,
             "queue": _encode(self.queue) if self.queue else None,
             "metrics": self._metrics, "samples": self._samples}
    if self.ppo is not None:
      state["ppo"] = self.ppo.state()
    return state

  def restore(self, state: Mapping[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"cannot restore a rollout state of version {state.get('version')!r}; "
                       f"this is version {STATE_VERSION}")
    self.order.restore(state["prompts"])
    self.rollouts = int(state["rollouts"])
    self.queue = _decode(state["queue"]) if state.get("queue") else []
    self._metrics = dict(state.get("metrics") or {})
    self._samples = list(state.get("samples") or [])
    if self.ppo is not None:
      self.ppo.restore(state["ppo"])

  # -- one rollout ---------------------------------------------------------------------------

  def _sample(self, model, prompts: list[Prompt], key):
    rl, tok = self.rl, self.run.tokenizer
    with jax.set_mesh(self.run.mesh):  # the decode state and KV cache follow the batch
      out = generate(self.run.config, model, [p.ids for p in prompts],
                     max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                     top_k=rl.top_k, top_p=rl.top_p, stop_tokens=tok.eos_ids, seed=key,
                     pad_id=pad_id_of(tok), compute_dtype=self._compute_dtype,
                     prompt_bucket=self.prompt_width, num_samples=self.group)
    tokens, lengths, sample_logps, entropies = host_tree(
        (out.tokens, out.lengths, out.sample_logprobs, out.entropies))
    return (np.asarray(tokens), np.asarray(lengths), np.asarray(sample_logps, np.float32),
            np.asarray(entropies, np.float32))

  def _score(self, prompts: list[Prompt], tokens_NxM, lengths_N):
    """Rewards of the completions of `prompts` (G each): the reward functions' `Scores`."""
    tok, G = self.run.tokenizer, self.group
    texts = [tok.decode(tokens_NxM[n, :lengths_N[n]].tolist(), skip_special_tokens=True)
             for n in range(len(tokens_NxM))]
    owners = [prompts[n // G] for n in range(len(texts))]
    completions = [[{"role": "assistant", "content": t}] if p.is_chat else t
                   for p, t in zip(owners, texts)]
    keys = sorted({k for p in prompts for k in p.columns})
    columns = {k: [p.columns.get(k) for p in owners] for k in keys}
    ids = [tokens_NxM[n, :lengths_N[n]].tolist() for n in range(len(texts))]
    scores = self.rewards.score([p.prompt for p in owners], completions, columns,
                                completion_ids=ids, row_ids=[p.where for p in owners])
    return scores, texts

  def _rollout(self, policy) -> None:
    rl, G, P = self.rl, self.group, self.num_prompts
    jax.block_until_ready(policy.params)
    t_ready = time.perf_counter()
    model = policy.model_params()
    kept: list[dict[str, Any]] = []  # one per kept group
    dropped: list[dict[str, Any]] = []
    groups_seen = equal = tries = 0
    t_sample = t_reward = 0.0
    generated = 0
    step_key = jax.random.fold_in(self.key, policy.step)
    drop_equal = rl.dynamic_sampling or self.pairs  # a pair needs two different rewards
    while len(kept) < P and tries < (rl.max_sampling_tries if drop_equal else 1):
      prompts = [self.prompts[i] for i in next(self.order)["index"]]
      s0 = time.perf_counter()
      tokens, lengths, sample_logps, entropies = self._sample(model, prompts, jax.random.fold_in(
          step_key, tries))
      s1 = time.perf_counter()
      scores, texts = self._score(prompts, tokens, lengths)
      t_sample += s1 - s0
      t_reward += time.perf_counter() - s1
      generated += int(lengths.sum())
      tries += 1
      for g, prompt in enumerate(prompts):
        rows = slice(g * G, (g + 1) * G)
        group = dict(prompt=prompt, tokens=tokens[rows], lengths=lengths[rows],
                     sample_logps=sample_logps[rows], entropies=entropies[rows],
                     total=scores.total_N[rows],
                     valid=scores.valid_N[rows],
                     per_fn={k: v[rows] for k, v in scores.per_fn.items()}, texts=texts[rows])
        groups_seen += 1
        raw = group["total"][group["valid"]]
        same = raw.size == 0 or np.all(raw == raw[0])
        equal += int(same)
        (dropped if drop_equal and same else kept).append(group)
    if len(kept) < P:  # only when groups with equal rewards are dropped
      self.log(f"warning: kept {len(kept)} of {P} groups after {tries} rounds of sampling (the "
               f"rest had equal rewards); the batch is filled with {P - len(kept)} of them, "
               "which carry no " + ("pair (weight 0)" if self.pairs else "advantage") +
               ". Raise rl.max_sampling_tries, or lower the difficulty of the prompts.")
      filler = [dict(g, filler=True) for g in dropped[:P - len(kept)]]
      kept += filler
    kept = kept[:P]
    if self.pairs:
      batch, metrics, samples = self._assemble_pairs(kept)
      metrics["ties_fraction"] = equal / max(groups_seen, 1)
      self._queue_pairs(batch, metrics, samples, t_ready, t_sample, t_reward, tries, generated)
      return
    batch, metrics, samples = self._assemble(kept, policy)
    t_logps = time.perf_counter()
    batch = self._with_logps(batch, model, policy)
    if self.ppo is not None:
      metrics.update(self.ppo.finish(batch, model, np.concatenate([g["total"] for g in kept]),
                                     np.concatenate([g["valid"] for g in kept]), samples))
      metrics["objective/entropy"] = metrics["entropy"]  # TRL's PPO name, the sampler's value
    t_end = time.perf_counter()
    self._split(batch, policy.step)
    metrics.update({
        "dynamic_sampling/dropped_fraction":
            equal / max(groups_seen, 1) if rl.dynamic_sampling else 0.0,
        "dynamic_sampling/rounds": float(tries),
        "timing/sampling_s": t_sample, "timing/reward_s": t_reward,
        "timing/logps_s": t_end - t_logps, "timing/rollout_s": t_end - t_ready,
        "rollout_tokens_per_s": generated / max(t_sample, 1e-9)})
    if self._last_ready is not None:  # the previous rollout's updates, until their params
      metrics["timing/update_s"] = t_ready - self._last_ready
      metrics["update_tokens_per_s"] = self._queued_tokens / max(t_ready - self._last_ready,
                                                                 1e-9)
    self._metrics, self._samples = metrics, samples
    self._last_ready = time.perf_counter()
    self._queued_tokens = int(batch["segment_ids"].astype(bool).sum()) * rl.num_iterations
    self.rollouts += 1
    no_signal = self.ppo is None and metrics["frac_reward_zero_std"] == 1.0  # PPO: a critic
    if no_signal and self.rollouts % 50 == 1:
      self.log(f"warning: every group of rollout {self.rollouts} had equal rewards, so this batch "
               "gives no learning signal (trl#3452). Consider rl.dynamic_sampling=true, more "
               "rl.num_generations, a higher rl.temperature or easier prompts.")

  def _assemble(self, groups: list[dict[str, Any]], policy):
    """The rollout batch (rows, advantages, sampler log-probs) and its metrics."""
    del policy
    rl, G = self.rl, self.group
    tokens = np.concatenate([g["tokens"] for g in groups])
    lengths = np.concatenate([g["lengths"] for g in groups])
    sample_logps = np.concatenate([g["sample_logps"] for g in groups])
    total = np.concatenate([g["total"] for g in groups]).astype(np.float32)
    valid = np.concatenate([g["valid"] for g in groups])
    prompt_ids = [g["prompt"].ids for g in groups]
    rows = completion_rows(prompt_ids, tokens, lengths, G, self.width)
    prompt_lengths = np.repeat([len(p) for p in prompt_ids], G)
    # A row no reward function scored trains nothing; for the group statistics it takes its
    # group's mean (so it moves neither the baseline nor, much, the spread).
    filled = total.copy()
    for g in range(len(groups)):
      rows_g = slice(g * G, (g + 1) * G)
      ok = valid[rows_g]
      filled[rows_g][~ok] = total[rows_g][ok].mean() if ok.any() else 0.0
    rows["loss_mask"] *= valid[:, None].astype(np.int32)
    mask = rows["loss_mask"].astype(np.float32)
    if self.ppo is not None:  # PPO's come from the critic (`ppo.finish`)
      adv = np.zeros_like(mask)
    elif rl.advantage == "group":
      adv = np.asarray(group_advantages(jnp.asarray(filled), G, scale=rl.scale_rewards,
                                        eps=rl.std_eps))[:, None] * mask
    elif rl.advantage == "rloo":
      adv = np.asarray(rloo_advantages(jnp.asarray(filled), G))[:, None] * mask
    else:
      adv = np.asarray(reinforce_pp_advantages(jnp.asarray(filled), jnp.asarray(mask),
                                               group_size=G if G > 1 else None))
    batch = dict(rows, advantages=adv.astype(np.float32),
                 sampler_logps=place_completion_values(sample_logps, prompt_lengths, lengths,
                                                       self.width))
    group_std = filled.reshape(-1, G).std(axis=1, ddof=1) if G > 1 else np.zeros(len(groups))
    metrics = {
        "reward": float(total[valid].mean()) if valid.any() else 0.0,
        "reward_std": float(group_std.mean()),
        "frac_reward_zero_std": float(np.mean(group_std == 0)),
        "completions/mean_length": float(lengths.mean()),
        # the sampling distribution's entropy per completion token (what TRL logs)
        "entropy": float(np.concatenate([g["entropies"] for g in groups]).sum()
                         / max(int(lengths.sum()), 1)),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(np.mean(self._clipped(tokens, lengths))),
        "rewards/valid_fraction": float(valid.mean()),
    }
    per_fn = {k: np.concatenate([g["per_fn"][k] for g in groups]) for k in groups[0]["per_fn"]}
    for name, values in per_fn.items():
      ok = ~np.isnan(values)
      metrics[f"rewards/{name}/mean"] = float(values[ok].mean()) if ok.any() else 0.0
      metrics[f"rewards/{name}/std"] = float(values[ok].std()) if ok.any() else 0.0
    texts = [t for g in groups for t in g["texts"]]
    samples = []
    for n in range(min(self.rl.samples_per_log, len(texts))):
      p = groups[n // G]["prompt"]
      samples.append({"prompt": p.prompt if isinstance(p.prompt, str) else p.prompt[-1]["content"],
                      "completion": texts[n], "reward": float(total[n]),
                      "advantage": float(adv[n][mask[n] > 0][0]) if mask[n].any() else 0.0,
                      **{f"rewards/{k}": (None if np.isnan(v[n]) else float(v[n]))
                         for k, v in per_fn.items()}})
    return batch, metrics, samples

  def _assemble_pairs(self, groups: list[dict[str, Any]]):
    """Online DPO's batch: per group, its best completion (chosen) and worst (rejected) by
    total reward, as the DPO family's paired rows [P, 2, T]; filler groups (all rewards
    equal) get an empty loss mask, so `dpo_loss` gives them weight 0."""
    chosen, rejected, scores_c, scores_r, samples = [], [], [], [], []
    for g in groups:
      total = np.where(g["valid"], g["total"], np.nan)
      best = int(np.nanargmax(total)) if np.isfinite(total).any() else 0
      worst = int(np.nanargmin(total)) if np.isfinite(total).any() else 0
      for pick, out in ((best, chosen), (worst, rejected)):
        out.append((g["prompt"].ids, g["tokens"][pick], g["lengths"][pick], g.get("filler")))
      scores_c.append(g["total"][best])
      scores_r.append(g["total"][worst])
      if len(samples) < self.rl.samples_per_log:
        p = g["prompt"]
        samples.append({"prompt": p.prompt if isinstance(p.prompt, str)
                        else p.prompt[-1]["content"], "chosen": g["texts"][best],
                        "rejected": g["texts"][worst], "score_chosen": float(g["total"][best]),
                        "score_rejected": float(g["total"][worst])})
    sides = []
    for side in (chosen, rejected):
      tokens = np.stack([np.pad(t, (0, self.rl.max_new_tokens - len(t))) for _, t, _, _ in side])
      lengths = np.asarray([n for _, _, n, _ in side])
      rows = completion_rows([ids for ids, _, _, _ in side], tokens, lengths, 1, self.width)
      rows["loss_mask"] *= np.asarray([0 if f else 1 for _, _, _, f in side], np.int32)[:, None]
      sides.append(rows)
    batch = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in _ROW_KEYS}
    scores_c, scores_r = np.asarray(scores_c), np.asarray(scores_r)
    real = np.asarray([not g.get("filler") for g in groups])
    lengths = np.concatenate([g["lengths"] for g in groups])
    metrics = {
        "scores/chosen": float(scores_c[real].mean()) if real.any() else 0.0,
        "scores/rejected": float(scores_r[real].mean()) if real.any() else 0.0,
        "scores/margin": float((scores_c - scores_r)[real].mean()) if real.any() else 0.0,
        "reward": float(np.concatenate([g["total"] for g in groups]).mean()),
        "completions/mean_length": float(lengths.mean()),
    }
    return batch, metrics, samples

  def _queue_pairs(self, batch, metrics, samples, t_ready, t_sample, t_reward, tries,
                   generated) -> None:
    """Queues online DPO's mini-batches (`num_iterations` passes) and records the rollout."""
    rl, n = self.rl, self.run.cfg.train.batch_size
    minis = [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(rl.mini_batches)]
    for _ in range(rl.num_iterations):
      self.queue.extend(minis)
    now = time.perf_counter()
    metrics.update({"dynamic_sampling/rounds": float(tries), "timing/sampling_s": t_sample,
                    "timing/reward_s": t_reward, "timing/rollout_s": now - t_ready,
                    "rollout_tokens_per_s": generated / max(t_sample, 1e-9)})
    if self._last_ready is not None:
      metrics["timing/update_s"] = t_ready - self._last_ready
    self._metrics, self._samples, self._last_ready = metrics, samples, now
    self.rollouts += 1

  def _clipped(self, tokens_NxM, lengths_N) -> np.ndarray:
    """Completions that reached max_new_tokens without a stop token."""
    stops = np.asarray(self.run.tokenizer.eos_ids or [-1])
    last = tokens_NxM[np.arange(len(lengths_N)), np.maximum(lengths_N - 1, 0)]
    return (lengths_N >= self.rl.max_new_tokens) & ~np.isin(last, stops)

  def _with_logps(self, batch: dict[str, np.ndarray], model, policy) -> dict[str, np.ndarray]:
    """Adds the old policy's log-probs (when the batch is used for more than one update) and
    the reference's (when beta > 0), both for PPO, from no-grad forwards at the sampling
    temperature."""
    rl = self.rl
    rows = self.run.place({k: batch[k] for k in _ROW_KEYS})
    updates = rl.num_iterations * rl.mini_batches
    if updates > 1 or self.ppo is not None:  # PPO's KL penalty reads them
      batch["old_logps"] = np.asarray(host_tree(self._logps(model, rows)), np.float32)
    else:  # every row is fresh: the loss uses its own log-probs, without gradient
      batch["old_logps"] = np.zeros_like(batch["advantages"])
    if rl.beta > 0 or self.ppo is not None:
      reference = self.run.reference_model(policy.params, policy.frozen)
      batch["ref_logps"] = np.asarray(host_tree(self._logps(reference, rows)), np.float32)
    if rl.tis_cap is None:
      del batch["sampler_logps"]
    return batch

  def _split(self, batch: dict[str, np.ndarray], step: int) -> None:
    """Queues the rollout's `num_iterations` passes of `mini_batches` mini-batches (the first
    taken at `step`); the first mini-batch is fresh (the policy has not moved since sampling).
    PPO's carry `policy_on` (0 during the critic's warm-up)."""
    rl = self.rl
    n = self.run.cfg.train.batch_size
    minis = [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(rl.mini_batches)]
    for it in range(rl.num_iterations):
      for i, mb in enumerate(minis):
        fresh = np.full((n,), float(it == 0 and i == 0), np.float32)
        mb = dict(mb, fresh=fresh)
        if self.ppo is not None:
          on = self.ppo.policy_on(step + it * rl.mini_batches + i)
          mb["policy_on"] = np.full((n,), on, np.float32)
        self.queue.append(mb)
