"""`BatchIterator`: fixed-shape numpy batches over epochs, deterministic and exactly resumable.

Examples are tokenised once, up front, and held in memory (the post-training sets this is for
are small: tokens cost 4 bytes each), so an epoch's batches are a pure function of
(examples, config, seed, epoch): the order is `np.random.default_rng([seed, epoch])`'s
permutation of the examples, the rows are that order packed greedily (`packing.plan_rows`),
the batches are consecutive rows. The iterator's state is just (epoch, batches taken in the
epoch); restoring recomputes the epoch's plan (from lengths only: cheap) and continues, so the
next batches are exactly those an uninterrupted iterator would have produced.

Each epoch is batched on its own: with `drop_remainder` its last partial batch is dropped,
without it the batch is filled with all-padding rows (segment 0, nothing trained), so every
batch has the same shape and a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxpost.data.formats import Example, Tokenized
from jaxpost.data.packing import (TruncationStats, make_rows, packing_efficiency, plan_rows,
                                  truncate)

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataStats:
  """What went into the batches. Packing figures are those of epoch 0 (shuffling changes
  the packing of later epochs slightly)."""

  examples: int
  tokens: int
  target_tokens: int
  skipped_rows: dict[str, int]
  truncated_examples: int
  truncated_tokens: int
  dropped_examples: int
  rows_per_epoch: int
  batches_per_epoch: int
  packing_efficiency: float

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


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


class BatchIterator(Iterator[dict[str, np.ndarray]]):
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
    state: a `state()` to resume from (same as calling `restore`).
  """

  def __init__(self, examples_or_dataset: Any, *, batch_size: int, seq_len: int,
               pack: bool = True, shuffle: bool = True, seed: int = 0,
               drop_remainder: bool = True, epochs: int | None = None,
               max_length: int | None = None, pad_id: int = 0,
               state: Mapping[str, Any] | None = None) -> None:
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"Need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}.")
    examples, self._skipped = _as_examples(examples_or_dataset)
    limit = seq_len if max_length is None else min(max_length, seq_len)
    self._examples, self._truncation = truncate(examples, limit)
    if not self._examples:
      raise ValueError("No examples to batch (every row was skipped or dropped).")
    self._lengths = np.array([len(e) for e in self._examples], np.int64)
    self.batch_size, self.seq_len, self.pack, self.shuffle = batch_size, seq_len, pack, shuffle
    self.seed, self.drop_remainder, self.epochs, self.pad_id = seed, drop_remainder, epochs, pad_id
    self._fingerprint = self._compute_fingerprint(max_length)
    self._plan_cache: tuple[int, list[list[int]]] | None = None
    self._epoch, self._batch = 0, 0
    if self.batches_in_epoch(0) == 0:
      raise ValueError(f"The data fills {len(self._plan(0))} rows of {seq_len} tokens, fewer "
                       f"than batch_size={batch_size}; lower batch_size or use "
                       "drop_remainder=False.")
    if state is not None:
      self.restore(state)

  # -- the schedule ------------------------------------------------------------------------------

  def _make_plan(self, epoch: int) -> list[list[int]]:
    """The rows of `epoch`, each a list of example indices."""
    n = len(self._examples)
    order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
             else np.arange(n))
    return plan_rows(self._lengths, order, self.seq_len, pack=self.pack)

  def _plan(self, epoch: int) -> list[list[int]]:
    """`_make_plan(epoch)`, cached for the epoch being iterated."""
    if self._plan_cache is None or self._plan_cache[0] != epoch:
      self._plan_cache = (epoch, self._make_plan(epoch))
    return self._plan_cache[1]

  def batches_in_epoch(self, epoch: int) -> int:
    """Number of batches epoch `epoch` yields (constant unless packing a shuffled order)."""
    return self._count_batches(len(self._plan(epoch)))

  def _count_batches(self, rows: int) -> int:
    return rows // self.batch_size if self.drop_remainder else -(-rows // self.batch_size)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while self.epochs is None or self._epoch < self.epochs:
      if self._batch < self.batches_in_epoch(self._epoch):
        plan = self._plan(self._epoch)
        rows = plan[self._batch * self.batch_size:(self._batch + 1) * self.batch_size]
        rows = rows + [[]] * (self.batch_size - len(rows))  # padding rows, if not dropped
        self._batch += 1
        return make_rows(self._examples, rows, self.seq_len, pad_id=self.pad_id)
      if self._batch == 0:
        raise RuntimeError(f"Epoch {self._epoch} packs into fewer rows than batch_size="
                           f"{self.batch_size}; lower batch_size or use drop_remainder=False.")
      self._epoch, self._batch = self._epoch + 1, 0
    raise StopIteration

  # -- exact resume --------------------------------------------------------------------------------

  def _compute_fingerprint(self, max_length: int | None) -> str:
    """A hash of the examples and of every setting that changes the batches."""
    digest = hashlib.sha256(json.dumps(
        [self.batch_size, self.seq_len, self.pack, self.shuffle, self.seed, self.drop_remainder,
         max_length, self.pad_id, len(self._examples)]).encode())
    digest.update(self._lengths.tobytes())
    for example in self._examples:
      digest.update(example.tokens.tobytes())
      digest.update(np.packbits(example.loss_mask).tobytes())
    return digest.hexdigest()[:16]

  def state(self) -> dict[str, Any]:
    """Where the iterator is, as JSON-serialisable values: the epoch, the batches already
    taken in it, and a fingerprint of the data and settings (checked by `restore`)."""
    return {"version": _STATE_VERSION, "epoch": self._epoch, "batch": self._batch,
            "seed": self.seed, "fingerprint": self._fingerprint}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `state()` of an iterator over the same data and settings).

    Raises:
      ValueError: the state is from another version, other data or other settings.
    """
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"Cannot restore a data iterator state of version "
                       f"{state.get('version')!r}; this is version {_STATE_VERSION}.")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError("The data iterator state was saved over other data or settings (its "
                       "fingerprint differs): the same examples, batch_size, seq_len, pack, "
                       "shuffle, seed, drop_remainder, max_length and pad_id are needed to "
                       "resume exactly.")
    self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

  # -- statistics -------------------------------------------------------------------------------

  @property
  def num_examples(self) -> int:
    return len(self._examples)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from."""
    return self._epoch

  @property
  def stats(self) -> DataStats:
    plan = self._make_plan(0)
    t: TruncationStats = self._truncation
    return DataStats(
        examples=len(self._examples), tokens=int(self._lengths.sum()),
        target_tokens=sum(e.num_targets for e in self._examples),
        skipped_rows=dict(self._skipped), truncated_examples=t.truncated_examples,
        truncated_tokens=t.truncated_tokens, dropped_examples=t.dropped_examples,
        rows_per_epoch=len(plan), batches_per_epoch=self._count_batches(len(plan)),
        packing_efficiency=packing_efficiency(self._lengths, plan, self.seq_len))

