"""XLA:CPU's library and code-generation choices, measured on the harness's workloads.

    python benchmarks/xla_flags.py                      # every variant, sft and matmul
    python benchmarks/xla_flags.py --only sft,dpo --variants default,eigen

jaxlib's CPU compiler sends each dot to a library chosen by flags: YNNPACK for single dots
(`--xla_cpu_experimental_ynn_fusion_type=individual_dot`, the default of jax 0.10), Eigen
(the flag empty), XNNPACK or oneDNN fusions; and it emits the rest with a preferred vector
width (256 bits by default, 512 on AVX-512 machines when asked). Each variant runs the
harness's own jaxpost worker (`benchmarks/workers/jaxpost_worker.py`) with `XLA_FLAGS` set:
the f32 matmul ceiling and each workload's median step, and the loss of its last step (a
variant that changes the result shows up there). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from workloads import make_spec

import run

VARIANTS = {
    "default": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_dot_fusion": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise",
    "xnn_dot_fusion": "--xla_cpu_experimental_ynn_fusion_type= "
                      "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
              "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "vector_512": "--xla_cpu_prefer_vector_width=512",
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--only", default="sft")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--timeout", type=float, default=1800.0)
  args = p.parse_args()
  s = run.settings_from_args(run.parse_args(["--only", args.only, "--frameworks", "jaxpost",
                                             "--rounds", "1", "--steps", str(args.steps)]))
  log_dir = tempfile.mkdtemp(prefix="jaxpost-xla-flags-")
  lines = ["| variant | XLA_FLAGS | ceiling GFLOP/s | "
           + " | ".join(f"{w} median s | {w} last loss" for w in s.workloads) + " |",
           "|---|---|--:|" + "--:|--:|" * len(s.workloads)]
  for name in args.variants.split(","):
    flags = VARIANTS[name]
    env = {"XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))}
    cells = []
    for w in ("matmul", *s.workloads):
      r = run.run_worker(sys.executable, "jaxpost", make_spec(s, w),
                         os.path.join(log_dir, f"{name}-{w}.log"), args.timeout, env=env)
      if "error" in r:
        run.log(f"{name} / {w}: FAILED {r['error'][:300]}")
        cells += ["failed"] if w == "matmul" else ["failed", "-"]
      elif w == "matmul":
        cells.append(f"{r['ceiling_gflop_per_s']:.1f}")
      else:
        cells += [f"{r['median_s']:.3f}", f"{r['losses'][-1]:.6f}"]
      run.log(f"{name} / {w}: {cells[-1] if w == 'matmul' else cells[-2]}")
    lines.append(f"| {name} | `{flags or '(none)'}` | " + " | ".join(cells) + " |")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
