"""jaxpost side by side with Tunix and PyTorch: same model shape, same data, same work.

    python benchmarks/run.py                        # the full comparison (1-1.5 h, 2 cores)
    python benchmarks/run.py --tiny --quick         # smoke run: 4 layers, width 256, 1 round
    python benchmarks/run.py --only sft,generate    # some workloads only
    python benchmarks/run.py --frameworks jaxpost,tunix --rounds 5

It writes, into `--out-dir` (default `benchmarks/`):

* `RESULTS.md`: the machine, the software on each side, the tables and what exactly is timed;
* `results.png`: tokens/s per workload and framework (bars: median over rounds, whiskers:
  the slowest and fastest round);
* `results.json`: the settings, every worker's raw result and the aggregates.

How it runs. Each measurement is one subprocess running one workload for one framework
(`benchmarks/workers/{jaxpost,tunix,torch}_worker.py`), given the workload spec as JSON and
printing its result as JSON, so compilation caches and peak memory are never shared. jaxpost
and PyTorch run in this interpreter's environment; Tunix (google-tunix 0.1.7 from PyPI) runs
in its own virtual environment, `benchmarks/.tunix-venv`, created on first use (it brings its
own jax/flax, whose versions are recorded). Frameworks alternate within each round and the
order reverses every other round (A B C, C B A, ...), so slow drift of the machine hits every
framework alike; a framework's time is the median over rounds of its per-round median step
time. The f32 matmul ceiling (for MFU) is measured by a jaxpost worker at the start and at
the end; the best of the two counts.

Workloads (to add one: a `Workload` in `WORKLOADS` and a branch in each worker that runs it):

* `sft`: a full-parameter SFT update step (AdamW) on batch x seq_len tokens;
* `lora`: the same with rank-16 LoRA adapters on q, k, v, o, gate, up and down, base frozen;
* `dpo`: a DPO step (sigmoid loss, beta 0.1) with a reference model on P pairs, each side a row
  of prompt + response tokens;
* `generate`: greedy generation, batch 16, 128-token prompts, 128 new tokens;
* `grpo`: one GRPO step, rollout (2 prompts x 8 samples at temperature 1, 128 prompt tokens,
  128 new tokens, a reward on the host, group advantages) then one update (beta 0, AdamW) on
  the 16 prompt + completion rows; reported as a whole and split into rollout and update;
* `ppo`: one PPO step with a critic, rollout (16 prompts x 1 sample, the same lengths and
  reward as `grpo`, then the old policy's, the reference's and the critic's no-grad forwards,
  a k1 KL penalty in the per-token rewards, GAE, whitened advantages) then one update of the
  policy (clipped surrogate) and the critic (clipped value loss); split as `grpo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers")
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, WORKERS)

import common
from bench_model import (_cpu_seconds, forward_flops_per_token, generate_flops,
                         layer_matmul_params, machine_line, matmul_params)
from jaxpost_worker import jaxpost_config

from jaxpost.models import num_params

TUNIX_VERSION = "0.1.7"
DEFAULT_TUNIX_VENV = os.path.join(HERE, ".tunix-venv")
FRAMEWORKS = ("jaxpost", "tunix", "pytorch")
FRAMEWORK_TITLES = {"jaxpost": "jaxpost", "tunix": "Tunix", "pytorch": "PyTorch"}
WORKER_SCRIPTS = {"jaxpost": "jaxpost_worker.py", "tunix": "tunix_worker.py",
                  "pytorch": "torch_worker.py"}

# The benchmark shape: Llama-style, GQA (4 query heads per KV head), SwiGLU, tied embeddings.
MODEL = {"vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
         "num_kv_heads": 2, "head_dim": 64, "intermediate_size": 1536, "tie_embeddings": True,
         "rope_theta": 500000, "norm_eps": 1e-5}
TINY_MODEL = dict(MODEL, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768)
OPTIM = {"lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
LORA = {"rank": 16, "alpha": 32.0, "targets": list(common.LORA_TARGETS)}


# ---------------------------------------------------------------------------------------------
# FLOPs per step (model FLOPs: what the algorithm needs, the same for every framework).


def lora_matmul_params(config, rank: int, targets: Sequence[str]) -> int:
  """Weights of the LoRA adapters: rank * (fan_in + fan_out) per target per layer."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  dims = {"q": (c.hidden_size, q), "k": (c.hidden_size, kv), "v": (c.hidden_size, kv),
          "o": (q, c.hidden_size), "gate": (c.hidden_size, c.intermediate_size),
          "up": (c.hidden_size, c.intermediate_size),
          "down": (c.intermediate_size, c.hidden_size)}
  return c.num_layers * rank * sum(sum(dims[t]) for t in targets)


def sft_flops(config, spec: dict) -> float:
  """3 x forward (backward = 2 x forward), bench_model's count: 6N + 12 L H Dh T per token."""
  t = spec["train"]
  return 3.0 * forward_flops_per_token(config, t["seq_len"]) * t["batch"] * t["seq_len"]


def lora_flops(config, spec: dict) -> float:
  """LoRA over a frozen base, per token: 4N + 3A + 6N_lora.

  Forward 2N + A + 2N_lora; backward 2N (input gradients of every frozen matmul, LM head
  included; no weight gradients) + 2A (attention's backward) + 4N_lora (input and weight
  gradients of the adapters); A = 4 L T H Dh. This is what an unmerged LoRA, x W + s (x A) B,
  needs. An implementation that merges W + s A B would also form the full weight gradient of
  every adapted matrix; jaxpost's executed matmul FLOPs (counted from its traced step) show
  what it does.
  """
  t = spec["train"]
  lo = spec["lora"]
  n_lora = lora_matmul_params(config, lo["rank"], lo["targets"])
  attention = (forward_flops_per_token(config, t["seq_len"])
               - forward_flops_per_token(config, 0))  # A: bench_model's attention term
  per_token = 4.0 * matmul_params(config) + 3.0 * attention + 6.0 * n_lora
  return per_token * t["batch"] * t["seq_len"]


def dpo_flops(config, spec: dict) -> float:
  """Policy forward + backward (3F) and reference forward (F) on all 2P rows: 4F per token."""
  d = spec["dpo"]
  seq = d["prompt_len"] + d["response_len"]
  return 4.0 * forward_flops_per_token(config, seq) * 2 * d["pairs"] * seq


def gen_flops(config, spec: dict) -> float:
  """bench_model's `generate_flops`: the prefill and the one-token steps at their context."""
  g = spec["generate"]
  return generate_flops(config, g["batch"], g["prompt_len"], g["new_tokens"])


def grpo_rollout_flops(config, spec: dict) -> float:
  """Sampling G completions of each prompt: each prompt prefilled once (its cache shared by its
  G samples), then G rows of one-token steps: `generate_flops` with the prefill counted per
  prompt and the decode steps per sample."""
  g = spec["grpo"]
  prefill = generate_flops(config, g["prompts"], g["prompt_len"], 1)
  decode = (generate_flops(config, 1, g["prompt_len"], g["new_tokens"])
            - generate_flops(config, 1, g["prompt_len"], 1))
  return prefill + g["prompts"] * g["group"] * decode


def grpo_update_flops(config, spec: dict) -> float:
  """The update: 3 x forward (as `sft_flops`) over the G x P rows of prompt + completion."""
  g = spec["grpo"]
  seq = g["prompt_len"] + g["new_tokens"]
  return 3.0 * forward_flops_per_token(config, seq) * g["prompts"] * g["group"] * seq


def grpo_flops(config, spec: dict) -> float:
  """One RL step: the rollout's forward FLOPs plus the update's."""
  return grpo_rollout_flops(config, spec) + grpo_update_flops(config, spec)


def grpo_generated_tokens(spec: dict) -> int:
  g = spec["grpo"]
  return g["prompts"] * g["group"] * g["new_tokens"]


def grpo_row_tokens(spec: dict) -> int:
  """Tokens of the rows one RL step samples and trains: G x P rows of prompt + completion."""
  g = spec["grpo"]
  return g["prompts"] * g["group"] * (g["prompt_len"] + g["new_tokens"])


def ppo_row_tokens(spec: dict) -> int:
  """Tokens of the rows one PPO step samples and trains: the prompts' prompt + completion rows."""
  p = spec["ppo"]
  return p["prompts"] * (p["prompt_len"] + p["new_tokens"])


def ppo_generated_tokens(spec: dict) -> int:
  p = spec["ppo"]
  return p["prompts"] * p["new_tokens"]


def _ppo_row_forwards(config, spec: dict) -> tuple[float, float]:
  """(policy, critic) forward FLOPs over the PPO step's rows. The critic is the policy's trunk
  with a value head [D] -> 1 in place of the LM head, so it lacks the LM head's 2 D V per token."""
  p = spec["ppo"]
  seq = p["prompt_len"] + p["new_tokens"]
  tokens = p["prompts"] * seq
  policy = forward_flops_per_token(config, seq) * tokens
  critic = forward_flops_per_token(config, seq, lm_head=False) + 2.0 * config.hidden_size
  return policy, critic * tokens


def ppo_rollout_flops(config, spec: dict) -> float:
  """Sampling one completion of each prompt (`generate_flops`), then three no-grad forwards over
  the rows: the old policy's and the reference's log-probs and the critic's values."""
  p = spec["ppo"]
  policy, critic = _ppo_row_forwards(config, spec)
  return (generate_flops(config, p["prompts"], p["prompt_len"], p["new_tokens"])
          + 2.0 * policy + critic)


def ppo_update_flops(config, spec: dict) -> float:
  """The update: 3 x forward (forward + backward) of the policy and of the critic over the rows."""
  policy, critic = _ppo_row_forwards(config, spec)
  return 3.0 * (policy + critic)


def ppo_flops(config, spec: dict) -> float:
  """One PPO step: the rollout's forward FLOPs plus the update's."""
  return ppo_rollout_flops(config, spec) + ppo_update_flops(config, spec)


@dataclasses.dataclass(frozen=True)
class Phase:
  """A part of a workload's step timed on its own (the worker reports `<key>_median_s`)."""

  key: str
  title: str
  tokens_per_step: Callable[[dict], int]
  flops_per_step: Callable[[Any, dict], float]
  unit: str


@dataclasses.dataclass(frozen=True)
class Workload:
  """One row group of the comparison: which frameworks run it and how it is counted."""

  name: str
  title: str
  frameworks: tuple[str, ...]
  tokens_per_step: Callable[[dict], int]
  flops_per_step: Callable[[Any, dict], float]
  unit: str  # what tokens/s counts
  phases: tuple[Phase, ...] = ()  # parts of the step reported separately (GRPO)


WORKLOADS = {
    w.name: w for w in (
        Workload("sft", "Full SFT step (AdamW)", ("jaxpost", "tunix", "pytorch"),
                 lambda s: s["train"]["batch"] * s["train"]["seq_len"], sft_flops,
                 "trained tokens"),
        Workload("lora", "LoRA r=16 SFT step (AdamW)", ("jaxpost", "tunix"),
                 lambda s: s["train"]["batch"] * s["train"]["seq_len"], lora_flops,
                 "trained tokens"),
        Workload("dpo", "DPO step with reference (AdamW)", ("jaxpost", "tunix"),
                 lambda s: 2 * s["dpo"]["pairs"] * (s["dpo"]["prompt_len"]
                                                    + s["dpo"]["response_len"]),
                 dpo_flops, "tokens of both sides"),
        Workload("generate", "Greedy generation", ("jaxpost", "tunix", "pytorch"),
                 lambda s: s["generate"]["batch"] * s["generate"]["new_tokens"], gen_flops,
                 "new tokens"),
        Workload("grpo", "GRPO step (rollout + update)", ("jaxpost", "tunix"),
                 grpo_row_tokens, grpo_flops, "row tokens",
                 phases=(Phase("rollout", "rollout", grpo_generated_tokens, grpo_rollout_flops,
                               "generated tokens"),
                         Phase("update", "update", grpo_row_tokens, grpo_update_flops,
                               "trained tokens"))),
        Workload("ppo", "PPO step with critic (rollout + update)", ("jaxpost", "tunix"),
                 ppo_row_tokens, ppo_flops, "row tokens",
                 phases=(Phase("rollout", "rollout", ppo_generated_tokens, ppo_rollout_flops,
                               "generated tokens"),
                         Phase("update", "update", ppo_row_tokens, ppo_update_flops,
                               "trained tokens"))),
    )
}


# ---------------------------------------------------------------------------------------------
# Settings and specs.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures."""

  model: dict
  workloads: tuple[str, ...]
  frameworks: tuple[str, ...]
  rounds: int
  train_warmup: int
  train_steps: int
  gen_warmup: int
  gen_steps: int
  matmul_sizes: tuple[int, ...]
  matmul_reps: int
  tiny: bool
  quick: bool
  seed: int = 0
  batch: int = 8
  seq_len: int = 256
  dpo_pairs: int = 8
  dpo_prompt_len: int = 128
  dpo_response_len: int = 128
  dpo_beta: float = 0.1
  gen_batch: int = 16
  gen_prompt_len: int = 128
  gen_new_tokens: int = 128
  grpo_prompts: int = 2
  grpo_group: int = 8
  grpo_prompt_len: int = 128
  grpo_new_tokens: int = 128
  ppo_prompts: int = 16
  ppo_prompt_len: int = 128
  ppo_new_tokens: int = 128


def make_spec(s: Settings, workload: str) -> dict:
  """The JSON spec a worker receives (see `benchmarks/workers/common.py`)."""
  generating = workload == "generate"
  return {
      "workload": workload,
      "model": s.model,
      "train": {"batch": s.batch, "seq_len": s.seq_len},
      "dpo": {"pairs": s.dpo_pairs, "prompt_len": s.dpo_prompt_len,
              "response_len": s.dpo_response_len, "beta": s.dpo_beta},
      "generate": {"batch": s.gen_batch, "prompt_len": s.gen_prompt_len,
                   "new_tokens": s.gen_new_tokens},
      "grpo": {"prompts": s.grpo_prompts, "group": s.grpo_group,
               "prompt_len": s.grpo_prompt_len, "new_tokens": s.grpo_new_tokens,
               "temperature": 1.0},
      "ppo": {"prompts": s.ppo_prompts, "prompt_len": s.ppo_prompt_len,
              "new_tokens": s.ppo_new_tokens, "temperature": 1.0, "kl_coef": 0.05,
              "gamma": 1.0, "lam": 0.95, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1},
      "lora": LORA,
      "optim": OPTIM,
      "matmul": {"sizes": list(s.matmul_sizes), "reps": s.matmul_reps},
      "warmup": s.gen_warmup if generating else s.train_warmup,
      "steps": s.gen_steps if generating else s.train_steps,
      "seed": s.seed,
  }


# ---------------------------------------------------------------------------------------------
# Workers.


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


def ensure_tunix_venv(path: str, log_path: str) -> str:
  """The Python of the Tunix venv at `path`, creating it (pip install google-tunix) if needed.

  pip's output goes to `log_path`.
  """
  python = os.path.join(path, "bin", "python")
  check = [python, "-c", "import importlib.metadata as m; print(m.version('google-tunix'))"]
  if os.path.exists(python):
    got = subprocess.run(check, capture_output=True, text=True, check=False)
    if got.returncode == 0 and got.stdout.strip() == TUNIX_VERSION:
      return python
  log(f"creating the Tunix venv at {path} (pip install google-tunix=={TUNIX_VERSION}; a few "
      f"minutes; log: {log_path}) ...")
  with open(log_path, "w") as out:
    if not os.path.exists(python):
      subprocess.run([sys.executable, "-m", "venv", path], check=True, stdout=out, stderr=out)
    done = subprocess.run([python, "-m", "pip", "install", f"google-tunix=={TUNIX_VERSION}"],
                          stdout=out, stderr=out, check=False)
  if done.returncode or subprocess.run(check, capture_output=True, check=False).returncode:
    raise SystemExit(f"installing google-tunix=={TUNIX_VERSION} into {path} failed; see "
                     f"{log_path}")
  return python


def _children_cpu_s() -> float:
  """CPU seconds of this process's finished children so far."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def run_worker(python: str, framework: str, spec: dict, log_path: str,
               timeout_s: float) -> dict[str, Any]:
  """Runs one worker; its result dict, or {"error": ...} when it failed.

  Adds `other_load`: the share of the machine's CPU time used by processes other than the
  worker while it ran (0 = the machine was quiet).
  """
  script = os.path.join(WORKERS, WORKER_SCRIPTS[framework])
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  busy0, child0, t0 = _cpu_seconds(), _children_cpu_s(), time.perf_counter()
  with open(log_path, "w") as err:
    try:
      proc = subprocess.run([python, script, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=err, text=True, timeout=timeout_s, cwd=REPO, env=env,
                            check=False)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout_s:.0f} s (log: {log_path})"}
  wall = time.perf_counter() - t0
  busy1, child1 = _cpu_seconds(), _children_cpu_s()
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(common.RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    with open(log_path) as f:
      tail = f.read().strip().splitlines()[-12:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
  result = json.loads(lines[-1][len(common.RESULT_PREFIX):])
  if busy0 is not None and busy1 is not None:
    others = (busy1[0] - busy0[0]) - (child1 - child0)
    result["other_load"] = max(others, 0.0) / (wall * (os.cpu_count() or 1))
  result["process_wall_s"] = wall
  return result


# ---------------------------------------------------------------------------------------------
# Aggregation.


def aggregate(s: Settings, runs: list[dict], ceiling: float) -> list[dict]:
  """One row per (workload, framework): medians over rounds, throughput, MFU, ratios."""
  config = jaxpost_config(s.model)
  rows = []
  for name in s.workloads:
    w = WORKLOADS[name]
    spec = make_spec(s, name)
    tokens = w.tokens_per_step(spec)
    flops = w.flops_per_step(config, spec)
    for fw in w.frameworks:
      if fw not in s.frameworks:
        continue
      mine = [r for r in runs if r["workload"] == name and r["framework"] == fw]
      ok = [r["result"] for r in mine if "error" not in r["result"]]
      errors = [r["result"]["error"] for r in mine if "error" in r["result"]]
      row: dict[str, Any] = {"workload": name, "framework": fw, "rounds_ok": len(ok),
                             "rounds": len(mine), "errors": errors, "tokens_per_step": tokens,
                             "model_flops_per_step": flops}
      if ok:
        medians = [r["median_s"] for r in ok]
        median = statistics.median(medians)
        row.update(
            median_s=median, fastest_round_s=min(medians), slowest_round_s=max(medians),
            tokens_per_s=tokens / median, mfu=flops / median / 1e9 / ceiling,
            compile_s=statistics.median(r["compile_s"] for r in ok),
            first_step_s=statistics.median(r["first_step_s"] for r in ok),
            peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
            other_load=statistics.median(r.get("other_load", 0.0) for r in ok),
            data_digest=sorted({r["data_digest"] for r in ok}),
            versions=ok[0]["versions"])
        cpu = [r["median_cpu_s"] for r in ok if "median_cpu_s" in r]
        if cpu:
          row["median_cpu_s"] = statistics.median(cpu)
        executed = [r["executed_matmul_flops"] for r in ok if "executed_matmul_flops" in r]
        if executed:
          row["executed_flops_per_step"] = executed[0]
        executed = [r["update_executed_matmul_flops"] for r in ok
                    if "update_executed_matmul_flops" in r]
        if executed:
          row["update_executed_flops_per_step"] = executed[0]
        if "trainable_params" in ok[0]:
          row["trainable_params"] = ok[0]["trainable_params"]
        if ok[0].get("losses"):
          row["loss_first"], row["loss_last"] = ok[0]["losses"][0], ok[0]["losses"][-1]
        row["phases"] = phase_rows(w, config, spec, ok, ceiling)
      rows.append(row)
  by_key = {(r["workload"], r["framework"]): r for r in rows}
  for r in rows:
    mine = by_key.get((r["workload"], "jaxpost"))
    for other in ("tunix", "pytorch"):
      theirs = by_key.get((r["workload"], other))
      if r["framework"] == "jaxpost" and mine and theirs and "tokens_per_s" in mine \
          and "tokens_per_s" in theirs:
        r[f"speedup_vs_{other}"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
        for key, phase in mine.get("phases", {}).items():
          if key in theirs.get("phases", {}):
            phase[f"speedup_vs_{other}"] = (theirs["phases"][key]["median_s"]
                                            / phase["median_s"])
  return rows


def phase_rows(w: Workload, config, spec: dict, ok: list[dict], ceiling: float) -> dict:
  """The parts of a step a workload times separately (GRPO: rollout, update; and the sampling
  inside the rollout), each from the median over rounds of its per-round median."""
  out = {}
  for phase in w.phases:
    times = [r[f"{phase.key}_median_s"] for r in ok if f"{phase.key}_median_s" in r]
    if not times:
      continue
    median = statistics.median(times)
    tokens, flops = phase.tokens_per_step(spec), phase.flops_per_step(config, spec)
    out[phase.key] = {"title": phase.title, "unit": phase.unit, "median_s": median,
                      "fastest_round_s": min(times), "slowest_round_s": max(times),
                      "tokens_per_step": tokens, "model_flops_per_step": flops,
                      "tokens_per_s": tokens / median, "mfu": flops / median / 1e9 / ceiling}
    sampling = [r["sampling_median_s"] for r in ok if "sampling_median_s" in r]
    if phase.key == "rollout" and sampling:
      out["sampling"] = {"title": "of which sampling", "median_s": statistics.median(sampling)}
  return out


# ---------------------------------------------------------------------------------------------
# Reporting.


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
  `stop_gradient`. Generation: one `jaxpost.sampling.generate` call.
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
  space-separated ids; tokenising 16 x 128 ids is negligible).
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
  `inference_mode`. LoRA and DPO are not run on PyTorch.

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
  reference forward). Generation: `bench_model.generate_flops`. GRPO: rollout = the forward
  FLOPs of sampling (`generate_flops` with the prefill counted once per prompt and the
  one-token steps once per sample), update = 3 x forward of the 16 x 256 rows. PPO: rollout =
  `generate_flops` (16 x 1 samples) plus two policy forwards (old, reference) and one critic
  forward over the rows (the critic has a D -> 1 value head instead of the LM head), update =
  3 x (policy + critic forward). For GRPO and PPO the step's MFU is their sum over the
  step's time, each part's over its own time. The FLOP table also gives the matmul FLOPs of
  jaxpost's traced step (`bench_model.jaxpr_matmul_flops`; for GRPO and PPO, of the update
  step only): above the model count where jaxpost recomputes (the LM head chunks under
  `jax.checkpoint`) or does more than the algorithm needs.
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
  for DPO).
"""


def write_results_md(path: str, s: Settings, rows: list[dict], machine: dict,
                     ceilings: list[float], command: str, started: str, wall_s: float) -> None:
  """RESULTS.md: machine, software, tables, notes, failures."""
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
  model_text = (
      f"**Model:** vocab {m['vocab_size']}, hidden {m['hidden_size']}, {m['num_layers']} "
      f"layers, {m['num_heads']} heads / {m['num_kv_heads']} KV heads (head_dim "
      f"{m['head_dim']}), MLP {m['intermediate_size']}, "
      f"{'tied' if m['tie_embeddings'] else 'untied'} embeddings, float32: "
      f"{num_params(config):,} parameters ({matmul_params(config):,} in matmuls, "
      f"{layer_matmul_params(config):,} in the layers). LoRA adapters: "
      f"{lora_matmul_params(config, LORA['rank'], LORA['targets']):,} parameters.")
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
      flops_table(rows, s), "",
      "![tokens/s per workload and framework](results.png)", "",
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


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; see the module docstring for examples."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="4 layers, width 256")
  p.add_argument("--quick", action="store_true",
                 help="1 round, 2 timed training steps, 1 timed generation call")
  p.add_argument("--only", default=",".join(WORKLOADS),
                 help=f"comma-separated workloads (default: {','.join(WORKLOADS)})")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help=f"comma-separated frameworks (default: {','.join(FRAMEWORKS)})")
  p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
  p.add_argument("--steps", type=int, help="timed training steps per worker (default 5)")
  p.add_argument("--out-dir", default=HERE, help="where RESULTS.md, results.png/.json go")
  p.add_argument("--tunix-venv", default=DEFAULT_TUNIX_VENV, help="the Tunix venv's path")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
  p.add_argument("--from-json", metavar="PATH",
                 help="measure nothing: rewrite the outputs from a results.json")
  return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
  """The `Settings` a command line asks for."""
  workloads = tuple(w for w in args.only.split(",") if w)
  frameworks = tuple(f for f in args.frameworks.split(",") if f)
  for w in workloads:
    if w not in WORKLOADS:
      raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
  for f in frameworks:
    if f not in FRAMEWORKS:
      raise SystemExit(f"unknown framework {f!r}; choose from {', '.join(FRAMEWORKS)}")
  q = args.quick
  return Settings(
      model=TINY_MODEL if args.tiny else MODEL, workloads=workloads, frameworks=frameworks,
      rounds=args.rounds or (1 if q else 3), train_warmup=2,
      train_steps=args.steps or (2 if q else 5), gen_warmup=1, gen_steps=1 if q else 3,
      matmul_sizes=(1024, 2048) if q else (1024, 2048, 3072), matmul_reps=3 if q else 5,
      tiny=args.tiny, quick=q)


def measure(s: Settings, args: argparse.Namespace, command: str) -> dict[str, Any]:
  """Runs the ceiling, then every (round, workload, framework) worker; the raw results."""
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  t0 = time.perf_counter()
  log_dir = os.path.join(args.out_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  pythons = {"jaxpost": sys.executable, "pytorch": sys.executable}
  if "tunix" in s.frameworks:
    pythons["tunix"] = ensure_tunix_venv(args.tunix_venv,
                                         os.path.join(log_dir, "tunix-install.log"))

  def ceiling(tag: str) -> dict:
    log(f"[{tag}] f32 matmul ceiling ...")
    r = run_worker(pythons["jaxpost"], "jaxpost", make_spec(s, "matmul"),
                   os.path.join(log_dir, f"matmul-{tag}.log"), args.timeout)
    if "error" in r:
      raise SystemExit(f"the ceiling measurement failed: {r['error']}")
    log(f"  {r['ceiling_gflop_per_s']:.1f} GFLOP/s")
    return r

  start_ceiling = ceiling("start")
  runs = []
  for rnd in range(s.rounds):
    for name in s.workloads:
      order = [f for f in WORKLOADS[name].frameworks if f in s.frameworks]
      if rnd % 2:
        order.reverse()
      for fw in order:
        log(f"[round {rnd + 1}/{s.rounds}] {name} / {fw} ...")
        result = run_worker(pythons[fw], fw, make_spec(s, name),
                            os.path.join(log_dir, f"{name}-{fw}-r{rnd + 1}.log"), args.timeout)
        if "error" in result:
          log(f"  FAILED: {result['error'][:400]}")
        else:
          log(f"  median {result['median_s']:.3f} s/step, compile {result['compile_s']:.1f} s, "
              f"peak RSS {result['peak_rss_mb']:,.0f} MiB")
        runs.append({"round": rnd + 1, "workload": name, "framework": fw, "result": result})
  end_ceiling = ceiling("end")
  return {"settings": dataclasses.asdict(s), "command": command, "started": started,
          "wall_s": time.perf_counter() - t0, "machine": start_ceiling.get("machine", {}),
          "ceilings_gflop_per_s": [start_ceiling["ceiling_gflop_per_s"],
                                   end_ceiling["ceiling_gflop_per_s"]],
          "runs": runs, "ceiling_runs": [start_ceiling, end_ceiling]}


def settings_from_json(d: dict) -> Settings:
  """The `Settings` saved in a results.json (lists back to tuples)."""
  return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def write_outputs(payload: dict[str, Any], out_dir: str) -> list[dict]:
  """Aggregates `payload` (from `measure`) and writes RESULTS.md, results.png, results.json."""
  s = settings_from_json(payload["settings"])
  ceilings = payload["ceilings_gflop_per_s"]
  rows = aggregate(s, payload["runs"], max(ceilings))
  os.makedirs(out_dir, exist_ok=True)
  write_results_md(os.path.join(out_dir, "RESULTS.md"), s, rows, payload["machine"], ceilings,
                   payload["command"], payload["started"], payload["wall_s"])
  write_plot(os.path.join(out_dir, "results.png"), s, rows)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(payload, rows=rows), f, indent=1)
    f.write("\n")
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """Measures (or, with --from-json, re-reads) and writes the results."""
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      payload = json.load(f)
  else:
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = measure(settings_from_args(args), args, command.strip())
  rows = write_outputs(payload, args.out_dir)
  print(summary_table(rows, settings_from_json(payload["settings"])))
  log(f"wrote {args.out_dir}/RESULTS.md, results.png, results.json "
      f"({payload['wall_s'] / 60:.1f} min of measurement)")


if __name__ == "__main__":
  main()
