"""Decoder LLMs as pure functions over parameter pytrees, and Hugging Face checkpoints in/out.

    config, params = load_hf("path/to/hf_folder", dtype=jnp.bfloat16)
    out = forward(config, params, tokens_BxT)          # out.logits: [B, T, V] float32
    save_hf(config, params, "path/to/out_folder")
"""

from jaxpost.models.attention import KVCache, Prefix, init_cache, prefix_cache
from jaxpost.models.config import ModelConfig, RopeConfig
from jaxpost.models.hf_config import (ConfigError, SUPPORTED_MODEL_TYPES, config_from_hf,
                                      config_to_hf)
from jaxpost.models.hf_io import CheckpointError, load_hf, read_config, save_hf
from jaxpost.models.params import (ParamSpec, init_params, logical_axes, num_params,
                                   param_shapes, param_specs)
from jaxpost.models.transformer import (Output, forward, lm_head, lm_head_weight, rms_norm,
                                        start_cache, unstack_layers)

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "Output", "ParamSpec", "Prefix",
    "RopeConfig", "SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "forward",
    "init_cache", "init_params", "lm_head", "lm_head_weight", "load_hf", "logical_axes",
    "num_params", "param_shapes", "param_specs", "prefix_cache", "read_config", "rms_norm",
    "save_hf", "start_cache", "unstack_layers",
]
