"""The models a merge reads, as tensor sources read one tensor at a time.

`open_source(text, where, tmp)` accepts what a merge config names:

    runs/sft/final                    a Hugging Face folder (config.json + safetensors)
    runs/sft                          a jaxpost run: its final/ model, else its latest
                                      checkpoint exported first (into `tmp`)
    runs/sft/checkpoints/300          that checkpoint, exported first
    runs/base/final+runs/lora/adapter a PEFT LoRA / DoRA adapter applied to a model (mergekit's
                                      MODEL+ADAPTER); an adapter folder alone uses its
                                      adapter_config.json's base_model_name_or_path

Every source has `names()`, `shape(name)`, `dtype(name)` and `read(name)` (a fresh NumPy array:
nothing stays mapped). An adapter is applied as its tensors are read, W + s B A (DoRA: scaled
by m / ||W + s B A|| per output row), as PEFT's `merge_and_unload` does, so it costs one tensor
of memory, not a model. A base weight the adapter saved whole (PEFT does for embeddings) replaces
the model's before the adapter is added, as loading the adapter with PEFT does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxpost.config import ConfigError
from jaxpost.models.hf_io import read_json_object, weight_files
from jaxpost.models.safetensors_io import SafetensorsFile
from jaxpost.peft.peft_format import check_adapter_options, read_adapter_config

# Tensors some exporters write that are recomputed, not learned: never merged.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class FolderSource:
  """The tensors of a Hugging Face model folder (sharded or not) and its config.json."""

  def __init__(self, folder: Path, label: str):
    self.folder, self.label = Path(folder), label
    self.config = read_json_object(self.folder / "config.json")
    self._where: dict[str, SafetensorsFile] = {}
    for f in weight_files(self.folder):
      reader = SafetensorsFile(f)
      for name in reader.keys():
        if not name.endswith(IGNORED_SUFFIXES):
          self._where[name] = reader

  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._where[name].dtype(name)

  def read(self, name: str) -> np.ndarray:
    return self._where[name].read(name)

  def nbytes(self) -> int:
    return sum(int(np.prod(self.shape(n))) * self.dtype(n).itemsize for n in self._where)


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|"
                       r"lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector|base_layer\.weight)$")


class AdapterSource:
  """A model with a PEFT LoRA / DoRA adapter merged in, tensor by tensor (see module doc)."""

  def __init__(self, base: FolderSource, adapter: Path, label: str):
    self.base, self.label, self.folder, self.config = base, label, base.folder, base.config
    cfg_path = Path(adapter) / "adapter_config.json"
    ac = read_adapter_config(Path(adapter), ("r", "lora_alpha"))
    if ac.get("peft_type", "LORA") != "LORA":
      raise ConfigError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} cannot be merged into "
                        "weights (only LoRA / DoRA adapters can)")
    check_adapter_options(ac, cfg_path)
    r = int(ac["r"])
    self.scale = float(ac["lora_alpha"]) / (r ** 0.5 if ac.get("use_rslora") else r)
    weights = SafetensorsFile(Path(adapter) / "adapter_model.safetensors")
    self._parts: dict[str, dict[str, np.ndarray]] = {}
    for key in weights.keys():
      m = _LORA_KEY.match(key)
      if m is None:
        raise ConfigError(f"{weights.path}: tensor {key!r} is not a LoRA factor jaxpost can merge "
                          "(expected base_model.model.<module>.lora_A.weight / lora_B.weight)")
      self._parts.setdefault(m["module"] + ".weight", {})[m["part"]] = weights.get(key)
    for name, parts in self._parts.items():
      if name not in base.names():
        raise ConfigError(f"{weights.path}: adapts {name!r}, which {base.label} does not have "
                          "(an adapter of another model?)")
      if "base_layer.weight" in parts and parts["base_layer.weight"].shape != base.shape(name):
        raise ConfigError(f"{weights.path}: its copy of {name!r} has shape "
                          f"{list(parts['base_layer.weight'].shape)}, {base.label}'s "
                          f"{list(base.shape(name))} (a resized vocabulary is not supported)")
      embedding = "lora_embedding_A" in parts
      a, b = (("lora_embedding_A", "lora_embedding_B") if embedding else
              ("lora_A.weight", "lora_B.weight"))
      if a not in parts or b not in parts:
        raise ConfigError(f"{weights.path}: {name!r} has {sorted(parts)}, not both LoRA factors")
      rows, cols = base.shape(name)
      out_dim, in_dim = (cols, rows) if embedding else (rows, cols)
      if parts[a].shape != (r, in_dim) or parts[b].shape != (out_dim, r):
        raise ConfigError(f"{weights.path}: the factors of {name!r} have shapes "
                          f"{list(parts[a].shape)} and {list(parts[b].shape)}, but r={r} and the "
                          f"weight is {[rows, cols]}")
      if embedding and "lora_magnitude_vector" in parts:
        raise ConfigError(f"{weights.path}: DoRA on an embedding is not supported; merge it with "
                          "PEFT's merge_and_unload first")

  def names(self) -> list[str]:
    return self.base.names()

  def shape(self, name: str) -> tuple[int, ...]:
    return self.base.shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self.base.dtype(name)

  def nbytes(self) -> int:
    return self.base.nbytes()

  def read(self, name: str) -> np.ndarray:
    w = self.base.read(name)
    parts = self._parts.get(name)
    if parts is None:
      return w
    if "base_layer.weight" in parts:  # PEFT saves an adapted embedding's weight whole
      w = np.array(parts["base_layer.weight"], dtype=w.dtype)
    if "lora_embedding_A" in parts:
      delta = (parts["lora_embedding_B"].astype(np.float32)
               @ parts["lora_embedding_A"].astype(np.float32)).T
    else:
      delta = parts["lora_B.weight"].astype(np.float32) @ parts["lora_A.weight"].astype(np.float32)
    merged = w.astype(np.float32) + self.scale * delta
    if "lora_magnitude_vector" in parts:
      norm = np.linalg.norm(merged, axis=1)
      merged = (parts["lora_magnitude_vector"].astype(np.float32) / norm)[:, None] * merged
    return merged.astype(w.dtype)


def _exported(run_dir: Path, step: int | None, tmp: Path, log: Callable[[str], None]) -> Path:
  """A run's checkpoint (the latest, or `step`) exported to an HF folder under `tmp`."""
  from jaxpost.train.trainer import export_run  # pylint: disable=import-outside-toplevel
  out = tmp / f"{run_dir.name}-{'latest' if step is None else step}"
  log(f"merge: exporting {run_dir}" + ("" if step is None else f" step {step}")
      + " to a temporary Hugging Face folder (the whole model in memory, once)")
  export_run(run_dir, out, step)
  return out / "final"


def model_folder(path: Path, where: str, tmp: Path, log: Callable[[str], None]) -> Path:
  """The HF folder of a folder, run or run checkpoint (exported into `tmp` when needed)."""
  if not path.exists():
    raise ConfigError(f"{where}: model {str(path)!r} does not exist (give a Hugging Face "
                      "folder, a jaxpost run folder or RUN/checkpoints/<step>; jaxpost merge "
                      "reads local folders only)")
  if path.parent.name == "checkpoints" and path.name.isdigit():
    return _exported(path.parent.parent, int(path.name), tmp, log)
  if (path / "config.yaml").is_file():
    if (path / "final" / "config.json").is_file():
      return path / "final"
    return _exported(path, None, tmp, log)
  if (path / "config.json").is_file():
    return path
  raise ConfigError(f"{where}: {path} is neither a Hugging Face model folder (no config.json) "
                    "nor a jaxpost run folder (no config.yaml) nor a PEFT adapter")


def open_source(text: str, where: str, tmp: Path, log: Callable[[str], None] = print):
  """The tensor source of one model of a merge config (see the module doc)."""
  model, _, adapter = text.partition("+")
  path = Path(model)
  if not adapter and (path / "adapter_config.json").is_file() and not (
      path / "config.json").is_file():
    base = read_adapter_config(path, ()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
      raise ConfigError(f"{where}: {path} is a PEFT adapter whose base model "
                        f"{base!r} is not a local folder: write it as BASE_FOLDER+{path}")
    model, adapter = base, str(path)
  source = FolderSource(model_folder(Path(model), where, tmp, log), text)
  if adapter:
    if not (Path(adapter) / "adapter_config.json").is_file():
      raise ConfigError(f"{where}: adapter {adapter!r} is not a PEFT adapter folder (no "
                        "adapter_config.json)")
    source = AdapterSource(source, Path(adapter), text)
  return source
