"""`EpochIterator`: the epoch schedule shared by SFT and preference batches, exactly resumable.

Data are held in memory as `num_items` items (examples, pairs, KTO rows). Epoch e takes them in
the order

    order_e = np.random.default_rng([seed, e]).permutation(num_items)   (shuffle)
            = arange(num_items)                                          (no shuffle)

and a subclass turns that order into the epoch's units (`_units`: the items themselves, or rows
packed from them). Batch i of the epoch is units[i * B:(i + 1) * B] (B = batch_size), laid out
by the subclass (`_collate`). Each epoch is batched on its own: with `drop_remainder` its last
partial batch is dropped, without it the short list of units goes to `_collate`, which pads it
to B, so every batch has the same shape and a jitted step compiles once. An epoch thus yields

    batches_in_epoch(e) = floor(len(units_e) / B)   (drop_remainder)
                        = ceil(len(units_e) / B)    (otherwise)

Everything is a pure function of (data, settings, seed, epoch), so the state is just (epoch,
batches taken in it) and a fingerprint of the data and settings: a restored iterator
recomputes the epoch's units and yields exactly the batches an uninterrupted one would have.

With a curriculum (`use_curriculum`, `jaxpost.data.curriculum`), the first `full_at_step`
batches are drawn easiest first, each a pure function of (scores, seed, batch number), and the
epochs above follow; the state adds the curriculum batches taken.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data.curriculum import Curriculum, batch_units
from jaxpost.data.formats import Example

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InputStats:
  """What went into the batches: the part of `DataStats` and `PreferenceStats` they share.

  examples: items batched (SFT examples, pairs, KTO rows); tokens, target_tokens: over every
  sequence (both sides of a pair); skipped_rows: rows skipped, by reason; truncated_examples,
  truncated_tokens, dropped_examples: what truncation cut (dropped items are not in
  `examples`); truncated_target_tokens: the trained tokens among the tokens cut;
  truncated_rows, dropped_rows: the rows ("data/train.jsonl row 17") of the first few
  truncated and dropped items (`packing.NAMED_ROWS`). `describe_truncation` makes a warning of
  them.
  """

  examples: int
  tokens: int
  target_tokens: int
  skipped_rows: dict[str, int]
  truncated_examples: int
  truncated_tokens: int
  dropped_examples: int
  truncated_target_tokens: int
  truncated_rows: list[str]
  dropped_rows: list[str]

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def unit(self) -> str:
    """What an item is called in messages ("examples", "pairs", "rows")."""
    return "examples"


def _name_rows(rows: Sequence[str], count: int) -> str:
  """"a.jsonl row 17, row 90, b.jsonl row 3, ..." (the file named once for consecutive rows;
  "..." when `count` items were cut and fewer are named)."""
  parts, last = [], None
  for where in rows:
    file, sep, number = where.rpartition(" row ")
    parts.append(f"row {number}" if sep and file == last else where)
    last = file if sep else None
  if count > len(rows):
    parts.append("...")
  return ", ".join(parts)


def describe_truncation(stats: InputStats, seq_len: int, *, max_length: int | None = None,
                        max_prompt_length: int | None = None) -> str | None:
  """A one-line warning saying what truncation cut and which rows, or None if it cut nothing.

  `seq_len`, `max_length`, `max_prompt_length`: the limits the batches were made with (named
  as the run config's data.* keys). The line (without a "warning: " prefix, which the caller
  adds as it logs) reads, for example:

    12 of 3000 examples were longer than data.seq_len=128 tokens and were cut, losing 950
    tokens (312 of them trained): data/train.jsonl row 17, row 90, row 112, ...; 3 of them
    were dropped, left with nothing to train on: data/train.jsonl row 90, ...; raise
    data.seq_len or shorten those rows

  A trainer logs it once, and the counts (`truncated_examples`, `dropped_examples`) as metrics.
  """
  if not stats.truncated_examples and not stats.dropped_examples:
    return None
  limits = ([f"data.max_length={max_length} tokens"]
            if max_length is not None and max_length < seq_len
            else [f"data.seq_len={seq_len} tokens"])
  if max_prompt_length is not None:
    limits.append(f"data.max_prompt_length={max_prompt_length} prompt tokens")
  total = stats.examples + stats.dropped_examples
  text = (f"{stats.truncated_examples} of {total} {stats.unit()} were longer than "
          f"{' or '.join(limits)} and were cut, losing {stats.truncated_tokens} tokens "
          f"({stats.truncated_target_tokens} of them trained)")
  if stats.truncated_rows:
    text += f": {_name_rows(stats.truncated_rows, stats.truncated_examples)}"
  if stats.dropped_examples:
    text += (f"; {stats.dropped_examples} of them were dropped, left with nothing to train on: "
             f"{_name_rows(stats.dropped_rows, stats.dropped_examples)}")
  keys = " or ".join(limit.split("=")[0] for limit in limits)
  return f"{text}; raise {keys} or shorten those rows"


def nothing_to_batch(unit: str, skipped: Mapping[str, int], dropped: int,
                     dropped_rows: Sequence[str], limit: int) -> str:
  """The error of an iterator left with no item: what was skipped and dropped, and where."""
  causes = []
  if skipped:
    counts = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    n = sum(skipped.values())
    causes.append(f"{n} {'row was' if n == 1 else 'rows were'} skipped as bad ({counts}; "
                  "on_bad_row='error' names the first)")
  if dropped:
    causes.append(f"truncation to {limit} tokens left {dropped} of the {unit} with nothing to "
                  f"train on ({_name_rows(dropped_rows, dropped)}); raise data.seq_len or "
                  "data.max_length")
  return f"No {unit} to batch: " + ("; ".join(causes) if causes else "there are none") + "."


def files_of(wheres: Iterable[str | None], limit: int = 3) -> str | None:
  """The files named by origins "file row N" (the first `limit`, in order), or None."""
  files = list(dict.fromkeys(w.rpartition(" row ")[0] for w in wheres if w and " row " in w))
  if not files:
    return None
  return ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit
                                     else "")


def fingerprint_of(settings: Sequence[Any], chunks: Iterable[bytes]) -> str:
  """16 hex digits of sha256(json(settings), then every chunk): what `state()` records of the
  data and settings, so that `restore` refuses a state saved over others."""
  digest = hashlib.sha256(json.dumps(list(settings)).encode())
  for chunk in chunks:
    digest.update(chunk)
  return digest.hexdigest()[:16]


def example_bytes(example: Example) -> Iterator[bytes]:
  """An example's bytes for `fingerprint_of`: its tokens, then its loss mask bit-packed."""
  yield example.tokens.tobytes()
  yield np.packbits(example.loss_mask).tobytes()


class EpochIterator(Iterator[dict[str, np.ndarray]]):
  """Fixed-shape batches over epochs (the module docstring's schedule); `state` / `restore`.

  A subclass sets up its data and settings, hashes them (`fingerprint_of`), calls
  `EpochIterator.__init__`, and defines
    `_units(order)`: the epoch's units from its item order (default: the order itself);
    `_collate(units)`: one batch from at most `batch_size` units (padding it to `batch_size`).
  `_NAME` names the iterator in `restore`'s errors and `_RESUME_NEEDS` lists what must be the
  same to resume; `_unit` names the units in the error for an epoch without a batch.

  Args:
    num_items: how many items are ordered in each epoch.
    batch_size: units per batch.
    shuffle: a new order every epoch, from `seed` and the epoch number; else data order.
    drop_remainder: drop each epoch's last partial batch; else `_collate` pads it.
    epochs: stop after this many epochs; None: never stop.
    fingerprint: the hash of the data and settings (`fingerprint_of`), saved by `state` and
      checked by `restore`.
    state: a `state()` to resume from (same as calling `restore`).

  Raises:
    ValueError: epoch 0 makes no batch (fewer units than `batch_size` with `drop_remainder`),
      or `state` cannot be restored.
  """

  _NAME = "data"
  _RESUME_NEEDS = "data and settings"
  _unit = "items"
  _source: str | None = None  # the data's files, for messages (`files_of`)

  def __init__(self, num_items: int, *, batch_size: int, shuffle: bool, seed: int,
               drop_remainder: bool, epochs: int | None, fingerprint: str,
               state: Mapping[str, Any] | None) -> None:
    self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
    self.drop_remainder, self.epochs = drop_remainder, epochs
    self._num_items, self._fingerprint = num_items, fingerprint
    self._units_cache: tuple[int, Sequence[Any]] | None = None
    self._epoch, self._batch = 0, 0
    self._curriculum: Curriculum | None = None
    self._ranked: np.ndarray | None = None
    self._curriculum_batch = 0
    if self.batches_in_epoch(0) == 0:
      raise ValueError(self._too_few(0))
    if state is not None:
      self.restore(state)

  # -- the schedule ------------------------------------------------------------------------------

  def _order(self, epoch: int) -> np.ndarray:
    """The items' order in `epoch`: int [num_items]."""
    if not self.shuffle:
      return np.arange(self._num_items)
    return np.random.default_rng([self.seed, epoch]).permutation(self._num_items)

  def _units(self, order: np.ndarray) -> Sequence[Any]:
    """An epoch's units, in batching order, from its item order."""
    return order

  @abc.abstractmethod
  def _collate(self, units: Sequence[Any]) -> dict[str, np.ndarray]:
    """One batch from `units` (fewer than `batch_size` in a final partial batch)."""

  def _epoch_units(self, epoch: int) -> Sequence[Any]:
    """`_units(_order(epoch))`, cached for the epoch being iterated."""
    if self._units_cache is None or self._units_cache[0] != epoch:
      self._units_cache = (epoch, self._units(self._order(epoch)))
    return self._units_cache[1]

  def _count_batches(self, units: int) -> int:
    """Batches an epoch of `units` units makes."""
    return units // self.batch_size if self.drop_remainder else -(-units // self.batch_size)

  def batches_in_epoch(self, epoch: int) -> int:
    """Number of batches epoch `epoch` yields (constant unless packing a shuffled order)."""
    return self._count_batches(len(self._epoch_units(epoch)))

  def _too_few(self, epoch: int) -> str:
    source = f" (from {self._source})" if self._source else ""
    return (f"Epoch {epoch} has {len(self._epoch_units(epoch))} {self._unit}{source}, fewer "
            f"than batch_size={self.batch_size}; lower batch_size, add data, or use "
            "drop_remainder=False.")

  def __iter__(self) -> EpochIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._in_curriculum:
      c, t = self._curriculum, self._curriculum_batch
      units = batch_units(self._units, self._ranked, c.pool_size(t, self.batch_size), t,
                          self.seed, self.batch_size)
      self._curriculum_batch += 1
      return self._collate(units)
    while self.epochs is None or self._epoch < self.epochs:
      if self._batch < self.batches_in_epoch(self._epoch):
        start = self._batch * self.batch_size
        batch = self._collate(self._epoch_units(self._epoch)[start:start + self.batch_size])
        self._batch += 1
        return batch
      if self._batch == 0:
        raise RuntimeError(self._too_few(self._epoch))
      self._epoch, self._batch = self._epoch + 1, 0
    raise StopIteration

  # -- curriculum ----------------------------------------------------------------------------------

  def use_curriculum(self, curriculum: Curriculum) -> None:
    """Draws the first `curriculum.full_at_step` batches easiest first (module docstring), then
    the epochs. Call it before taking any batch and before `restore`; it changes the
    fingerprint (a state saved without this curriculum does not restore).

    Raises:
      ValueError: not one score per item, or batches were already taken.
    """
    if len(curriculum.scores) != self._num_items:
      raise ValueError(f"The curriculum has {len(curriculum.scores)} scores for "
                       f"{self._num_items} {self._unit}.")
    if self._epoch or self._batch or self._curriculum_batch:
      raise ValueError("use_curriculum must come before the first batch.")
    self._curriculum, self._ranked = curriculum, curriculum.ranked(self.seed)
    self._fingerprint = fingerprint_of([self._fingerprint, *curriculum.settings()],
                                       [curriculum.scores.tobytes()])

  @property
  def _in_curriculum(self) -> bool:
    return (self._curriculum is not None
            and self._curriculum_batch < self._curriculum.full_at_step)

  @property
  def curriculum(self) -> Curriculum | None:
    return self._curriculum

  def competence(self) -> float:
    """The fraction of the items (easiest first) the next batch is drawn from (1: all)."""
    if not self._in_curriculum:
      return 1.0
    return self._curriculum.competence(self._curriculum_batch)

  def item_lengths(self) -> np.ndarray:
    """Tokens of every item (a curriculum's `length` score)."""
    raise NotImplementedError(f"{type(self).__name__} has no item lengths")

  def item_wheres(self) -> list[str | None]:
    """Where every item came from ("file row N"), to score it by its row."""
    raise NotImplementedError(f"{type(self).__name__} does not know its items' rows")

  def item_examples(self) -> list[Example]:
    """One example per item (the text a curriculum's `loss` score is the loss of)."""
    raise NotImplementedError(f"{type(self).__name__} has no examples to score")

  # -- exact resume --------------------------------------------------------------------------------

  @property
  def fingerprint(self) -> str:
    """A hash of the data and of every setting that changes the batches."""
    return self._fingerprint

  def state(self) -> dict[str, Any]:
    """Where the iterator is, as JSON-serialisable values: the epoch, the batches already
    taken in it, the curriculum batches taken (with a curriculum), and a fingerprint of the data and settings
    (checked by `restore`)."""
    state = {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch,
             "seed": self.seed, "fingerprint": self._fingerprint}
    if self._curriculum is not None:
      state["curriculum_batch"] = self._curriculum_batch
    return state

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `state()` of an iterator over the same data and settings).

    Raises:
      ValueError: the state is from another version, other data or other settings.
    """
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"Cannot restore a {self._NAME} iterator state of version "
                       f"{state.get('version')!r}; this is version {STATE_VERSION}.")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError(f"The {self._NAME} iterator state was saved over other data or settings "
                       f"(its fingerprint differs): the same {self._RESUME_NEEDS} are needed to "
                       "resume exactly.")
    self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
    self._curriculum_batch = int(state.get("curriculum_batch", 0))

  @property
  def num_examples(self) -> int:
    """How many items are batched each epoch."""
    return self._num_items

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from (0 during a curriculum)."""
    if self._in_curriculum:
      return 0
    return self._epoch + (self._batch >= self.batches_in_epoch(self._epoch))
