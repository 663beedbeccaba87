"""What an algorithm is: a loss plus what makes its batches, as one small immutable object.

    algorithm = Algorithm(name="sft", loss=loss_fn, batches=make_batches)
    loss, metrics = algorithm.loss(params, batch, rng, frozen)      # pure, jit-able
    source = algorithm.batches("train", policy)                       # next(policy), state()

Like optax's `GradientTransformation`, an `Algorithm` is a record of functions: variants are
made by composition and `dataclasses.replace`, never by subclassing. The training loop
(`jaxpost.train.loop`) calls only these fields and never asks which algorithm it runs.

The frozen inputs of a step are one typed structure, `Frozen(base, reference, teacher)`,
passed to the loss as its fourth argument. In the update step `base` is the frozen base model
under PEFT and `reference` the reference in the trainable's own form; the loss sees them
resolved: `reference` is the reference model's full parameters (under LoRA without a moving
reference: the base with the adapters off) and `base` is None.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Protocol

import jax
import numpy as np
from flax import struct

Batch = Mapping[str, np.ndarray]


@struct.dataclass
class Frozen:
  """What a step reads but does not train: a pytree (arrays get shardings, no gradient).

  base: the frozen base model under LoRA / prompt tuning (None for full fine-tuning).
  reference: the reference model of DPO-style losses (None: none, or the base itself).
  teacher: a teacher model (distillation).
  start: the trained tree's starting value, which `continual.l2_to_init` pulls it towards
    (`jaxpost.train.trainable.l2_to_start`; None without it). Never seen by a loss.
  """

  base: Any = None
  reference: Any = None
  teacher: Any = None
  start: Any = None


class BatchSource(Protocol):
  """Where a run's batches come from. `next(policy)` gets the current policy (`Policy`): an
  offline source ignores it, an online one (RL) samples from it. `state()` is JSON-ready and
  `restore(state)` continues exactly where `state()` was taken. Optional: `host_metrics()`
  (host-side metrics of the last batch, e.g. rewards; logged as `train/<name>`) and
  `samples()` (a few examples for `samples.jsonl`)."""

  def next(self, policy: Policy | None) -> Batch: ...
  def state(self) -> dict[str, Any]: ...
  def restore(self, state: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Policy:
  """The model being trained, as a batch source sees it.

  params: the trainable tree (full params, adapters or a prompt); frozen: the step's `Frozen`;
  model: `model(params, frozen)` -> the full model parameters (adapters attached) for
  `forward` / `generate`. `step` is the number of steps taken.
  """

  params: Any
  frozen: Frozen
  model: Callable[[Any, Frozen], Any]
  step: int = 0

  def model_params(self) -> Any:
    return self.model(self.params, self.frozen)


class Offline:
  """A `BatchSource` over a resumable iterator (`BatchIterator`, `PreferenceIterator`): the
  batches do not depend on the policy. Iterating it yields the remaining batches (for a
  finite evaluation set)."""

  def __init__(self, batches: Iterator[Batch], transform: Callable[[Batch], Batch] | None = None):
    self.batches, self.transform = batches, transform

  def next(self, policy: Policy | None = None) -> Batch:
    del policy
    batch = next(self.batches)
    return batch if self.transform is None else self.transform(batch)

  def __iter__(self) -> Iterator[Batch]:
    while True:
      try:
        yield self.next()
      except StopIteration:
        return

  def state(self) -> dict[str, Any]:
    return self.batches.state()

  def restore(self, state: Mapping[str, Any]) -> None:
    self.batches.restore(state)

  def __getattr__(self, name: str) -> Any:  # stats, num_examples, fingerprint, ...
    return getattr(self.__dict__["batches"], name)


def save_on_first_process(path: Path, save: Callable[[IO[bytes]], None]) -> None:
  """Writes a file a batch source computed once (precomputed reference log-probs, curriculum
  scores, a teacher's top K) on the first process only: `save(file)` into `path`.tmp, then
  renamed into place, so a killed run never leaves half a file to be read back."""
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    save(f)
  tmp.replace(path)


def _unchanged(params: Any, rng: jax.Array) -> Any:
  del rng
  return params


def tokens_in(batch: Batch) -> int:
  """Real tokens of a batch (every side and KL row included): non-zero segment ids of every
  `*segment_ids` array, for tokens/s."""
  return sum(int(np.count_nonzero(v)) for k, v in batch.items() if k.endswith("segment_ids"))


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An algorithm: a pure loss, what makes its batches, and a few optional hooks.

  Required:
    name: what it is called in metrics, messages and the registry.
    loss: `loss(params, batch, rng, frozen) -> (scalar, metrics)`, pure; `params` are the full
      model parameters (PEFT already attached), `frozen` a `Frozen` whose `reference` is the
      reference model's parameters. `metrics["weight"]` (optional) weighs micro-batches.
    batches: `batches(split, policy) -> BatchSource | None` for split "train" or "eval"
      (None: no such data); `policy` is the starting `Policy`.

  Optional:
    headline: the metric the progress bar shows beside the loss (and the held-out summary).
    needs_reference: the loss wants `frozen.reference` (a frozen copy of the start model).
    moving_reference: `after_step` changes the reference (under PEFT it then needs its own
      copy of the adapters instead of "adapters off").
    reference_of: `reference_of(params)` -> the part of the trained tree the reference copies
      (full fine-tuning; e.g. the policy without PPO's critic); None: all of it.
    init: `init(params, rng) -> params` before training starts (e.g. a reward head).
    param_specs: `param_specs(model_config)` -> the parameter specs (sharding) when `init`
      changes the tree; None: the language model's.
    after_step: `after_step(step, params, frozen) -> frozen` after each step (TR-DPO's sync).
    eval_metrics: `eval_metrics(metrics) -> metrics`, derived held-out metrics (perplexity).
    export: `export(model_params, folder)` writes the model (default: the trainable's export:
      a Hugging Face causal LM, merged adapters and a PEFT adapter folder).
    generates: whether the trained model is a language model (a task's exact match applies).
    wrap_trainable: `wrap_trainable(trainable) -> trainable`, for an algorithm that trains
      more than the model under PEFT (PPO's LoRA critic beside the policy's adapters).
    frozen_teacher: `frozen_teacher() -> (params, shardings)`, a frozen model the loss reads
      as `frozen.teacher` (distillation); loaded only when training.
  """

  name: str
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  batches: Callable[[str, Policy | None], BatchSource | None]
  headline: str = "loss"
  needs_reference: bool = False
  moving_reference: bool = False
  reference_of: Callable[[Any], Any] | None = None
  init: Callable[[Any, jax.Array], Any] = _unchanged
  param_specs: Callable[[Any], Any] | None = None
  after_step: Callable[[int, Any, Frozen], Frozen] | None = None
  eval_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
  export: Callable[[Any, Any], Iterable[Any]] | None = None
  generates: bool = True
  wrap_trainable: Callable[[Any], Any] | None = None
  frozen_teacher: Callable[[], tuple[Any, Any]] | None = None


def mix_reference(alpha: float) -> Callable[[Any, Any], Any]:
  """A jitted `(policy, reference) -> alpha * policy + (1 - alpha) * reference` over trees of
  the same structure (TR-DPO's soft update; alpha = 1 copies the policy)."""

  @jax.jit
  def mix(policy, reference):
    return jax.tree.map(lambda p, r: (alpha * p + (1 - alpha) * r).astype(r.dtype), policy,
                        reference)

  return mix


def reference_sync(every: int, alpha: float) -> Callable[[int, Any, Frozen], Frozen]:
  """An `after_step` that moves `frozen.reference` towards the policy every `every` steps
  (TR-DPO, Gorbatovski et al. 2024, arXiv:2404.09656). The reference has the trainable's form
  (full params, or a copy of the adapters), so one tree mix serves every trainable."""
  mix = mix_reference(alpha)

  def after_step(step: int, params: Any, frozen: Frozen) -> Frozen:
    if step % every:
      return frozen
    if frozen.reference is None:
      raise ValueError("reference sync needs a moving reference (Algorithm.moving_reference)")
    return frozen.replace(reference=mix(params, frozen.reference))

  return after_step
