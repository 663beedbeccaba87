"""jaxpost side of `benchmarks/run.py`: one workload per process, in the project's venv.

What one timed step is, per workload (each step ends with `jax.block_until_ready` on the new
train state and the metrics, or on the generated tokens):

* **matmul**: not a workload but the f32 ceiling: `bench_model.bench_matmul` (best GFLOP/s of a
  jitted square `a @ b`), run at the start and at the end of a benchmark run; with it the read
  bandwidth (`roofline.bench_bandwidth`), for generation's bound.
* **sft**: `jaxpost.train.make_train_step(partial(sft_loss, config=...), adamw)` as in
  `bench_model.bench_train_step`: one call `step(state, batch, {})` (forward, chunked LM head
  and log-softmax under `jax.checkpoint`, backward, AdamW, the NaN guard). The loss covers
  the T - 1 tokens that have a next token (as Tunix's and Hugging Face's shifted losses).
* **lora**: the same step over `jaxpost.peft.lora_loss(sft_loss, LoraConfig(rank, alpha,
  targets))`: the trainable params are the adapters from `init_lora`, the base arrives frozen
  as `{"base": params}` (no gradient, no optimizer state), as `jaxpost.train.trainer` wires
  it; how the adapters enter the forward is `jaxpost.peft.lora`'s business.
* **dpo**: the same step over jaxpost's own `jaxpost.losses.dpo.dpo_loss(loss_type="sigmoid",
  beta)` on a paired [P, 2, T] batch (index 0 chosen, 1 rejected): policy log-probs of the 2P
  rows in one forward (`forward(..., compute_logits=False)`, `target_logprobs`,
  `sequence_logprobs`), the reference parameters passed frozen as `{"ref_params": ...}` and
  their log-probs computed inside the same step under `stop_gradient`, then
  `jaxpost.losses.preference.preference_loss` (DPO, Rafailov et al. 2023, eq. 7) on the
  summed response log-probs.
* **distill**: the same step over `jaxpost.losses.distill_batch_loss` (the loss `algorithm:
  distill` trains with, `jaxpost.algorithms.distill`) on the SFT batch, `kind` and
  `temperature` from the spec (forward KL, 1.0), no cross-entropy term (sft_weight 0), default
  chunk (256): the student's forward and backward, and the frozen teacher (its own shape,
  `spec["distill"]["teacher"]`, initialised from seed + 1) passed as `{"teacher_params": ...}`
  and run forward inside the same step without gradient; both LM heads and the divergence are
  computed a chunk of positions at a time under `jax.checkpoint`.
* **generate**: one call of `jaxpost.sampling.generate(..., temperature=0.0)` (greedy) on the
  prompt batch, prefill included.
* **sft_chat**, **dpo_shared_prompt**, **dpo_precomputed_ref**: see `jaxpost_user.py`.
* **long_context_*k**: the sft step on `spec["train"]` (batch 1 of 1024 ... 8192 tokens) with
  `sft_loss(attention=spec["long_context"]["attention"])` (`model.attention`: auto, dense or
  blockwise).
* **grpo**: one RL step, rollout then update, as `jaxpost.rl.rollout.RolloutSource` and the
  train loop do it, from the library's own pieces. Rollout: `jaxpost.sampling.generate(...,
  temperature=1.0, num_samples=G)` (each prompt prefilled once, its KV cache shared by its G
  samples; no stop token, so every row generates all new tokens) with the tokens brought to
  the host; the reward (`common.grpo_reward`) of each completion on the host;
  `jaxpost.losses.group_advantages`; `jaxpost.rl.rollout.completion_rows` (prompt +
  completion rows); the batch put on the device. Update: one `make_train_step(grpo_loss,
  adamw)` call on the G x P rows (`jaxpost.algorithms.grpo.grpo_loss`, temperature 1, "dapo"
  aggregation, beta 0 so no reference model; every row `fresh`, so the old log-probs are the
  current ones and no extra forward is needed, as with one update per rollout in jaxpost's
  trainer, which then passes `on_policy=True`: the LM head's gradient is taken in the forward
  pass, `token_nll`). The result has the medians of the sampling, rollout and update
  phases besides the whole step's, and the matmul FLOPs of the traced update step.
* **ppo**: one PPO step, rollout then update, as `RolloutSource` with `PPOTargets` do it.
  Rollout: `generate(..., num_samples=1)` on the 16 prompts, the rewards on the host,
  `completion_rows`, the old policy's and the reference's log-probs
  (`jaxpost.rl.rollout._logps_fn`; the reference a copy of the initial params) and the
  critic's values (`jaxpost.algorithms.ppo.critic_values`), `ppo_rollout.token_rewards` (k1
  penalty, kl_coef 0.05), `losses.rl.gae` and `masked_whiten`, the batch on the device.
  Update: one `make_train_step(ppo_loss, adamw)` call over the policy and its critic (one
  tree from `ppo.with_critic`, one optimizer), the rows fresh and `on_policy=True` as the
  trainer does with one update per rollout (the policy term through `token_nll`). Reported
  as grpo.

Besides the times, it counts the FLOPs of every matmul in each training step's traced program
(`bench_model.jaxpr_matmul_flops`): the matmul work jaxpost actually executes, to compare with
the model FLOPs that MFU is charged (recomputation, or full weight gradients under LoRA, would
show up as a difference).
"""

from __future__ import annotations

import functools
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))  # benchmarks/, for bench_model

import common

PACKAGES = ("jaxpost", "jax", "jaxlib", "flax", "optax", "numpy")  # whose versions a result records


def jaxpost_config(model: dict):
  """jaxpost's `ModelConfig` for the spec's "model" entry."""
  from jaxpost.models import ModelConfig, RopeConfig

  return ModelConfig(
      model_type="llama", vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
      num_layers=model["num_layers"], num_heads=model["num_heads"],
      num_kv_heads=model["num_kv_heads"], head_dim=model["head_dim"],
      intermediate_size=model["intermediate_size"], rms_norm_eps=model["norm_eps"],
      rope=RopeConfig(theta=float(model["rope_theta"])),
      tie_embeddings=model["tie_embeddings"])


def make_optimizer(spec: dict):
  """AdamW with the spec's hyper-parameters (constant learning rate, no clipping)."""
  import optax

  o = spec["optim"]
  return optax.adamw(o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"],
                     weight_decay=o["weight_decay"])


def lm_batch(tokens_BxT, scored_BxT=None) -> dict:
  """A jaxpost batch for next-token losses over `tokens_BxT`.

  `scored_BxT` marks the tokens whose log-probability counts (default: all but the first);
  the loss mask sits one position earlier, where that token is the target.
  """
  import numpy as np

  B, T = tokens_BxT.shape
  if scored_BxT is None:
    scored_BxT = np.ones((B, T), bool)
    scored_BxT[:, 0] = False
  loss_mask = np.zeros((B, T), bool)
  loss_mask[:, :-1] = scored_BxT[:, 1:]
  return {"tokens": tokens_BxT, "targets": np.roll(tokens_BxT, -1, axis=1),
          "loss_mask": loss_mask, "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def bench_train(spec: dict) -> dict:
  """SFT, LoRA, DPO or distillation update steps through `make_train_step`."""
  import jax
  import jax.numpy as jnp
  import jaxpost_user  # pylint: disable=import-outside-toplevel

  from jaxpost.losses import distill_batch_loss, sft_loss
  from jaxpost.losses.dpo import dpo_loss
  from jaxpost.models import init_params
  from jaxpost.peft import LoraConfig, init_lora, lora_loss
  from jaxpost.train import init_state, make_train_step

  w = spec["workload"]
  config = jaxpost_config(spec["model"])
  params = init_params(config, jax.random.key(spec["seed"]), dtype=jnp.float32)
  opt = make_optimizer(spec)
  if w == "dpo":
    tokens, response = common.dpo_rows(spec)
    P = tokens.shape[0] // 2  # [2P, T] rows (chosen, then rejected) -> [P, 2, T] pairs
    batch = {k: v.reshape(2, P, *v.shape[1:]).swapaxes(0, 1)
             for k, v in lm_batch(tokens, response).items()}
    loss_fn = functools.partial(dpo_loss, config=config, loss_type="sigmoid",
                                beta=spec["dpo"]["beta"])
    trainable, frozen = params, {"ref_params": jax.tree.map(jnp.copy, params)}
  elif w in ("sft_chat", "dpo_shared_prompt", "dpo_precomputed_ref"):
    bench = jaxpost_user.bench_chat if w == "sft_chat" else jaxpost_user.bench_dpo_shared
    return bench(spec, config, params, opt)
  else:
    tokens = common.sft_tokens(spec)
    batch = lm_batch(tokens)
    # long_context_*k: the attention implementation the run asks for (model.attention)
    kw = ({"attention": spec["long_context"]["attention"]} if w.startswith("long_context_")
          else {})
    loss_fn = functools.partial(sft_loss, config=config, **kw)
    trainable, frozen = params, {}
    if w == "distill":
      d = spec["distill"]
      teacher = jaxpost_config(d["teacher"])
      loss_fn = functools.partial(distill_batch_loss, config=config, teacher_config=teacher,
                                  kind=d["kind"], temperature=d["temperature"])
      frozen = {"teacher_params": init_params(teacher, jax.random.key(spec["seed"] + 1),
                                              dtype=jnp.float32)}
    elif w == "lora":
      lo = spec["lora"]
      lora = LoraConfig(rank=lo["rank"], alpha=float(lo["alpha"]), targets=tuple(lo["targets"]))
      loss_fn = lora_loss(loss_fn, lora)
      trainable = init_lora(config, lora, jax.random.key(spec["seed"] + 1))
      frozen = {"base": params}
  batch = jax.device_put(batch)
  step = make_train_step(loss_fn, opt)
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  timing, losses, executed = jaxpost_user.time_update_steps(
      step, init_state(trainable, opt, jax.random.key(0)), batch, frozen, spec)
  return dict(timing, data_digest=common.digest(tokens), losses=losses,
              trainable_params=n_trainable, executed_matmul_flops=executed)


def bench_generate(spec: dict) -> dict:
  """Greedy `jaxpost.sampling.generate` on the prompt batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxpost.models import init_params
  from jaxpost.sampling import generate

  g = spec["generate"]
  config = jaxpost_config(spec["model"])
  params = init_params(config, jax.random.key(spec["seed"]), dtype=jnp.float32)
  ids = common.prompts(spec)
  call = functools.partial(generate, config, params, ids.tolist(),
                           max_new_tokens=g["new_tokens"], temperature=0.0)
  lengths = []

  def one():
    out = jax.block_until_ready(call())
    lengths.append(np.asarray(out.lengths).tolist())
    return out

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  return common.generation_result("jaxpost", timing, ids, lengths[-1], g["new_tokens"])


def _update(step, holder, batch, phases, times):
  """One RL update `holder[0] = step(holder[0], batch)`, timed to the end; records the
  sampling, rollout and update phases from `times` = (start, sampling done, rollout done)."""
  import jax  # pylint: disable=import-outside-toplevel
  t0, t1, t2 = times
  holder[0], metrics = step(holder[0], batch, {})
  jax.block_until_ready((holder[0], metrics))
  phases["sampling"].append(t1 - t0)
  phases["rollout"].append(t2 - t0)
  phases["update"].append(time.perf_counter() - t2)
  return metrics


def bench_grpo(spec: dict) -> dict:
  """One GRPO step per call: rollout (sampling, rewards, advantages, rows), then the update."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench_model import jaxpr_matmul_flops

  from jaxpost.algorithms.grpo import grpo_loss
  from jaxpost.losses import group_advantages
  from jaxpost.models import init_params
  from jaxpost.rl.rollout import completion_rows
  from jaxpost.sampling import generate
  from jaxpost.train import init_state, make_train_step

  g = spec["grpo"]
  G, P, N = g["group"], g["prompt_len"], g["new_tokens"]
  config = jaxpost_config(spec["model"])
  params = init_params(config, jax.random.key(spec["seed"]), dtype=jnp.float32)
  opt = make_optimizer(spec)
  loss = functools.partial(grpo_loss, config=config, temperature=g["temperature"],
                           aggregation="dapo", on_policy=True)
  step = make_train_step(lambda params, batch, rng: loss(params, batch, rng), opt)
  holder = [init_state(params, opt, jax.random.key(0))]
  ids = common.grpo_prompts(spec)
  prompt_ids = ids.tolist()
  key = jax.random.key(spec["seed"] + 4)
  phases = {"sampling": [], "rollout": [], "update": []}
  losses, rewards_mean, lengths = [], [], []
  last_batch = [None]

  def one():
    t0 = time.perf_counter()
    out = generate(config, holder[0].params, prompt_ids, max_new_tokens=N,
                   temperature=g["temperature"], num_samples=G,
                   seed=jax.random.fold_in(key, len(losses)), prompt_bucket=P)
    tokens, lens = (np.asarray(x) for x in jax.device_get((out.tokens, out.lengths)))
    t1 = time.perf_counter()
    rewards = np.asarray([common.grpo_reward(tokens[n, :lens[n]]) for n in range(len(tokens))],
                         np.float32)
    rows = completion_rows(prompt_ids, tokens, lens, group_size=G, width=P + N)
    adv = np.asarray(group_advantages(jnp.asarray(rewards), G))[:, None] * rows["loss_mask"]
    batch = jax.device_put(dict(rows, advantages=adv.astype(np.float32),
                                old_logps=np.zeros(adv.shape, np.float32),
                                fresh=np.ones((len(tokens),), np.float32)))
    metrics = _update(step, holder, batch, phases, (t0, t1, time.perf_counter()))
    last_batch[0] = batch
    losses.append(float(metrics["loss"]))
    rewards_mean.append(float(rewards.mean()))
    lengths.append(lens.tolist())
    return metrics

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  if any(n != N for n in lengths[-1]):
    raise RuntimeError(f"jaxpost generated {lengths[-1]} tokens per row, expected {N} each")
  executed = jaxpr_matmul_flops(lambda s, b, f: step(s, b, f), holder[0], last_batch[0], {})
  return dict(timing, **common.phase_medians(phases, spec["steps"]), phases=phases,
              update_executed_matmul_flops=executed,
              data_digest=common.digest(ids), losses=losses, rewards_mean=rewards_mean,
              trainable_params=sum(x.size for x in jax.tree.leaves(params)),
              generated_lengths=sorted(set(lengths[-1])))


def bench_ppo(spec: dict) -> dict:
  """One PPO step per call: rollout (sampling, rewards, the old policy's, the reference's and
  the critic's no-grad forwards, KL-penalised token rewards, GAE), then the update."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench_model import jaxpr_matmul_flops

  from jaxpost.algorithms import ppo
  from jaxpost.losses.rl import gae, masked_whiten
  from jaxpost.models import init_params
  from jaxpost.rl.ppo_rollout import token_rewards
  from jaxpost.rl.rollout import _logps_fn, completion_rows
  from jaxpost.sampling import generate
  from jaxpost.train import init_state, make_train_step

  p = spec["ppo"]
  P, N = p["prompt_len"], p["new_tokens"]
  config = jaxpost_config(spec["model"])
  policy = init_params(config, jax.random.key(spec["seed"]), dtype=jnp.float32)
  ref_params = jax.tree.map(jnp.copy, policy)  # the reference: the initial policy
  params = ppo.with_critic(config, policy, jax.random.key(spec["seed"] + 1))
  opt = make_optimizer(spec)
  loss = functools.partial(ppo.ppo_loss, config=config, temperature=p["temperature"],
                           vf_coef=p["vf_coef"], value_clip=p["value_clip"],
                           clip_low=p["clip"], clip_high=p["clip"], on_policy=True)
  step = make_train_step(lambda params, batch, rng: loss(params, batch, rng), opt)
  logps = _logps_fn(config, p["temperature"], None)
  values_fn = jax.jit(lambda critic, rows: ppo.critic_values(
      config, critic, rows["tokens"], positions=rows["positions"],
      segment_ids=rows["segment_ids"]))
  holder = [init_state(params, opt, jax.random.key(0))]
  ids = common.ppo_prompts(spec)
  prompt_ids = ids.tolist()
  key = jax.random.key(spec["seed"] + 4)
  phases = {"sampling": [], "rollout": [], "update": []}
  losses, rewards_mean, kl_mean, lengths = [], [], [], []
  last_batch = [None]

  def one():
    t0 = time.perf_counter()
    model = holder[0].params
    out = generate(config, ppo.policy_of(model), prompt_ids, max_new_tokens=N,
                   temperature=p["temperature"], num_samples=1,
                   seed=jax.random.fold_in(key, len(losses)), prompt_bucket=P)
    tokens, lens = (np.asarray(x) for x in jax.device_get((out.tokens, out.lengths)))
    t1 = time.perf_counter()
    scores = np.asarray([common.grpo_reward(tokens[n, :lens[n]]) for n in range(len(tokens))],
                        np.float32)
    rows = completion_rows(prompt_ids, tokens, lens, group_size=1, width=P + N)
    mask = rows["loss_mask"].astype(np.float32)
    on_device = jax.device_put({k: rows[k] for k in ("tokens", "targets", "segment_ids",
                                                     "positions")})
    old, ref, values = jax.device_get((logps(ppo.policy_of(model), on_device),
                                       logps(ref_params, on_device),
                                       values_fn(model[ppo.CRITIC], on_device)))
    old = np.asarray(old, np.float32) * mask
    values = np.asarray(values, np.float32) * mask
    rewards, k1 = token_rewards(scores, old, ref, mask, p["kl_coef"])
    adv, returns = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                       gamma=p["gamma"], lam=p["lam"])
    adv = masked_whiten(adv, jnp.asarray(mask))
    batch = jax.device_put(dict(rows, advantages=adv, returns=returns, old_values=values,
                                old_logps=old, fresh=np.ones((len(tokens),), np.float32)))
    jax.block_until_ready(batch)
    metrics = _update(step, holder, batch, phases, (t0, t1, time.perf_counter()))
    last_batch[0] = batch
    losses.append(float(metrics["loss"]))
    rewards_mean.append(float(scores.mean()))
    kl_mean.append(float(k1.sum(axis=1).mean()))
    lengths.append(lens.tolist())
    return metrics

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  if any(n != N for n in lengths[-1]):
    raise RuntimeError(f"jaxpost generated {lengths[-1]} tokens per row, expected {N} each")
  executed = jaxpr_matmul_flops(lambda s, b, f: step(s, b, f), holder[0], last_batch[0], {})
  return dict(timing, **common.phase_medians(phases, spec["steps"]), phases=phases,
              update_executed_matmul_flops=executed,
              data_digest=common.digest(ids), losses=losses, rewards_mean=rewards_mean,
              kl_mean=kl_mean, trainable_params=sum(x.size for x in jax.tree.leaves(params)),
              generated_lengths=sorted(set(lengths[-1])))


def bench_ceiling(spec: dict) -> dict:
  """The f32 matmul ceiling (`bench_model.bench_matmul`) and the read bandwidth
  (`roofline.bench_bandwidth`, for generation's bound)."""
  from bench_model import bench_matmul
  from roofline import bench_bandwidth

  m = spec["matmul"]
  best, rows = bench_matmul(m["sizes"], m["reps"])
  return {"ceiling_gflop_per_s": best,
          "sizes": {r.shape: r.extra["best_gflop_per_s"] for r in rows},
          **bench_bandwidth(reps=m["reps"] + 5)}


def main() -> None:
  """Runs the spec's workload and prints the result line."""
  spec = common.read_spec()
  start = time.perf_counter()
  import jax

  if spec.get("compile_cache"):  # as the CLI does (benchmarks/starts.py); off by default
    from jaxpost.compile_cache import enable_compile_cache

    enable_compile_cache(spec["compile_cache"])

  common.log(f"jaxpost worker: {spec['workload']} on {jax.devices()[0].device_kind}")
  w = spec["workload"]
  if w in ("sft", "lora", "dpo", "distill", "sft_chat", "dpo_shared_prompt",
           "dpo_precomputed_ref") or w.startswith("long_context_"):
    result = bench_train(spec)
  elif w == "generate":
    result = bench_generate(spec)
  elif w == "grpo":
    result = bench_grpo(spec)
  elif w == "ppo":
    result = bench_ppo(spec)
  elif w == "matmul":
    result = bench_ceiling(spec)
  else:
    raise SystemExit(f"jaxpost worker: no workload {w!r}")
  result.update(framework="jaxpost", workload=w, versions=common.package_versions(PACKAGES),
                wall_s=time.perf_counter() - start)
  if w == "matmul":
    from bench_model import machine_info

    result["machine"] = machine_info()
  common.emit(result)


if __name__ == "__main__":
  main()
