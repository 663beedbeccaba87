"""The decoder configuration: one frozen, hashable dataclass for every supported family.

A `ModelConfig` is static under `jax.jit` (hashable, compared by value), so it can be passed
as a static argument or closed over. It describes the *architecture* only; how it is read from
and written to a Hugging Face `config.json` lives in `hf_config.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

LayerType = Literal["full", "sliding"]
RopeType = Literal["default", "linear", "llama3", "yarn"]
Activation = Literal["silu", "gelu_tanh"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters for one kind of layer.

  `rope_type`:
    * "default": inv_freq = theta ** (-2i / d).
    * "linear": positions divided by `factor` (equivalently inv_freq / factor).
    * "llama3": Llama 3.1 frequency-band scaling with `factor`, `low_freq_factor`,
      `high_freq_factor` and `original_max_position_embeddings`.
    * "yarn": YaRN (Peng et al., 2023) with `factor`, `beta_fast`, `beta_slow`,
      `original_max_position_embeddings` and an attention temperature `attention_factor`.
  """

  theta: float = 10000.0
  rope_type: RopeType = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer (Llama, Mistral, Qwen2/3, Gemma 2/3).

  Per-layer behaviour is given by `layer_types` ("full" or "sliding" attention); sliding layers
  attend to keys at distance < `sliding_window` and may use their own RoPE (`local_rope`).
  """

  model_type: str  # the HF `model_type` this config round-trips to ("llama", "gemma2", ...)
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  local_rope: RopeConfig | None = None  # RoPE of sliding layers when it differs (Gemma 3)
  layer_types: tuple[LayerType, ...] = ()
  sliding_window: int | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k, before RoPE
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
  sandwich_norm: bool = False  # Gemma 2/3: norms after attention and MLP as well as before
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  activation: Activation = "silu"
  query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 when set
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # The config.json this config was read from, kept so that saving preserves keys jaxpost does
  # not model (torch_dtype, architectures, ...). Excluded from equality and hashing.
  hf_source: str = dataclasses.field(default="", compare=False, repr=False)

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
    if len(self.layer_types) != self.num_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
      )
    bad = [t for t in self.layer_types if t not in ("full", "sliding")]
    if bad:
      raise ValueError(f"layer_types entries must be 'full' or 'sliding', got {bad[0]!r}")
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ValueError("sliding layers need a positive sliding_window")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
      )
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"unknown activation {self.activation!r}; expected 'silu' or 'gelu_tanh'")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def attn_scale(self) -> float:
    scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return 1.0 / math.sqrt(scalar)

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.hidden_size) if self.scale_embeddings else 1.0

  @property
  def rope_for_sliding(self) -> RopeConfig:
    return self.local_rope if self.local_rope is not None else self.rope

  def replace(self, **changes) -> "ModelConfig":
    """A copy with `changes`. Changing `num_layers` alone keeps uniform layer types uniform;
    mixed ones (Gemma's pattern) must be given again as `layer_types`."""
    if "num_layers" in changes and "layer_types" not in changes:
      kinds = set(self.layer_types)
      if len(kinds) > 1:
        raise ValueError("num_layers changed on a config with mixed layer_types: pass the new "
                         "layer_types too")
      changes["layer_types"] = (kinds.pop(),) * changes["num_layers"]
    return dataclasses.replace(self, **changes)
