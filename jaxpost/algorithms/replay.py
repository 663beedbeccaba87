"""`data.replay` for a built run: the replay buffer read from its sources, and every algorithm's
training iterator mixed with it (`jaxpost.data.replay`).

    batches = training_batches(run, build, path, "sft", policy)   # SFT, distillation, DPO, KTO
    prompts, order = prompt_order(run, prompts, batch_size=P, ...) # RL and GKD prompts

A source is a data file or folder, or an earlier run folder (one with a `config.yaml`), whose
training data of the run's kind is replayed: its own files, or the generated task's (for a
task run, RUN_DIR/data/train.jsonl; pairs and KTO rows of the same questions for preference
runs). The new data keep `data.curriculum`; the replayed share is shuffled per epoch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxpost.algorithms.curriculum import apply_curriculum
from jaxpost.config import ConfigError
from jaxpost.config.continual import replay_units
from jaxpost.data.replay import ReplayMix, reservoir
from jaxpost.data.sources import Row, read_rows


def source_path(source: str, kind: str) -> str:
  """A replay source's data: a data file or folder as it is, or the training data of `kind`
  ("sft", "paired", "unpaired") of an earlier run folder."""
  folder = Path(source)
  if not (folder / "config.yaml").is_file():
    return source
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel
  from jaxpost.tasks.source import data_source  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(load_config(folder / "config.yaml"), run_dir=str(folder))
  path = data_source(cfg, folder).path(kind, "train")
  if path is None:
    raise ConfigError(f"data.replay.sources: the run {source} has no training data to replay")
  return str(path)


def replay_rows(run, kind: str) -> list[Row]:
  """The replay buffer: a reservoir sample of at most `data.replay.buffer_size` rows of all
  the sources (in order), drawn with `data.replay.seed`; rows keep their origins."""
  r = run.cfg.data.replay
  paths = [source_path(s, kind) for s in r.sources]
  return reservoir((row for path in paths for row in read_rows(path)), r.buffer_size, r.seed)


def replay_size(run, units: int, what: str) -> int:
  """How many of a batch's `units` `what` are replayed (0 without `data.replay`).

  Raises:
    ConfigError: the ratio leaves no replayed or no new unit.
  """
  r = run.cfg.data.replay
  if r is None:
    return 0
  k = replay_units(r.ratio, units)
  if not 1 <= k <= units - 1:
    raise ConfigError(f"data.replay.ratio={r.ratio} of the {units} {what} of a batch is {k} "
                      f"replayed; it must leave at least one replayed and one new: change the "
                      "ratio or the batch size")
  return k


def _log(message: str) -> None:
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel
  log(message)


def training_batches(run, build: Callable[..., Any], path: str, kind: str, policy) -> Any:
  """A run's training iterator: `build(source, batch_size=, seed=)` (an `EpochIterator`) over
  `path` with `data.curriculum` applied and, with `data.replay`, mixed with `build` over the
  replay buffer: batch_size - k new units and k replayed in every batch. With `data.shards`
  > 1: this process's rows of every batch from its shards (`jaxpost.data.ShardedBatches`)."""
  t = run.cfg.train
  if run.cfg.data.shards > 1:  # per-process data (config validation rules out the rest)
    from jaxpost.data import ShardedBatches, read_rows  # pylint: disable=import-outside-toplevel
    return ShardedBatches(build, read_rows(path), shards=run.cfg.data.shards,
                          batch_size=t.batch_size, seed=t.seed,
                          process_rows=run.process_rows(t.batch_size))
  k = replay_size(run, t.batch_size, "rows")
  new = build(path, batch_size=t.batch_size - k, seed=t.seed)
  apply_curriculum(run, new, policy, path)
  if not k:
    return new
  rows = replay_rows(run, kind)
  replay = build(rows, batch_size=k, seed=run.cfg.data.replay.seed)
  _log(f"replay: {k} of the {t.batch_size} rows of every batch from a buffer of {len(rows)} "
       f"rows of {', '.join(run.cfg.data.replay.sources)}")
  return ReplayMix(new, replay)


def prompt_order(run, prompts: Sequence[Any], *, batch_size: int, shuffle: bool = True,
                 max_prompt_length: int | None = None) -> tuple[list[Any], Any]:
  """(prompts, order) of an RL or on-policy source: a `PromptOrder` of `batch_size` prompts
  over `prompts`, paced by `data.curriculum`; with `data.replay`, k of every batch's prompts
  come from the replay buffer's prompts, appended to `prompts` (the order's indices count
  them after the run's own)."""
  from jaxpost.rl.prompts import PromptOrder, read_prompts  # pylint: disable=import-outside-toplevel
  seed, d = run.cfg.train.seed, run.cfg.data
  k = replay_size(run, batch_size, "prompts")
  order = PromptOrder(prompts, batch_size=batch_size - k, seed=seed, shuffle=shuffle)
  apply_curriculum(run, order, None, run.data.path("sft", "train"))
  if not k:
    return list(prompts), order
  replayed = read_prompts(replay_rows(run, "sft"), run.tokenizer,
                          max_prompt_length=max_prompt_length, on_bad_row=d.on_bad_row)
  replay = PromptOrder(replayed, batch_size=k, seed=d.replay.seed)
  _log(f"replay: {k} of the {batch_size} prompts of every batch from a buffer of "
       f"{len(replayed)} prompts of {', '.join(d.replay.sources)}")
  return list(prompts) + list(replayed), ReplayMix(order, replay)
