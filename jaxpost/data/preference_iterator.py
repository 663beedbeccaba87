"""`PreferenceIterator`: fixed-shape batches of preference items, shuffled by epoch, resumable.

The schedule is `BatchIterator`'s without packing: items (pairs, or KTO rows) are tokenised
once and held in memory; epoch e takes them in `np.random.default_rng([seed, e])`'s permutation
(or in data order), `batch_size` at a time, and a `collate` function (`preference.pair_batch`,
`preference.kto_batch`) lays each batch out. The state is (epoch, batches taken in the epoch)
and a fingerprint of the data and settings, so a restored iterator yields exactly the batches
an uninterrupted one would have.

Each epoch is batched on its own: with `drop_remainder` its last partial batch is dropped,
without it the batch is completed with padding items (None to `collate`), so every batch has
the same shape and a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxpost.data.packing import TruncationStats

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PreferenceStats:
  """What went into the batches.

  examples: items batched (pairs, or KTO rows); tokens and target_tokens count every sequence
  (both sides of a pair); truncated_examples, truncated_tokens, dropped_examples: what
  truncation cut (an item is dropped when it leaves no completion token, or identical sides);
  desirable / undesirable: KTO label counts (None for pairs).
  """

  examples: int
  tokens: int
  target_tokens: int
  skipped_rows: dict[str, int]
  truncated_examples: int
  truncated_tokens: int
  dropped_examples: int
  batches_per_epoch: int
  desirable: int | None = None
  undesirable: int | None = None

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _truncate(items: list[Any], max_length: int | None,
              max_prompt_length: int | None) -> tuple[list[Any], TruncationStats]:
  """Items cut by their `truncate`, those left untrainable dropped; what was cut."""
  kept, truncated, tokens, dropped = [], 0, 0, 0
  for item in items:
    cut = item.truncate(max_length, max_prompt_length)
    lost = sum(len(a) - len(b) for a, b in zip(item.examples, cut.examples))
    truncated, tokens = truncated + (lost > 0), tokens + lost
    if cut.trainable:
      kept.append(cut)
    else:
      dropped += 1
  return kept, TruncationStats(truncated, tokens, dropped)


class PreferenceIterator(Iterator[dict[str, np.ndarray]]):
  """Batches of preference items, `collate(items, seq_len, pad_id=, max_length=)` each.

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
      raise ValueError("No preference items to batch (every row was skipped or dropped).")
    self.collate, self.batch_size, self.seq_len = collate, batch_size, seq_len
    self.shuffle, self.seed, self.drop_remainder = shuffle, seed, drop_remainder
    self.epochs, self.pad_id = epochs, pad_id
    self._fingerprint = self._compute_fingerprint(max_length, max_prompt_length)
    self._order_cache: tuple[int, np.ndarray] | None = None
    self._epoch, self._batch = 0, 0
    if self.batches_per_epoch == 0:
      raise ValueError(f"{len(self._items)} items are fewer than batch_size={batch_size}; "
                       "lower batch_size or use drop_remainder=False.")
    if state is not None:
      self.restore(state)

  # -- the schedule ------------------------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    """The items' order in `epoch` (cached for the epoch being iterated)."""
    if self._order_cache is None or self._order_cache[0] != epoch:
      n = len(self._items)
      order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
               else np.arange(n))
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  @property
  def batches_per_epoch(self) -> int:
    n = len(self._items)
    return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

  def __iter__(self) -> PreferenceIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch >= self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    if self.epochs is not None and self._epoch >= self.epochs:
      raise StopIteration
    start = self._batch * self.batch_size
    indices = self._order(self._epoch)[start:start + self.batch_size]
    items = [self._items[i] for i in indices]
    items += [None] * (self.batch_size - len(items))  # padding items, if not dropped
    self._batch += 1
    batch = self.collate(items, self.seq_len, pad_id=self.pad_id, max_length=self.limit)
    # which item each row is (-1: padding), e.g. to look up precomputed reference log-probs
    batch["index"] = np.full((self.batch_size,), -1, np.int32)
    batch["index"][:len(indices)] = indices
    return batch

  @property
  def fingerprint(self) -> str:
    """A hash of the items and of every setting that changes the batches."""
    return self._fingerprint

  # -- exact resume --------------------------------------------------------------------------------

  def _compute_fingerprint(self, max_length: int | None, max_prompt_length: int | None) -> str:
    """A hash of the items and of every setting that changes the batches."""
    digest = hashlib.sha256(json.dumps(
        [getattr(self.collate, "__name__", repr(self.collate)), self.batch_size, self.seq_len,
         self.shuffle, self.seed, self.drop_remainder, max_length, max_prompt_length,
         self.pad_id, len(self._items)]).encode())
    for item in self._items:
      digest.update(json.dumps([item.prompt_length, getattr(item, "label", None),
                                [len(e) for e in item.examples]]).encode())
      for example in item.examples:
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
      raise ValueError(f"Cannot restore a preference iterator state of version "
                       f"{state.get('version')!r}; this is version {_STATE_VERSION}.")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError("The preference iterator state was saved over other data or settings "
                       "(its fingerprint differs): the same items, collate, batch_size, seq_len, "
                       "shuffle, seed, drop_remainder, max_length, max_prompt_length and pad_id "
                       "are needed to resume exactly.")
    self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

  # -- statistics -------------------------------------------------------------------------------

  @property
  def num_examples(self) -> int:
    return len(self._items)

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from."""
    return self._epoch if self._batch < self.batches_per_epoch else self._epoch + 1

  @property
  def stats(self) -> PreferenceStats:
    examples = [e for item in self._items for e in item.examples]
    labels = [item.label for item in self._items if hasattr(item, "label")]
    t = self._truncation
    return PreferenceStats(
        examples=len(self._items), tokens=sum(len(e) for e in examples),
        target_tokens=sum(e.num_targets for e in examples), skipped_rows=dict(self._skipped),
        truncated_examples=t.truncated_examples, truncated_tokens=t.truncated_tokens,
        dropped_examples=t.dropped_examples, batches_per_epoch=self.batches_per_epoch,
        desirable=sum(labels) if labels else None,
        undesirable=len(labels) - sum(labels) if labels else None)
