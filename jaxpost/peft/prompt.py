"""Prompt tuning and prefix tuning: a learned prefix every sequence starts from.

* Prompt tuning (Lester et al. 2021, arXiv:2104.08691): P learned input embeddings ("soft
  prompt") placed before every sequence. They run through the frozen model like tokens at
  positions 0..P-1; the real tokens follow at positions P, P+1, ...
* Prefix tuning (Li & Liang 2021, arXiv:2101.00190): learned keys and values for P slots in
  every layer ([L, K, P, Dh] each), attended to by every token; the tokens follow at
  positions P, P+1, ... (as PEFT's past_key_values prefix).

Both become a `jaxpost.models.Prefix` under params["prefix"]: the forward pass (without a
cache) starts each row from it, and `generate` starts its cache from it, so training, scoring
and generation need no other change. The prefix is visible to every segment of a packed row.
Only the prompt parameters train; the model goes in frozen, as with LoRA.

    pc = PromptConfig(kind="prompt", num_tokens=16)
    prompt = init_prompt(config, pc, params, key)
    loss = prompt_loss(sft_loss_fn, config, pc)      # loss(prompt, batch, rng, base=params)
    out = generate(config, attach_prompt(config, params, prompt, pc), prompts, ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig, ParamSpec, Prefix, forward, init_cache
from jaxpost.models.safetensors_io import SafetensorsFile, save_file
from jaxpost.peft.peft_format import read_adapter_config


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """kind: "prompt" (soft input embeddings) or "prefix" (per-layer keys and values)."""

  kind: Literal["prompt", "prefix"] = "prompt"
  num_tokens: int = 16

  def __post_init__(self):
    if self.kind not in ("prompt", "prefix"):
      raise ValueError(f"prompt tuning kind must be 'prompt' or 'prefix', got {self.kind!r}")
    if self.num_tokens < 1:
      raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")


def prompt_specs(config: ModelConfig, pc: PromptConfig) -> dict:
  """Shapes and logical axes of the trainable prompt parameters."""
  P = pc.num_tokens
  if pc.kind == "prompt":
    return {"embeddings": ParamSpec((P, config.hidden_size), ("prompt", "embed"))}
  kv = ParamSpec((config.num_layers, config.num_kv_heads, P, config.head_dim),
                 ("layers", "kv_heads", "prompt", "head_dim"))
  return {"k": kv, "v": kv}


def _prompt_prefix(config: ModelConfig, params: dict, embeddings_PxD: jax.Array) -> Prefix:
  """Runs a soft prompt through the model: its keys and values in every layer."""
  P = embeddings_PxD.shape[0]
  dtype = jnp.dtype(params["embed"].dtype)
  out = forward(config, params, None, embeddings=embeddings_PxD[None].astype(dtype),
                cache=init_cache(config, 1, P, dtype), compute_logits=False)
  return Prefix(k=out.cache.k[:, 0], v=out.cache.v[:, 0], next_pos=jnp.int32(P))


def init_prompt(config: ModelConfig, pc: PromptConfig, params: dict, rng: jax.Array,
                init_tokens: jax.Array | None = None) -> dict:
  """Prompt parameters that start from real tokens (`init_tokens`, default random ids):
  their embeddings (prompt tuning) or their keys and values in the frozen model (prefix
  tuning), so the prefix starts at the scale the model is used to (Lester et al. sec. 3.2)."""
  if init_tokens is None:
    init_tokens = jax.random.randint(rng, (pc.num_tokens,), 0, config.vocab_size)
  init_tokens = jnp.asarray(init_tokens, jnp.int32)
  if init_tokens.shape != (pc.num_tokens,):
    raise ValueError(f"init_tokens must have {pc.num_tokens} ids, got {init_tokens.shape}")
  embeddings = jnp.take(params["embed"], init_tokens, axis=0).astype(jnp.float32)
  if pc.kind == "prompt":
    return {"embeddings": embeddings}
  prefix = _prompt_prefix(config, params, embeddings)
  return {"k": prefix.k.astype(jnp.float32), "v": prefix.v.astype(jnp.float32)}


def attach_prompt(config: ModelConfig, params: dict, prompt: dict, pc: PromptConfig) -> dict:
  """The model's params with the prompt as params["prefix"] (differentiable in `prompt`)."""
  if pc.kind == "prompt":
    prefix = _prompt_prefix(config, params, prompt["embeddings"])
  else:
    prefix = Prefix(k=prompt["k"], v=prompt["v"], next_pos=jnp.int32(pc.num_tokens))
  return {**params, "prefix": prefix}


def prompt_loss(loss_fn: Callable, config: ModelConfig, pc: PromptConfig) -> Callable:
  """`loss_fn(params, batch, rng, **frozen)` as a loss over prompt parameters:
  `(prompt, batch, rng, *, base, **frozen)` with the model frozen."""

  def prompted(prompt, batch, rng, *, base, **frozen):
    return loss_fn(attach_prompt(config, base, prompt, pc), batch, rng, **frozen)

  return prompted


# PEFT's own format: adapter_config.json + adapter_model.safetensors["prompt_embeddings"].
# Prefix tuning stores [P, L * 2 * K * Dh]: per virtual token, every layer's key then value.

def save_prompt(config: ModelConfig, pc: PromptConfig, prompt: dict, path: str | os.PathLike,
                *, base_model: str | None = None) -> Path:
  """Writes the prompt in the PEFT library's PROMPT_TUNING / PREFIX_TUNING format."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  prompt = jax.device_get(prompt)
  if pc.kind == "prompt":
    table = np.asarray(prompt["embeddings"], np.float32)
  else:
    k, v = np.asarray(prompt["k"], np.float32), np.asarray(prompt["v"], np.float32)
    kv = np.stack([k, v], axis=1)  # [L, 2, K, P, Dh]
    table = kv.transpose(3, 0, 1, 2, 4).reshape(pc.num_tokens, -1)
  save_file({"prompt_embeddings": np.ascontiguousarray(table)},
            path / "adapter_model.safetensors")
  meta = {"peft_type": "PROMPT_TUNING" if pc.kind == "prompt" else "PREFIX_TUNING",
          "task_type": "CAUSAL_LM", "num_virtual_tokens": pc.num_tokens,
          "token_dim": config.hidden_size, "num_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_transformer_submodules": 1,
          "inference_mode": True, "base_model_name_or_path": base_model}
  if pc.kind == "prefix":
    meta["prefix_projection"] = False
  else:
    meta["prompt_tuning_init"] = "RANDOM"
  tmp = path / "adapter_config.json.tmp"
  tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
  tmp.replace(path / "adapter_config.json")
  return path


def load_prompt(config: ModelConfig, path: str | os.PathLike) -> tuple[PromptConfig, dict]:
  """Reads a prompt saved by `save_prompt` (or by PEFT, without prefix projection)."""
  path = Path(path)
  meta = read_adapter_config(path, ("peft_type", "num_virtual_tokens"))
  kinds = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}
  if meta.get("peft_type") not in kinds:
    raise ValueError(f"{path / 'adapter_config.json'}: peft_type {meta.get('peft_type')!r} is "
                     "not PROMPT_TUNING or PREFIX_TUNING")
  if meta.get("prefix_projection"):
    raise ValueError(f"{path / 'adapter_config.json'}: prefix_projection=true is not supported")
  pc = PromptConfig(kind=kinds[meta["peft_type"]], num_tokens=int(meta["num_virtual_tokens"]))
  table = np.asarray(SafetensorsFile(path / "adapter_model.safetensors").get("prompt_embeddings"),
                     np.float32)
  c = config
  if pc.kind == "prompt":
    want = (pc.num_tokens, c.hidden_size)
  else:
    want = (pc.num_tokens, c.num_layers * 2 * c.num_kv_heads * c.head_dim)
  if table.shape != want:
    raise ValueError(f"{path}: prompt_embeddings has shape {list(table.shape)}, expected "
                     f"{list(want)} for this model")
  if pc.kind == "prompt":
    return pc, {"embeddings": jnp.asarray(table)}
  kv = table.reshape(pc.num_tokens, c.num_layers, 2, c.num_kv_heads, c.head_dim)
  kv = kv.transpose(1, 2, 3, 0, 4)  # [L, 2, K, P, Dh]
  return pc, {"k": jnp.asarray(kv[:, 0]), "v": jnp.asarray(kv[:, 1])}
