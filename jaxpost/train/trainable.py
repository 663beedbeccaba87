"""What a run trains: the whole model, LoRA/DoRA/QLoRA adapters, or a soft prompt / prefix.

`make_trainable` turns the run config and the loaded model into a `Trainable`: the initial
trainable tree with its shardings, the frozen inputs of the update step (the base model under
PEFT) with theirs, how a loss over full model params becomes a loss over the trainable tree,
the model params that forward/generate use (adapters attached, never merged), and the export.
The update step itself never changes: PEFT is a rewrite of the loss's params argument.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost import sharding as sharding_lib
from jaxpost.config import RunConfig
from jaxpost.models import ModelConfig, save_hf
from jaxpost.peft import (LoraConfig, attach_lora, init_lora, load_peft_adapter, lora_specs,
                          merge_lora, quantize_params, save_peft_adapter)
from jaxpost.peft.lora import dropout_rng
from jaxpost.peft.prompt import (PromptConfig, attach_prompt, init_prompt, prompt_specs,
                                 save_prompt)
from jaxpost.peft.quant import is_quantized

# A loss over full model params, with the reference model (if any) as `ref_params`.
LossFn = Callable[..., Any]


@dataclasses.dataclass
class Trainable:
  """See the module docstring. `model_params(trainable, frozen)` gives the params for
  forward/generate; `reference(frozen)` the reference model of preference losses."""

  params: Any
  shardings: Any
  frozen: dict
  frozen_shardings: dict
  kind: str  # "full", "lora" or "prompt"
  wrap: Callable[[LossFn], LossFn]
  model_params: Callable[[Any, dict], dict]
  export: Callable[[Any, dict, Path, Path], None]
  describe: str


def _replicated_quantized(p_shard, params, mesh):
  """Shardings for a tree where some weights are `QuantizedWeight`s (stored flat per layer:
  replicated; their logical axes no longer apply)."""
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda s, p: jax.tree.map(lambda _: rep, p) if is_quantized(p) else s,
                      p_shard, params, is_leaf=lambda x: is_quantized(x) or isinstance(
                          x, NamedSharding))


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def make_trainable(cfg: RunConfig, config: ModelConfig, params: dict, p_shard, mesh,
                   rng: jax.Array, *, tokenizer=None, needs_reference: bool = False,
                   log: Callable[[str], None] = print) -> Trainable:
  """Builds the trainable tree for `cfg` (full fine-tuning, `lora:` or `prompt:`).

  With `needs_reference`, full fine-tuning keeps a frozen copy of the initial model as the
  reference (`frozen["ref"]`); PEFT runs use the frozen base itself (adapters off).
  """
  dtype = jnp.dtype(cfg.model.dtype)
  sync = needs_reference and cfg.preference.sync_every > 0

  if cfg.lora is not None:
    lc = cfg.lora
    lora = LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=lc.target_tuple(),
                      rslora=lc.rslora, dropout=lc.dropout, dora=lc.dora)
    loaded = None
    if lc.init_from:
      lora, loaded = load_peft_adapter(config, lc.init_from, dtype)
      lora = dataclasses.replace(lora, dropout=lc.dropout)
      log(f"LoRA adapters from {lc.init_from} (r={lora.rank}, alpha={lora.alpha}, "
          f"targets={','.join(lora.targets)})")
    base, b_shard = params, p_shard
    if lc.quantize != "none":
      base = jax.jit(lambda p: quantize_params(p, kind=lc.quantize))(params)  # all projections
      b_shard = _replicated_quantized(p_shard, base, mesh)
      base = jax.device_put(base, b_shard)
    t_shard = sharding_lib.param_shardings(lora_specs(config, lora), mesh)
    if loaded is not None:
      trainable = jax.device_put(loaded, t_shard)
    else:
      trainable = jax.jit(lambda k, b: init_lora(config, lora, k, dtype, base=b),
                          out_shardings=t_shard)(jax.random.fold_in(rng, 1), base)
    frozen, f_shard = {"base": base}, {"base": b_shard}
    if sync:  # TR-DPO under LoRA: the reference is the base with its own copy of the adapters
      frozen["ref_adapters"] = jax.tree.map(jnp.copy, trainable)
      f_shard["ref_adapters"] = t_shard

    def wrap(loss_fn):
      def adapted(adapters, batch, rng, *, base, ref_adapters=None, **rest):
        extra = {}
        if needs_reference:
          extra["ref_params"] = base if ref_adapters is None else attach_lora(base, ref_adapters,
                                                                              lora)
        return loss_fn(attach_lora(base, adapters, lora, dropout_rng(rng)), batch, rng, **extra,
                       **rest)
      return adapted

    def export(tr, fr, run_dir, model_dir):
      save_hf(config, merge_lora(fr["base"], tr, lora), run_dir / "final")
      save_peft_adapter(config, lora, tr, run_dir / "adapter", base_model=str(model_dir))

    quant = "" if lc.quantize == "none" else f", base in {lc.quantize}"
    variant = "DoRA" if lora.dora else "LoRA"
    return Trainable(trainable, t_shard, frozen, f_shard, "lora", wrap,
                     lambda tr, fr: attach_lora(fr["base"], tr, lora), export,
                     f"{variant} r={lora.rank}{quant}: {count(trainable):,} trainable of "
                     f"{count(params):,} parameters")

  if cfg.prompt is not None:
    pc = PromptConfig(kind=cfg.prompt.kind, num_tokens=cfg.prompt.num_tokens)
    init_tokens = None
    if cfg.prompt.init_text:
      ids = tokenizer.encode(cfg.prompt.init_text) if tokenizer is not None else []
      ids = (ids * pc.num_tokens)[:pc.num_tokens] if ids else None
      init_tokens = None if ids is None else jnp.asarray(ids, jnp.int32)
    t_shard = sharding_lib.param_shardings(prompt_specs(config, pc), mesh)
    trainable = jax.jit(lambda k, p: init_prompt(config, pc, p, k, init_tokens),
                        out_shardings=t_shard)(jax.random.fold_in(rng, 1), params)
    frozen, f_shard = {"base": params}, {"base": p_shard}

    def wrap(loss_fn):
      def prompted(prompt, batch, rng, *, base, **rest):
        extra = {"ref_params": base} if needs_reference else {}
        return loss_fn(attach_prompt(config, base, prompt, pc), batch, rng, **extra, **rest)
      return prompted

    def export(tr, fr, run_dir, model_dir):
      save_prompt(config, pc, tr, run_dir / "adapter", base_model=str(model_dir))

    return Trainable(trainable, t_shard, frozen, f_shard, "prompt", wrap,
                     lambda tr, fr: attach_prompt(config, fr["base"], tr, pc), export,
                     f"{pc.kind} tuning, {pc.num_tokens} virtual tokens: {count(trainable):,} "
                     f"trainable of {count(params):,} parameters")

  frozen, f_shard = {}, {}
  if needs_reference:
    frozen["ref"] = jax.tree.map(jnp.copy, params)  # the step donates the trainable tree
    f_shard["ref"] = p_shard

  def wrap(loss_fn):
    if not needs_reference:
      return loss_fn
    return lambda p, batch, rng, *, ref, **rest: loss_fn(p, batch, rng, ref_params=ref, **rest)

  def export(tr, fr, run_dir, model_dir):
    save_hf(config, tr, run_dir / "final")

  return Trainable(params, p_shard, frozen, f_shard, "full", wrap, lambda tr, fr: tr, export,
                   f"full fine-tuning: {count(params):,} parameters")


def sync_reference(trainable: Trainable, params, frozen: dict, alpha: float) -> dict:
  """TR-DPO: the reference moves towards the policy, ref <- alpha * policy + (1-alpha) * ref."""
  key = "ref" if trainable.kind == "full" else "ref_adapters"
  if key not in frozen:
    raise ValueError("reference sync needs a run with a moving reference (sync_every > 0)")
  mix = jax.jit(lambda p, r: jax.tree.map(lambda a, b: (alpha * a + (1 - alpha) * b).astype(
      b.dtype), p, r))
  return {**frozen, key: mix(params, frozen[key])}
