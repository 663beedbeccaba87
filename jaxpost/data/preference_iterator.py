"""`PreferenceIterator`: fixed-shape batches of preference items, shuffled by epoch, resumable.

The schedule is `epochs.EpochIterator`'s (as `BatchIterator`'s) without packing: items (pairs,
or KTO rows) are tokenised once and held in memory; epoch e takes them in
`np.random.default_rng([seed, e])`'s permutation (or in data order), `batch_size` at a time, and
a `collate` function (`preference.pair_batch`, `preference.kto_batch`) lays each batch out. The
state is (epoch, batches taken in the epoch) and a fingerprint of the data and settings, so a
restored iterator yields exactly the batches an uninterrupted one would have.

Each epoch is batched on its own: with `drop_remainder` its last partial batch is dropped,
without it the batch is completed with padding items (None to `collate`), so every batch has
the same shape and a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data.epochs import (EpochIterator, InputStats, example_bytes, files_of,
                                 fingerprint_of, nothing_to_batch)
from jaxpost.data.formats import Example
from jaxpost.data.packing import NAMED_ROWS, TruncationStats


@dataclasses.dataclass(frozen=True)
class PreferenceStats(InputStats):
  """What went into the batches.

  examples: items batched (pairs, or KTO rows); tokens and target_tokens count every sequence
  (both sides of a pair); truncated_examples, truncated_tokens, dropped_examples: what
  truncation cut (an item is dropped when it leaves no completion token, or identical sides);
  desirable / undesirable: KTO label counts (None for pairs).
  """

  batches_per_epoch: int
  desirable: int | None = None
  undesirable: int | None = None

  def unit(self) -> str:
    return "pairs" if self.desirable is None else "rows"


def _truncate(items: list[Any], max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[Any], TruncationStats]:
  """Items cut by their `truncate`, those left untrainable dropped; what was cut (naming the
  rows of the first few cut and dropped items)."""
  kept, truncated, tokens, targets, dropped = [], 0, 0, 0, 0
  truncated_rows: list[str] = []
  dropped_rows: list[str] = []
  for i, item in enumerate(items):
    cut = item.truncate(max_length, max_prompt_length)
    where = item.where if item.where is not None else f"item {i}"
    lost = sum(len(a) - len(b) for a, b in zip(item.examples, cut.examples))
    truncated, tokens = truncated + (lost > 0), tokens + lost
    targets += sum(a.num_targets - b.num_targets for a, b in zip(item.examples, cut.examples))
    if lost > 0 and len(truncated_rows) < NAMED_ROWS:
      truncated_rows.append(where)
    if cut.trainable:
      kept.append(cut)
    else:
      dropped += 1
      if len(dropped_rows) < NAMED_ROWS:
        dropped_rows.append(where)
  return kept, TruncationStats(truncated, tokens, dropped, targets, tuple(truncated_rows),
                               tuple(dropped_rows))


def _item_bytes(item: Any) -> Iterator[bytes]:
  """An item's bytes for `fingerprint_of`: its prompt length, label and lengths, then its
  examples'."""
  yield json.dumps([item.prompt_length, getattr(item, "label", None),
                    [len(e) for e in item.examples]]).encode()
  for example in item.examples:
    yield from example_bytes(example)


class PreferenceIterator(EpochIterator):
  """Batches of preference items, `collate(items, seq_len, pad_id=, max_length=)` each, plus
  "index" [batch_size] int32: which item each row is (-1: padding), e.g. to look up
  precomputed reference log-probs.

  Args:
    items: `preference.PreferenceTokenized` (its skipped-row counts go into `stats`) or a list
      of `preference.Pair` / `preference.Unpaired`.
    collate: `preference.pair_batch` ([B, 2, T] arrays) or `preference.kto_batch` ([B, T]).
    batch_size, seq_len: the batch shape.
    max_length: cut every sequence to this many tokens (default and at most `seq_len`).
    max_prompt_length: keep only each prompt's last tokens.
    shuffle: a new order every epoch, from `seed` and the epoch number; else data order.
    drop_remainder: drop each epoch's last partial batch; else fill it with padding items.
    epochs: stop after this many epochs; None: never stop.
    pad_id: the token id written on padding (never attended to nor trained).
    state: a `state()` to resume from (same as calling `restore`).
  """

  _NAME = "preference"
  _RESUME_NEEDS = ("items, collate, batch_size, seq_len, shuffle, seed, drop_remainder, "
                   "max_length, max_prompt_length and pad_id")

  def __init__(self, items: Any, *, collate: Callable[..., dict[str, np.ndarray]],
               batch_size: int, seq_len: int, max_length: int | None = None,
               max_prompt_length: int | None = None, shuffle: bool = True, seed: int = 0,
               drop_remainder: bool = True, epochs: int | None = None, pad_id: int = 0,
               state: Mapping[str, Any] | None = None) -> None:
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"Need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}.")
    if max_prompt_length is not None and max_prompt_length < 1:
      raise ValueError(f"max_prompt_length should be at least 1, got {max_prompt_length}.")
    if max_length is not None and max_length < 2:
      raise ValueError(f"max_length should be at least 2 (an input and a target), got "
                       f"{max_length}.")
    skipped = getattr(items, "skipped", {})
    items = list(getattr(items, "items", items))
    self.limit = seq_len if max_length is None else min(max_length, seq_len)
    self._items, self._truncation = _truncate(items, self.limit, max_prompt_length)
    self._skipped = dict(skipped)
    if not self._items:
      t = self._truncation
      raise ValueError(nothing_to_batch("preference items", self._skipped, t.dropped_examples,
                                        t.dropped_rows, self.limit))
    self.collate, self.seq_len, self.pad_id = collate, seq_len, pad_id
    self._source = files_of(item.where for item in self._items)
    settings = [getattr(collate, "__name__", repr(collate)), batch_size, seq_len, shuffle, seed,
                drop_remainder, max_length, max_prompt_length, pad_id, len(self._items)]
    chunks = (chunk for item in self._items for chunk in _item_bytes(item))
    super().__init__(len(self._items), batch_size=batch_size, shuffle=shuffle, seed=seed,
                     drop_remainder=drop_remainder, epochs=epochs,
                     fingerprint=fingerprint_of(settings, chunks), state=state)

  @property
  def batches_per_epoch(self) -> int:
    return self._count_batches(len(self._items))

  def batches_in_epoch(self, epoch: int) -> int:
    """`batches_per_epoch`, whatever the epoch (every epoch has every item)."""
    del epoch
    return self.batches_per_epoch

  def _collate(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    items = [self._items[i] for i in indices]
    items += [None] * (self.batch_size - len(items))  # padding items, if not dropped
    batch = self.collate(items, self.seq_len, pad_id=self.pad_id, max_length=self.limit)
    batch["index"] = np.full((self.batch_size,), -1, np.int32)
    batch["index"][:len(indices)] = indices
    return batch

  def item_lengths(self) -> np.ndarray:
    """Tokens of every item: a pair's chosen and rejected sequences together."""
    return np.array([sum(len(e) for e in item.examples) for item in self._items], np.int64)

  def item_wheres(self) -> list[str | None]:
    return [item.where for item in self._items]

  def item_examples(self) -> list[Example]:
    """A pair's chosen sequence, a KTO row's sequence."""
    return [item.examples[0] for item in self._items]

  @property
  def stats(self) -> PreferenceStats:
    examples = [e for item in self._items for e in item.examples]
    labels = [item.label for item in self._items if hasattr(item, "label")]
    t = self._truncation
    return PreferenceStats(
        examples=len(self._items), tokens=sum(len(e) for e in examples),
        target_tokens=sum(e.num_targets for e in examples), skipped_rows=dict(self._skipped),
        truncated_examples=t.truncated_examples, truncated_tokens=t.truncated_tokens,
        dropped_examples=t.dropped_examples, truncated_target_tokens=t.truncated_target_tokens,
        truncated_rows=list(t.truncated_rows), dropped_rows=list(t.dropped_rows),
        batches_per_epoch=self.batches_per_epoch,
        desirable=sum(labels) if labels else None,
        undesirable=len(labels) - sum(labels) if labels else None)
