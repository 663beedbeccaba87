"""Per-device memory of SFT, LoRA, DPO and GRPO steps for Llama 3 shapes on TPU pods, from the
TPU compiler (ahead of time, on a CPU machine; no TPU, no weights).

    TPU_LIBRARY_PATH=... python benchmarks/memory_table.py            # writes benchmarks/MEMORY.md
    python benchmarks/memory_table.py --models llama3-1b --topologies v5e-16 --algorithms sft

Every cell is `jaxpost compile` of a shipped recipe (configs/sft.yaml, sft_lora.yaml, dpo.yaml,
grpo.yaml) with the model replaced by a preset and one 2048-token row (DPO: one pair; GRPO: one
rollout row, 1536 prompt + 512 sampled tokens) per device: bfloat16 weights and activations,
`model.remat=true` (full: each layer keeps only its input), pure FSDP over every device, AdamW.
A cell that does not fit shows what the compiler asked for (it stops at the first program that
is over, so "needs" is that program's temporaries alone, the arguments come on top).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxpost import aot
from jaxpost.aot.command import compile_overrides, prepare_backend
from jaxpost.config import load_config

RECIPES = {"sft": "sft.yaml", "lora": "sft_lora.yaml", "dpo": "dpo.yaml", "grpo": "grpo.yaml"}
MODELS = ("llama3-1b", "llama3-8b", "llama3-70b")
TOPOLOGIES = ("v5e-16", "v5e-64", "v5e-256", "v5p-128")
SEQ, NEW = 2048, 512


def overrides(algorithm: str, preset: str, n: int) -> list[str]:
  """A row (pair, rollout row) of SEQ tokens per device on n devices (see the docstring)."""
  out = ["model.path=null", f"model.preset={preset}", "model.dtype=bfloat16",
         "model.compute_dtype=bfloat16", "model.remat=true", f"data.seq_len={SEQ}",
         f"train.batch_size={n}", "train.micro_batches=1", "optim.name=adamw"]
  if algorithm == "grpo":
    out += [f"rl.max_new_tokens={NEW}", "rl.num_generations=8"]
  return out


def cell(algorithm: str, preset: str, topology: str) -> dict:
  topo = aot.parse_topology(topology)
  prepare_backend(topo.platform, topo.num_devices, topo.name)
  cfg = load_config(ROOT / "configs" / RECIPES[algorithm],
                    compile_overrides(overrides(algorithm, preset, topo.num_devices),
                                      topo.num_devices))
  t0 = time.perf_counter()
  try:
    reports = aot.compile_run(cfg, topo)
  except aot.DoesNotFit as e:
    need = re.search(r"temporaries \(([\d.]+)G\)", str(e))
    return {"fits": False, "seconds": time.perf_counter() - t0, "error": str(e)[:300],
            "needs_gib": float(need.group(1)) if need else None}
  out = {"fits": all(r.fits for r in reports), "seconds": time.perf_counter() - t0}
  for r in reports:
    key = "sampler" if r.name.startswith("sampler") else "step"
    out[key] = {"arguments_gib": r.argument_bytes / aot.report.GIB,
                "temporaries_gib": r.temp_bytes / aot.report.GIB,
                "peak_gib": r.peak_bytes / aot.report.GIB, "hbm_gib": r.hbm_bytes / aot.report.GIB,
                "collectives": r.collectives}
  return out


NOTES = """
## Reading it

- Arguments are small and scale as they should (8B SFT on v5p-128: 0.70 GiB of sharded
  bf16 weights and AdamW moments per chip; with `optim.offload=true` the moments move to host
  memory: 1B SFT on v5e-16, 0.43 -> 0.14 GiB of HBM arguments, 0.29 GiB in host memory).
- Temporaries: the first version of this table (before `sharding.constrain_batch`) had them
  grow with the *global* batch (8B SFT: 17.2 GiB on v5e-64, 63.6 GiB on v5e-256, one row per
  chip): with only the jit boundary's shardings, XLA propagated the embedding table's
  `embed -> fsdp` split into the activations and kept the batch replicated on every chip. The
  update step now runs under `jax.set_mesh` and `forward` constrains its embedding output to
  the batch axes; the activations follow the batch, and a row per chip costs the same
  temporaries on 16 chips as on 256.
- The fused loss (`losses/fused_nll.py`) is bounded: it never holds B x T x V, only one chunk of
  512 positions of the local rows (B_local x 512 x V float32: 250 MiB per row for a 128k
  vocabulary) and the head's gradient, float32, sharded as the head is.
"""


def markdown(results: dict) -> str:
  lines = ["# Per-device memory from the TPU compiler (ahead of time)", "",
           ("Made by `benchmarks/memory_table.py` (see its docstring for the settings: one "
            f"{SEQ}-token row per device, bfloat16, `model.remat=true`, pure FSDP, AdamW; "
            "libtpu 0.0.42.1 with jax 0.10.2). Peak GiB per device of the training step "
            "(GRPO: the step / the sampler), against the chip's HBM (v5e 16 GiB, v5p 95 GiB). "
            "`OOM (needs X)`: the compiler refused it, its temporaries alone needing X GiB."),
           "",
           "| algorithm | model | " + " | ".join(TOPOLOGIES) + " |",
           "|---|---|" + "---|" * len(TOPOLOGIES)]
  for algorithm in RECIPES:
    for preset in MODELS:
      row = []
      for topology in TOPOLOGIES:
        r = results.get(f"{algorithm}/{preset}/{topology}")
        if r is None:
          row.append("-")
        elif "step" not in r:
          row.append(f"OOM (needs {r['needs_gib']:.1f})" if r.get("needs_gib") else "OOM")
        else:
          text = f"{r['step']['peak_gib']:.2f}"
          if "sampler" in r:
            text += f" / {r['sampler']['peak_gib']:.2f}"
          row.append(text + ("" if r["fits"] else " (over)"))
      lines.append(f"| {algorithm} | {preset} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n" + NOTES


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--algorithms", default=",".join(RECIPES))
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--topologies", default=",".join(TOPOLOGIES))
  p.add_argument("--json", default=str(ROOT / "benchmarks" / "memory.json"))
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "MEMORY.md"))
  args = p.parse_args()
  path = Path(args.json)
  results = json.loads(path.read_text()) if path.exists() else {}
  for algorithm in args.algorithms.split(","):
    for preset in args.models.split(","):
      for topology in args.topologies.split(","):
        key = f"{algorithm}/{preset}/{topology}"
        results[key] = cell(algorithm, preset, topology)
        r = results[key]
        print(f"{key}: " + (f"peak {r['step']['peak_gib']:.2f} GiB" if "step" in r else
                            f"does not fit ({r.get('needs_gib')} GiB temporaries)")
              + f" [{r['seconds']:.0f}s]", flush=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
        Path(args.out).write_text(markdown(results))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
