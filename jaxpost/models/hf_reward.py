"""Reward models: their parameter layout, and Hugging Face `*ForSequenceClassification` in and out.

A reward model is the decoder with a scalar head in place of the LM head:

    params = {**decoder_params, "score": w_D}      # no "lm_head"
    r(x) = w . h(x)[last]                          # h after the final norm (see jaxpost.reward)

In transformers this is `LlamaForSequenceClassification` (Qwen2..., Gemma2..., ...) with
`num_labels=1`: the decoder's tensors under the `*ForCausalLM` names (`model.layers.{i}....`),
`score.weight` [1, D] without bias, and no `lm_head.weight`. It reads each row's reward at its
last token that is not `pad_token_id`, so the exported config must name a pad id that never ends
a sequence (not EOS, nor an end-of-turn token: jaxpost's reward sequences end with one).

Files are written as `save_hf` writes them: one temporary file renamed into place per file, and
past `max_shard_size`, `model-0000k-of-0000n.safetensors` shards with an index. Loading reads
lazily, one layer's tensor at a time, straight onto the requested shardings; pickle files are
refused.
"""

from __future__ import annotations

import os

from jax.sharding import Mesh

from jaxpost import sharding as sharding_lib
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf_config import config_to_hf
from jaxpost.models.hf_io import (CheckpointError, TensorMap, load_tensors, tensor_maps,
                                  write_tensors)
from jaxpost.models.params import ParamSpec, param_specs

SCORE = "score"

# model_type -> the transformers class of a sequence-classification (reward) model.
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}


def score_spec(config: ModelConfig) -> ParamSpec:
  """The reward head: a [D] vector on the `embed` axis (normal init, std 0.02, as HF's)."""
  return ParamSpec((config.hidden_size,), ("embed",))


def reward_param_specs(config: ModelConfig) -> dict:
  """`param_specs(config)` without `lm_head`, with `score` [D] (for shardings and shapes)."""
  specs = {k: v for k, v in param_specs(config).items() if k != "lm_head"}
  specs[SCORE] = score_spec(config)
  return specs


def _reward_maps(config: ModelConfig) -> list[TensorMap]:
  """The decoder's HF tensor names without the LM head, plus `score.weight` [1, D] <-> [D]."""
  maps = [m for m in tensor_maps(config) if m.path != ("lm_head",)]
  maps.append(TensorMap("score.weight", (SCORE,), lambda w: w.reshape(w.shape[-1]),
                   lambda w: w.reshape(1, -1), False))
  return maps


def _eos_ids(config: ModelConfig) -> tuple[int, ...]:
  eos = config.eos_token_id
  if eos is None:
    return ()
  return tuple(eos) if isinstance(eos, tuple) else (eos,)


def reward_config_to_hf(config: ModelConfig, pad_token_id: int, dtype: str = "float32") -> dict:
  """config.json of the `*ForSequenceClassification` model: the decoder's, with the class,
  one label and the pad id."""
  if config.model_type not in ARCHITECTURES:
    raise ValueError(f"no sequence-classification class known for {config.model_type!r}; "
                     f"supported: {', '.join(ARCHITECTURES)}")
  out = config_to_hf(config, dtype)
  out.update(architectures=[ARCHITECTURES[config.model_type]], pad_token_id=pad_token_id,
             id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  out.pop("num_labels", None)  # id2label says it; transformers rejects the two disagreeing
  return out


def save_reward_model_hf(config: ModelConfig, params: dict, path: str | os.PathLike, *,
                         pad_token_id: int | None = None, dtype=None,
                         max_shard_size: int | str = "5GB") -> None:
  """Writes a folder that `transformers.AutoModelForSequenceClassification` loads (num_labels 1).

  Args:
    config: the decoder's config.
    params: reward-model params (`jaxpost.reward`: decoder params plus "score" [D]). Adapter
      and quantised weight objects are written merged (their effective weight); an `lm_head`,
      if present, is not written.
    path: the output folder (created; earlier weight files in it are replaced).
    pad_token_id: the id transformers treats as padding: it reads each row's reward at the
      last token that is not this id. Default `config.pad_token_id`. It must be set (else
      transformers refuses batches of more than one row) and must not be an EOS id of the
      config (sequences end with one, whose reward would then be skipped).
    dtype: the dtype written (default: that of `params["embed"]`).
    max_shard_size: shard past this size ("5GB", "200MB" or a byte count), as `save_hf`.

  Raises:
    ValueError: no usable pad id, params without "score" or with a prompt/prefix adapter
      ("prefix" has no HF equivalent).
  """
  pad = config.pad_token_id if pad_token_id is None else int(pad_token_id)
  if pad is None:
    raise ValueError(
        "save_reward_model_hf needs a pad_token_id: transformers reads a reward at each row's "
        "last token that is not the pad id, and without one refuses batches of more than one "
        "row. Pass the tokenizer's pad id (one that never ends a sequence).")
  if pad in _eos_ids(config):
    raise ValueError(
        f"pad_token_id={pad} is an EOS id of this model ({list(_eos_ids(config))}): reward "
        "sequences end with EOS (or an end-of-turn token), and transformers would read their "
        "reward before it. Pass a pad id that never ends a sequence (e.g. a dedicated pad "
        "token).")
  if SCORE not in params:
    raise ValueError("params have no 'score' head; make reward params with "
                     "jaxpost.reward.with_score_head")
  if params.get("prefix") is not None:
    raise ValueError("params hold a prompt/prefix-tuning 'prefix', which a transformers "
                     "sequence-classification model cannot represent")

  write_tensors(path, params, _reward_maps(config), reward_param_specs(config),
                config.num_layers, dtype=dtype, max_shard_size=max_shard_size,
                config_json=lambda hf_dtype: reward_config_to_hf(config, pad, hf_dtype))


def load_reward_model_hf(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None,
                         rules=sharding_lib.DEFAULT_RULES) -> tuple[ModelConfig, dict]:
  """Loads a `*ForSequenceClassification` folder (num_labels 1) as (config, reward params).

  The params are the decoder's (no `lm_head`) plus "score" [D]. `config.pad_token_id` is the
  folder's. Arguments as `load_hf`: `dtype` (default: the checkpoint's), `mesh` and `rules`
  (place each parameter straight onto its sharding; `reward_param_specs` gives the axes).

  Raises:
    CheckpointError: not a folder of safetensors, a missing or unexpected tensor (a causal LM
      folder has no `score.weight`: load it with `load_hf` and add a head with
      `jaxpost.reward.with_score_head`), or a shape that disagrees with config.json (e.g. more
      than one label).
  """
  def check(path, where):
    if "score.weight" not in where:
      raise CheckpointError(
          f"{path}: no 'score.weight' tensor, so not a reward (sequence-classification) model. "
          "To start a reward model from a causal LM, load it with load_hf and add a head with "
          "jaxpost.reward.with_score_head.")

  def hint(name, got, want):
    if name == "score.weight" and len(got) == 2 and got[-1] == want[-1]:
      return " (a reward model has one label: num_labels=1)"
    return ""

  # An LM head left beside the score head is unused by transformers too.
  return load_tensors(path, maps_of=_reward_maps, specs_of=reward_param_specs, dtype=dtype,
                      mesh=mesh, rules=rules, unused=lambda name, _: name == "lm_head.weight",
                      what="reward model", check=check, shape_hint=hint)

