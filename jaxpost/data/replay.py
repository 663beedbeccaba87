"""Replay: a fixed share of every training batch drawn from earlier data, against forgetting.

Experience replay for continual learning (Rolnick et al. 2019, arXiv 1811.11682; Chaudhry et
al. 2019, "On tiny episodic memories", arXiv 1902.10486): while a model learns a new task, a
fraction of each batch repeats examples of the earlier ones.

    buffer = reservoir(rows, size=1000, seed=0)        # at most 1000 rows, uniform, seeded
    mixed = ReplayMix(new_data(batch_size=13), replayed(buffer, batch_size=3))
    batch = next(mixed)                                # 13 rows of new data, then 3 replayed

(3 = round(0.2 x 16): `jaxpost.config.continual.replay_units`.) The buffer is a reservoir sample (Vitter 1985, Algorithm R): one pass over the sources' rows
keeps each of the n rows with probability size / n, holding at most `size` rows at any time,
with the draws from `np.random.default_rng([seed, REPLAY_STREAM])`. The buffer is batched by an
ordinary iterator of its own (`EpochIterator`: packed rows, pairs, KTO rows or prompts,
shuffled per epoch by the seed), so every batch holds exactly k replayed units and
batch_size - k new ones, and (new data, replay) resumes exactly from the two iterators' states.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

from jaxpost.data.epochs import fingerprint_of

T = TypeVar("T")
REPLAY_STREAM = 0x4E9A  # keeps the reservoir's draws apart from the epochs' permutations
# fields holding an item number (-1: padding): a replayed item i is item n_new + i of the mix
INDEX_FIELDS = ("index", "example_index")


def reservoir(items: Iterable[T], size: int, seed: int) -> list[T]:
  """A uniform sample of at most `size` of `items`, in one pass (Algorithm R), in stream order.

  Item t (0-based) enters a full reservoir with probability size / (t + 1), replacing a slot
  drawn uniformly; the draws come from (seed, REPLAY_STREAM), so the sample is a pure function
  of (items, size, seed).
  """
  if size < 1:
    raise ValueError(f"a reservoir holds at least one item, got size={size}")
  rng = np.random.default_rng([seed, REPLAY_STREAM])
  kept: list[tuple[int, T]] = []
  for t, item in enumerate(items):
    if t < size:
      kept.append((t, item))
      continue
    j = int(rng.integers(0, t + 1))
    if j < size:
      kept[j] = (t, item)
  return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


class ReplayMix(Iterator[dict[str, np.ndarray]]):
  """Batches of `new`'s next batch followed by `replay`'s (concatenated on the batch axis).

  Both are iterators with `state()` / `restore()` and `num_examples` (`EpochIterator`s) whose
  batches have the same fields. Item numbers (`INDEX_FIELDS`) of the replayed rows are shifted
  by `new.num_examples`, so that they index `examples` (the new items, then the replayed ones),
  e.g. a distillation cache or the prompts of an RL source. Other attributes (`stats`,
  `competence`, ...) are the new data's.
  """

  def __init__(self, new: Iterator[dict[str, np.ndarray]],
               replay: Iterator[dict[str, np.ndarray]]) -> None:
    self.new, self.replay = new, replay

  def __iter__(self) -> ReplayMix:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    a, b = next(self.new), next(self.replay)
    if a.keys() != b.keys():
      raise ValueError(f"replayed batches have fields {sorted(b)}, the run's {sorted(a)}: the "
                       "replayed data must be of the run's kind")
    shift = self.new.num_examples
    out = {}
    for key, x in a.items():
      y = b[key]
      if key in INDEX_FIELDS:
        y = np.where(y >= 0, y + shift, y).astype(y.dtype)
      out[key] = np.concatenate([x, y], axis=0)
    return out

  @property
  def num_examples(self) -> int:
    return self.new.num_examples + self.replay.num_examples

  @property
  def examples(self) -> list[Any]:
    """The new items, then the replayed ones (what `INDEX_FIELDS` number)."""
    return list(self.new.examples) + list(self.replay.examples)

  @property
  def fingerprint(self) -> str:
    return fingerprint_of(["replay"], [self.new.fingerprint.encode(),
                                       self.replay.fingerprint.encode()])

  def state(self) -> dict[str, Any]:
    return {"new": self.new.state(), "replay": self.replay.state()}

  def restore(self, state: Mapping[str, Any]) -> None:
    if "replay" not in state or "new" not in state:
      raise ValueError("The data iterator state was saved without data.replay; the same "
                       "data.replay settings are needed to resume exactly.")
    self.new.restore(state["new"])
    self.replay.restore(state["replay"])

  def __getattr__(self, name: str) -> Any:  # stats, competence, curriculum, ...
    return getattr(self.__dict__["new"], name)
