"""PEFT benchmark: one SFT step under full fine-tuning, LoRA, DoRA and QLoRA (NF4, int8).

    python benchmarks/bench_peft.py                  # full run, every variant (a few minutes)
    python benchmarks/bench_peft.py --quick          # fewer timed steps
    python benchmarks/bench_peft.py --json out.json  # also write the results as JSON
    python benchmarks/bench_peft.py --variants lora qlora-nf4

On `bench_model.BASE_CONFIG` (24.9M-parameter Llama, tied embeddings), float32 parameters,
AdamW (lr 1e-4), a random batch of 8 x 256 tokens with every token in the loss, it measures
one `jaxpost.train.make_train_step` step for:

* **full**: `sft_loss` over all parameters, `step(state, batch, {})`;
* **lora**: r=16, alpha=32 on q, k, v, o, gate, up, down; the trainable params are
  `peft.init_lora`'s adapters, the loss is `peft.lora_loss(sft_loss, lora)` and the base
  arrives frozen as `step(state, batch, {"base": params})`;
* **dora**: the same with `LoraConfig(dora=True)` (magnitudes from `init_lora(base=params)`);
* **qlora-nf4** / **qlora-int8**: LoRA r=16 over `peft.quantize_params(params, kind=...)`
  (block 64, double quantisation); the embedding / tied LM head and norms stay float32.

Each variant runs in its own subprocess, so its peak RSS (`ru_maxrss`) is its own. The step is
compiled ahead of time (`step.lower(...).compile()`, reported as compile s), called once as a
warm-up, then timed (`bench_model.time_calls`). "XLA live MB" is from the compiled step's
`memory_analysis()`: argument + temp + output - alias bytes, i.e. the state, batch and frozen
base passed in, XLA's scratch buffers, and the outputs not written in place of the donated
state (`peak_memory_in_bytes` is recorded in the JSON, but on CPU it is about the argument
size alone). "peak RSS" is `ru_maxrss` at the end of the worker, "setup" the same before
compiling the step (the jax runtime, `init_params`' compilation, the arrays). A separate
subprocess measures the NF4 / int8 error on the model's initialised (not pretrained) weights:
mean |W - dequant(quant(W))| / mean |W| over the quantised layer weights.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_model import (BASE_CONFIG, _fmt, bench_matmul, cpu_seconds, machine_info,
                         machine_line, time_calls)
from jaxpost.losses import sft_loss
from jaxpost.models import init_params, num_params
from jaxpost.peft import (LoraConfig, dequantize_params, init_lora, lora_loss,
                          quantize_params)
from jaxpost.peft.quant import TARGETS, is_quantized
from jaxpost.train import init_state, make_train_step

VARIANTS = ("full", "lora", "dora", "qlora-nf4", "qlora-int8", "dpo-full", "dpo-lora")
MB = 1e6


def _rss_mb() -> float:
  """Peak resident memory of this process so far, MB (`ru_maxrss` is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def _count(tree) -> tuple[int, int]:
  """(represented parameters, stored bytes) of a tree; `QuantizedWeight`s count as leaves."""
  leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
  n = sum(int(x.size) for x in leaves)
  nbytes = sum(x.nbytes if is_quantized(x) else x.size * x.dtype.itemsize for x in leaves)
  return n, int(nbytes)


def make_batch(config, batch: int, seq_len: int) -> dict:
  """The SFT batch of `bench_model.bench_train_step`: random tokens, every token trained."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (batch, seq_len)).astype(np.int32)
  return jax.device_put({
      "tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
      "loss_mask": np.ones((batch, seq_len), bool),
      "segment_ids": np.ones((batch, seq_len), np.int32),
      "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))})


def bench_variant(name: str, reps: int, batch: int, seq_len: int) -> dict[str, Any]:
  """Sizes, compile time, step times and memory of one variant's training step."""
  config = BASE_CONFIG
  params = init_params(config, jax.random.key(0), dtype=jnp.float32)
  opt = optax.adamw(1e-4)
  sft = functools.partial(sft_loss, config=config)
  tokens_per_step = batch * seq_len
  if name.startswith("dpo"):
    # DPO with an in-step reference: `batch` pairs of `seq_len` tokens per side, one forward of
    # [2 * batch, seq_len] for the policy and one (no gradient) for the reference.
    from jaxpost.losses import dpo_loss  # pylint: disable=import-outside-toplevel
    from jaxpost.peft import attach_lora  # pylint: disable=import-outside-toplevel
    dpo = functools.partial(dpo_loss, config=config, beta=0.1)
    pair = make_batch(config, 2 * batch, seq_len)
    data = {k: jnp.stack([v[:batch], v[batch:]], axis=1) for k, v in pair.items()}
    tokens_per_step = 2 * batch * seq_len
    if name == "dpo-full":
      trainable, frozen = params, {"ref": jax.tree.map(jnp.copy, params)}
      loss = lambda p, b, r, *, ref: dpo(p, b, r, ref_params=ref)  # noqa: E731
    else:
      lora = LoraConfig(rank=16, alpha=32.0)
      trainable, frozen = init_lora(config, lora, jax.random.key(1)), {"base": params}
      loss = lambda a, b, r, *, base: dpo(attach_lora(base, a, lora), b, r,  # noqa: E731
                                          ref_params=base)
    del params
  elif name == "full":
    trainable, loss, frozen = params, sft, {}
  else:
    lora = LoraConfig(rank=16, alpha=32.0, dora=name == "dora")
    base = quantize_params(params, kind=name.split("-")[1]) if name.startswith("qlora") else params
    trainable = init_lora(config, lora, jax.random.key(1), base=base if lora.dora else None)
    loss, frozen = lora_loss(sft, lora), {"base": base}
    del params, base  # QLoRA: the float32 layer weights go; only the frozen tree holds the base
  if not name.startswith("dpo"):
    data = make_batch(config, batch, seq_len)
  n_train, train_bytes = _count(trainable)
  state = init_state(trainable, opt, jax.random.key(2))  # donated by the step: not reused
  _, opt_bytes = _count(state.opt_state)
  n_base, base_bytes = _count(frozen)
  quantized = [x for x in jax.tree.leaves(frozen, is_leaf=is_quantized) if is_quantized(x)]
  rss_setup = _rss_mb()

  step = make_train_step(loss, opt)
  start = time.perf_counter()
  compiled = step.lower(state, data, frozen).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  fields = ("argument", "output", "alias", "temp", "generated_code")
  xla = {f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0) for f in fields}
  peak = getattr(mem, "peak_memory_in_bytes", None)  # not filled in by every backend
  xla["peak_memory"] = int(peak) if peak else None
  xla["live"] = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"]

  holder = [state]
  losses = []

  def one():
    holder[0], metrics = compiled(holder[0], data, frozen)
    losses.append(metrics["loss"])
    return holder[0], metrics

  start = time.perf_counter()
  jax.block_until_ready(one())
  first_s = time.perf_counter() - start
  times = time_calls(one, reps)
  median = statistics.median(times)
  losses = [float(x) for x in losses]
  if not all(np.isfinite(losses)):
    raise RuntimeError(f"{name}: non-finite loss {losses}")
  return {
      "variant": name, "trainable_params": n_train, "trainable_bytes": train_bytes,
      "opt_state_bytes": opt_bytes, "base_params": n_base, "base_bytes": base_bytes,
      "base_bf16_bytes": 2 * n_base,
      "quantized_params": sum(q.size for q in quantized),
      "quantized_bytes": sum(q.nbytes for q in quantized),
      "compile_s": compile_s, "first_call_s": first_s, "times_s": times, "median_s": median,
      "tokens_per_s": tokens_per_step / median, "losses": losses, "xla_memory_bytes": xla,
      "rss_setup_mb": rss_setup, "rss_peak_mb": _rss_mb(),
  }


def quant_error() -> dict[str, Any]:
  """NF4 / int8 error on the benchmark model's (initialised) layer weights, per target."""
  params = init_params(BASE_CONFIG, jax.random.key(0), dtype=jnp.float32)
  out = {}
  for kind in ("nf4", "int8"):
    q = quantize_params(params, kind=kind)
    deq = dequantize_params(q, jnp.float32)
    per, err_sum, abs_sum, nbytes, n = {}, 0.0, 0.0, 0, 0
    for name, group in TARGETS.items():
      w = np.asarray(params["layers"][group][name], np.float64)
      e = np.abs(w - np.asarray(deq["layers"][group][name], np.float64))
      per[name] = float(e.mean() / np.abs(w).mean())
      err_sum, abs_sum = err_sum + e.sum(), abs_sum + np.abs(w).sum()
      nbytes, n = nbytes + q["layers"][group][name].nbytes, n + w.size
    out[kind] = {"rel_mean_abs_error": err_sum / abs_sum, "per_target": per,
                 "bits_per_param": 8 * nbytes / n, "params": n}
  return out


def _subprocess(args: list[str]) -> dict[str, Any]:
  """Runs this script with `args` in a fresh process; returns its last stdout line as JSON."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True,
                        stdout=subprocess.PIPE, text=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _busy() -> tuple[float, float] | None:
  """(busy CPU s of the machine, CPU s of this process and its waited-for children)."""
  machine = cpu_seconds()
  t = os.times()
  return None if machine is None else (machine[0], t[0] + t[1] + t[2] + t[3])


def run(variants: Sequence[str], reps: int, batch: int, seq_len: int) -> dict[str, Any]:
  """Every variant in its own subprocess, the quantisation error, and the matmul ceiling."""
  log = functools.partial(print, file=sys.stderr, flush=True)
  machine = machine_info()
  log(f"machine: {machine_line(machine)}")
  busy0, wall0 = _busy(), time.perf_counter()
  ceiling_start, _ = bench_matmul((2048,), 3)
  log("quantisation error ...")
  quant = _subprocess(["--worker", "quant"])
  rows = []
  for name in variants:
    log(f"{name} ...")
    rows.append(_subprocess(["--worker", name, "--reps", str(reps), "--batch", str(batch),
                             "--seq-len", str(seq_len)]))
    log(f"  {rows[-1]['median_s']:.2f} s/step, compile {rows[-1]['compile_s']:.1f} s")
  ceiling_end, _ = bench_matmul((2048,), 3)
  busy1, wall = _busy(), time.perf_counter() - wall0
  load = None
  if busy0 and busy1:
    load = max((busy1[0] - busy0[0]) - (busy1[1] - busy0[1]), 0.0) / (wall * os.cpu_count())
  machine["other_load"] = load
  return {"machine": machine, "config": {"num_params": num_params(BASE_CONFIG),
                                         "vocab": BASE_CONFIG.vocab_size,
                                         "hidden": BASE_CONFIG.hidden_size,
                                         "layers": BASE_CONFIG.num_layers},
          "settings": {"batch": batch, "seq_len": seq_len, "reps": reps, "rank": 16,
                       "alpha": 32.0, "optimizer": "adamw(1e-4)"},
          "ceiling_gflop_per_s_start_end": [ceiling_start, ceiling_end],
          "quant_error": quant, "rows": rows}


def report(res: dict[str, Any]) -> str:
  """The printed report: machine, load, the step table and the quantisation error table."""
  s, load = res["settings"], res["machine"]["other_load"]
  full = next((r for r in res["rows"] if r["variant"] == "full"), None)
  lines = [
      f"Machine: {machine_line(res['machine'])}",
      (f"Matmul ceiling (f32 2048^3) start / end: "
      f"{res['ceiling_gflop_per_s_start_end'][0]:.1f} / "
      f"{res['ceiling_gflop_per_s_start_end'][1]:.1f} GFLOP/s; CPU used by other processes: "
      f"{_fmt(None if load is None else 100 * load, '.0f')}%."),
      (f"Model: {res['config']['num_params']:,} params; SFT step B={s['batch']} "
      f"T={s['seq_len']}, f32, AdamW; LoRA r={s['rank']} alpha={s['alpha']:g} on q,k,v,o,"
      f"gate,up,down; median of {s['reps']} timed steps after 1 warm-up."), "",
      ("| variant | trainable params | trainable MB | optimizer MB | frozen base MB "
      "| base bf16-eq MB | compile s | step s | tokens/s | vs full | XLA live MB "
      "| peak RSS MB (setup) |"),
      "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for r in res["rows"]:
    base = r["base_bytes"] > 0
    speed = full["median_s"] / r["median_s"] if full else None
    lines.append(
        f"| {r['variant']} | {r['trainable_params']:,} | {r['trainable_bytes'] / MB:.1f} "
        f"| {r['opt_state_bytes'] / MB:.1f} "
        f"| {_fmt(r['base_bytes'] / MB if base else None, '.1f')} "
        f"| {_fmt(r['base_bf16_bytes'] / MB if base else None, '.1f')} "
        f"| {r['compile_s']:.1f} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} "
        f"| {_fmt(speed, '.2f')}x | {r['xla_memory_bytes']['live'] / MB:.0f} "
        f"| {r['rss_peak_mb']:.0f} ({r['rss_setup_mb']:.0f}) |")
  lines.append("")
  for r in res["rows"]:
    if r["quantized_params"]:
      plain = r["base_bytes"] - r["quantized_bytes"]
      lines.append(f"{r['variant']} base: {r['quantized_params']:,} layer weights in "
                   f"{r['quantized_bytes'] / MB:.1f} MB "
                   f"({8 * r['quantized_bytes'] / r['quantized_params']:.3f} bits each) + "
                   f"{plain / MB:.1f} MB float32 embedding / tied LM head and norms.")
  lines += ["", "| quantisation | bits/param | rel. mean abs error | worst target |",
            "|---|--:|--:|--:|"]
  for kind, q in res["quant_error"].items():
    worst = max(q["per_target"], key=q["per_target"].get)
    lines.append(f"| {kind} (block 64, double quant) | {q['bits_per_param']:.3f} "
                 f"| {100 * q['rel_mean_abs_error']:.2f}% "
                 f"| {worst} {100 * q['per_target'][worst]:.2f}% |")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; see the module docstring for examples."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="2 timed steps instead of 5")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
  p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--reps", type=int, help="timed steps (overrides --quick)")
  p.add_argument("--worker", choices=VARIANTS + ("quant",), help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark (or, with --worker, one part of it) and prints the report."""
  args = parse_args(argv)
  reps = args.reps or (2 if args.quick else 5)
  if args.worker == "quant":
    print(json.dumps(quant_error()))
    return
  if args.worker:
    print(json.dumps(bench_variant(args.worker, reps, args.batch, args.seq_len)))
    return
  res = run(args.variants, reps, args.batch, args.seq_len)
  print(report(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
