"""Tiny random Hugging Face models of every supported family, made locally by transformers.

Nothing is downloaded: transformers builds each model from a config and random weights. Every
parameter (norm weights and biases included) is perturbed, so a wrong mapping cannot hide
behind ones and zeros.
"""

from __future__ import annotations

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-6)

# family -> kwargs of its transformers config class. Sliding windows (16) are shorter than the
# test sequences; RoPE scalings use small original contexts so they act at positions > 1000.
FAMILIES = {
    "llama": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=256)),
    "mistral": dict(model_type="mistral", rope_theta=1_000_000.0, sliding_window=16,
                    head_dim=16),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=16, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", head_dim=32, rope_theta=1_000_000.0,
                  rope_scaling=dict(rope_type="yarn", factor=4.0,
                                    original_max_position_embeddings=256)),
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24,
                        sliding_window=16, sliding_window_pattern=2, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0,
                        rope_scaling=dict(rope_type="linear", factor=8.0)),
}


def hf_config(family: str):
  from transformers import AutoConfig

  kwargs = dict(COMMON, **FAMILIES[family])
  model_type = kwargs.pop("model_type")
  return AutoConfig.for_model(model_type, **kwargs)


def make_hf_model(family: str, seed: int = 0):
  """A float32 transformers model of `family` with every weight random."""
  import torch
  from transformers import AutoModelForCausalLM

  torch.manual_seed(seed)
  config = hf_config(family)
  config._attn_implementation = "eager"
  model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norms and biases
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def save_hf_model(family: str, path, seed: int = 0):
  model = make_hf_model(family, seed)
  model.save_pretrained(path)
  return model
