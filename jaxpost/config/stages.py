"""A recipe's `stages:` resolved into one ordinary `RunConfig` per stage.

    stages = stage_configs(load_config("configs/continual.yaml"))
    stages[1].cfg.task.op, stages[1].cfg.model.path, stages[1].cfg.data.replay.sources

Stage i is the recipe without `stages:`, with stage i's overrides merged in (nested mappings
merge key by key; any other value, `null` included, replaces), and with what the sequence
decides itself:

    run_dir              RUN_DIR/stage_<i>
    model.path           stage 0: the recipe's model (RUN_DIR/model for a tiny model, made once
                         over every stage's data: `jaxpost.continual`); stage i > 0:
                         RUN_DIR/stage_<i-1>/final, the previous stage's exported model
    data.replay.sources  the recipe's sources plus RUN_DIR/stage_0 .. stage_<i-1> (the earlier
                         stages' training data); stage 0 without sources replays nothing

A stage's `name` (default `stage_<i>`) names it in the report. Every stage is validated when
the recipe is loaded, so an unknown key in stage 2 is an error before stage 0 trains.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from jaxpost.config.loader import config_from_dict, config_to_dict
from jaxpost.config.sections import ConfigError, RunConfig

# keys a stage may not set: the sequence sets them
_SEQUENCE_KEYS = {"run_dir": "is RUN_DIR/stage_<i>", "stages": "cannot nest",
                  "model.path": "is the previous stage's model",
                  "model.tiny": "is the recipe's (one tiny model for every stage)"}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a sequence: its position, name and run configuration."""

  index: int
  name: str
  cfg: RunConfig

  @property
  def run_dir(self) -> Path:
    return Path(self.cfg.run_dir)


def stage_dir(run_dir: str | Path, index: int) -> Path:
  """RUN_DIR/stage_<index>: the folder of stage `index`'s run."""
  return Path(run_dir) / f"stage_{index}"


def start_model(cfg: RunConfig) -> Path:
  """The model stage 0 starts from: the recipe's `model.path`, or RUN_DIR/model for a tiny
  model (made by the sequence over every stage's data)."""
  return Path(cfg.run_dir) / "model" if cfg.model.tiny else Path(cfg.model.path)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  out = copy.deepcopy(base)
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = copy.deepcopy(value)
  return out


def _plain(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _set_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
  out = []
  for key, value in raw.items():
    out.append(prefix + key)
    if isinstance(value, dict):
      out += _set_keys(value, f"{prefix}{key}.")
  return out


def stage_configs(cfg: RunConfig) -> list[Stage]:
  """The stages of `cfg` (the module docstring), each a validated `RunConfig`.

  Raises:
    ConfigError: a stage that sets a key the sequence sets, has an unknown key or an
      impossible value, or repeats another stage's name; one line naming the stage.
  """
  base = config_to_dict(cfg)
  base["stages"] = []
  stages, names = [], set()
  for i, overrides in enumerate(cfg.stages):
    overrides = _plain(overrides)
    name = overrides.pop("name", f"stage_{i}")
    where = f"stages[{i}]"
    if not isinstance(name, str) or not name or name in names:
      raise ConfigError(f"{where}: name must be a string naming one stage, got {name!r}")
    names.add(name)
    where = f"{where} ({name})"
    for key in _set_keys(overrides):
      if key in _SEQUENCE_KEYS:
        raise ConfigError(f"{where}: {key} {_SEQUENCE_KEYS[key]} in a stages: recipe; remove "
                          "it from the stage")
    raw = _merge(base, overrides)
    raw["run_dir"] = str(stage_dir(cfg.run_dir, i))
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    raw["model"] = {**model, "tiny": False, "path": str(
        start_model(cfg) if i == 0 else stage_dir(cfg.run_dir, i - 1) / "final")}
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("replay"), dict):
      replay = data["replay"]
      sources = list(replay.get("sources") or ()) + [str(stage_dir(cfg.run_dir, j))
                                                      for j in range(i)]
      data["replay"] = {**replay, "sources": sources} if sources else None
    try:
      stage = config_from_dict(raw, source="the stage's overrides")
    except ConfigError as e:
      raise ConfigError(f"{where}: {e}") from None
    if stage.algorithm == "reward":
      raise ConfigError(f"{where}: algorithm=reward exports a reward model, which the next "
                        "stage cannot start from; a stages: recipe chains language models")
    stages.append(Stage(i, name, stage))
  return stages
