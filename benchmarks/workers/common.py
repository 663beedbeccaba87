"""What every benchmark worker shares: the spec, the data, the timing loop and the result line.

This module imports only the standard library and numpy, so that each framework's worker can
import it from its own virtual environment (the Tunix worker runs in `benchmarks/.tunix-venv`,
which has no jaxpost). A worker is started as

    python benchmarks/workers/<framework>_worker.py '<spec as JSON>'

and prints exactly one line starting with `RESULT_PREFIX` followed by the result as JSON
(everything else it or its libraries print goes to stderr or is ignored by the orchestrator).

The spec (built by `benchmarks/workloads.py`'s `make_spec`):

    {"workload": "sft" | "lora" | "dpo" | "distill" | "generate" | "grpo" | "ppo" | "sft_chat"
                 | "dpo_shared_prompt" | "dpo_precomputed_ref" | "long_context_<n>k" | "matmul",
     "model": {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "intermediate_size", "tie_embeddings", "rope_theta", "norm_eps"},
     "train": {"batch", "seq_len"},                     # sft, lora, distill
     "dpo": {"pairs", "prompt_len", "response_len", "beta"},
     "distill": {"teacher": {<as "model">}, "kind", "temperature"},
     "generate": {"batch", "prompt_len", "new_tokens"},
     "grpo": {"prompts", "group", "prompt_len", "new_tokens", "temperature"},
     "ppo": {"prompts", "prompt_len", "new_tokens", "temperature", "kl_coef", "gamma", "lam",
             "clip", "value_clip", "vf_coef"},
     "chat": {"conversations", "prompt_mean", "response_mean", "sigma", "max_len", "rows",
              "batch", "warmup_epochs", "epochs"},           # sft_chat
     "long_context": {"seq_len", "batch", "attention"},  # long_context_*k ("train" set to it)
     "lora": {"rank", "alpha", "targets"},
     "optim": {"lr", "b1", "b2", "eps", "weight_decay"},
     "matmul": {"sizes", "reps"},
     "warmup": int, "steps": int, "seed": int}

The data of every workload comes from `np.random.default_rng(seed)` here, identically for every
framework; ids are drawn from [1, vocab) so that no framework mistakes a token for padding
(id 0). `data_digest` fingerprints what a worker actually fed its model.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

RESULT_PREFIX = "BENCH_RESULT "
LAUNCHED_AT_ENV = "JAXPOST_BENCH_LAUNCHED_AT"  # time.time() when run.py launched the worker

# Module names of the seven projections a LoRA targets, per naming scheme.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def read_spec(argv: list[str] | None = None) -> dict[str, Any]:
  """The spec passed as the first command-line argument (JSON)."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: <worker>.py '<spec as JSON>'")
  return json.loads(argv[0])


def log(*args) -> None:
  """Progress messages: stderr, flushed."""
  print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data.


def sft_tokens(spec: dict) -> np.ndarray:
  """[batch, seq_len] int32 token ids of the SFT, LoRA and distillation workloads."""
  t = spec["train"]
  rng = np.random.default_rng(spec["seed"])
  return rng.integers(1, spec["model"]["vocab_size"], (t["batch"], t["seq_len"]),
                      dtype=np.int64).astype(np.int32)


def dpo_pairs(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(prompt [P, Lp], chosen [P, Lr], rejected [P, Lr]) int32 ids of the DPO workload.

  Each side of a pair is one row of Lp + Lr tokens (the shared prompt, then that side's
  response); the loss scores the Lr response tokens. A step therefore runs the policy (forward
  and backward) and the reference (forward) on 2 * P rows of Lp + Lr tokens.
  """
  d = spec["dpo"]
  rng = np.random.default_rng(spec["seed"] + 1)
  v = spec["model"]["vocab_size"]
  prompt = rng.integers(1, v, (d["pairs"], d["prompt_len"]), dtype=np.int64)
  chosen = rng.integers(1, v, (d["pairs"], d["response_len"]), dtype=np.int64)
  rejected = rng.integers(1, v, (d["pairs"], d["response_len"]), dtype=np.int64)
  return prompt.astype(np.int32), chosen.astype(np.int32), rejected.astype(np.int32)


def dpo_rows(spec: dict) -> tuple[np.ndarray, np.ndarray]:
  """The DPO batch as the frameworks that take whole rows see it.

  Returns (tokens [2P, Lp + Lr]: the P chosen rows then the P rejected rows; response_mask
  [2P, Lp + Lr] bool, True on the response tokens).
  """
  prompt, chosen, rejected = dpo_pairs(spec)
  tokens = np.concatenate([np.concatenate([prompt, chosen], 1),
                           np.concatenate([prompt, rejected], 1)], 0)
  mask = np.zeros(tokens.shape, bool)
  mask[:, prompt.shape[1]:] = True
  return tokens, mask


def prompts(spec: dict) -> np.ndarray:
  """[batch, prompt_len] int32 prompt ids of the generation workload."""
  g = spec["generate"]
  rng = np.random.default_rng(spec["seed"] + 2)
  return rng.integers(1, spec["model"]["vocab_size"], (g["batch"], g["prompt_len"]),
                      dtype=np.int64).astype(np.int32)


def grpo_prompts(spec: dict) -> np.ndarray:
  """[prompts, prompt_len] int32 prompt ids of the GRPO workload (each sampled `group` times)."""
  g = spec["grpo"]
  rng = np.random.default_rng(spec["seed"] + 3)
  return rng.integers(1, spec["model"]["vocab_size"], (g["prompts"], g["prompt_len"]),
                      dtype=np.int64).astype(np.int32)


def ppo_prompts(spec: dict) -> np.ndarray:
  """[prompts, prompt_len] int32 prompt ids of the PPO workload (one sample each)."""
  p = spec["ppo"]
  rng = np.random.default_rng(spec["seed"] + 5)
  return rng.integers(1, spec["model"]["vocab_size"], (p["prompts"], p["prompt_len"]),
                      dtype=np.int64).astype(np.int32)


# The sft_chat workload's lengths: a log-normal fit to the mean prompt and response lengths of
# ShareGPT (ChatGPT conversations shared by users), 161.31 and 337.99 tokens, as published in
# the vLLM paper (Kwon et al., SOSP 2023, "Efficient Memory Management for Large Language Model
# Serving with PagedAttention", section 6.1 and Fig. 11: 8.4x Alpaca's 19.31-token inputs,
# 5.8x its 58.45-token outputs). The spread (sigma, the same for prompts and responses) is ours.
CHAT_SOURCE = ("ShareGPT mean lengths (prompt 161.31, response 337.99 tokens; Kwon et al. 2023, "
               "Fig. 11), log-normal, sigma {sigma}")


def chat_lengths(spec: dict) -> tuple[np.ndarray, np.ndarray]:
  """(prompt, response) token counts of the sft_chat conversations: log-normal with the
  spec's means and sigma (mu = ln(mean) - sigma^2 / 2), each conversation cut to `max_len`
  tokens (the response's end goes first; a prompt keeps at most max_len - 16 tokens)."""
  c = spec["chat"]
  rng = np.random.default_rng(spec["seed"] + 7)
  n, sigma = c["conversations"], c["sigma"]
  draw = lambda mean: np.maximum(  # noqa: E731
      1, np.round(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n))).astype(np.int64)
  prompt, reply = draw(c["prompt_mean"]), draw(c["response_mean"])
  prompt = np.minimum(prompt, c["max_len"] - 16)
  reply = np.minimum(reply, c["max_len"] - prompt)
  return prompt, reply


def chat_examples(spec: dict) -> list[tuple[np.ndarray, np.ndarray]]:
  """The sft_chat conversations in their fixed order: (tokens int32 [n], trained bool [n]) each,
  `trained[t]` True on the response tokens (token t is a target, predicted from tokens < t)."""
  prompt, reply = chat_lengths(spec)
  rng = np.random.default_rng(spec["seed"] + 8)
  v = spec["model"]["vocab_size"]
  out = []
  for p, r in zip(prompt, reply):
    tokens = rng.integers(1, v, p + r, dtype=np.int64).astype(np.int32)
    out.append((tokens, np.arange(p + r) >= p))
  return out


def padded_batches(examples: list[tuple[np.ndarray, np.ndarray]], batch: int,
                   width: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
  """Consecutive groups of `batch` conversations, right-padded with id 0 to `width` (None: the
  longest of the group): [(tokens [b, w], trained [b, w])]."""
  out = []
  for i in range(0, len(examples), batch):
    group = examples[i:i + batch]
    w = width or max(len(t) for t, _ in group)
    tokens = np.zeros((len(group), w), np.int32)
    trained = np.zeros((len(group), w), bool)
    for j, (t, m) in enumerate(group):
      tokens[j, :len(t)], trained[j, :len(t)] = t, m
    out.append((tokens, trained))
  return out


def grpo_reward(completion_ids) -> float:
  """The GRPO and PPO workloads' reward of one completion (token ids): the fraction of even ids.

  A trivial function of the sampled tokens, computed on the host, the same on every side; it
  varies within a group, so the advantages are not all zero.
  """
  ids = np.asarray(completion_ids)
  return float(np.mean(ids % 2 == 0)) if ids.size else 0.0


def digest(*arrays: np.ndarray) -> str:
  """A short fingerprint of the arrays' values (to show every framework got the same data)."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(np.asarray(a, np.int64)).tobytes())
  return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Timing and the result.


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
  """The installed version of each package (None when it is not installed)."""
  from importlib import metadata

  out = {}
  for name in names:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far, MiB (`ru_maxrss` is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
  """Calls `step` warmup + steps times; `step` must return only when its work is done.

  The first `warmup` calls compile and settle (their times are reported, not used); the
  median of the next `steps` calls is the steady-state step time. `compile_s` estimates the
  one-off cost: the warm-up calls' time beyond `warmup` steady-state steps. `cpu_s` is the
  CPU time this process (all its threads) spent in each timed step: on a machine that other
  processes share, it moves much less than the wall time.
  """
  times, cpu = [], []
  last, first_done = None, None
  for i in range(warmup + steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    last = step()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    first_done = first_done or time.time()
    log(f"  step {i + 1}/{warmup + steps}: {times[-1]:.3f} s")
  out = dict(step_timing(times, cpu, warmup), last=last)
  launched = os.environ.get(LAUNCHED_AT_ENV)
  if launched:  # seconds from the process's launch to the end of its first step
    out["time_to_first_step_s"] = first_done - float(launched)
  return out


def step_timing(times: list[float], cpu: list[float], warmup: int) -> dict[str, Any]:
  """`time_steps`' summary of per-step wall and CPU times (the first `warmup` are warm-up),
  for a worker that timed its steps itself (Tunix's GRPO loop calls the step, not the worker)."""
  warm, timed, cpu = times[:warmup], times[warmup:], cpu[warmup:]
  median = statistics.median(timed)
  return {
      "warmup_s": warm,
      "times_s": timed,
      "cpu_s": cpu,
      "median_cpu_s": statistics.median(cpu),
      "median_s": median,
      "first_step_s": warm[0] if warm else None,
      "compile_s": max(sum(warm) - len(warm) * median, 0.0) if warm else None,
  }


def phase_medians(phases: dict[str, list[float]], steps: int) -> dict[str, float]:
  """Medians of the last `steps` (the timed steps') entries of each phase's list of times."""
  return {f"{name}_median_s": statistics.median(times[-steps:])
          for name, times in phases.items()}


def generation_result(framework: str, timing: dict[str, Any], prompt_ids: np.ndarray,
                      lengths: list[int], new_tokens: int) -> dict[str, Any]:
  """A generation workload's result, once every row is checked to have `new_tokens` tokens
  (`lengths`: the last timed call's count per row)."""
  if any(n != new_tokens for n in lengths):
    raise RuntimeError(f"{framework} generated {lengths} tokens per row, expected {new_tokens} "
                       f"each")
  return dict(timing, data_digest=digest(prompt_ids), generated_lengths=sorted(set(lengths)))


def emit(result: dict[str, Any]) -> None:
  """Prints the result line (adds the peak RSS, measured now, after the workload)."""
  result = dict(result)
  result.pop("last", None)
  result["peak_rss_mb"] = peak_rss_mb()
  sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=_jsonable) + "\n")
  sys.stdout.flush()


def _jsonable(x):
  """numpy scalars and arrays as plain Python values."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")
