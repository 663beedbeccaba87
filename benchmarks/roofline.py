"""The machine's limit for generation: memory bandwidth, measured, and the time it allows.

A decode step (one new token per row) reads every matmul weight once and each row's KV cache
up to its context; at small batch it is bound by how fast memory delivers those bytes, at
larger batch by its FLOPs. The prefill is a batch of whole prompts and runs at the matmul
ceiling. So the least time a `generate` call can take on this machine is

    T_min = max(F_prefill / C, W / BW)
            + sum over decode steps i of max(bytes_i / BW, F_i / C)

with C the f32 matmul ceiling (`bench_model.bench_matmul`), BW the read bandwidth measured
here, W the matmul weights' bytes, F the model FLOPs of `bench_model.generate_flops` split
into its parts, and bytes_i = W + the keys and values of the step's context (2 L B K ctx Dh
elements, ctx = prompt + tokens so far). Norms, embedding rows and writes are < 0.1% and not
counted. A framework's generation time divided into T_min is its "fraction of the bound".

`bench_bandwidth` times jitted reductions of a float32 array larger than the model (a full
sum and a row sum, several repetitions each) and keeps the fastest: the best rate at which XLA
on this machine streams bytes it reads once, which is what a decode step does with its weights.
"""

from __future__ import annotations

import time
from typing import Any

from bench_model import forward_flops_per_token, layer_matmul_params, matmul_params


def bench_bandwidth(mib: int = 256, reps: int = 10) -> dict[str, Any]:
  """Best read bandwidth (GB/s, 1e9 bytes) of jitted reductions over a `mib`-MiB f32 array.

  Returns {"bandwidth_gb_per_s": best, "methods": {name: best GB/s}, "mib": mib}.
  """
  import jax
  import jax.numpy as jnp

  n = mib * 1024 * 1024 // 4
  x = jnp.ones((n,), jnp.float32) + 0.0
  methods = {"sum": jax.jit(jnp.sum),
             "row sum": jax.jit(lambda a: jnp.sum(a.reshape(-1, 1024), axis=1))}
  best = {}
  for name, fn in methods.items():
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - start)
    best[name] = 4.0 * n / min(times) / 1e9
  return {"bandwidth_gb_per_s": max(best.values()), "methods": best, "mib": mib}


def decode_step_bytes(config, batch: int, context: int, bytes_per_param: int = 4,
                      kv_bytes: int = 4) -> float:
  """Bytes one decode step must read: every matmul weight (the LM head included) once, and
  the keys and values of `context` slots for each of the `batch` rows."""
  c = config
  kv = 2 * c.num_layers * batch * c.num_kv_heads * context * c.head_dim * kv_bytes
  return matmul_params(c) * bytes_per_param + kv


def generate_bound(config, batch: int, prompt_len: int, new_tokens: int, ceiling_gflops: float,
                   bandwidth_gbs: float) -> dict[str, float]:
  """The least time of a greedy `generate` call (see the module docstring), and its parts.

  Returns {"bound_s", "prefill_s", "decode_s", "decode_bandwidth_bound_steps"}: seconds, and
  how many decode steps are bound by bandwidth rather than FLOPs.
  """
  c, C, BW = config, ceiling_gflops * 1e9, bandwidth_gbs * 1e9
  prefill_flops = batch * (prompt_len * forward_flops_per_token(c, prompt_len, lm_head=False)
                           + 2.0 * c.hidden_size * c.vocab_size)
  prefill = max(prefill_flops / C, (layer_matmul_params(c) + c.hidden_size * c.vocab_size)
                * 4 / BW)
  decode, by_bytes = 0.0, 0
  for i in range(new_tokens - 1):  # the step feeding new token i attends over prompt + i + 1
    context = prompt_len + i + 1
    t_bytes = decode_step_bytes(c, batch, context) / BW
    t_flops = batch * forward_flops_per_token(c, context) / C
    decode += max(t_bytes, t_flops)
    by_bytes += t_bytes >= t_flops
  return {"bound_s": prefill + decode, "prefill_s": prefill, "decode_s": decode,
          "decode_bandwidth_bound_steps": by_bytes}


def gen_bound(config, spec: dict, ceiling_gflops: float, bandwidth_gbs: float) -> dict:
  """`generate_bound` for the `generate` workload's spec (`workloads.make_spec`)."""
  g = spec["generate"]
  return generate_bound(config, g["batch"], g["prompt_len"], g["new_tokens"], ceiling_gflops,
                        bandwidth_gbs)


def bound_table(rows: list[dict]) -> str:
  """The workloads with a machine bound (generation, `roofline`): each framework's time
  against the least time the measured ceiling and read bandwidth allow (RESULTS.md)."""
  # imported here: workloads imports this module
  from workloads import FRAMEWORK_TITLES, WORKLOADS

  lines = [("| workload | framework | median s | bound s (prefill + decode) "
            "| decode steps bandwidth-bound | fraction of bound |"),
           "|---|---|--:|--:|--:|--:|"]
  for r in rows:
    if "of_bound" not in r:
      continue
    b = r["bound"]
    lines.append(f"| {WORKLOADS[r['workload']].title} | {FRAMEWORK_TITLES[r['framework']]} "
                 f"| {r['median_s']:.3f} | {b['bound_s']:.3f} ({b['prefill_s']:.3f} + "
                 f"{b['decode_s']:.3f}) | {b['decode_bandwidth_bound_steps']} "
                 f"| {100 * r['of_bound']:.0f}% |")
  return "\n".join(lines) if len(lines) > 2 else ""
