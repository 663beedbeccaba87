"""`BatchIterator`: fixed-shape numpy batches over epochs, deterministic and exactly resumable.

Examples are tokenised once, up front, and held in memory (the post-training sets this is for
are small: tokens cost 4 bytes each), so an epoch's batches are a pure function of
(examples, config, seed, epoch): the order is `np.random.default_rng([seed, epoch])`'s
permutation of the examples, the rows are that order packed greedily (`packing.plan_rows`),
the batches are consecutive rows. The iterator's state is just (epoch, batches taken in the
epoch); restoring recomputes the epoch's plan (from lengths only: cheap) and continues, so the
next batches are exactly those an uninterrupted iterator would have produced (the schedule is
`epochs.EpochIterator`'s, its units the packed rows).

Each epoch is batched on its own: with `drop_remainder` its last partial batch is dropped,
without it the batch is filled with all-padding rows (segment 0, nothing trained), so every
batch has the same shape and a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data.epochs import (EpochIterator, InputStats, example_bytes, files_of,
                                 fingerprint_of, nothing_to_batch)
from jaxpost.data.formats import Example, Tokenized
from jaxpost.data.packing import (TruncationStats, make_rows, packing_efficiency, plan_rows,
                                  truncate)


@dataclasses.dataclass(frozen=True)
class DataStats(InputStats):
  """What went into the batches (`InputStats`), and how it packed. Packing figures are those
  of epoch 0 (shuffling changes the packing of later epochs slightly)."""

  rows_per_epoch: int
  batches_per_epoch: int
  packing_efficiency: float


def _as_examples(data: Any) -> tuple[list[Example], dict[str, int]]:
  """Examples and skipped-row counts from `Tokenized`, Examples, or rows with tokens/loss_mask."""
  if isinstance(data, Tokenized):
    return list(data.examples), dict(data.skipped)
  examples = []
  for i, item in enumerate(data):
    if isinstance(item, Example):
      examples.append(item)
    elif isinstance(item, Mapping) and "tokens" in item and "loss_mask" in item:
      examples.append(Example(np.asarray(item["tokens"]), np.asarray(item["loss_mask"])))
    else:
      raise TypeError(f"Item {i}: expected an Example or a mapping with 'tokens' and "
                      f"'loss_mask', got {type(item).__name__}.")
  return examples, {}


class BatchIterator(EpochIterator):
  """Batches {"tokens", "targets", "loss_mask", "segment_ids", "positions"}, each
  [batch_size, seq_len] (int32; loss_mask bool), laid out as `jaxpost.data.packing` describes.

  Args:
    examples_or_dataset: `Tokenized` (from `tokenize_rows`; its skipped-row counts go into
      `stats`), a sequence of `Example`, or rows (a `datasets.Dataset`, a list of dicts) with
      "tokens" and "loss_mask".
    batch_size, seq_len: the batch shape.
    pack: pack several examples per row; else one per row, right-padded.
    shuffle: a new order every epoch, from `seed` and the epoch number; else data order.
    drop_remainder: drop each epoch's last partial batch; else fill it with padding rows.
    epochs: stop after this many epochs; None: never stop.
    max_length: truncate examples to this many tokens (they are truncated to `seq_len` anyway).
    pad_id: the token id written on padding (never attended to nor trained).
    example_index: batches also carry "example_index" [batch_size, seq_len] (`make_rows`):
      the index in `examples` of each token's example, -1 on padding.
    state: a `state()` to resume from (same as calling `restore`).
  """

  _NAME = "data"
  _RESUME_NEEDS = ("examples, batch_size, seq_len, pack, shuffle, seed, drop_remainder, "
                   "max_length and pad_id")

  def __init__(self, examples_or_dataset: Any, *, batch_size: int, seq_len: int,
               pack: bool = True, shuffle: bool = True, seed: int = 0,
               drop_remainder: bool = True, epochs: int | None = None,
               max_length: int | None = None, pad_id: int = 0, example_index: bool = False,
               state: Mapping[str, Any] | None = None) -> None:
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"Need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}.")
    examples, self._skipped = _as_examples(examples_or_dataset)
    limit = seq_len if max_length is None else min(max_length, seq_len)
    self._examples, self._truncation = truncate(examples, limit)
    if not self._examples:
      t = self._truncation
      raise ValueError(nothing_to_batch("examples", self._skipped, t.dropped_examples,
                                        t.dropped_rows, limit))
    self._lengths = np.array([len(e) for e in self._examples], np.int64)
    self.seq_len, self.pack, self.pad_id = seq_len, pack, pad_id
    self.example_index = example_index
    self._unit = f"rows of {seq_len} tokens"
    self._source = files_of(e.where for e in self._examples)
    settings = [batch_size, seq_len, pack, shuffle, seed, drop_remainder, max_length, pad_id,
                len(self._examples)]
    chunks = itertools.chain([self._lengths.tobytes()],
                             *(example_bytes(e) for e in self._examples))
    super().__init__(len(self._examples), batch_size=batch_size, shuffle=shuffle, seed=seed,
                     drop_remainder=drop_remainder, epochs=epochs,
                     fingerprint=fingerprint_of(settings, chunks), state=state)

  def _units(self, order: np.ndarray) -> list[list[int]]:
    """The epoch's rows, each a list of example indices: `order` packed (`plan_rows`)."""
    return plan_rows(self._lengths, order, self.seq_len, pack=self.pack)

  def _collate(self, rows: Sequence[list[int]]) -> dict[str, np.ndarray]:
    rows = list(rows) + [[]] * (self.batch_size - len(rows))  # padding rows, if not dropped
    return make_rows(self._examples, rows, self.seq_len, pad_id=self.pad_id,
                     example_index=self.example_index)

  def item_lengths(self) -> np.ndarray:
    return self._lengths.copy()

  def item_wheres(self) -> list[str | None]:
    return [e.where for e in self._examples]

  def item_examples(self) -> list[Example]:
    return list(self._examples)

  @property
  def examples(self) -> Sequence[Example]:
    """The examples batched (after truncation), in the order `example_index` counts them."""
    return self._examples

  @property
  def stats(self) -> DataStats:
    plan = self._units(self._order(0))
    t: TruncationStats = self._truncation
    return DataStats(
        examples=len(self._examples), tokens=int(self._lengths.sum()),
        target_tokens=sum(e.num_targets for e in self._examples),
        skipped_rows=dict(self._skipped), truncated_examples=t.truncated_examples,
        truncated_tokens=t.truncated_tokens, dropped_examples=t.dropped_examples,
        truncated_target_tokens=t.truncated_target_tokens,
        truncated_rows=list(t.truncated_rows), dropped_rows=list(t.dropped_rows),
        rows_per_epoch=len(plan), batches_per_epoch=self._count_batches(len(plan)),
        packing_efficiency=packing_efficiency(self._lengths, plan, self.seq_len))
