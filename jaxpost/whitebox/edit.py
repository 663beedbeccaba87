"""Train only an edit of the activations at one site: a steering vector or a low-rank edit,
a trainable beside LoRA and prompt tuning (`edit:` in a recipe).

    edit: {kind: vector, site: resid_post, layers: [1]}      # x + v at layer 1's output
    edit: {kind: low_rank, site: resid_mid, rank: 4}         # x + (x A) B at every layer

The trained tree is the edit's arrays only ([n, D] for a vector; A [n, D, r], B [n, r, D] for a
low-rank edit, n = the number of edited layers); the model goes in frozen. The edit reaches
`forward` as an intervention in the params (`params["edits"]`), so every loss, the sampler
and evaluation see the edited model with no other change. Both start as the identity: the
vector and B at zero (A random, scaled by 1/sqrt(D)).

`save_edit` / `load_edit` write and read `edit.safetensors` and `edit.json`;
`attach_edit(params, edit)` gives the edited model's params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost.algorithms.base import Frozen
from jaxpost.config.sections_base import ConfigError
from jaxpost.models import ModelConfig
from jaxpost.models.safetensors_io import SafetensorsFile, save_file
from jaxpost.whitebox.interventions import AddVector, LowRankEdit


@dataclasses.dataclass(frozen=True)
class EditSpec:
  """What is edited: `kind` vector | low_rank, at `site`, in `layers` (None: every layer)."""

  kind: str = "vector"
  site: str = "resid_post"
  layers: tuple[int, ...] | None = None
  rank: int = 4


def edit_shapes(config: ModelConfig, spec: EditSpec) -> dict[str, tuple[int, ...]]:
  n = len(spec.layers) if spec.layers is not None else config.num_layers
  D = config.hidden_size
  if spec.kind == "vector":
    return {"vector": (n, D)}
  return {"a": (n, D, spec.rank), "b": (n, spec.rank, D)}


def init_edit(config: ModelConfig, spec: EditSpec, rng: jax.Array, dtype=jnp.float32) -> dict:
  """The identity edit: zero vector, or random A and zero B."""
  shapes = edit_shapes(config, spec)
  if spec.kind == "vector":
    return {"vector": jnp.zeros(shapes["vector"], dtype)}
  a = jax.random.normal(rng, shapes["a"], jnp.float32) / np.sqrt(config.hidden_size)
  return {"a": a.astype(dtype), "b": jnp.zeros(shapes["b"], dtype)}


def edit_intervention(spec: EditSpec, tree: dict):
  if spec.kind == "vector":
    return AddVector(spec.site, tree["vector"], 1.0, layers=spec.layers)
  return LowRankEdit(spec.site, tree["a"], tree["b"], layers=spec.layers)


def attach_edit(params: dict, spec: EditSpec, tree: dict) -> dict:
  """The model params with the edit applied in every forward (after any earlier edits)."""
  return dict(params, edits=(*params.get("edits", ()), edit_intervention(spec, tree)))


def save_edit(spec: EditSpec, tree: dict, path: str | os.PathLike, *,
              base_model: str | None = None) -> Path:
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32))
            for k, v in tree.items()}
  save_file(arrays, path / "edit.safetensors")
  meta = {"kind": spec.kind, "site": spec.site,
          "layers": None if spec.layers is None else list(spec.layers), "rank": spec.rank,
          "base_model_name_or_path": base_model}
  tmp = path / "edit.json.tmp"
  tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  tmp.replace(path / "edit.json")
  return path


def load_edit(path: str | os.PathLike) -> tuple[EditSpec, dict]:
  path = Path(path)
  meta = json.loads((path / "edit.json").read_text())
  layers = meta.get("layers")
  spec = EditSpec(kind=meta["kind"], site=meta["site"],
                  layers=None if layers is None else tuple(layers), rank=meta.get("rank", 4))
  f = SafetensorsFile(path / "edit.safetensors")
  return spec, {name: jnp.asarray(f.read(name)) for name in f.keys()}


@dataclasses.dataclass
class Edit:
  """The `edit:` trainable (see `jaxpost.train.trainable` for the members' contract)."""

  config: ModelConfig
  spec: EditSpec
  base_shardings: Any
  mesh: Any
  dtype: Any = jnp.float32
  kind: str = "edit"
  describe: str = ""

  @property
  def shardings(self):
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return {k: replicated for k in edit_shapes(self.config, self.spec)}

  def init(self, params, rng, *, reference: bool, moving_reference: bool = False,
           reference_of=None):
    del reference, moving_reference, reference_of  # the reference is the base, edit off
    bad = [i for i in self.spec.layers or () if i >= self.config.num_layers]
    if bad:
      raise ConfigError(f"edit.layers: layer {bad[0]} is out of range; the model has "
                        f"{self.config.num_layers} layers (0..{self.config.num_layers - 1})")
    tree = jax.device_put(init_edit(self.config, self.spec, jax.random.fold_in(rng, 1),
                                    self.dtype), self.shardings)
    where = "every layer" if self.spec.layers is None else f"layers {list(self.spec.layers)}"
    n = sum(int(x.size) for x in jax.tree.leaves(tree))
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    rank = f" rank {self.spec.rank}" if self.spec.kind == "low_rank" else ""
    self.describe = (f"{self.spec.kind}{rank} edit at {self.spec.site}, {where}: {n:,} "
                     f"trainable of {total:,} parameters")
    return tree, Frozen(base=params)

  def frozen_shardings(self, frozen: Frozen) -> Frozen:
    del frozen
    return Frozen(base=self.base_shardings)

  def model(self, tree, frozen: Frozen, dropout_key=None):
    del dropout_key
    return attach_edit(frozen.base, self.spec, tree)

  def reference(self, tree, frozen: Frozen):
    del tree
    return frozen.base

  def export(self, tree, frozen: Frozen, out_dir: Path, model_dir: Path) -> None:
    del frozen
    save_edit(self.spec, tree, Path(out_dir) / "edit", base_model=str(model_dir))
