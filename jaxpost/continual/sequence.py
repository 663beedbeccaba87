"""A task sequence: the stages of a `stages:` recipe trained one after another.

    summary = train(load_config("configs/continual.yaml"))      # jaxpost.train detects stages

```
recipe (stages:) --stage_configs--> stage 0 .. T-1, each an ordinary RunConfig
RUN_DIR/model: a tiny model's tokenizer trained on every stage's data, made once
before: b[j] = exact match of the start model on every stage's held-out set
for stage i (skipped when RUN_DIR/continual/report.json already has its row):
  train(stage i)   RUN_DIR/stage_i/, from RUN_DIR/stage_{i-1}/final (stage 0: the start
                   model), replaying the earlier stages' data with data.replay; a killed
                   stage resumes from its own checkpoint as any run does
  R[i, j] = exact match of RUN_DIR/stage_i/final on stage j's held-out set, every j
  RUN_DIR/continual/report.md, report.json, accuracy_matrix.png rewritten
```

Scores are `jaxpost.eval.generation.greedy_exact_match` (the trainer's before / after line)
on each stage's held-out questions: a generated task's, or the rows of the stage's
`data.eval` (chat rows whose last assistant turn, or `answer` column, is the answer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpost.config import ConfigError, RunConfig, load_config, save_config
from jaxpost.config.stages import Stage, stage_configs, start_model
from jaxpost.continual.report import JSON_FILE, forgetting_metrics, write_report
from jaxpost.errors import TrainingError

REPORT_DIR = "continual"
DEFAULT_MAX_NEW_TOKENS = 16


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def held_out(stage: Stage, max_new_tokens: int | None) -> tuple[list[dict], int]:
  """(rows, answer length) a stage's task is scored on: its task's held-out questions, or its
  `data.eval` rows."""
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  from jaxpost.tasks.source import data_source  # pylint: disable=import-outside-toplevel
  cfg = stage.cfg
  if cfg.task is not None:
    rows = data_source(cfg, stage.run_dir).exact_match_rows()
    return rows, max_new_tokens or cfg.task.max_new_tokens
  if cfg.data.eval is None:
    raise ConfigError(f"stage {stage.index} ({stage.name}) has no held-out set for the "
                      "forgetting report: give it a task: or data.eval")
  rows = [r.data for r in read_rows(cfg.data.eval) if isinstance(r.data, dict)]
  return rows, max_new_tokens or DEFAULT_MAX_NEW_TOKENS


def scores(folder: Path, tasks: list[tuple[list[dict], int]], dtype: str) -> list[float]:
  """The greedy exact match of the model in `folder` on every task's rows."""
  from jaxpost.eval import EvalModel  # pylint: disable=import-outside-toplevel
  from jaxpost.eval.generation import greedy_exact_match  # pylint: disable=import-outside-toplevel
  from jaxpost.models import load_hf  # pylint: disable=import-outside-toplevel
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  config, params = load_hf(folder, dtype=jnp.dtype(dtype))
  model = EvalModel(config, params, load_tokenizer(folder), batch_size=256)
  return [greedy_exact_match(model, rows, max_new_tokens=n) for rows, n in tasks]


def make_start_model(cfg: RunConfig, stages: list[Stage]) -> Path:
  """RUN_DIR/model for a tiny model: its tokenizer is trained on every stage's training text
  (so that later stages' text has merges of its own), made once."""
  from jaxpost.tasks.source import data_source  # pylint: disable=import-outside-toplevel
  from jaxpost.train.build import make_tiny_model  # pylint: disable=import-outside-toplevel
  folder = start_model(cfg)
  if not (folder / "config.json").exists():
    corpus = [line for s in stages for line in data_source(s.cfg, s.run_dir).corpus()]
    make_tiny_model(cfg, folder, corpus)
    _log(f"tiny model for all {len(stages)} stages: {folder}")
  return folder


def _done(folder: Path, names: list[str]) -> dict[str, Any]:
  """What an earlier process of this sequence recorded (nothing if it never scored)."""
  path = folder / JSON_FILE
  if not path.exists():
    return {"accuracy": [], "before": None, "seconds": []}
  done = json.loads(path.read_text())
  if done.get("tasks") != names:
    raise TrainingError(f"{path} is the report of another sequence (stages "
                        f"{', '.join(done.get('tasks') or [])}); use another run_dir")
  return done


def _check_unchanged(stage: Stage) -> None:
  """A finished stage is skipped only if the recipe still makes the same stage."""
  saved = stage.run_dir / "config.yaml"
  if saved.exists() and load_config(saved) != stage.cfg:
    raise TrainingError(f"stage {stage.index} ({stage.name}) finished with other settings "
                        f"({saved}); the recipe changed since: use another run_dir")


def train_stages(cfg: RunConfig, *, algorithm=None,
                 on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Trains the stages of `cfg` in order (module docstring), skipping those already scored.

  Returns the last stage's summary (or a short one if every stage was done before) with
  `continual`: the report's path, the tasks, the accuracy matrix and its metrics.
  """
  from jaxpost.train.trainer import train  # pylint: disable=import-outside-toplevel
  stages = stage_configs(cfg)
  names = [s.name for s in stages]
  run_dir = Path(cfg.run_dir)
  out = run_dir / REPORT_DIR
  done = _done(out, names)
  for stage in stages[:len(done["accuracy"])]:
    _check_unchanged(stage)
  if jax.process_index() == 0:
    save_config(cfg, run_dir / "config.yaml")
  start = make_start_model(cfg, stages) if cfg.model.tiny else start_model(cfg)
  tasks = [held_out(s, cfg.continual.max_new_tokens) for s in stages]
  before, R, seconds = done["before"], done["accuracy"], done["seconds"]
  if before is None:
    before = scores(start, tasks, cfg.model.dtype)
    _log("before: " + ", ".join(f"{n} {x:.3f}" for n, x in zip(names, before)))

  def report() -> Path:
    return write_report(out, names, R, before=before, title=f"Continual learning: {run_dir.name}",
                        notes=[f"{len(stages)} stages, {cfg.algorithm}; "
                               + _replay_note(stages)], extra={"seconds": seconds})

  summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": 0, "seconds": 0.0,
                             "final_metrics": {}, "headline": "eval/loss",
                             "final_model": str(stages[-1].run_dir / "final")}
  for stage in stages:
    if stage.index < len(R):
      _log(f"stage {stage.index} ({stage.name}) finished earlier: skipped")
      continue
    _log(f"stage {stage.index} of {len(stages)} ({stage.name}): {stage.run_dir}, from "
         f"{stage.cfg.model.path}")
    t0 = time.perf_counter()
    summary = train(stage.cfg, algorithm=algorithm, on_step=on_step)
    seconds.append(time.perf_counter() - t0)
    R.append(scores(stage.run_dir / "final", tasks, cfg.model.dtype))
    _log(f"after stage {stage.index} ({stage.name}): " + ", ".join(
        f"{n} {x:.3f}" for n, x in zip(names, R[-1])))
    if jax.process_index() == 0:
      report()
  path = out / "report.md"
  if jax.process_index() == 0 and not path.exists():
    path = report()
  summary["continual"] = {"report": str(path), "tasks": names, "accuracy": R, "before": before,
                          "metrics": forgetting_metrics(R, before)}
  return summary


def _replay_note(stages: list[Stage]) -> str:
  """How the stages replay, in words (for the report's header)."""
  replay = [s.cfg.data.replay for s in stages]
  ratios = sorted({r.ratio for r in replay if r is not None})
  l2 = stages[-1].cfg.continual.l2_to_init
  text = (f"replay of earlier data at {', '.join(f'{x:g}' for x in ratios)} of every batch"
          if ratios else "no replay (naive fine-tuning)")
  return text + (f", L2 pull to each stage's start weights {l2:g}" if l2 else "") + "."
