"""What a run trains: the whole model (`Full`), LoRA/DoRA/QLoRA adapters (`Lora`), a soft
prompt / prefix (`Prompt`), or an edit of the activations at one site (`Edit`,
`jaxpost.whitebox.edit`).

Each is a small object with the same members:

    tree, frozen = trainable.init(params, rng, reference=..., moving_reference=...)
    trainable.model(tree, frozen, dropout_rng)   # full model params for forward / generate
    trainable.reference(tree, frozen)            # the reference model's full params
    trainable.export(tree, frozen, out_dir, model_dir)

`tree` is what the optimizer updates; `frozen` is a `Frozen(base, reference)` that the update
step reads without gradient. The reference of DPO-style losses always has the trainable's own
form: a copy of the full params, a copy of the adapters (a moving reference under LoRA), or
None, meaning the frozen base with the adapters off (no second copy of the weights). The update
step itself never changes: `trainable_loss` turns a loss over full model params into a loss
over the trainable tree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost import sharding as sharding_lib
from jaxpost.algorithms.base import Frozen
from jaxpost.config import RunConfig
from jaxpost.models import ModelConfig, save_hf
from jaxpost.peft import (LoraConfig, attach_lora, init_lora, load_peft_adapter, lora_specs,
                          merge_lora, quantize_params, save_peft_adapter)
from jaxpost.peft.lora import dropout_rng
from jaxpost.peft.prompt import (PromptConfig, attach_prompt, init_prompt, prompt_specs,
                                 save_prompt)
from jaxpost.peft.quant import is_quantized
from jaxpost.whitebox.edit import Edit, EditSpec


def count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _copy(tree):
  """A copy that survives the step donating the original."""
  return jax.tree.map(jnp.copy, tree)


def _replicated_quantized(p_shard, params, mesh):
  """Shardings for a tree where some weights are `QuantizedWeight`s (stored flat per layer:
  replicated; their logical axes no longer apply)."""
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda s, p: jax.tree.map(lambda _: rep, p) if is_quantized(p) else s,
                      p_shard, params, is_leaf=lambda x: is_quantized(x) or isinstance(
                          x, NamedSharding))


@dataclasses.dataclass
class Full:
  """Full fine-tuning: every parameter trains; the reference is a frozen copy of the start."""

  config: ModelConfig
  shardings: Any  # of the model params
  kind: str = "full"
  describe: str = ""

  def init(self, params, rng, *, reference: bool, moving_reference: bool = False,
           reference_of=None):
    del rng, moving_reference
    self.describe = f"full fine-tuning: {count(params):,} parameters"
    if not reference:
      return params, Frozen()
    return params, Frozen(reference=_copy(params if reference_of is None
                                          else reference_of(params)))

  def frozen_shardings(self, frozen: Frozen) -> Frozen:
    if frozen.reference is None:
      return Frozen()
    # the reference may be part of the trained tree (`Algorithm.reference_of`): its keys'
    return Frozen(reference={k: self.shardings[k] for k in frozen.reference})

  def model(self, params, frozen: Frozen, dropout_key=None):
    del frozen, dropout_key
    return params

  def reference(self, params, frozen: Frozen):
    return params if frozen.reference is None else frozen.reference

  def export(self, params, frozen: Frozen, out_dir: Path, model_dir: Path) -> None:
    del frozen, model_dir
    save_hf(self.config, params, out_dir / "final")


@dataclasses.dataclass
class Lora:
  """LoRA / rsLoRA / DoRA adapters over a frozen (optionally NF4 / int8) base."""

  config: ModelConfig
  lora: LoraConfig
  quantize: str
  base_shardings: Any
  mesh: Any
  dtype: Any = jnp.float32
  loaded: Any = None  # adapters from `lora.init_from`
  kind: str = "lora"
  describe: str = ""

  @property
  def shardings(self):
    return sharding_lib.param_shardings(lora_specs(self.config, self.lora), self.mesh)

  def init(self, params, rng, *, reference: bool, moving_reference: bool = False,
           reference_of=None):
    del reference_of  # PEFT's reference is the base, adapters off (or a copy of adapters)
    base, self._base_sh = params, self.base_shardings
    if self.quantize != "none":
      base = jax.jit(lambda p: quantize_params(p, kind=self.quantize))(params)
      self._base_sh = _replicated_quantized(self.base_shardings, base, self.mesh)
      base = jax.device_put(base, self._base_sh)
    if self.loaded is not None:
      adapters = jax.device_put(self.loaded, self.shardings)
    else:
      adapters = jax.jit(lambda k, b: init_lora(self.config, self.lora, k, self.dtype, base=b),
                         out_shardings=self.shardings)(jax.random.fold_in(rng, 1), base)
    quant = "" if self.quantize == "none" else f", base in {self.quantize}"
    variant = "DoRA" if self.lora.dora else "LoRA"
    self.describe = (f"{variant} r={self.lora.rank}{quant}: {count(adapters):,} trainable of "
                     f"{count(params):,} parameters")
    moving = reference and moving_reference  # else the reference is the base, adapters off
    return adapters, Frozen(base=base, reference=_copy(adapters) if moving else None)

  def frozen_shardings(self, frozen: Frozen) -> Frozen:
    return Frozen(base=self._base_sh,
                  reference=None if frozen.reference is None else self.shardings)

  def model(self, adapters, frozen: Frozen, dropout_key=None):
    return attach_lora(frozen.base, adapters, self.lora, dropout_key)

  def reference(self, adapters, frozen: Frozen):
    del adapters
    if frozen.reference is None:
      return frozen.base
    return attach_lora(frozen.base, frozen.reference, self.lora)

  def export(self, adapters, frozen: Frozen, out_dir: Path, model_dir: Path) -> None:
    save_hf(self.config, merge_lora(frozen.base, adapters, self.lora), out_dir / "final")
    save_peft_adapter(self.config, self.lora, adapters, out_dir / "adapter",
                      base_model=str(model_dir))


@dataclasses.dataclass
class Prompt:
  """Prompt tuning (learned input embeddings) or prefix tuning (learned keys / values)."""

  config: ModelConfig
  prompt: PromptConfig
  base_shardings: Any
  mesh: Any
  init_tokens: Any = None
  kind: str = "prompt"
  describe: str = ""

  @property
  def shardings(self):
    return sharding_lib.param_shardings(prompt_specs(self.config, self.prompt), self.mesh)

  def init(self, params, rng, *, reference: bool, moving_reference: bool = False,
           reference_of=None):
    del reference_of  # PEFT's reference is the base, adapters off (or a copy of adapters)
    del reference, moving_reference  # the reference is the base, prompt off
    pc = self.prompt
    tree = jax.jit(lambda k, p: init_prompt(self.config, pc, p, k, self.init_tokens),
                   out_shardings=self.shardings)(jax.random.fold_in(rng, 1), params)
    self.describe = (f"{pc.kind} tuning, {pc.num_tokens} virtual tokens: {count(tree):,} "
                     f"trainable of {count(params):,} parameters")
    return tree, Frozen(base=params)

  def frozen_shardings(self, frozen: Frozen) -> Frozen:
    del frozen
    return Frozen(base=self.base_shardings)

  def model(self, prompt, frozen: Frozen, dropout_key=None):
    del dropout_key
    return attach_prompt(self.config, frozen.base, prompt, self.prompt)

  def reference(self, prompt, frozen: Frozen):
    del prompt
    return frozen.base

  def export(self, prompt, frozen: Frozen, out_dir: Path, model_dir: Path) -> None:
    del frozen
    save_prompt(self.config, self.prompt, prompt, out_dir / "adapter",
                base_model=str(model_dir))


Trainable = Full | Lora | Prompt | Edit


def make_trainable(cfg: RunConfig, config: ModelConfig, p_shard, mesh, *, tokenizer=None,
                   log: Callable[[str], None] = print) -> Trainable:
  """The trainable of `cfg`: `lora:` adapters, a `prompt:`, an `edit:`, or else the whole
  model."""
  if cfg.edit is not None:
    e = cfg.edit
    return Edit(config, EditSpec(kind=e.kind, site=e.site, layers=e.layers, rank=e.rank),
                p_shard, mesh, jnp.dtype(cfg.model.dtype))
  if cfg.lora is not None:
    lc = cfg.lora
    lora = LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=lc.target_tuple(),
                      rslora=lc.rslora, dropout=lc.dropout, dora=lc.dora)
    loaded = None
    if lc.init_from:
      lora, loaded = load_peft_adapter(config, lc.init_from, jnp.dtype(cfg.model.dtype))
      lora = dataclasses.replace(lora, dropout=lc.dropout)
      log(f"LoRA adapters from {lc.init_from} (r={lora.rank}, alpha={lora.alpha}, "
          f"targets={','.join(lora.targets)})")
    return Lora(config, lora, lc.quantize, p_shard, mesh, jnp.dtype(cfg.model.dtype), loaded)
  if cfg.prompt is not None:
    pc = PromptConfig(kind=cfg.prompt.kind, num_tokens=cfg.prompt.num_tokens)
    init_tokens = None
    if cfg.prompt.init_text and tokenizer is not None:
      ids = tokenizer.encode(cfg.prompt.init_text)
      init_tokens = jnp.asarray((ids * pc.num_tokens)[:pc.num_tokens], jnp.int32) if ids else None
    return Prompt(config, pc, p_shard, mesh, init_tokens)
  return Full(config, p_shard)


def l2_to_start(tree, start) -> jax.Array:
  """||tree - start||^2 / 2 over every leaf, in float32: the L2 pull towards the start weights
  (its gradient is tree - start). For continual learning this is L2-init, the isotropic
  special case of EWC's quadratic penalty (Kirkpatrick et al. 2017)."""
  sq = [jnp.sum(jnp.square(t.astype(jnp.float32) - s.astype(jnp.float32)))
        for t, s in zip(jax.tree.leaves(tree), jax.tree.leaves(start))]
  return 0.5 * sum(sq, jnp.float32(0))


def start_anchor(tree) -> Any:
  """The `Frozen.start` of `continual.l2_to_init`: a copy of the trainable tree as it starts
  (the whole model's params, the LoRA adapters or the prompt)."""
  return _copy(tree)


def trainable_loss(trainable: Trainable, loss: Callable, *, training: bool,
                   reference: bool, l2_to_init: float = 0.0) -> Callable:
  """`loss(model_params, batch, rng, frozen)` as a loss over the trainable tree for the update
  step: `(tree, batch, rng, frozen) -> (loss, metrics)`. The loss sees the model with the
  trainable attached (LoRA dropout on only when `training`) and a `Frozen` whose `reference` is
  the reference model's full params (with `reference`; else None).

  `l2_to_init` > 0 adds l2_to_init x ||tree - frozen.start||^2 / 2 (`l2_to_start`) and reports
  `distance_to_init` (||tree - start||) and `l2_penalty`. The pull is on the trained tree, so
  under LoRA it pulls the adapters to their initial values (B to 0: the merged update s A B
  shrinks towards the model the run started from) with no copy of the base, and it is the
  same term for every algorithm. It is the same in every micro-batch, so accumulation keeps it
  exact."""

  def step_loss(tree, batch, rng, frozen: Frozen):
    model = trainable.model(tree, frozen, dropout_rng(rng) if training else None)
    ref = trainable.reference(tree, frozen) if reference else None
    seen = Frozen(reference=ref, teacher=frozen.teacher)
    value, metrics = loss(model, batch, rng, seen)
    if not l2_to_init:
      return value, metrics
    half_sq = l2_to_start(tree, frozen.start)
    penalty = l2_to_init * half_sq
    return value + penalty, {**metrics, "l2_penalty": penalty,
                             "distance_to_init": jnp.sqrt(2.0 * half_sq)}

  return step_loss
