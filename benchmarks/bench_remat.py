"""Memory against time of each rematerialisation policy (`model.remat`) on the harness's 40M
Llama shape (benchmarks/workloads.py MODEL): the table in benchmarks/RESULTS.md's notes.

    python benchmarks/bench_remat.py [--batch 8] [--seq 256] [--rounds 5]

For every policy it compiles one SFT loss + gradient (`jaxpost.losses.sft_loss`, fused LM
head) and reports XLA's compiled memory analysis (temporaries: the activations kept for the
backward pass live there) and the median step time over rounds that alternate the policies.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import MODEL  # noqa: E402  (puts benchmarks/workers on sys.path)

from jaxpost_worker import jaxpost_config  # noqa: E402
from jaxpost.losses import sft_loss  # noqa: E402
from jaxpost.models import init_params  # noqa: E402
from jaxpost.models.transformer import REMAT_POLICIES  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=5)
  args = ap.parse_args()
  cfg = jaxpost_config(MODEL)
  params = init_params(cfg, jax.random.key(0))
  B, T = args.batch, args.seq
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones((B, T), jnp.float32),
           "segment_ids": jnp.ones((B, T), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
  steps, memory = {}, {}
  for policy in REMAT_POLICIES:
    loss = functools.partial(sft_loss, config=cfg, remat=policy)
    grad = jax.jit(jax.grad(lambda p, b: loss(p, b, None)[0]))
    compiled = grad.lower(params, batch).compile()
    memory[policy] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(params, batch))
    steps[policy] = compiled
  times = {p: [] for p in steps}
  for _ in range(args.rounds):
    for policy, fn in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, batch))
      times[policy].append(time.perf_counter() - t0)
  base = statistics.median(times["none"])
  print(f"{cfg.num_layers} x {cfg.hidden_size}, vocab {cfg.vocab_size}, {B} x {T} tokens, "
        f"SFT loss + gradient, {args.rounds} rounds")
  print("| remat | temporaries (MiB) | step (s) | vs none |")
  print("| --- | --- | --- | --- |")
  for policy in steps:
    t = statistics.median(times[policy])
    print(f"| {policy} | {memory[policy]:.0f} | {t:.2f} | {t / base:.2f}x |")


if __name__ == "__main__":
  main()
