"""Named architectures without weights: `model.preset=llama3-8b` for `jaxpost compile`.

Compiling a step for a pod needs only the model's shapes, so a preset is the `config.json` of
the published checkpoint (Meta's Llama 3.x, as on the Hugging Face Hub) read through the same
`config_from_hf` as a real folder: a preset and the downloaded model give the same
`ModelConfig`. A folder holding only a `config.json` works the same way (`model.path=DIR`).
"""

from __future__ import annotations

from jaxpost.models.config import ModelConfig
from jaxpost.models.hf_config import config_from_hf

_LLAMA3 = {
    "model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False,
}


def _rope(factor: float) -> dict:
  return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# HF config.json fields of each published checkpoint (the rest are `_LLAMA3`'s).
PRESETS: dict[str, dict] = {
    "llama3-1b": {  # meta-llama/Llama-3.2-1B
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
        "rope_scaling": _rope(32.0)},
    "llama3-3b": {  # meta-llama/Llama-3.2-3B
        "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
        "head_dim": 128, "intermediate_size": 8192, "tie_word_embeddings": True,
        "rope_scaling": _rope(32.0)},
    "llama3-8b": {  # meta-llama/Llama-3.1-8B
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "head_dim": 128, "intermediate_size": 14336, "tie_word_embeddings": False,
        "rope_scaling": _rope(8.0)},
    "llama3-70b": {  # meta-llama/Llama-3.1-70B
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "head_dim": 128, "intermediate_size": 28672, "tie_word_embeddings": False,
        "rope_scaling": _rope(8.0)},
}


def preset_config(name: str) -> ModelConfig:
  """The `ModelConfig` of preset `name` (see `PRESETS`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model.preset {name!r}; known: {', '.join(PRESETS)}")
  return config_from_hf({**_LLAMA3, **PRESETS[name]}, source=f"model.preset={name}")
