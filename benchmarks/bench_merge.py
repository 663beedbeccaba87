"""Peak memory and time of `jaxpost merge` against model size (the table in docs/architecture.md).

    python benchmarks/bench_merge.py [--layers 8 16] [--dir /tmp/merge_bench] [--mergekit]

Writes random Llama-shaped float32 folders with NumPy (width 1024, MLP 2816, vocabulary 8192:
456 MiB at 8 layers; a base and two fine-tunes at +0.002 noise), then runs each method as its
own process under `/usr/bin/time -v` and prints the peak resident memory against the inputs'
size. With `--mergekit`, `mergekit-yaml` (a test-only dependency) runs the same configs.
The folders are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jaxpost.models.safetensors_io import SafetensorsWriter  # noqa: E402

METHODS = {
    "linear": "models:\n  - {{model: {a}, parameters: {{weight: 0.6}}}}\n"
              "  - {{model: {b}, parameters: {{weight: 0.4}}}}\n",
    "slerp": "base_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
             "parameters: {{t: [0, 0.5, 1]}}\n",
    "ties": "base_model: {base}\nmodels:\n"
            "  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
            "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}\n",
    "dare_ties": "base_model: {base}\nmodels:\n"
                 "  - {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}}\n"
                 "  - {{model: {b}, parameters: {{weight: 0.4, density: 0.5}}}}\n",
}


def make_model(folder: Path, seed: int, layers: int, hidden=1024, inter=2816, vocab=8192):
  """A Llama-shaped folder: shared random weights (the 'base') plus 0.002 noise by `seed`."""
  folder.mkdir(parents=True, exist_ok=True)
  shapes = {"model.embed_tokens.weight": (vocab, hidden)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,),
                   **{p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"},
                   p + "mlp.gate_proj.weight": (inter, hidden),
                   p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)})
  shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
  noise = np.random.default_rng(seed)
  with SafetensorsWriter(folder / "model.safetensors",
                         [(n, np.float32, s) for n, s in shapes.items()]) as w:
    for i, (n, s) in enumerate(shapes.items()):
      w.write(n, np.random.default_rng([0, i]).standard_normal(s, np.float32) * 0.02
              + 0.002 * noise.standard_normal(s, np.float32))
  (folder / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
      "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
      "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
      "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
      "hidden_act": "silu", "rope_theta": 10000.0}))


def timed(cmd: list[str]) -> tuple[float, float]:
  """(peak resident MiB, wall seconds) of a command under /usr/bin/time -v."""
  out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
  rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
  wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", out.stderr).group(1)
  seconds = sum(float(x) * 60 ** k for k, x in enumerate(reversed(wall.split(":"))))
  return rss / 1024, seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
  parser.add_argument("--dir", default="/tmp/merge_bench")
  parser.add_argument("--mergekit", action="store_true")
  args = parser.parse_args()
  root = Path(args.dir)
  baseline, _ = timed([sys.executable, "-c", "import jax.numpy as jnp, jaxpost.merge, "
                       "jaxpost.cli; jnp.ones(3).block_until_ready()"])
  print(f"baseline (JAX and jaxpost.merge imported): {baseline:.0f} MiB")
  print("| layers | method | model MiB | inputs MiB | jaxpost peak MiB | s |"
        + (" mergekit peak MiB | s |" if args.mergekit else ""))
  try:
    for layers in args.layers:
      models = {name: root / f"L{layers}" / name for name in ("base", "a", "b")}
      for k, folder in enumerate(models.values()):
        make_model(folder, k, layers)
      size = (models["a"] / "model.safetensors").stat().st_size / 2**20
      for method, body in METHODS.items():
        cfg = root / f"{method}.yaml"
        cfg.write_text(f"merge_method: {method}\n" + body.format(**models))
        inputs = size * (3 if "base_model: " + str(models["base"]) in cfg.read_text() else 2)
        rss, sec = timed(["jaxpost", "merge", str(cfg), "--out", str(root / "out")])
        row = f"| {layers} | {method} | {size:.0f} | {inputs:.0f} | {rss:.0f} | {sec:.0f} |"
        if args.mergekit:
          rss, sec = timed(["mergekit-yaml", str(cfg), str(root / "mk"), "--no-copy-tokenizer",
                            "--quiet"])
          row += f" {rss:.0f} | {sec:.0f} |"
        print(row, flush=True)
      shutil.rmtree(root / f"L{layers}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
