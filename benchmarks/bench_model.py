"""Model throughput benchmark: forward and decode tokens/s, and MFU against a measured ceiling.

    python benchmarks/bench_model.py                 # ~34M-parameter Llama shape, full run
    python benchmarks/bench_model.py --quick         # fewer repetitions (a smoke run)
    python benchmarks/bench_model.py --tiny --quick  # 4 layers, width 256
    python benchmarks/bench_model.py --json out.json # also write the results as JSON

What it measures, all in float32 and in one process, so the ceiling and the model numbers come
from the same machine under the same load:

* **matmul ceiling**: a jitted `a @ b` on square f32 matrices of a few sizes, and again at the
  best size after the model benchmarks; the best GFLOP/s over sizes, repetitions and both
  passes is the ceiling that MFU is relative to. It is a *measured* ceiling (what XLA's own
  GEMM reaches here), not the vendor peak.
* **forward**: `forward(config, params, tokens_BxT).logits` under one `jax.jit`, compiled ahead
  of time (compile time reported separately), then the median of the timed runs.
* **decode**: `jaxpost.sampling.generate` greedy from a random prompt, batch 1 and batch 16; one
  warm-up call with the same shapes excludes compilation; the first call's time minus the
  fastest timed call is reported as its compile time. Tokens/s counts *new* tokens (batch *
  max_new_tokens); the timed call includes the prefill of the prompt, and so do its FLOPs.

FLOPs are counted analytically (`forward_flops_per_token`) and cross-checked against a count
of every `dot_general` in the traced program (`jaxpr_matmul_flops`), which, unlike XLA's
`cost_analysis`, multiplies the scanned layer body by the number of layers.

The script sets no XLA flags and changes no numerics; `XLA_FLAGS`, when the user sets it, is
recorded with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost.losses import sft_loss
from jaxpost.models import ModelConfig, forward, init_params, num_params
from jaxpost.train import init_state, make_train_step

# The benchmark shape: Llama-style GQA (3 query heads per KV head), SwiGLU MLP, untied head.
BASE_CONFIG = ModelConfig(  # 24.9M parameters, tied embeddings (as Llama 3.2 1B/3B)
    model_type="llama", vocab_size=32000, hidden_size=384, num_layers=8, num_heads=6,
    num_kv_heads=2, head_dim=64, intermediate_size=1024, tie_embeddings=True)
TINY_CONFIG = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=64, intermediate_size=768, tie_embeddings=False)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to run: shapes and repetition counts."""

  config: ModelConfig
  matmul_sizes: tuple[int, ...] = (1024, 2048, 3072)
  matmul_reps: int = 5
  fwd_batch: int = 8
  fwd_seq_len: int = 256
  fwd_reps: int = 10
  decode_batches: tuple[int, ...] = (1, 16)
  prompt_len: int = 128
  new_tokens: int = 128
  decode_reps: int = 3


@dataclasses.dataclass
class Row:
  """One line of the results table."""

  name: str
  shape: str
  compile_s: float | None
  median_s: float
  tokens_per_s: float | None
  gflop_per_token: float | None
  gflop_per_s: float
  mfu: float | None
  times_s: list[float]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Results:
  """Everything one run measured; `to_json` gives the `--json` file's content."""

  machine: dict[str, Any]
  config: ModelConfig
  settings: Settings
  ceiling_gflop_per_s: float  # best of the start and end measurements
  ceiling_start_end: tuple[float, float]
  rows: list[Row]

  def to_json(self) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "hf_source"}
    settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "config"}
    return {
        "machine": self.machine,
        "config": config,
        "num_params": num_params(self.config),
        "matmul_params": matmul_params(self.config),
        "settings": settings,
        "ceiling_gflop_per_s": self.ceiling_gflop_per_s,
        "ceiling_gflop_per_s_start_end": list(self.ceiling_start_end),
        "rows": [dataclasses.asdict(r) for r in self.rows],
    }


# ---------------------------------------------------------------------------------------------
# The machine.


def machine_info() -> dict[str, Any]:
  """CPU model, core counts, jax/jaxlib versions, backend, device kind and the date."""
  cpu_model, cpu_id, simd = platform.processor() or "unknown", "", []
  try:
    with open("/proc/cpuinfo") as f:
      info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                  if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu_model = info.get("model name", cpu_model)
    cpu_id = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    flags = set(info.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  except OSError:
    pass
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cores = os.cpu_count()
  import jaxlib  # local: only its version is needed

  device = jax.devices()[0]
  return {
      "cpu_model": cpu_model,
      "cpu_id": cpu_id,
      "cpu_simd": simd,
      "cpu_count": os.cpu_count(),
      "usable_cores": usable_cores,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }


def cpu_seconds() -> tuple[float, float] | None:
  """(busy CPU seconds of the whole machine, of this process) so far; None without /proc."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  ticks = os.sysconf("SC_CLK_TCK")
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
  own = os.times()
  return (sum(fields[:8]) - idle) / ticks, own.user + own.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None,
               wall_s: float) -> float | None:
  """Share of the machine's CPU time used by *other* processes between two `cpu_seconds`.

  0 means the benchmark had the machine to itself; on a shared machine a few percent or more
  means the numbers are depressed by that much or worse.
  """
  if before is None or after is None or wall_s <= 0:
    return None
  others = (after[0] - before[0]) - (after[1] - before[1])
  return max(others, 0.0) / (wall_s * (os.cpu_count() or 1))


def machine_line(m: dict[str, Any]) -> str:
  """One line naming the machine and software, from `machine_info`."""
  flags = f", XLA_FLAGS={m['xla_flags']}" if m["xla_flags"] else ""
  simd = "/".join(m["cpu_simd"]) or "no avx2"
  return (f"{m['cpu_model']} ({m['cpu_id']}, {simd}), {m['usable_cores']} usable cores "
          f"({m['cpu_count']} CPUs), "
          f"jax {m['jax']} / jaxlib {m['jaxlib']}, backend {m['backend']} "
          f"({m['device_kind']} x{m['device_count']}){flags}, {m['date']}")


# ---------------------------------------------------------------------------------------------
# FLOP counting.


def layer_matmul_params(config: ModelConfig) -> int:
  """Matmul weights of the decoder layers: q, k, v, o and the gated MLP's gate, up, down."""
  c = config
  attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v
  attn += c.num_heads * c.head_dim * c.hidden_size  # o
  mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
  return c.num_layers * (attn + mlp)


def matmul_params(config: ModelConfig) -> int:
  """Parameters used as matmul weights per token: every layer matrix plus the LM head.

  The input embedding is a gather, not a matmul, so an untied embedding table is excluded;
  norms and biases are not matmul weights either.
  """
  return layer_matmul_params(config) + config.hidden_size * config.vocab_size


def forward_flops_per_token(config: ModelConfig, context: float, *,
                            lm_head: bool = True) -> float:
  """Forward FLOPs of one token that attends to `context` keys.

      flops = 2 * N_matmul + 2 * 2 * n_layers * context * (n_heads * head_dim)

  The first term is a multiply-add for every matmul weight (`matmul_params`: q/k/v/o, the
  gated MLP and, unless `lm_head=False`, the LM head). The second is the attention scores q.k
  and the weighted sum of values, each `2 * context * n_heads * head_dim` per layer. With
  `context` = the sequence length T this is the forward part of the PaLM appendix B formula
  (training: 6N + 12 L H Q T); like PaLM it charges each query for all T keys, which is what a
  dense masked implementation computes (a causal-only count would halve the attention term,
  here ~5% of the total). Norms, RoPE, softmax and activations are not counted.
  """
  c = config
  n_matmul = matmul_params(c) if lm_head else layer_matmul_params(c)
  return 2.0 * n_matmul + 4.0 * c.num_layers * context * c.num_heads * c.head_dim


def generate_flops(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs of one `generate` call: the prefill plus the one-token decode steps.

  The prefill runs the `prompt_len` prompt tokens through the layers at context `prompt_len`
  and the LM head on the last position only; its logits give the first new token. Each of the
  remaining `new_tokens - 1` steps feeds the previous token, which attends over the prompt and
  the tokens so far (context `prompt_len + i + 1` for the step feeding new token i), and runs
  the LM head. The sampler attends over its whole preallocated cache (`prompt_len +
  new_tokens` slots) at every step; the extra work on empty slots is overhead, not model
  FLOPs, and is not counted.
  """
  prefill = (prompt_len * forward_flops_per_token(config, prompt_len, lm_head=False)
             + 2.0 * config.hidden_size * config.vocab_size)
  steps = sum(forward_flops_per_token(config, prompt_len + i + 1) for i in range(new_tokens - 1))
  return batch * (prefill + steps)


def _sub_jaxprs(value) -> list:
  """The jaxprs held by one equation parameter (closed or open, possibly in a tuple)."""
  if hasattr(value, "jaxpr") and hasattr(value, "consts"):
    return [value.jaxpr]
  if hasattr(value, "eqns"):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _count_dot_flops(jaxpr) -> float:
  """2 * M * N * K of every `dot_general`, recursing into sub-jaxprs (scan: times length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      out_shape = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)
      continue
    subs = [_count_dot_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == "cond":
      total += max(subs, default=0.0)
    elif name == "scan":
      total += eqn.params["length"] * sum(subs)
    else:  # jit, remat, custom_jvp, while (counted once: its trip count is not static) ...
      total += sum(subs)
  return total


def jaxpr_matmul_flops(fn: Callable, *args) -> float:
  """FLOPs of every `dot_general` in `fn`'s traced program, scan bodies times their length.

  An independent check of the analytic count: it sees exactly the matmuls the code performs.
  """
  return _count_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ---------------------------------------------------------------------------------------------
# Timing.


def _block(x):
  """Waits for every array in `x` and returns it."""
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], reps: int) -> list[float]:
  """Wall time of `reps` calls of `fn`, each waited for with `block_until_ready`."""
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - start)
  return times


def bench_matmul(sizes: Sequence[int], reps: int) -> tuple[float, list[Row]]:
  """Best f32 GFLOP/s of a jitted square `a @ b` over `sizes`; one row per size."""
  matmul = jax.jit(lambda a, b: a @ b)
  rows, best = [], 0.0
  for n in sizes:
    key_a, key_b = jax.random.split(jax.random.key(n))
    a_NxN = jax.random.normal(key_a, (n, n), jnp.float32)
    b_NxN = jax.random.normal(key_b, (n, n), jnp.float32)
    start = time.perf_counter()
    compiled = matmul.lower(a_NxN, b_NxN).compile()
    compile_s = time.perf_counter() - start
    _block(compiled(a_NxN, b_NxN))  # warm-up
    times = time_calls(lambda: compiled(a_NxN, b_NxN), reps)
    flops = 2.0 * n ** 3
    size_best = flops / min(times) / 1e9
    best = max(best, size_best)
    rows.append(Row(
        name="matmul f32", shape=f"{n}x{n}x{n}", compile_s=compile_s,
        median_s=statistics.median(times), tokens_per_s=None, gflop_per_token=None,
        gflop_per_s=flops / statistics.median(times) / 1e9, mfu=None, times_s=times,
        extra={"best_gflop_per_s": size_best}))
  return best, rows


def bench_forward(config: ModelConfig, params: dict, batch: int, seq_len: int,
                  reps: int) -> Row:
  """Tokens/s and GFLOP/s of the jitted f32 forward pass (logits included), random tokens."""
  tokens_BxT = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, config.vocab_size)

  def logits_fn(p, t):
    return forward(config, p, t).logits

  start = time.perf_counter()
  compiled = jax.jit(logits_fn).lower(params, tokens_BxT).compile()
  compile_s = time.perf_counter() - start
  _block(compiled(params, tokens_BxT))  # warm-up
  times = time_calls(lambda: compiled(params, tokens_BxT), reps)
  median = statistics.median(times)
  n_tokens = batch * seq_len
  flops_per_token = forward_flops_per_token(config, seq_len)
  gflop_per_s = flops_per_token * n_tokens / median / 1e9
  counted = jaxpr_matmul_flops(logits_fn, params, tokens_BxT) / n_tokens
  return Row(
      name="forward", shape=f"B={batch} T={seq_len}", compile_s=compile_s, median_s=median,
      tokens_per_s=n_tokens / median, gflop_per_token=flops_per_token / 1e9,
      gflop_per_s=gflop_per_s, mfu=None, times_s=times,
      extra={"jaxpr_gflop_per_token": counted / 1e9, "best_s": min(times)})


def bench_train_step(config: ModelConfig, params: dict, batch: int, seq_len: int,
                     reps: int) -> Row:
  """Tokens/s of the full-parameter SFT update step (`jaxpost.train.make_train_step` with
  `sft_loss`, AdamW, f32, every token trained). FLOPs: 3x the forward's (backward = 2x)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
  data = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
          "loss_mask": np.ones((batch, seq_len), bool),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))}
  data = jax.device_put(data)
  opt = optax.adamw(1e-4)
  step = make_train_step(functools.partial(sft_loss, config=config), opt)
  holder = [init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))]

  def one():
    holder[0], metrics = step(holder[0], data, {})
    return metrics["loss"]

  start = time.perf_counter()
  _block(one())  # compiles
  compile_s = time.perf_counter() - start
  times = time_calls(one, reps)
  median = statistics.median(times)
  n_tokens = batch * seq_len
  flops_per_token = 3 * forward_flops_per_token(config, seq_len)
  return Row(
      name="SFT step (AdamW)", shape=f"B={batch} T={seq_len}", compile_s=compile_s,
      median_s=median, tokens_per_s=n_tokens / median, gflop_per_token=flops_per_token / 1e9,
      gflop_per_s=flops_per_token * n_tokens / median / 1e9, mfu=None, times_s=times,
      extra={"best_s": min(times)})


def bench_decode(config: ModelConfig, params: dict, batch: int, prompt_len: int,
                 new_tokens: int, reps: int) -> Row:
  """New tokens/s and GFLOP/s of greedy `generate` from a random `prompt_len`-token prompt."""
  from jaxpost.sampling import generate  # local: only the decode part needs the sampler

  rng = np.random.default_rng(batch)
  prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
  call = functools.partial(generate, config, params, prompts, max_new_tokens=new_tokens,
                           temperature=0.0)
  start = time.perf_counter()
  first = _block(call())
  first_s = time.perf_counter() - start
  lengths = np.asarray(first.lengths)
  if first.tokens.shape != (batch, new_tokens) or not (lengths == new_tokens).all():
    raise RuntimeError(
        f"generate returned tokens {first.tokens.shape} and lengths {lengths.tolist()}; "
        f"expected ({batch}, {new_tokens}) and {new_tokens} each (no early stop)")
  times = time_calls(call, reps)
  median = statistics.median(times)
  flops = generate_flops(config, batch, prompt_len, new_tokens)
  gflop_per_s = flops / median / 1e9
  n_new = batch * new_tokens
  return Row(
      name="decode (greedy)", shape=f"B={batch} P={prompt_len} N={new_tokens}",
      compile_s=max(first_s - min(times), 0.0), median_s=median, tokens_per_s=n_new / median,
      gflop_per_token=flops / n_new / 1e9, gflop_per_s=gflop_per_s,
      mfu=None, times_s=times,
      extra={"first_call_s": first_s, "ms_per_new_token": 1e3 * median / new_tokens,
             "best_s": min(times)})


# ---------------------------------------------------------------------------------------------
# Reporting.


def _fmt(x: float | None, spec: str) -> str:
  """`x` formatted with `spec`, or "-" for a missing value."""
  return "-" if x is None else format(x, spec)


def markdown_table(rows: Sequence[Row]) -> str:
  """The results as a markdown table (the columns are described in benchmarks/README.md)."""
  header = ("| benchmark | shape | compile s | median s | tokens/s | GFLOP/token | GFLOP/s "
            "| MFU |")
  lines = [header, "|---|---|--:|--:|--:|--:|--:|--:|"]
  for r in rows:
    lines.append(
        f"| {r.name} | {r.shape} | {_fmt(r.compile_s, '.2f')} | {_fmt(r.median_s, '.4f')} "
        f"| {_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.gflop_per_token, '.4f')} "
        f"| {r.gflop_per_s:.1f} | {_fmt(None if r.mfu is None else 100 * r.mfu, '.1f')}"
        f"{'' if r.mfu is None else '%'} |")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; see the module docstring for examples."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="4 layers, width 256 (a quick shape)")
  p.add_argument("--quick", action="store_true", help="fewer repetitions and matmul sizes")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
  p.add_argument("--batch", type=int, default=8, help="forward batch size")
  p.add_argument("--seq-len", type=int, default=256, help="forward sequence length")
  p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16],
                 help="decode batch sizes")
  p.add_argument("--prompt-len", type=int, default=128, help="decode prompt length")
  p.add_argument("--new-tokens", type=int, default=128, help="decode new tokens")
  p.add_argument("--matmul-sizes", type=int, nargs="+", help="square matmul sizes")
  p.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
  return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
  """The `Settings` a command line asks for (`--tiny` picks the shape, `--quick` the reps)."""
  config = TINY_CONFIG if args.tiny else BASE_CONFIG
  quick = args.quick
  default_sizes = (1024, 2048) if quick else (1024, 2048, 3072)
  return Settings(
      config=config,
      matmul_sizes=tuple(args.matmul_sizes) if args.matmul_sizes else default_sizes,
      matmul_reps=3 if quick else 5,
      fwd_batch=args.batch, fwd_seq_len=args.seq_len, fwd_reps=3 if quick else 10,
      decode_batches=() if args.no_decode else tuple(args.decode_batches),
      prompt_len=args.prompt_len, new_tokens=args.new_tokens, decode_reps=1 if quick else 3)


def run(s: Settings) -> Results:
  """Runs every benchmark of `s`, printing progress to stderr; returns the results."""
  machine = machine_info()
  config = s.config
  log = functools.partial(print, file=sys.stderr, flush=True)
  log(f"machine: {machine_line(machine)}")
  log(f"model: {num_params(config):,} parameters ({matmul_params(config):,} in matmuls)")

  cpu_before, wall_before = cpu_seconds(), time.perf_counter()
  log("matmul ceiling ...")
  ceiling, matmul_rows = bench_matmul(s.matmul_sizes, s.matmul_reps)
  log(f"  {ceiling:.1f} GFLOP/s")
  params = init_params(config, jax.random.key(0), dtype=jnp.float32)
  log("forward ...")
  model_rows = [bench_forward(config, params, s.fwd_batch, s.fwd_seq_len, s.fwd_reps)]
  log("SFT step ...")
  model_rows.append(bench_train_step(config, params, s.fwd_batch, s.fwd_seq_len, s.fwd_reps))
  for batch in s.decode_batches:
    log(f"decode batch {batch} ...")
    model_rows.append(bench_decode(config, params, batch, s.prompt_len, s.new_tokens,
                                   s.decode_reps))
  # The ceiling again, at the size that did best, in case the first measurement was disturbed.
  best_size = max(matmul_rows, key=lambda r: r.extra["best_gflop_per_s"]).shape.split("x")[0]
  log("matmul ceiling again ...")
  ceiling_end, end_rows = bench_matmul((int(best_size),), s.matmul_reps)
  end_rows[0].name = "matmul f32 (at end)"
  log(f"  {ceiling_end:.1f} GFLOP/s")
  ceiling = max(ceiling, ceiling_end)
  for r in model_rows:
    r.mfu = r.gflop_per_s / ceiling
  rows = matmul_rows + end_rows + model_rows
  machine["other_load"] = other_load(cpu_before, cpu_seconds(),
                                     time.perf_counter() - wall_before)
  ceiling_start = max(r.extra["best_gflop_per_s"] for r in matmul_rows)
  return Results(machine=machine, config=config, settings=s, ceiling_gflop_per_s=ceiling,
                 ceiling_start_end=(ceiling_start, ceiling_end), rows=rows)


def report(results: Results) -> str:
  """The printed report: machine, model, ceiling, the table and the FLOP cross-check."""
  c = results.config
  fwd = next(r for r in results.rows if r.name == "forward")
  start, end = results.ceiling_start_end
  load = results.machine["other_load"]
  lines = [
      f"Machine: {machine_line(results.machine)}",
      "",
      f"Model: Llama-shaped, vocab {c.vocab_size}, hidden {c.hidden_size}, "
      f"{c.num_layers} layers, {c.num_heads} heads / {c.num_kv_heads} KV heads "
      f"(head_dim {c.head_dim}), MLP {c.intermediate_size}, "
      f"{'tied' if c.tie_embeddings else 'untied'}, f32: {num_params(c):,} parameters "
      f"({matmul_params(c):,} in matmuls).",
      f"Ceiling: {results.ceiling_gflop_per_s:.1f} GFLOP/s (best f32 matmul, start "
      f"{start:.1f} / end {end:.1f}; MFU is relative to it). CPU used by other processes "
      f"during the run: {_fmt(None if load is None else 100 * load, '.0f')}%.",
      "",
      markdown_table(results.rows),
      "",
      f"FLOP check (forward): analytic {fwd.gflop_per_token:.4f} GFLOP/token, counted from "
      f"the jaxpr's matmuls {fwd.extra['jaxpr_gflop_per_token']:.4f} GFLOP/token.",
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark, prints the report and writes `--json` if given."""
  args = parse_args(argv)
  results = run(settings_from_args(args))
  print(report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results.to_json(), f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
