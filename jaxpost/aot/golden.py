"""Golden sharding dumps: the PartitionSpec of every parameter and optimizer-state leaf.

    python -m jaxpost.aot.golden --write      # regenerate tests/golden/shardings/*.json after a
                                              # deliberate change of the rules table

A pod run's memory depends on every leaf being split as intended: one rule that stops
matching (a renamed logical axis, a new rule earlier in the table) silently replicates an 8B
model's MLP on every chip. `tests/test_compile.py` compares these tables with the files in
tests/golden/shardings/, so such a change fails CI with the leaves that moved. The tables need
shapes only: the mesh is a `jax.sharding.AbstractMesh`, so a 256-device mesh costs nothing
and no device is involved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from jaxpost import sharding as sharding_lib
from jaxpost.config.sections import OptimSection
from jaxpost.models import param_specs
from jaxpost.models.params import is_spec
from jaxpost.models.presets import preset_config
from jaxpost.train.optim import make_optimizer
from jaxpost.train.step import state_shardings

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden" / "shardings"
# (file stem, preset, mesh sizes): Llama-3-8B on 256 devices as 32-way FSDP x 8-way tensor
# parallelism (8 = its KV heads, the widest tensor split every tensor rule still divides), and
# pure FSDP (MaxText's default on v5e-256).
CASES = (
    ("llama3-8b_fsdp32_tensor8_adamw", "llama3-8b", {"data": 1, "fsdp": 32, "tensor": 8}),
    ("llama3-8b_fsdp256_adamw", "llama3-8b", {"data": 1, "fsdp": 256, "tensor": 1}),
)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  """A (data, fsdp, tensor) mesh of these sizes without devices."""
  names = sharding_lib.MESH_AXES
  return AbstractMesh(tuple(sizes[n] for n in names), names,
                      axis_types=(AxisType.Auto,) * len(names))


def _table(tree) -> dict[str, str]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: isinstance(x, NamedSharding))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): str(s.spec)
          for path, s in leaves}


def sharding_table(preset: str, sizes: dict[str, int], optim: OptimSection | None = None,
                   rules=sharding_lib.DEFAULT_RULES) -> dict:
  """{"mesh", "params": {path: spec}, "opt_state": {path: spec}} for `preset`'s full
  fine-tuning under `optim` (default: AdamW with global-norm clipping, as `jaxpost train`)."""
  optim = optim or OptimSection()
  config = preset_config(preset)
  mesh = abstract_mesh(sizes)
  specs = param_specs(config)
  p_shard = sharding_lib.param_shardings(specs, mesh, rules)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), specs,
                        is_leaf=is_spec)
  optimizer, _ = make_optimizer(optim, 1000)
  state = state_shardings(p_shard, shapes, optimizer, mesh)
  return {"preset": preset, "mesh": dict(sizes), "optimizer": optim.name,
          "params": _table(state.params), "opt_state": _table(state.opt_state)}


def golden_tables() -> dict[str, dict]:
  """Every case of `CASES`, by file stem."""
  return {stem: sharding_table(preset, sizes) for stem, preset, sizes in CASES}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--write", action="store_true",
                      help="write the tables to --dir (else print which differ)")
  parser.add_argument("--dir", default=str(GOLDEN_DIR))
  args = parser.parse_args(argv)
  out, differ = Path(args.dir), 0
  for stem, table in golden_tables().items():
    path = out / f"{stem}.json"
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    if args.write:
      out.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
      print(f"wrote {path}")
    elif not path.exists() or path.read_text() != text:
      differ += 1
      print(f"differs: {path}")
  return 1 if differ else 0


if __name__ == "__main__":
  raise SystemExit(main())
