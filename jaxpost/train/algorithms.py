"""Algorithms: a loss over model params plus what makes its batches, chosen at the edge.

    algo = make_algorithm(cfg, config, tokenizer, train_path, eval_path)
    algo.loss_fn(params, batch, rng[, ref_params=...]) -> (loss, metrics)

`sft` (token cross-entropy), `reward` (Bradley-Terry reward model), `dpo` (the DPO family:
`preference.loss_type`) and `kto`. Each is one pure loss function from `jaxpost.losses` (or
`jaxpost.reward`) bound to its options with `functools.partial`; the update step is the same.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np

from jaxpost.config import RunConfig
from jaxpost.data import build_sft_batches
from jaxpost.losses import sft_loss
from jaxpost.losses.dpo import dpo_loss, kto_loss


@dataclasses.dataclass
class Algorithm:
  name: str
  loss_fn: Callable[..., Any]
  needs_reference: bool  # the loss wants `ref_params` (in-step reference)
  make_batches: Callable[..., Iterator[dict[str, np.ndarray]]]  # (path, train: bool)
  headline: str  # the metric the progress bar shows next to the loss


def tokens_in(batch: dict[str, np.ndarray]) -> int:
  """Real tokens of a batch (every side and KL row included), for tokens/s."""
  n = int(batch["segment_ids"].astype(bool).sum())
  if "kl_segment_ids" in batch:
    n += int(batch["kl_segment_ids"].astype(bool).sum())
  return n


def make_algorithm(cfg: RunConfig, config, tokenizer) -> Algorithm:
  d, t, p = cfg.data, cfg.train, cfg.preference
  compute_dtype = jnp.dtype(cfg.model.compute_dtype) if cfg.model.compute_dtype else None
  common = dict(config=config, compute_dtype=compute_dtype, remat=cfg.model.remat)

  if cfg.algorithm == "sft":
    def batches(path, train):
      return build_sft_batches(path, tokenizer, format=d.format, seq_len=d.seq_len,
                               batch_size=t.batch_size, pack=d.pack, seed=t.seed,
                               max_length=d.max_length, on_bad_row=d.on_bad_row,
                               train_on=d.train_on, shuffle=d.shuffle and train,
                               epochs=None if train else 1, drop_remainder=train)
    return Algorithm("sft", functools.partial(sft_loss, **common), False, batches, "loss")

  from jaxpost.data.preference import (  # pylint: disable=import-outside-toplevel
      build_kto_batches, build_preference_batches)
  builder = build_kto_batches if cfg.algorithm == "kto" else build_preference_batches

  def pref_batches(path, train):
    return builder(path, tokenizer, seq_len=d.seq_len, batch_size=t.batch_size,
                   max_prompt_length=p.max_prompt_length, max_length=d.max_length, seed=t.seed,
                   on_bad_row=d.on_bad_row, shuffle=d.shuffle and train,
                   epochs=None if train else 1, drop_remainder=train)

  if cfg.algorithm == "reward":
    from jaxpost.reward import reward_loss  # pylint: disable=import-outside-toplevel
    loss = functools.partial(reward_loss, margin=p.margin or None,
                             center_coefficient=p.center_coefficient, **common)
    return Algorithm("reward", loss, False, pref_batches, "accuracy")
  in_step = p.reference == "in_step"
  if cfg.algorithm == "kto":
    loss = functools.partial(kto_loss, beta=p.beta, desirable_weight=p.desirable_weight,
                             undesirable_weight=p.undesirable_weight, **common)
    return Algorithm("kto", loss, in_step, pref_batches, "rewards/margins")
  loss = functools.partial(dpo_loss, loss_type=p.loss_type, beta=p.beta,
                           label_smoothing=p.label_smoothing, gamma=p.gamma,
                           length_normalize=p.length_normalize, sft_weight=p.sft_weight,
                           **common)
  return Algorithm("dpo", loss, in_step and p.needs_reference, pref_batches,
                   "rewards/accuracies")


class WithReference(Iterator[dict[str, np.ndarray]]):
  """Adds precomputed reference log-probs (`ref_logps` [B, 2], looked up by each row's item
  `index`) to the batches of a preference iterator; state and restore pass through."""

  def __init__(self, batches, table: np.ndarray):
    self.batches, self.table = batches, table

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.batches)
    index = batch["index"]
    batch["ref_logps"] = np.where(index[:, None] >= 0, self.table[np.maximum(index, 0)],
                                  0.0).astype(np.float32)
    return batch

  def state(self):
    return self.batches.state()

  def restore(self, state):
    self.batches.restore(state)
