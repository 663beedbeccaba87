"""LoRA adapters in the Hugging Face PEFT library's own format, both ways.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

(and `lora_magnitude_vector` [out_features] for DoRA; `embed_tokens.lora_embedding_A/B` and
`lm_head.lora_A/B` when those are targets) so that
`peft.PeftModel.from_pretrained(transformers_model, folder)` applies W_hf + s * B @ A. jaxpost's A [L, *in, r] and B [L, r, *out] are the same factors, transposed
and flattened per layer (the flattening order is the HF projections' own, see hf_io).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import CheckpointError, ModelConfig
from jaxpost.models.hf_io import read_json_object
from jaxpost.models.params import is_spec
from jaxpost.models.safetensors_io import SafetensorsFile, save_file
from jaxpost.peft.lora import TARGETS, LoraConfig, get_target, lora_specs

_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}
# Options of adapter_config.json that change the math; jaxpost refuses what it cannot honour.
_UNSUPPORTED = {"bias": "none", "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False,
                "use_qalora": False, "lora_bias": False, "layer_replication": None,
                "trainable_token_indices": None, "use_bdlora": False}


def _module_key(name: str, layer: int | None) -> str:
  if name == "embed":
    return "base_model.model.model.embed_tokens"
  if name == "lm_head":
    return "base_model.model.lm_head"
  return f"base_model.model.model.layers.{layer}.{_HF_MODULE[name]}"


def _suffixes(name: str) -> tuple[str, str]:
  if name == "embed":
    return ".lora_embedding_A", ".lora_embedding_B"
  return ".lora_A.weight", ".lora_B.weight"


def _slices(config: ModelConfig, name: str) -> list[int | None]:
  return list(range(config.num_layers)) if TARGETS[name][0] else [None]


def save_peft_adapter(config: ModelConfig, lora: LoraConfig, adapters: dict,
                      path: str | os.PathLike, *, base_model: str | None = None) -> Path:
  """Writes `adapters` as a PEFT LoRA (or DoRA) folder (float32 tensors, HF names)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {}
  r = lora.rank
  for name in lora.targets:
    node = jax.device_get(get_target(adapters, name))
    a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
    m = np.asarray(node["m"], np.float32) if "m" in node else None
    suffix_a, suffix_b = _suffixes(name)
    for i in _slices(config, name):
      key = _module_key(name, i)
      ai, bi = (a, b) if i is None else (a[i], b[i])
      tensors[key + suffix_a] = np.ascontiguousarray(ai.reshape(-1, r).T)
      tensors[key + suffix_b] = np.ascontiguousarray(bi.reshape(r, -1).T)
      if m is not None:
        tensors[key + ".lora_magnitude_vector"] = np.ascontiguousarray(
            (m if i is None else m[i]).reshape(-1))
  save_file(tensors, path / "adapter_model.safetensors")
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "target_modules": sorted(_HF_MODULE[t].split(".")[-1] for t in lora.targets),
      "use_rslora": lora.rslora, "lora_dropout": lora.dropout, "bias": "none",
      "use_dora": lora.dora, "fan_in_fan_out": False, "init_lora_weights": True,
      "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": base_model,
  }
  tmp = path / "adapter_config.json.tmp"
  tmp.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
  tmp.replace(path / "adapter_config.json")
  return path


def read_adapter_config(path: Path, required: tuple[str, ...]) -> dict:
  """`path/adapter_config.json` as a dict, with the `required` keys.

  Raises:
    FileNotFoundError: no such file (the folder is not a PEFT adapter).
    CheckpointError (a ValueError): not UTF-8, not JSON, not an object, or a required key is
      missing; the message names the file and the key.
  """
  cfg_path = Path(path) / "adapter_config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{path}: no adapter_config.json; is this a PEFT adapter folder?")
  config = read_json_object(cfg_path)
  missing = [key for key in required if key not in config]
  if missing:
    raise CheckpointError(f"{cfg_path}: required key {missing[0]!r} is missing; export the "
                          "adapter again (PEFT's save_pretrained writes it)")
  return config


def check_adapter_options(ac: dict, cfg_path: Path) -> None:
  """Refuses an adapter_config.json option that changes the math in a way jaxpost does not
  honour (a trained bias, modules saved whole, rank / alpha patterns, ...), naming it."""
  for key, neutral in _UNSUPPORTED.items():
    if ac.get(key) not in (None, neutral):
      raise ValueError(f"{cfg_path}: {key}={ac[key]!r} is not supported by jaxpost's LoRA")


def load_peft_adapter(config: ModelConfig, path: str | os.PathLike,
                      dtype=jnp.float32) -> tuple[LoraConfig, dict]:
  """Reads a PEFT LoRA (or DoRA) folder into (LoraConfig, adapters) for `config`'s model."""
  path = Path(path)
  cfg_path = path / "adapter_config.json"
  ac = read_adapter_config(path, ("target_modules", "r", "lora_alpha"))
  if ac.get("peft_type") != "LORA":
    raise ValueError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not LORA")
  check_adapter_options(ac, cfg_path)
  modules = ac["target_modules"]
  modules = [modules] if isinstance(modules, str) else list(modules)
  by_hf = {v.split(".")[-1]: k for k, v in _HF_MODULE.items()}
  unknown = [m for m in modules if m not in by_hf]
  if unknown:
    raise ValueError(f"{cfg_path}: target module {unknown[0]!r} is not one jaxpost adapts "
                     f"({', '.join(by_hf)})")
  lora = LoraConfig(rank=int(ac["r"]), alpha=float(ac["lora_alpha"]),
                    targets=tuple(t for t in TARGETS if _HF_MODULE[t].split(".")[-1] in modules),
                    rslora=bool(ac.get("use_rslora", False)),
                    dropout=float(ac.get("lora_dropout") or 0.0),
                    dora=bool(ac.get("use_dora", False)))
  weights = SafetensorsFile(path / "adapter_model.safetensors")
  specs = lora_specs(config, lora)
  adapters: dict = {}
  for name in lora.targets:
    spec = get_target(specs, name)
    n_lead = 1 if TARGETS[name][0] else 0
    parts: dict[str, list[np.ndarray]] = {k: [] for k in spec}
    suffix_a, suffix_b = _suffixes(name)
    for i in _slices(config, name):
      key = _module_key(name, i)
      wanted = {"a": (key + suffix_a, (lora.rank, int(np.prod(spec["a"].shape[n_lead:-1])))),
                "b": (key + suffix_b, (int(np.prod(spec["b"].shape[n_lead + 1:])), lora.rank))}
      if lora.dora:
        wanted["m"] = (key + ".lora_magnitude_vector", (int(np.prod(spec["m"].shape[n_lead:])),))
      for part, (tensor, shape) in wanted.items():
        if tensor not in weights.keys():
          raise ValueError(f"{weights.path}: tensor {tensor!r} is missing")
        value = np.asarray(weights.get(tensor), np.float32)
        if value.shape != shape:
          raise ValueError(f"{weights.path}: {tensor} has shape {list(value.shape)}, expected "
                           f"{list(shape)}")
        value = value if part == "m" else value.T
        parts[part].append(value.reshape(spec[part].shape[n_lead:]))
    node = {k: jnp.asarray(np.stack(v) if n_lead else v[0], dtype) for k, v in parts.items()}
    group = TARGETS[name][0]
    if group:
      adapters.setdefault("layers", {}).setdefault(group, {})[name] = node
    else:
      adapters[name] = node
  assert jax.tree.structure(adapters) == jax.tree.structure(
      jax.tree.map(lambda s: 0, specs, is_leaf=is_spec))
  return lora, adapters
