"""Reading and writing Hugging Face `config.json` for the supported families.

Both layouts load: the older one of most checkpoints on the Hub (`rope_theta`, `rope_scaling`,
`rope_local_base_freq`, `sliding_window_pattern` at top level) and transformers 5's
`rope_parameters` (one dict, or one per layer type for Gemma 3). Saving writes the layout the
config was read in (the older one for configs made in jaxpost, which every transformers reads).
"""

from __future__ import annotations

import json
import math
from typing import Any

from jaxpost.models.config import ModelConfig, RopeConfig

# model_type -> (architecture class, family defaults)
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "mistral": ("MistralForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0,
                                           sliding_window=4096)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "gemma": ("GemmaForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "gemma2": ("Gemma2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0,
                                         query_pre_attn_scalar=256, sliding_window=4096,
                                         final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0)),
    "gemma3_text": ("Gemma3ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1_000_000.0,
                                              rope_local_base_freq=10000.0,
                                              query_pre_attn_scalar=256, sliding_window=4096)),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
_GEMMAS = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


class ConfigError(ValueError):
  """A config.json that jaxpost cannot represent; the message names the file and the key."""


_FIX = "fix it, or take config.json from the original model"


def json_type(value: Any) -> str:
  """The JSON name of a parsed value's type: "object", "list", "string", "number", ..."""
  if isinstance(value, bool):
    return "boolean"
  if value is None:
    return "null"
  names = {dict: "object", list: "list", str: "string", int: "number", float: "number"}
  return names.get(type(value), type(value).__name__)


def _number(value: Any, key: str, where: str, kind: type) -> Any:
  """`value` as an int or a float (`kind`); a `ConfigError` naming `where` and `key` if it is
  not a number of that kind (an int given as 4.0 is accepted)."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and kind is int and float(value).is_integer():
    return int(value)
  if ok and kind is float:
    return float(value)
  what = "an integer" if kind is int else "a number"
  raise ConfigError(f"{where}: {key} should be {what}, got {json_type(value)} {value!r}; {_FIX}")


def _rope_from_dict(d: Any, default_theta: float, where: str) -> RopeConfig:
  if not isinstance(d, dict):
    raise ConfigError(f"{where} should be an object, got {json_type(d)} {d!r}; {_FIX}")
  rope_type = d.get("rope_type", d.get("type", "default")) or "default"

  def need(key: str, kind: type = float) -> Any:
    if d.get(key) is None:
      raise ConfigError(f"{where}: rope type {rope_type!r} needs key {key!r}, which is missing; "
                        f"{_FIX}")
    return _number(d[key], key, where, kind)

  def get(key: str, default: Any, kind: type = float) -> Any:
    return default if d.get(key) is None else _number(d[key], key, where, kind)

  theta = get("rope_theta", default_theta)
  if rope_type == "default":
    return RopeConfig(theta=theta)
  if rope_type == "linear":
    return RopeConfig(theta=theta, rope_type="linear", factor=need("factor"))
  if rope_type == "llama3":
    return RopeConfig(
        theta=theta, rope_type="llama3", factor=need("factor"),
        low_freq_factor=need("low_freq_factor"), high_freq_factor=need("high_freq_factor"),
        original_max_position_embeddings=need("original_max_position_embeddings", int))
  if rope_type == "yarn":
    factor = need("factor")
    attention_factor = get("attention_factor", None)
    mscale, mscale_all_dim = get("mscale", None), get("mscale_all_dim", None)
    if attention_factor is None and mscale and mscale_all_dim:
      def scale(s, m):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
      attention_factor = scale(factor, mscale) / scale(factor, mscale_all_dim)
    return RopeConfig(
        theta=theta, rope_type="yarn", factor=factor,
        original_max_position_embeddings=need("original_max_position_embeddings", int),
        beta_fast=float(d.get("beta_fast") or 32.0), beta_slow=float(d.get("beta_slow") or 1.0),
        attention_factor=attention_factor, truncate=bool(d.get("truncate", True)))
  raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (supported: default, "
                    "linear, llama3, yarn)")


def _rope_to_dict(r: RopeConfig) -> dict:
  out: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
  if r.rope_type == "linear":
    out["factor"] = r.factor
  elif r.rope_type == "llama3":
    out.update(factor=r.factor, low_freq_factor=r.low_freq_factor,
               high_freq_factor=r.high_freq_factor,
               original_max_position_embeddings=r.original_max_position_embeddings)
  elif r.rope_type == "yarn":
    out.update(factor=r.factor, beta_fast=r.beta_fast, beta_slow=r.beta_slow,
               original_max_position_embeddings=r.original_max_position_embeddings,
               truncate=r.truncate)
    if r.attention_factor is not None:
      out["attention_factor"] = r.attention_factor
  return out


def config_from_hf(d: dict, *, source: str = "config.json") -> ModelConfig:
  """A `ModelConfig` from a parsed HF config.json; errors name `source` and the key.

  Raises:
    ConfigError: `d` is not a JSON object, a required key is missing, a key has the wrong type
      or a value jaxpost does not support (the message names `source` and the key).
  """
  if not isinstance(d, dict):
    raise ConfigError(f"{source} must hold a JSON object, got a {json_type(d)}; {_FIX}")
  model_type = d.get("model_type")
  if model_type == "gemma3" and "text_config" in d:
    raise ConfigError(
        f"{source}: model_type 'gemma3' is the multimodal Gemma 3; jaxpost loads the text-only "
        "'gemma3_text' layout (Gemma3ForCausalLM). Convert the checkpoint to its language model.")
  if not isinstance(model_type, str) or model_type not in _FAMILIES:
    what = "no model_type" if model_type is None else f"unknown model_type {model_type!r}"
    raise ConfigError(f"{source}: {what}; jaxpost supports "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  if d.get("use_bidirectional_attention"):
    raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder) is not supported")
  defaults = _FAMILIES[model_type][1]

  def get(key, default=None):
    value = d.get(key)
    return defaults.get(key, default) if value is None else value

  def need(key):
    if d.get(key) is None:
      raise ConfigError(f"{source}: required key {key!r} is missing (a {model_type} config.json "
                        f"has it); {_FIX}")
    return d[key]

  def number(value, key, kind=int):
    return None if value is None else _number(value, key, source, kind)

  def optional(key, default, kind=int):
    return number(d[key] if d.get(key) is not None else default, key, kind)

  hidden = number(need("hidden_size"), "hidden_size")
  heads = number(need("num_attention_heads"), "num_attention_heads")
  layers = number(need("num_hidden_layers"), "num_hidden_layers")
  for key, value in (("hidden_size", hidden), ("num_attention_heads", heads),
                     ("num_hidden_layers", layers)):
    if value < 1:
      raise ConfigError(f"{source}: {key} should be at least 1, got {value}; {_FIX}")
  head_dim = number(get("head_dim"), "head_dim") or hidden // heads
  act_name = d.get("hidden_activation") or d.get("hidden_act") or (
      "gelu_pytorch_tanh" if model_type in _GEMMAS else "silu")
  if model_type in _GEMMAS and act_name == "gelu":
    act_name = "gelu_pytorch_tanh"  # HF runs Gemma's legacy "gelu" as the tanh approximation
  if not isinstance(act_name, str) or act_name not in _ACTIVATIONS:
    raise ConfigError(f"{source}: hidden_act {act_name!r} is not supported "
                      f"(supported: {', '.join(_ACTIVATIONS)})")

  # Sliding windows and layer types.
  sliding_window = get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
    sliding_window = None
  if model_type in ("llama", "gemma"):
    sliding_window = None
  sliding_window = number(sliding_window, "sliding_window")
  if d.get("layer_types") and model_type != "mistral":
    if not isinstance(d["layer_types"], list):
      raise ConfigError(f"{source}: layer_types should be a list, got "
                        f"{json_type(d['layer_types'])}; {_FIX}")
    unknown = [t for t in d["layer_types"] if not isinstance(t, str) or t not in _LAYER_TYPES]
    if unknown:
      raise ConfigError(f"{source}: layer_types entry {unknown[0]!r} is not supported "
                        f"(supported: {', '.join(_LAYER_TYPES)})")
    if len(d["layer_types"]) != layers:
      raise ConfigError(f"{source}: layer_types has {len(d['layer_types'])} entries but "
                        f"num_hidden_layers is {layers}; {_FIX}")
    layer_types = tuple(_LAYER_TYPES[t] for t in d["layer_types"])
  elif model_type == "mistral":
    layer_types = ("sliding" if sliding_window else "full",) * layers
  elif model_type in ("qwen2", "qwen3"):
    start = optional("max_window_layers", 28)
    layer_types = tuple("sliding" if sliding_window is not None and i >= start else "full"
                        for i in range(layers))
  elif model_type == "gemma2":
    layer_types = tuple("sliding" if (i + 1) % 2 else "full" for i in range(layers))
  elif model_type == "gemma3_text":
    pattern = optional("sliding_window_pattern", 6)
    if pattern < 1:
      raise ConfigError(f"{source}: sliding_window_pattern should be at least 1, got {pattern}; "
                        f"{_FIX}")
    layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(layers))
  else:
    layer_types = ("full",) * layers
  if "sliding" not in layer_types:
    sliding_window = None

  # RoPE, either layout.
  local_rope = None
  if isinstance(d.get("rope_parameters"), dict):
    rp = d["rope_parameters"]
    if "full_attention" in rp or "sliding_attention" in rp:
      rope = _rope_from_dict(rp.get("full_attention") or {}, get("rope_theta"),
                             f"{source}: rope_parameters.full_attention")
      local_rope = _rope_from_dict(rp.get("sliding_attention") or {},
                                   get("rope_local_base_freq", get("rope_theta")),
                                   f"{source}: rope_parameters.sliding_attention")
    else:
      rope = _rope_from_dict(rp, get("rope_theta"), f"{source}: rope_parameters")
  else:
    scaling = d.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
      raise ConfigError(f"{source}: rope_scaling should be an object or null, got "
                        f"{json_type(scaling)} {scaling!r}; {_FIX}")
    rope = _rope_from_dict(dict(scaling, rope_theta=get("rope_theta")),
                           get("rope_theta"), f"{source}: rope_scaling")
    if model_type == "gemma3_text":
      local_rope = RopeConfig(theta=number(get("rope_local_base_freq"), "rope_local_base_freq",
                                           float))
  if local_rope == rope:
    local_rope = None

  attention_bias = bool(d.get("attention_bias", False))
  kwargs = dict(
      model_type=model_type,
      vocab_size=number(need("vocab_size"), "vocab_size"),
      hidden_size=hidden,
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=number(d.get("num_key_value_heads"), "num_key_value_heads") or heads,
      head_dim=head_dim,
      intermediate_size=number(need("intermediate_size"), "intermediate_size"),
      rms_norm_eps=optional("rms_norm_eps", 1e-6, float),
      rope=rope,
      local_rope=local_rope,
      layer_types=layer_types,
      sliding_window=int(sliding_window) if sliding_window else None,
      tie_embeddings=bool(get("tie_word_embeddings")),
      qkv_bias=attention_bias or model_type == "qwen2",
      o_bias=attention_bias,
      mlp_bias=bool(d.get("mlp_bias", False)),
      qk_norm=model_type in ("qwen3", "gemma3_text"),
      norm_plus_one=model_type in _GEMMAS,
      sandwich_norm=model_type in ("gemma2", "gemma3_text"),
      scale_embeddings=model_type in _GEMMAS,
      activation=_ACTIVATIONS[act_name],
      query_pre_attn_scalar=(number(get("query_pre_attn_scalar"), "query_pre_attn_scalar", float)
                             if model_type in ("gemma2", "gemma3_text") else None),
      attn_logit_softcap=number(get("attn_logit_softcapping"), "attn_logit_softcapping", float),
      final_logit_softcap=number(get("final_logit_softcapping"), "final_logit_softcapping",
                                 float),
      max_position_embeddings=optional("max_position_embeddings", 8192),
      bos_token_id=d.get("bos_token_id"),
      eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list)
      else d.get("eos_token_id"),
      pad_token_id=d.get("pad_token_id"),
      hf_source=json.dumps(d, sort_keys=True),
  )
  try:
    return ModelConfig(**kwargs)
  except ValueError as e:  # the config's own consistency checks (heads, layer types, ...)
    raise ConfigError(f"{source}: {e}; {_FIX}") from None


_OWNED_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq",
               "sliding_window_pattern", "layer_types", "use_sliding_window", "sliding_window",
               "max_window_layers", "hidden_act", "hidden_activation")


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict:
  """An HF config.json dict for `config` that transformers' `AutoConfig` accepts."""
  c = config
  if c.model_type not in _FAMILIES:
    raise ConfigError(f"cannot save model_type {c.model_type!r}; supported: "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  source = json.loads(c.hf_source) if c.hf_source else {}
  new_layout = isinstance(source.get("rope_parameters"), dict)
  out = {k: v for k, v in source.items() if k not in _OWNED_KEYS}
  if c.o_bias != c.qkv_bias and not (c.model_type == "qwen2" and not c.o_bias):
    raise ConfigError(f"{c.model_type}: qkv_bias={c.qkv_bias} with o_bias={c.o_bias} has no HF "
                      "equivalent")
  out.update(
      model_type=c.model_type,
      architectures=[_FAMILIES[c.model_type][0]],
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      intermediate_size=c.intermediate_size,
      rms_norm_eps=c.rms_norm_eps,
      tie_word_embeddings=c.tie_embeddings,
      max_position_embeddings=c.max_position_embeddings,
      bos_token_id=c.bos_token_id,
      eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
      pad_token_id=c.pad_token_id,
      dtype=dtype,
  )
  if c.model_type != "qwen2":
    out["attention_bias"] = c.o_bias
  if c.model_type == "llama":
    out["mlp_bias"] = c.mlp_bias
  act = "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else "silu"
  out["hidden_activation" if c.model_type in ("gemma2", "gemma3_text") else "hidden_act"] = act
  if c.model_type in ("gemma2", "gemma3_text"):
    out.update(query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar),
               attn_logit_softcapping=c.attn_logit_softcap,
               final_logit_softcapping=c.final_logit_softcap)

  # Sliding windows.
  if c.model_type == "mistral":
    if len(set(c.layer_types)) > 1:
      raise ConfigError("mistral: mixed sliding and full layers have no HF Mistral equivalent")
    out["sliding_window"] = c.sliding_window
  elif c.model_type in ("qwen2", "qwen3"):
    out["use_sliding_window"] = c.sliding_window is not None
    out["sliding_window"] = c.sliding_window
    out["max_window_layers"] = (c.layer_types.index("sliding") if "sliding" in c.layer_types
                                else c.num_layers)
    out["layer_types"] = [_hf_layer_type(t) for t in c.layer_types]
  elif c.model_type in ("gemma2", "gemma3_text"):
    out["sliding_window"] = c.sliding_window
    out["layer_types"] = [_hf_layer_type(t) for t in c.layer_types]
  elif "sliding" in c.layer_types:
    raise ConfigError(f"{c.model_type}: sliding-window layers have no HF equivalent")

  # RoPE.
  if c.model_type == "gemma3_text":
    local = c.rope_for_sliding
    if new_layout:
      out["rope_parameters"] = {"full_attention": _rope_to_dict(c.rope),
                                "sliding_attention": _rope_to_dict(local)}
    else:
      if local.rope_type != "default":
        raise ConfigError("gemma3_text: a scaled local RoPE needs the rope_parameters layout")
      out["rope_theta"] = c.rope.theta
      out["rope_local_base_freq"] = local.theta
      out["rope_scaling"] = None if c.rope.rope_type == "default" else _legacy_scaling(c.rope)
  else:
    if c.local_rope is not None:
      raise ConfigError(f"{c.model_type}: a separate local RoPE has no HF equivalent")
    if new_layout:
      out["rope_parameters"] = _rope_to_dict(c.rope)
    else:
      out["rope_theta"] = c.rope.theta
      out["rope_scaling"] = None if c.rope.rope_type == "default" else _legacy_scaling(c.rope)
  return out


def _int_if_whole(x):
  return int(x) if x is not None and float(x).is_integer() else x


def _legacy_scaling(r: RopeConfig) -> dict:
  d = _rope_to_dict(r)
  d.pop("rope_theta")
  return d


def _hf_layer_type(t: str) -> str:
  return "sliding_attention" if t == "sliding" else "full_attention"
