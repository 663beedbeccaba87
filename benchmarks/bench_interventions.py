"""The cost of interventions and captures on the benchmark's 40M Llama shape (the table in
docs/architecture.md's white-box section and the issue's closing note).

    python benchmarks/bench_interventions.py [--rounds 7] [--batch 8] [--seq 256]

Times one jitted forward (logits) and one forward + backward (a mean-logit loss) of the
harness's model (8 x 512, vocabulary 32k, benchmarks/workloads.py MODEL) on batch x seq
tokens: with no intervention; one steering vector at one layer; a steering vector at every
layer; a head knockout at every layer; capturing every layer's residual stream. Rounds
alternate the variants; each time is the median over rounds of a 3-call median.
"""

from __future__ import annotations

import argparse
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

from jaxpost.models import ModelConfig, forward, init_params  # noqa: E402
from jaxpost.whitebox import Ablate, AddVector  # noqa: E402


def variants(cfg: ModelConfig):
  v = jnp.ones((cfg.hidden_size,), jnp.float32) * 0.01
  return {
      "none": dict(),
      "one vector, one layer": dict(interventions=[AddVector("resid_post", v, 1.0, (3,))]),
      "vector at every layer": dict(interventions=[AddVector("resid_post", v, 1.0)]),
      "head knockout, every layer": dict(interventions=[Ablate("head_out", heads=(0,))]),
      "capture every resid_post": dict(capture=["resid_post"]),
  }


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()
  cfg = jaxpost_config(MODEL)
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
  fns = {}
  for name, kw in variants(cfg).items():
    def fwd(p, t, kw=kw):
      out = forward(cfg, p, t, **kw)
      return out.logits, out.captured
    def loss(p, t, kw=kw):
      return jnp.mean(forward(cfg, p, t, **kw).logits)
    fns[name] = (jax.jit(fwd), jax.jit(jax.grad(loss)))
  for f, g in fns.values():  # compile
    jax.block_until_ready(f(params, tokens))
    jax.block_until_ready(g(params, tokens))
  times = {name: ([], []) for name in fns}
  for _ in range(args.rounds):
    for name, (f, g) in fns.items():
      for i, fn in enumerate((f, g)):
        ts = []
        for _ in range(3):
          t0 = time.perf_counter()
          jax.block_until_ready(fn(params, tokens))
          ts.append(time.perf_counter() - t0)
        times[name][i].append(statistics.median(ts))
  base_f = statistics.median(times["none"][0])
  base_g = statistics.median(times["none"][1])
  print(f"{cfg.num_layers} x {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{args.batch} x {args.seq} tokens, {args.rounds} rounds, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
  print("| variant | forward (ms) | vs none | forward + backward (ms) | vs none |")
  print("| --- | --- | --- | --- | --- |")
  for name, (tf, tg) in times.items():
    f, g = statistics.median(tf), statistics.median(tg)
    print(f"| {name} | {1e3 * f:.0f} | {f / base_f:.3f}x | {1e3 * g:.0f} | {g / base_g:.3f}x |")


if __name__ == "__main__":
  main()
