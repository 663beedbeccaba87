"""`ShardedBatches`: global batches from S data shards, each process reading only its own.

The training rows are split into S shards (row i of the data in shard i % S) and each shard is
an iterator of its own (`BatchIterator`, `PreferenceIterator`: its own order, packing and
epochs, seeded by (seed + s)) giving b = B / S units of every global batch of B:

    global batch = concat(shard 0's next b units, shard 1's, ..., shard S-1's)

A process feeds the rows [lo, hi) of each global batch its devices hold (`multihost.
process_rows`: [i * B / N, (i + 1) * B / N) for process i of N on a data-parallel mesh), so it
builds, reads and tokenises only the shards those rows come from, about 1 / N of the data when
S is a multiple of N. The global batches depend on S, never on N: one process and N processes
train on the same batches, and a run resumes onto another number of processes.

The position is per shard. `state()` is a collective: every process contributes the states of
its shards and all return the same state of every shard, which a checkpoint stores; `restore`
takes the shards a process holds, whichever process held them before.

Why not `grain` (which MaxText and Tunix use): its per-process sharding makes the batches a
function of the process count (a 2-process run and a 1-process run differ, and a checkpoint
does not restore onto another count), and its packing is not jaxpost's; the epoch schedule
(`epochs.EpochIterator`) already gives a deterministic, checkpointable order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 1


def _merge_stats(stats: Sequence[Any]) -> Any:
  """One stats record of several shards' (`InputStats` subclasses): counts added, reasons
  merged, rows listed in shard order, per-epoch figures of the shortest shard, packing
  efficiency averaged."""
  out = {}
  for f in dataclasses.fields(stats[0]):
    values = [getattr(s, f.name) for s in stats]
    if values[0] is None:  # not counted (KTO's labels of pairs)
      out[f.name] = None
    elif f.name == "batches_per_epoch":
      out[f.name] = min(values)
    elif isinstance(values[0], float):
      out[f.name] = float(np.mean(values))
    elif isinstance(values[0], dict):
      merged: dict = {}
      for v in values:
        for k, n in v.items():
          merged[k] = merged.get(k, 0) + n
      out[f.name] = merged
    elif isinstance(values[0], list):
      out[f.name] = [x for v in values for x in v]
    else:
      out[f.name] = sum(values)
  return type(stats[0])(**out)


class ShardedBatches:
  """This process's rows of global batches of `batch_size` units from `shards` shards.

  Args:
    build: `build(rows, batch_size=, seed=) -> EpochIterator` over a list of rows (as
      `build_sft_batches` and the preference builders take).
    rows: every row of the training data (`jaxpost.data.read_rows`); a process tokenises only
      those of its shards.
    shards, batch_size, seed: S, B and the seed (shard s shuffles with seed + s).
    process_rows: (lo, hi), the rows of each global batch this process feeds.

  `next()` gives rows [lo, hi) of the global batch; `process_rows` = (lo, batch_size) tells
  `Run.place` where they go.
  """

  def __init__(self, build: Callable[..., Any], rows: Sequence[Any], *, shards: int,
               batch_size: int, seed: int, process_rows: tuple[int, int]) -> None:
    if batch_size % shards:
      raise ValueError(f"batch_size={batch_size} is not divisible by shards={shards}")
    lo, hi = process_rows
    if not 0 <= lo < hi <= batch_size:
      raise ValueError(f"process rows [{lo}, {hi}) are not within a batch of {batch_size}")
    self.shards, self.batch_size, self.per_shard = shards, batch_size, batch_size // shards
    self.held = [s for s in range(shards)
                 if s * self.per_shard < hi and (s + 1) * self.per_shard > lo]
    self._slice = slice(lo - self.held[0] * self.per_shard, hi - self.held[0] * self.per_shard)
    self.process_rows = (lo, batch_size)
    self.iterators = {s: build(list(rows[s::shards]), batch_size=self.per_shard, seed=seed + s)
                      for s in self.held}

  def __iter__(self) -> ShardedBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self.iterators[s]) for s in self.held]
    return {k: np.concatenate([p[k] for p in parts])[self._slice] for k in parts[0]}

  @property
  def stats(self) -> Any:
    """What went into this process's shards (`DataStats` / `PreferenceStats`, merged)."""
    return _merge_stats([it.stats for it in self.iterators.values()])

  def state(self) -> dict[str, Any]:
    """Every shard's position (a collective: all processes must call it)."""
    from jaxpost import multihost  # pylint: disable=import-outside-toplevel
    mine = {str(s): it.state() for s, it in self.iterators.items()}
    merged: dict[str, Any] = {}
    for states in multihost.allgather_json(mine):
      merged.update(states)
    return {"version": STATE_VERSION, "shards": self.shards, "states": merged}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues every shard this process holds from `state` (any process's `state()`)."""
    if state.get("version") != STATE_VERSION or "states" not in state:
      raise ValueError("the data state was not saved by sharded data (data.shards > 1) of "
                       f"this version; it was {dict(state)!r:.200}")
    if state["shards"] != self.shards:
      raise ValueError(f"the data state has {state['shards']} shards, this run "
                       f"data.shards={self.shards}: the same shards are needed to resume")
    for s, it in self.iterators.items():
      it.restore(state["states"][str(s)])
