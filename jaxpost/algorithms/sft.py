"""Supervised fine-tuning: token cross-entropy on the trained tokens (`jaxpost.losses.sft_loss`).

Its batches are packed rows of chat, prompt + completion or plain text
(`jaxpost.data.build_sft_batches`); held out, it also reports perplexity.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxpost.algorithms.base import Algorithm, Offline
from jaxpost.algorithms.replay import training_batches
from jaxpost.data import build_sft_batches
from jaxpost.losses import sft_loss


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
  """exp(held-out loss), capped at exp(50)."""
  if "loss" not in metrics:
    return metrics
  return {**metrics, "perplexity": float(np.exp(min(metrics["loss"], 50.0)))}


def sft_batches(run, split: str, kind: str = "sft", path: str | None = None,
                example_index: bool = False, policy=None) -> Offline | None:
  """The run's SFT batches of `split` (None where the run has no such data): shuffled and
  endless for "train" (paced by `data.curriculum` if set, its `loss` score needs the start
  `policy`; mixed with `data.replay` if set), one pass padded to full batches for "eval".
  `path` replaces the run's file of that split (e.g. seq-KD's teacher answers);
  `example_index` adds the field of that name (`jaxpost.data.BatchIterator`)."""
  d, t = run.cfg.data, run.cfg.train
  path = path or run.data.path(kind, split)
  if path is None:
    return None
  training = split == "train"
  build = functools.partial(
      build_sft_batches, tokenizer=run.tokenizer, format=d.format, seq_len=d.seq_len,
      pack=d.pack, max_length=d.max_length, on_bad_row=d.on_bad_row, train_on=d.train_on,
      shuffle=d.shuffle and training, epochs=None if training else 1, drop_remainder=training,
      example_index=example_index)
  if training:
    return Offline(training_batches(run, build, path, kind, policy))
  return Offline(build(path, batch_size=t.batch_size, seed=t.seed))


def make(run) -> Algorithm:
  """SFT for a built run (`jaxpost.train.build`)."""
  loss = functools.partial(sft_loss, config=run.config, **run.model_kwargs)
  return Algorithm(
      name="sft",
      loss=lambda params, batch, rng, frozen: loss(params, batch, rng),
      batches=lambda split, policy: sft_batches(run, split, policy=policy),
      eval_metrics=perplexity)
