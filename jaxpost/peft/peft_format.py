"""LoRA adapters in the Hugging Face PEFT library's own format, both ways.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` with tensors

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]

so that `peft.PeftModel.from_pretrained(transformers_model, folder)` applies
W_hf + s * B @ A. jaxpost's A [L, *in, r] and B [L, r, *out] are the same factors, transposed
and flattened per layer (the flattening order is the HF projections' own, see hf_io).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig
from jaxpost.models.params import is_spec
from jaxpost.models.safetensors_io import SafetensorsFile, save_file
from jaxpost.peft.lora import _TARGETS, LoraConfig, lora_specs

_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers.{i}."
# Options of adapter_config.json that change the math; jaxpost refuses what it cannot honour.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "fan_in_fan_out": False, "use_qalora": False}


def save_peft_adapter(config: ModelConfig, lora: LoraConfig, adapters: dict,
                      path: str | os.PathLike, *, base_model: str | None = None) -> Path:
  """Writes `adapters` as a PEFT LoRA folder (float32 tensors, HF names)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name in lora.targets:
    ab = adapters["layers"][_TARGETS[name][0]][name]
    a, b = np.asarray(jax.device_get(ab["a"]), np.float32), np.asarray(jax.device_get(ab["b"]), np.float32)
    r = lora.rank
    for i in range(config.num_layers):
      key = _PREFIX.format(i=i) + _HF_MODULE[name]
      tensors[key + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      tensors[key + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  save_file(tensors, path / "adapter_model.safetensors")
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "target_modules": sorted(_HF_MODULE[t].split(".")[1] for t in lora.targets),
      "use_rslora": lora.rslora, "lora_dropout": 0.0, "bias": "none", "use_dora": False,
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None, "base_model_name_or_path": base_model,
  }
  tmp = path / "adapter_config.json.tmp"
  tmp.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
  tmp.replace(path / "adapter_config.json")
  return path


def load_peft_adapter(config: ModelConfig, path: str | os.PathLike,
                      dtype=jnp.float32) -> tuple[LoraConfig, dict]:
  """Reads a PEFT LoRA folder into (LoraConfig, adapters) for `config`'s model."""
  path = Path(path)
  cfg_path = path / "adapter_config.json"
  try:
    ac = json.loads(cfg_path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no adapter_config.json; is this a PEFT adapter folder?") \
        from None
  if ac.get("peft_type") != "LORA":
    raise ValueError(f"{cfg_path}: peft_type {ac.get('peft_type')!r} is not LORA")
  for key, neutral in _UNSUPPORTED.items():
    if ac.get(key) not in (None, neutral):
      raise ValueError(f"{cfg_path}: {key}={ac[key]!r} is not supported by jaxpost's LoRA")
  modules = ac["target_modules"]
  modules = [modules] if isinstance(modules, str) else list(modules)
  by_hf = {v.split(".")[1]: k for k, v in _HF_MODULE.items()}
  unknown = [m for m in modules if m not in by_hf]
  if unknown:
    raise ValueError(f"{cfg_path}: target module {unknown[0]!r} is not one jaxpost adapts "
                     f"({', '.join(by_hf)})")
  lora = LoraConfig(rank=int(ac["r"]), alpha=float(ac["lora_alpha"]),
                    targets=tuple(t for t in _TARGETS if _HF_MODULE[t].split(".")[1] in modules),
                    rslora=bool(ac.get("use_rslora", False)))
  weights = SafetensorsFile(path / "adapter_model.safetensors")
  specs = lora_specs(config, lora)
  adapters: dict = {"layers": {}}
  for name in lora.targets:
    group = _TARGETS[name][0]
    spec_a, spec_b = specs["layers"][group][name]["a"], specs["layers"][group][name]["b"]
    a_layers, b_layers = [], []
    for i in range(config.num_layers):
      key = _PREFIX.format(i=i) + _HF_MODULE[name]
      for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key + suffix not in weights.keys():
          raise ValueError(f"{weights.path}: tensor {key + suffix!r} is missing")
      a_hf, b_hf = weights.get(key + ".lora_A.weight"), weights.get(key + ".lora_B.weight")
      want_a, want_b = (lora.rank, int(np.prod(spec_a.shape[1:-1]))), (
          int(np.prod(spec_b.shape[2:])), lora.rank)
      if a_hf.shape != want_a or b_hf.shape != want_b:
        raise ValueError(f"{weights.path}: {key} has lora_A {list(a_hf.shape)} and lora_B "
                         f"{list(b_hf.shape)}, expected {list(want_a)} and {list(want_b)}")
      a_layers.append(np.asarray(a_hf, np.float32).T.reshape(spec_a.shape[1:]))
      b_layers.append(np.asarray(b_hf, np.float32).T.reshape(spec_b.shape[1:]))
    adapters["layers"].setdefault(group, {})[name] = {
        "a": jnp.asarray(np.stack(a_layers), dtype), "b": jnp.asarray(np.stack(b_layers), dtype)}
  assert jax.tree.structure(adapters) == jax.tree.structure(
      jax.tree.map(lambda s: 0, specs, is_leaf=is_spec))
  return lora, adapters
