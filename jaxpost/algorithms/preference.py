"""Preference optimisation: the DPO family (`dpo:`) and KTO (`kto:`), with a reference model.

`dpo.shared_prompt: true` lays each pair out as one row `prompt, chosen, rejected`
(`jaxpost.data.shared_prompt`), so the policy and the reference score each prompt once.

The losses are `jaxpost.losses.dpo_loss` / `kto_loss` bound to their section's options. The
reference model (`reference:`) is the start model, frozen (under PEFT: the base, adapters off):
scored inside the step (`mode: in_step`, `frozen.reference`), or once over the data before
training (`mode: precomputed`: the batches then carry `ref_logps`). `reference.sync_every` > 0
moves it towards the policy (TR-DPO) in `after_step`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

from jaxpost.algorithms.base import (Algorithm, Offline, Policy, reference_sync,
                                    save_on_first_process)
from jaxpost.algorithms.replay import training_batches
from jaxpost.data.preference import build_kto_batches, build_preference_batches
from jaxpost.losses.dpo import dpo_loss, kto_loss, reference_logps
from jaxpost.multihost import host_tree

_BUILDERS = {"paired": build_preference_batches, "unpaired": build_kto_batches}


def preference_batches(run, split: str, kind: str, *, training: bool | None = None,
                       policy: Policy | None = None, shared_prompt: bool = False
                       ) -> Offline | None:
  """The run's preference batches of `split`: pairs [B, 2, T] (`kind` "paired"; with
  `shared_prompt`, one row [B, T] per pair, the prompt scored once) or KTO rows
  (`kind` "unpaired"). Training batches (default for "train") are shuffled and endless, paced
  by `data.curriculum` if set (its `loss` score needs the start `policy`) and mixed with
  `data.replay` if set; else one pass in data order, padded to full batches. None where the
  run has no such data."""
  d, t = run.cfg.data, run.cfg.train
  path = run.data.path(kind, split)
  if path is None:
    return None
  training = split == "train" if training is None else training
  build = functools.partial(
      _BUILDERS[kind], tokenizer=run.tokenizer, seq_len=d.seq_len,
      max_prompt_length=d.max_prompt_length, max_length=d.max_length, on_bad_row=d.on_bad_row,
      shuffle=d.shuffle and training, epochs=None if training else 1, drop_remainder=training,
      **({"shared_prompt": True} if shared_prompt else {}))
  if training:
    return Offline(training_batches(run, build, path, kind, policy))
  return Offline(build(path, batch_size=t.batch_size, seed=t.seed))


@functools.lru_cache(maxsize=None)
def _reference_fn(config, kind: str, compute_dtype):
  return jax.jit(lambda p, b: reference_logps(config, p, b, kind=kind,
                                              compute_dtype=compute_dtype))


def _with_table(table: np.ndarray):
  """Adds each row's precomputed reference log-probs (`ref_logps` [B, 2], looked up by the
  row's item `index`; -1 is padding)."""

  def add(batch):
    index = batch["index"]
    ref = np.where(index[:, None] >= 0, table[np.maximum(index, 0)], 0.0)
    return {**batch, "ref_logps": ref.astype(np.float32)}

  return add


def with_reference_logps(run, source: Offline, split: str, kind: str, policy: Policy, *,
                         shared_prompt: bool = False) -> Offline:
  """`source` with every batch's `ref_logps` from the reference model (the start model).

  Training data: computed once over every item (and reused from `run_dir/data` when the
  data's fingerprint matches), looked up by item. Held-out data: computed per batch (the loop
  takes the held-out batches once)."""
  fn = _reference_fn(run.config, "kto" if kind == "unpaired" else "dpo",
                     run.model_kwargs["compute_dtype"])
  model = run.reference_model(policy.params, policy.frozen)
  score = lambda batch: np.asarray(host_tree(fn(model, run.place(batch))), np.float32)  # noqa: E731
  if split != "train":
    return Offline(source.batches, lambda b: {**b, "ref_logps": score(b)})
  path = Path(run.run_dir) / "data" / f"reference_logps_{source.fingerprint}.npy"
  if path.exists():
    table = np.load(path)
  else:
    table = np.zeros((source.num_examples, 2), np.float32)
    for batch in preference_batches(run, split, kind, training=False,
                                    shared_prompt=shared_prompt):
      index = batch["index"]
      table[index[index >= 0]] = score(batch)[index >= 0]
    save_on_first_process(path, lambda f: np.save(f, table))
    print(f"reference log-probs of {len(table)} items precomputed into {path}", flush=True)
  return Offline(source.batches, _with_table(table))


def _preference(run, name: str, kind: str, loss, needs_reference: bool, headline: str, *,
                shared_prompt: bool = False) -> Algorithm:
  """An algorithm over preference data of `kind` with the run's `reference:` settings."""
  ref = run.cfg.reference
  precomputed = needs_reference and ref.mode == "precomputed"

  def batches(split, policy):
    source = preference_batches(run, split, kind, policy=policy, shared_prompt=shared_prompt)
    if source is None or not precomputed:
      return source
    return with_reference_logps(run, source, split, kind, policy, shared_prompt=shared_prompt)

  moving = needs_reference and ref.sync_every > 0
  return Algorithm(
      name=name, loss=loss, batches=batches, headline=headline,
      needs_reference=needs_reference and not precomputed, moving_reference=moving,
      after_step=reference_sync(ref.sync_every, ref.sync_alpha) if moving else None)


def make_dpo(run) -> Algorithm:
  """The DPO family for a built run (`jaxpost.train.build`); settings from `dpo:`."""
  p = run.cfg.dpo
  loss = functools.partial(dpo_loss, config=run.config, loss_type=p.loss_type, beta=p.beta,
                           label_smoothing=p.label_smoothing, gamma=p.gamma,
                           length_normalize=p.length_normalize, sft_weight=p.sft_weight,
                           **run.model_kwargs)
  return _preference(
      run, "dpo", "paired",
      lambda params, batch, rng, frozen: loss(params, batch, rng, ref_params=frozen.reference),
      p.needs_reference, "rewards/accuracies", shared_prompt=p.shared_prompt)


def make_kto(run) -> Algorithm:
  """KTO for a built run (`jaxpost.train.build`); settings from `kto:`."""
  k = run.cfg.kto
  loss = functools.partial(kto_loss, config=run.config, beta=k.beta,
                           desirable_weight=k.desirable_weight,
                           undesirable_weight=k.undesirable_weight, **run.model_kwargs)
  return _preference(
      run, "kto", "unpaired",
      lambda params, batch, rng, frozen: loss(params, batch, rng, ref_params=frozen.reference),
      True, "rewards/margins")
