"""The report of `benchmarks/run.py`: RESULTS.md (the machine, the software, the markdown
tables, what is compared and timed) and results.png, from the aggregated rows (`run.aggregate`:
one dict per workload and framework).
"""

from __future__ import annotations

import statistics

from bench_model import layer_matmul_params, machine_line, matmul_params
from flops import lora_matmul_params  # first: it puts benchmarks/workers/ on sys.path
from jaxpost_worker import jaxpost_config
from roofline import bound_table
from workloads import (FRAMEWORK_TITLES, FRAMEWORKS, LORA, WORKLOADS, Settings, make_spec,
                       teacher_model)

from jaxpost.models import num_params


def _fmt(x, spec: str, suffix: str = "") -> str:
  return "-" if x is None else format(x, spec) + suffix


def summary_table(rows: list[dict], s: Settings) -> str:
  """Per workload: tokens/s of each framework and jaxpost's speed relative to the others."""
  fws = [f for f in FRAMEWORKS if f in s.frameworks]
  others = [f for f in fws if f != "jaxpost"] if "jaxpost" in fws else []
  head = ("| workload | " + " | ".join(f"{FRAMEWORK_TITLES[f]} tokens/s" for f in fws)
          + "".join(f" | jaxpost / {FRAMEWORK_TITLES[f]}" for f in others) + " |")
  lines = [head, "|---|" + "--:|" * (len(fws) + len(others))]
  by_key = {(r["workload"], r["framework"]): r for r in rows}
  for name in s.workloads:
    w = WORKLOADS[name]
    cells = []
    for f in fws:
      r = by_key.get((name, f))
      if r is None and w.peers_from and f != "jaxpost":  # the same work's row, shown again
        r = by_key.get((w.peers_from, f))
      if r is None:
        cells.append("n/a")
      elif "tokens_per_s" not in r:
        cells.append("failed")
      else:
        cells.append(f"{r['tokens_per_s']:,.0f}")
    jp = by_key.get((name, "jaxpost"), {})
    cells += [_fmt(jp.get(f"speedup_vs_{f}"), ".2f", "x") for f in others]
    lines.append(f"| {w.title} ({w.unit}) | " + " | ".join(cells) + " |")
    for phase in w.phases:
      cells = []
      for f in fws:
        p = by_key.get((name, f), {}).get("phases", {}).get(phase.key)
        cells.append("n/a" if (name, f) not in by_key else
                     "failed" if p is None else f"{p['tokens_per_s']:,.0f}")
      p = by_key.get((name, "jaxpost"), {}).get("phases", {}).get(phase.key, {})
      cells += [_fmt(p.get(f"speedup_vs_{f}"), ".2f", "x") for f in others]
      lines.append(f"| &nbsp;&nbsp;{phase.title} ({phase.unit}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def phase_table(rows: list[dict]) -> str:
  """The split of the workloads timed in parts (GRPO): time, throughput and MFU per part."""
  lines = [("| workload | framework | part | median s | share of step | rounds (fastest-slowest s) "
            "| tokens / step | tokens/s | MFU |"), "|---|---|---|--:|--:|--:|--:|--:|--:|"]
  for r in rows:
    if not r.get("phases"):
      continue
    name = WORKLOADS[r["workload"]].title
    fw = FRAMEWORK_TITLES[r["framework"]]
    for p in r["phases"].values():
      share = f"{100 * p['median_s'] / r['median_s']:.0f}%"
      if "tokens_per_s" in p:
        lines.append(
            f"| {name} | {fw} | {p['title']} | {p['median_s']:.3f} | {share} "
            f"| {p['fastest_round_s']:.3f}-{p['slowest_round_s']:.3f} "
            f"| {p['tokens_per_step']:,} {p['unit']} | {p['tokens_per_s']:,.0f} "
            f"| {100 * p['mfu']:.1f}% |")
      else:
        lines.append(f"| {name} | {fw} | {p['title']} | {p['median_s']:.3f} | {share} "
                     "| | | | |")
    lines.append(f"| {name} | {fw} | whole step | {r['median_s']:.3f} | 100% "
                 f"| {r['fastest_round_s']:.3f}-{r['slowest_round_s']:.3f} "
                 f"| {r['tokens_per_step']:,} {WORKLOADS[r['workload']].unit} "
                 f"| {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
  return "\n".join(lines) if len(lines) > 2 else ""


def detail_table(rows: list[dict]) -> str:
  """Every (workload, framework): times, throughput, MFU, compile and memory."""
  lines = [("| workload | framework | median step s | rounds (fastest-slowest s) | tokens/s "
            "| MFU | CPU s / step | compile s | first step s | peak RSS MiB | other load "
            "| loss first -> last |"),
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for r in rows:
    name = WORKLOADS[r["workload"]].title
    fw = FRAMEWORK_TITLES[r["framework"]]
    if "median_s" not in r:
      lines.append(f"| {name} | {fw} | failed ({r['rounds'] - r['rounds_ok']}/{r['rounds']} "
                   "rounds, see below) | | | | | | | | | |")
      continue
    loss = (f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if "loss_first" in r else "-")
    lines.append(
        f"| {name} | {fw} | {r['median_s']:.3f} | {r['rounds_ok']} "
        f"({r['fastest_round_s']:.3f}-{r['slowest_round_s']:.3f}) | {r['tokens_per_s']:,.0f} "
        f"| {100 * r['mfu']:.1f}% | {_fmt(r.get('median_cpu_s'), '.2f')} "
        f"| {r['compile_s']:.1f} | {r['first_step_s']:.1f} "
        f"| {r['peak_rss_mb']:,.0f} | {100 * r['other_load']:.0f}% | {loss} |")
  return "\n".join(lines)


def flops_table(rows: list[dict], s: Settings) -> str:
  """The model FLOPs each workload is charged, and what jaxpost's traced step executes."""
  lines = [("| workload | tokens / step | model GFLOP / step | jaxpost executed matmul GFLOP "
            "/ step (jaxpr) |"), "|---|--:|--:|--:|"]
  for name in s.workloads:
    r = next((x for x in rows if x["workload"] == name), None)
    if r is None:
      continue
    jp = next((x for x in rows if x["workload"] == name and x["framework"] == "jaxpost"), {})
    ex = jp.get("executed_flops_per_step")
    lines.append(f"| {WORKLOADS[name].title} | {r['tokens_per_step']:,} "
                 f"| {r['model_flops_per_step'] / 1e9:,.1f} | {_fmt(ex and ex / 1e9, ',.1f')} |")
    config = jaxpost_config(s.model)
    spec = make_spec(s, name)
    for phase in WORKLOADS[name].phases:
      ex = jp.get(f"{phase.key}_executed_flops_per_step")
      lines.append(f"| &nbsp;&nbsp;{phase.title} | {phase.tokens_per_step(spec):,} "
                   f"{phase.unit} | {phase.flops_per_step(config, spec) / 1e9:,.1f} "
                   f"| {_fmt(ex and ex / 1e9, ',.1f')} |")
  return "\n".join(lines)


def chat_table(rows: list[dict]) -> str:
  """sft_chat: how each framework lays the same conversations out, and the epoch it takes."""
  lines = [("| framework | layout | steps / epoch | token slots | padding | epoch s "
            "| real tokens/s | jaxpost / framework |"), "|---|---|--:|--:|--:|--:|--:|--:|"]
  mine = next((r for r in rows if r["workload"] == "sft_chat" and r["framework"] == "jaxpost"
               and "tokens_per_s" in r), None)
  for r in rows:
    if r["workload"] != "sft_chat" or "median_s" not in r:
      continue
    ratio = _fmt(mine and mine["tokens_per_s"] / r["tokens_per_s"], ".2f", "x")
    lines.append(f"| {FRAMEWORK_TITLES[r['framework']]} | {r.get('layout', '-')} "
                 f"| {r.get('steps_per_epoch', '-')} | {r.get('token_slots', 0):,} "
                 f"| {100 * r.get('padding_share', 0.0):.0f}% | {r['median_s']:.2f} "
                 f"| {r['tokens_per_s']:,.0f} | {ratio} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def long_context_table(rows: list[dict], s: Settings) -> str:
  """long_context_*k: step time and peak memory against the sequence length, per framework,
  and their growth from the shortest length measured."""
  lines = [("| framework | length | step s | tokens/s | MFU | peak RSS MiB | time vs "
            "first length | memory vs first length |"), "|---|--:|--:|--:|--:|--:|--:|--:|"]
  for fw in FRAMEWORKS:
    mine = [r for r in rows if r["workload"].startswith("long_context_")
            and r["framework"] == fw and "median_s" in r]
    mine.sort(key=lambda r: r["tokens_per_step"])
    for r in mine:
      first = mine[0]
      title = FRAMEWORK_TITLES[fw] + (f" (attention={s.attention})" if fw == "jaxpost" else "")
      lines.append(f"| {title} | {r['tokens_per_step']:,} | {r['median_s']:.3f} "
                   f"| {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
                   f"| {r['peak_rss_mb']:,.0f} | {r['median_s'] / first['median_s']:.1f}x "
                   f"| {r['peak_rss_mb'] / first['peak_rss_mb']:.2f}x |")
  return "\n".join(lines) if len(lines) > 2 else ""


def dpo_variants_table(rows: list[dict]) -> str:
  """The DPO rows on the same pairs: two rows per pair or one shared row, the reference in the
  step or precomputed; the loss of each row's first and last step (the same on every jaxpost
  row: same pairs, same initial weights)."""
  names = ("dpo", "dpo_shared_prompt", "dpo_precomputed_ref")
  lines = [("| workload | framework | rows x tokens per step | step s | tokens of both sides / s "
            "| reference precompute s | loss first -> last |"), "|---|---|--:|--:|--:|--:|--:|"]
  for r in rows:
    if r["workload"] not in names or "median_s" not in r:
      continue
    shape = r.get("row_shape")
    shape = f"{shape[0]} x {shape[1]}" if shape else "2P rows (chosen, rejected)"
    loss = (f"{r['loss_first']:.6f} -> {r['loss_last']:.6f}" if "loss_first" in r else "-")
    lines.append(f"| {WORKLOADS[r['workload']].title} | {FRAMEWORK_TITLES[r['framework']]} "
                 f"| {shape} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} "
                 f"| {_fmt(r.get('precompute_s'), '.2f')} | {loss} |")
  return "\n".join(lines) if len(lines) > 3 else ""


def data_line(rows: list[dict], s: Settings) -> str:
  """Whether every framework fed its model the same token ids (their fingerprints)."""
  parts, same = [], True
  for name in s.workloads:
    digests = sorted({d for r in rows if r["workload"] == name for d in r.get("data_digest", [])})
    same = same and len(digests) <= 1
    parts.append(f"{name} {'/'.join(digests) or '-'}")
  verdict = "yes" if same else "**NO**"
  return f"**Same token ids on every side:** {verdict} (fingerprints: {', '.join(parts)})."


def versions_lines(rows: list[dict]) -> list[str]:
  """One line per framework: the package versions its worker reported."""
  out = []
  for fw in FRAMEWORKS:
    v = next((r["versions"] for r in rows if r["framework"] == fw and "versions" in r), None)
    if v:
      out.append(f"* {FRAMEWORK_TITLES[fw]}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
  return out


RESULTS_NOTES = """\
## What is compared

Every framework gets the same Llama-style model (RMSNorm, RoPE theta 500000, GQA, SwiGLU,
tied input/output embeddings, no biases), randomly initialised (normal, std 0.02), in float32,
the same token ids (`benchmarks/workers/common.py`, one numpy seed; ids in [1, vocab);
fingerprinted above from what each worker fed its model) and AdamW with lr 1e-4, betas (0.9, 0.999),
eps 1e-8, weight decay 0.01 on every trained parameter, constant learning rate, no clipping.

* **Full SFT step**: batch 8 x 256 tokens, next-token cross-entropy over the 255 shifted
  positions of each row, a full-parameter AdamW update.
* **LoRA SFT step**: the same loss; rank-16 adapters (alpha 32, scale alpha / rank = 2) on q,
  k, v, o, gate, up and down of every layer, A random, B zero; only the adapters are trained.
* **DPO step**: 8 pairs. Each side of a pair is one row of 256 tokens: a shared 128-token
  prompt and that side's 128-token response; the 16 rows (8 chosen, then 8 rejected) go
  through the policy (forward and backward) and through a frozen reference model with the
  same weights (forward). Loss: sigmoid DPO, beta 0.1, on the responses' summed
  log-probabilities. Tokens per step: 16 x 256 = 4,096.
* **Distillation step**: the SFT batch (8 x 256 tokens) through the student (the model above:
  forward and backward, a full-parameter AdamW update) and through a frozen teacher of the
  same width, heads and vocabulary with twice the layers (forward only). Loss: the forward KL
  KL(p_teacher || p_student) of the next-token distributions at temperature 1, token mean
  over the 255 positions of each row that have a next token (no cross-entropy term): the one
  divergence Tunix's `LogitStrategy` offers, so both sides compute the same loss.
* **Generation**: 16 prompts of 128 random tokens, 128 new tokens each, greedy, KV cache; no
  end token can stop a row early (every framework is checked to return 128 tokens per row).
  Tokens/s counts new tokens; the timed call includes the prefill.
* **GRPO step**: one RL step: a rollout, then one update. Rollout: 2 prompts of 128 random
  tokens, 8 samples each at temperature 1 (no top-k / top-p, no end token: every row
  generates 128 tokens), a reward per completion on the host (the fraction of even token ids,
  the same Python function on each side), group-normalised advantages (mean and std of the 8
  rewards of a prompt). Update: the GRPO loss (clipped ratio, clip 0.2, token-mean over the
  batch, beta 0 so no reference model and no KL) on the 16 rows of 128 prompt + 128
  completion tokens, one AdamW step; one update per rollout, so the old policy is the current
  one (ratio 1, no extra forward for old log-probs on either side). Tokens per step: the
  16 x 256 row tokens (whole step and update), the 16 x 128 generated tokens (rollout).
* **PPO step**: one RL step with a critic: a rollout, then one update. Rollout: 16 prompts of
  128 random tokens, 1 sample each at temperature 1 (no top-k / top-p, no end token), the
  same reward as GRPO at the last completion token, then three no-grad forwards over the
  16 x 256 rows: the policy's log-probs (old), the reference model's (a frozen copy of the
  initial policy) and the critic's values; per-token rewards r_t = -0.05 (logp_old -
  logp_ref) (k1 KL penalty) plus the score at the last token; GAE (gamma 1, lambda 0.95),
  advantages whitened over the batch. Update: one mini-batch, one epoch: the clipped
  surrogate (clip 0.2, token mean) for the policy and the clipped value loss (clip 0.2) for
  the critic (the policy's trunk with a scalar value head), AdamW. Tokens per step as GRPO.
* **SFT epoch, chat lengths** (`sft_chat`): conversations whose prompt and response lengths
  are drawn (fixed seed, the same on every side) from log-normals with ShareGPT's published
  mean lengths, 161.31 prompt and 337.99 response tokens (Kwon et al. 2023, the vLLM paper,
  Fig. 11), sigma 1.0, each cut to 1024 tokens; the loss is on the response tokens only. Each
  framework takes them its own documented way (the chat table): jaxpost packs them with
  segment isolation (`jaxpost.data.BatchIterator(pack=True)`: 2 rows of 1024 per step),
  Tunix pads every conversation to the fixed 1024 of its SFT example (4 per step), PyTorch
  pads 4 per step to the longest of the step. A "step" is one epoch; tokens/s counts the
  real (non-padding) tokens of the epoch, so the ratio is the ratio of epoch times; model
  FLOPs are 3 x forward per real token at its conversation's own length.
* **DPO, prompt scored once** (`dpo_shared_prompt`): the DPO pairs above, each as one row
  `prompt, chosen, rejected` (jaxpost's `dpo.shared_prompt`: 8 rows of 128 + 1 + 2 x 128
  tokens, branch ids so that each response sees the prompt and not the other response), the
  reference in the step. Tunix's `DPOTrainer` has no such layout, so its row is its DPO step
  on the same pairs. `dpo_precomputed_ref`: the same shared rows with the reference's
  log-probs computed once before training (`reference.mode: precomputed`; that one-off time
  is in the DPO table, not in the step), compared with the same Tunix row. Every DPO row
  counts the tokens of both sides (2 x 8 x 256) per step, so their tokens/s compare pairs
  per second; the loss is the same on every jaxpost row.
* **SFT step at 1k-8k tokens** (`long_context_1k` ... `_8k`): one full SFT step on one row of
  1024, 2048, 4096 or 8192 random tokens; the long-context table gives time and peak RSS per
  length and their growth from 1k. jaxpost runs the attention `--attention` names (auto,
  dense or blockwise; `model.attention`).

## What is timed

Each framework's steady-state step: the first 2 training steps (1 generation call) are
warm-up and excluded; the median of the following ones is a round's time; the table gives
the median over rounds. Every timed step ends when its results are computed
(`jax.block_until_ready` on the new parameters / train state and the loss; PyTorch is eager).

* **jaxpost**: the compiled `jaxpost.train.make_train_step` step function, `step(state,
  batch, frozen)`: SFT with `sft_loss` (chunked LM head under `jax.checkpoint`); LoRA with
  `jaxpost.peft.lora_loss` (adapters from `init_lora` trained, the base passed frozen); DPO
  with `jaxpost.losses.dpo.dpo_loss` (sigmoid) on a paired [8, 2, 256] batch, the reference
  parameters passed frozen (`ref_params`) and evaluated inside the same step under
  `stop_gradient`. Distillation: `jaxpost.losses.distill_batch_loss` (what `algorithm:
  distill` trains with; `kind="forward_kl"`, temperature 1, sft_weight 0), the teacher's
  parameters passed frozen and its forward run inside the same step without gradient, both
  LM heads and the divergence computed 256 positions at a time under `jax.checkpoint`.
  Generation: one `jaxpost.sampling.generate` call.
* **Tunix** (its own Llama 3 model `tunix.models.llama3.model.Llama3` at this shape, weights
  from its `create_dummy_model`, a 1 x 1 mesh with `AxisType.Auto` axes): the jitted train
  step of `PeftTrainer` / `DpoTrainer` obtained from `trainer.jit_train_and_eval_step()` (the
  function its `train()` loop calls), each step preceded by the trainer's own
  `_prepare_inputs` and `shard_input` as in the loop. That is one loop iteration minus metric
  logging, the progress bar and checkpointing. For DPO, `_prepare_inputs` runs the reference
  model's jitted log-prob pass, so the reference forward is inside the timed step as it is for
  jaxpost. LoRA: `qwix.LoraProvider` on `.*q_proj|.*k_proj|...|.*down_proj` applied with
  `qwix.apply_lora_to_model`, as Tunix's cli does (unmerged: x W + s (x A) B); the trainer
  then optimises only `nnx.LoRAParam`. SFT uses the trainer's default loss (full [B, T, V]
  logits, one-hot cross-entropy). Generation: one `tunix.generate.sampler.Sampler` call
  (greedy, cache of 256 slots, prompts passed as text through a stub tokenizer of
  space-separated ids; tokenising 16 x 128 ids is negligible). Distillation:
  `tunix.distillation.DistillationTrainer` with `strategies.LogitStrategy(temperature=1,
  alpha=1)` (forward KL only, no task-loss weight) and forward functions returning the logits
  of the first T - 1 positions, as in Tunix's `logit_distillation` example; its
  `_prepare_inputs` runs the teacher's jitted forward (full [B, T - 1, V] logits), then the
  jitted train step runs the student.
* **GRPO** (both sides): each RL step is timed as a whole and in two parts, the rollout
  (sampling, rewards, advantages, the training batch on the device) and the update (one
  optimizer step), each ended with `block_until_ready`; "sampling" is the generation call
  alone, inside the rollout. jaxpost: `jaxpost.sampling.generate(..., temperature=1.0,
  num_samples=8, prompt_bucket=128)` (each prompt prefilled once, its KV cache shared by its
  8 samples), `jaxpost.losses.group_advantages`, `jaxpost.rl.rollout.completion_rows`, then
  `make_train_step` over `jaxpost.algorithms.grpo.grpo_loss` ("dapo" = token-mean
  aggregation). Tunix: its own loop, `GRPOLearner.train()` on an `RLCluster` (rollout engine
  "vanilla", i.e. its `Sampler`; actor and rollout on one mesh, sharing weights), its steps
  timed by wrapping `_run_global_step` (the whole step), `_generate_and_compute_advantage`
  (rollout), `RLCluster.generate` (sampling) and `RLCluster.update_actor` (update) with timers.
  Tunix repeats each prompt 8 times before generating, so it prefills 16 rows where jaxpost
  prefills 2 (the model FLOPs count the 2 prefills the algorithm needs), and it samples every
  rollout with the same key (`RolloutConfig.seed` None: `PRNGKey(0)`), which changes no work.
* **PPO** (both sides), timed and split as GRPO; the rollout includes the three no-grad
  forwards and GAE. jaxpost: `generate(..., num_samples=1)`, `completion_rows`, the old and
  reference log-probs with `jaxpost.rl.rollout._logps_fn`, the values with
  `jaxpost.algorithms.ppo.critic_values`, `jaxpost.rl.ppo_rollout.token_rewards`,
  `jaxpost.losses.rl.gae` and `masked_whiten`, then one `make_train_step` call over
  `jaxpost.algorithms.ppo.ppo_loss` (vf_coef 0.1; policy and critic in one tree, one AdamW
  step, from `ppo.with_critic`). Tunix: its own loop, `PPOLearner.train()`
  (`PPOConfig(beta=0.05, kl_method="kl", gamma=1, gae_lambda=0.95, epsilon=0.2,
  clip_range_value=0.2)`) on an `RLCluster` with actor, reference (a second `Llama3` with the
  same weights) and critic (`tunix.rl.utils.create_critic_model`: an `nnx.Linear(D, 1)` head
  on a copy of the trunk); the update is `RLCluster.update_actor` plus
  `RLCluster.update_critic` (two trainers, each with its own AdamW; Tunix has no vf_coef),
  timed as one part.
* **PyTorch** (Hugging Face `LlamaForCausalLM`, float32, `torch.set_num_threads(cpu_count)`,
  eager, `sdpa` attention): `zero_grad`, `model(input_ids, labels=input_ids)`, `backward`,
  `AdamW.step`.
  Generation: `model.generate(do_sample=False, min_new_tokens=max_new_tokens=128)` under
  `inference_mode`. LoRA, DPO and distillation are not run on PyTorch (TRL's `GKDTrainer`,
  its distillation trainer, is not installed here).

## Columns

* **tokens/s**: tokens per step / median step time (training: batch x sequence tokens; DPO:
  the tokens of both sides, chosen and rejected rows; generation: new tokens; GRPO: the
  16 x 256 prompt + completion row tokens per RL step, and in its sub-rows the generated
  tokens per second of rollout and the trained row tokens per second of update, each part's
  time the median over rounds of its per-round median; PPO likewise).
* **jaxpost / X**: jaxpost's tokens/s divided by X's (above 1: jaxpost is faster).
* **MFU**: model FLOPs per step / median step time / the f32 matmul ceiling measured in this
  run (`bench_model.bench_matmul`, best of start and end). Model FLOPs are what the workload
  needs, the same for every framework, counted as in `bench_model.py`: forward per token
  2 N + 4 L T H Dh (N: matmul weights incl. the LM head; attention charged for all T keys).
  SFT: 3 x forward. LoRA: 4 N + 3 x attention + 6 N_lora per token (no weight gradients for
  the frozen base). DPO: 4 x forward per token of the 16 rows (policy forward and backward,
  reference forward). Distillation: 3 x the student's forward + 1 x the teacher's forward
  per token (`flops.distill_flops`). Generation: `bench_model.generate_flops`. GRPO:
  rollout = the forward FLOPs of sampling (`generate_flops` with the prefill counted once per
  prompt and the one-token steps once per sample), update = 3 x forward of the 16 x 256 rows.
  PPO: rollout = `generate_flops` (16 x 1 samples) plus two policy forwards (old, reference)
  and one critic forward over the rows (the critic has a D -> 1 value head instead of the LM
  head), update = 3 x (policy + critic forward). For GRPO and PPO the step's MFU is their sum
  over the step's time, each part's over its own time. The FLOP table also gives the matmul
  FLOPs of jaxpost's traced step (`bench_model.jaxpr_matmul_flops`; for GRPO and PPO, of the
  update step only): above the model count where jaxpost recomputes (the LM head chunks under
  `jax.checkpoint`) or does more than the algorithm needs.
* **fraction of bound** (generation): the least time the machine allows for the call
  (`benchmarks/roofline.py`) divided by the median time. The bound is the prefill's FLOPs at
  the matmul ceiling, then for each decode step the larger of (the matmul weights, LM head
  included, plus the keys and values of the step's context, read once at the measured read
  bandwidth) and (its FLOPs at the ceiling). 100% would be a generation that reads nothing
  twice and computes at the ceiling.
* **CPU s / step**: the CPU time of the worker process (all threads) per timed step, median.
  On a quiet machine it is about cores x wall time for work that keeps every core busy; on a
  shared machine it is steadier than the wall time, so it helps read a noisy run (it also
  counts threads that spin while waiting, so it is not a pure measure of work).
* **compile s**: the 2 warm-up steps' time (1 call for generation) beyond as many
  steady-state steps: compilation plus first-call overheads (median over rounds).
  **first step s**: the first step's wall time.
* **peak RSS MiB**: `ru_maxrss` of the worker process after its workload (one workload per
  process; imports, compilation and both models for DPO included); the largest over rounds.
* **other load**: the share of the machine's CPU time used by other processes while the
  worker ran (median over rounds). Above a few percent, the numbers are depressed.
* **loss first -> last**: the loss of the first and of the last step of the first round, a
  sanity check that the sides train the same thing (the weights are drawn differently on each
  side, so the values agree only roughly: ln(32000) = 10.37 at the start of SFT, ln 2 = 0.693
  for DPO; for distillation the KL between two random models whose outputs are nearly
  uniform starts close to 0).
"""


def write_results_md(path: str, s: Settings, rows: list[dict], machine: dict,
                     ceilings: list[float], command: str, started: str, wall_s: float,
                     bandwidths: list[float] | None = None,
                     sections: tuple[str, ...] = ()) -> None:
  """RESULTS.md: machine, software, tables, further `sections` (markdown), notes, failures."""
  config = jaxpost_config(s.model)
  m = s.model
  load = [100 * r["other_load"] for r in rows if "other_load" in r] or [0.0]
  lines = ["# jaxpost vs Tunix vs PyTorch", ""]
  if s.tiny or s.quick:
    flags = " ".join(f for f, on in (("--tiny", s.tiny), ("--quick", s.quick)) if on)
    model = "a 4-layer, width-256 model; " if s.tiny else ""
    banner = (f"> **Smoke run** (`{flags}`): {model}{s.rounds} round(s) of {s.train_steps} "
              "timed steps. It shows that every workload runs; do not compare its numbers. "
              "Regenerate with `python benchmarks/run.py` on a quiet machine.")
    lines += [banner, ""]
  machine_text = (f"**Machine:** {machine_line(machine) if machine else 'unknown'}. CPU used "
                  f"by other processes while the workers ran: median "
                  f"{statistics.median(load):.0f}%, max {max(load):.0f}% (per-row column "
                  "below).")
  ceiling_text = (f"**Ceiling:** {max(ceilings):.1f} GFLOP/s, the best f32 matmul (start "
                  f"{ceilings[0]:.1f} / end {ceilings[-1]:.1f}); MFU is relative to it.")
  if bandwidths:
    ceiling_text += (f" **Read bandwidth:** {max(bandwidths):.1f} GB/s (best jitted "
                     f"reduction of a 256 MiB array, `roofline.py`; start {bandwidths[0]:.1f}"
                     f" / end {bandwidths[-1]:.1f}); with the ceiling it gives generation's "
                     "bound.")
  model_text = (
      f"**Model:** vocab {m['vocab_size']}, hidden {m['hidden_size']}, {m['num_layers']} "
      f"layers, {m['num_heads']} heads / {m['num_kv_heads']} KV heads (head_dim "
      f"{m['head_dim']}), MLP {m['intermediate_size']}, "
      f"{'tied' if m['tie_embeddings'] else 'untied'} embeddings, float32: "
      f"{num_params(config):,} parameters ({matmul_params(config):,} in matmuls, "
      f"{layer_matmul_params(config):,} in the layers). LoRA adapters: "
      f"{lora_matmul_params(config, LORA['rank'], LORA['targets']):,} parameters.")
  if "distill" in s.workloads:
    teacher = jaxpost_config(teacher_model(s))
    model_text += (f" Distillation teacher: the same with {teacher.num_layers} layers, "
                   f"{num_params(teacher):,} parameters.")
  runs_text = (f"**Runs:** {s.rounds} round(s); per worker {s.train_warmup} warm-up + "
               f"{s.train_steps} timed training steps, {s.gen_warmup} warm-up + {s.gen_steps} "
               "timed generation calls.")
  lines += [
      f"Generated by `{command}` on {started}, in {wall_s / 60:.0f} min.", "",
      machine_text, "",
      ceiling_text, "",
      model_text, "",
      runs_text, "",
      data_line(rows, s), "",
      "**Software:**", *versions_lines(rows), "",
      "## Results", "",
      summary_table(rows, s), "",
      detail_table(rows), "",
      *([phase_table(rows), ""] if phase_table(rows) else []),
      *([chat_table(rows), ""] if chat_table(rows) else []),
      *([dpo_variants_table(rows), ""] if dpo_variants_table(rows) else []),
      *([long_context_table(rows, s), ""] if long_context_table(rows, s) else []),
      *([bound_table(rows), ""] if bound_table(rows) else []),
      flops_table(rows, s), "",
      "![tokens/s per workload and framework](results.png)", "",
      *sections,
  ]
  failed = [r for r in rows if r["errors"]]
  if failed:
    lines += ["## Failures", ""]
    for r in failed:
      lines.append(f"* {WORKLOADS[r['workload']].title}, {FRAMEWORK_TITLES[r['framework']]}: "
                   f"{len(r['errors'])} of {r['rounds']} round(s) failed: "
                   f"{r['errors'][0][:1500]}")
    lines.append("")
  lines.append(RESULTS_NOTES)
  with open(path, "w") as f:
    f.write("\n".join(lines))


def write_plot(path: str, s: Settings, rows: list[dict]) -> None:
  """results.png: one panel per workload, a bar per framework (tokens/s, whiskers: rounds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {"jaxpost": "#1f77b4", "tunix": "#ff7f0e", "pytorch": "#2ca02c"}
  names = list(s.workloads)
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    w = WORKLOADS[name]
    mine = [r for r in rows if r["workload"] == name]
    labels = [FRAMEWORK_TITLES[r["framework"]] for r in mine]
    values = [r.get("tokens_per_s", 0.0) for r in mine]
    lo = [v - r["tokens_per_step"] / r["slowest_round_s"] if "median_s" in r else 0.0
          for v, r in zip(values, mine)]
    hi = [r["tokens_per_step"] / r["fastest_round_s"] - v if "median_s" in r else 0.0
          for v, r in zip(values, mine)]
    bars = ax.bar(labels, values, color=[colors[r["framework"]] for r in mine],
                  yerr=[lo, hi], capsize=3)
    for bar, r in zip(bars, mine):
      text = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "failed"
      ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                  textcoords="offset points")
    ax.set_title(w.title, fontsize=9)
    ax.set_ylabel(f"{w.unit} / s", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_ylim(0, max(values + [1.0]) * 1.25)
  n_params = num_params(jaxpost_config(s.model))
  size = f"{'tiny, ' if s.tiny else ''}{n_params / 1e6:.1f}M-parameter model"
  fig.suptitle(f"Throughput, {size}, float32 (median over {s.rounds} round(s); higher is "
               "better)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)

