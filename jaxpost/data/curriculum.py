"""Curriculum learning: the training stream ordered and paced by difficulty, easy first.

Competence-based curriculum (Platanios et al. 2019, arXiv 1903.09848): every item has a
difficulty score; at the t-th batch an iterator draws from the easiest fraction c(t) of its
items, the competence, which grows from `start_fraction` (c0) to 1 at `full_at_step` (T):

    linear  c(t) = min(1, c0 + (1 - c0) t / T)
    root    c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t / T))          (the paper's "sqrt")
    step    c(t) = min(1, c0 + (1 - c0) floor(K t / T) / K)        (K = `stages`: baby steps)

How `EpochIterator` uses it (`use_curriculum`): the items are ranked by score, ascending, ties
in a random order drawn from the seed. Batch t < T takes the pool of the first
max(ceil(c(t) N), batch_size) ranked items (N items in all), permutes the pool with
`np.random.default_rng([seed, t, CURRICULUM_STREAM])`, and makes its units (packed rows,
pairs, prompts) from the permuted pool, taking the first `batch_size` (a pool too small to
fill a batch is repeated). From batch T on, the ordinary epochs follow, epoch 0 first. Batch
t depends only on (scores, settings, seed, t), so the iterator's state gains one number (the
curriculum batches taken) and resumes exactly.

Scores (`data.curriculum.score`): `length` (tokens of the item), `loss` (the starting model's
mean per-token loss on the item, computed once: `jaxpost.algorithms.curriculum`), a column of
the data (a number per row), or `module:function` (`function(row) -> float` on the raw row).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data.errors import MISSING_FIELD, WRONG_TYPE, DataError

PACINGS = ("linear", "root", "step")
CURRICULUM_STREAM = 0x0C0C  # keeps the curriculum's draws apart from the epochs' permutations


def competence(t: int, *, pacing: str, start_fraction: float, full_at_step: int,
               stages: int = 4) -> float:
  """c(t): the fraction of the data (easiest first) batch t is drawn from (module docstring)."""
  if pacing not in PACINGS:
    raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
  if t >= full_at_step:
    return 1.0
  c0, x = start_fraction, t / full_at_step
  if pacing == "linear":
    c = c0 + (1.0 - c0) * x
  elif pacing == "root":
    c = math.sqrt(c0 * c0 + (1.0 - c0 * c0) * x)
  else:
    c = c0 + (1.0 - c0) * math.floor(stages * x) / stages
  return min(1.0, c)


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Difficulty `scores` [num_items] (lower is easier) and the pacing of `competence`."""

  scores: np.ndarray
  pacing: str = "linear"
  start_fraction: float = 0.2
  full_at_step: int = 1000
  stages: int = 4

  def __post_init__(self) -> None:
    scores = np.asarray(self.scores, np.float64)
    if scores.ndim != 1 or not np.all(np.isfinite(scores)):
      raise ValueError("curriculum scores must be finite numbers, one per item")
    if not 0.0 < self.start_fraction <= 1.0:
      raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}")
    if self.full_at_step < 1 or self.stages < 1:
      raise ValueError("full_at_step and stages must be >= 1")
    if self.pacing not in PACINGS:
      raise ValueError(f"pacing must be one of {PACINGS}, got {self.pacing!r}")
    object.__setattr__(self, "scores", scores)

  def competence(self, t: int) -> float:
    return competence(t, pacing=self.pacing, start_fraction=self.start_fraction,
                      full_at_step=self.full_at_step, stages=self.stages)

  def pool_size(self, t: int, batch_size: int) -> int:
    """How many of the easiest items batch t is drawn from."""
    n = len(self.scores)
    return min(n, max(math.ceil(self.competence(t) * n - 1e-9), batch_size))

  def ranked(self, seed: int) -> np.ndarray:
    """Item indices from easiest to hardest; ties in a random order drawn from `seed`."""
    tiebreak = np.random.default_rng([seed, CURRICULUM_STREAM]).permutation(len(self.scores))
    return np.lexsort((tiebreak, self.scores))

  def settings(self) -> list[Any]:
    """What `fingerprint_of` records of the curriculum (the scores go in as bytes)."""
    return ["curriculum", self.pacing, self.start_fraction, self.full_at_step, self.stages]


def pool_order(ranked: np.ndarray, pool: int, t: int, seed: int, length: int) -> np.ndarray:
  """The first `length` items batch t takes: permutations of the pool (the `pool` easiest of
  `ranked`) drawn from (seed, t), one after another."""
  rng = np.random.default_rng([seed, t, CURRICULUM_STREAM])
  draws = [rng.permutation(pool) for _ in range(-(-length // pool))]
  return ranked[np.concatenate(draws)[:length]]


def batch_units(units_of: Callable[[np.ndarray], Sequence[Any]], ranked: np.ndarray, pool: int,
                t: int, seed: int, batch_size: int) -> Sequence[Any]:
  """Batch t's `batch_size` units: `units_of` (an iterator's `_units`) over ever longer prefixes
  of `pool_order` until they make more than a batch (so that, packed, the batch's last row
  is closed), or the pool's permutations fill one batch."""
  length = min(pool, 2 * batch_size)
  while True:
    units = units_of(pool_order(ranked, pool, t, seed, length))
    if len(units) > batch_size or (length >= pool and len(units) >= batch_size):
      return units[:batch_size]
    length *= 2


def row_scores(score: str, wheres: Sequence[str | None], rows: Mapping[str, Any],
               function: Callable[[dict], float] | None = None) -> np.ndarray:
  """Scores from the raw rows: the column `score`, or `function(row)`; `rows` maps a row's
  `where` ("data/train.jsonl row 17") to its data.

  Raises:
    DataError: an item whose row is unknown, lacks the column, or scores as no finite number;
      the message names the row.
  """
  out = np.zeros(len(wheres), np.float64)
  for i, where in enumerate(wheres):
    row = rows.get(where) if where is not None else None
    if not isinstance(row, dict):
      raise DataError(MISSING_FIELD, f"data.curriculum.score={score}: item {i} has no row to "
                      "score", where=where)
    try:
      value = function(row) if function is not None else row[score]
    except KeyError:
      raise DataError(MISSING_FIELD, f"data.curriculum.score={score}: the row has no column "
                      f"{score!r} (its columns: {', '.join(sorted(row))})", where=where,
                      field=score) from None
    try:
      out[i] = float(value)
    except (TypeError, ValueError):
      out[i] = math.nan
    if not math.isfinite(out[i]):
      raise DataError(WRONG_TYPE, f"data.curriculum.score={score}: the difficulty {value!r} is "
                      "not a finite number", where=where)
  return out
