"""The continual-learning sections: `data.replay:` (a fraction of every batch from earlier data),
`continual:` (the L2 pull to the start weights, the forgetting report) and a recipe's `stages:`
(a task sequence; resolved into one `RunConfig` per stage by `jaxpost.config.stages`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxpost.config.sections_base import Section, _require


class Overrides(dict):
  """A free-form mapping of config keys (one stage's overrides of the recipe), frozen into
  nested mappings and tuples so that it hashes by value; its keys are checked where it is
  applied (`jaxpost.config.stages.stage_configs`), against the whole config tree."""

  def __hash__(self) -> int:  # type: ignore[override]
    return hash(tuple(sorted(self.items())))

  @classmethod
  def of(cls, value: Any) -> Any:
    """`value` with every dict made an `Overrides` and every list a tuple."""
    if isinstance(value, dict):
      return cls((k, cls.of(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
      return tuple(cls.of(v) for v in value)
    return value


def replay_units(ratio: float, batch_size: int) -> int:
  """The units (rows, pairs, prompts) of every batch drawn from the replay buffer:
  round(ratio * batch_size), halves rounded up."""
  return int(math.floor(ratio * batch_size + 0.5))


@dataclasses.dataclass(frozen=True)
class ReplaySection(Section):
  """Replay (`jaxpost.data.replay`): round(`ratio` x batch_size) rows (SFT, distillation:
  packed rows of replayed examples), pairs, KTO rows or RL prompts of every training batch
  come from a buffer of earlier data, the rest from the run's own data.

  `sources`: data files or folders, or earlier run folders (their training data); in a
  `stages:` recipe the earlier stages' training data are added on their own, so `sources` may
  stay empty. `buffer_size`: the buffer holds at most this many rows of the sources, a uniform
  sample drawn in one pass by a seeded reservoir (Vitter's Algorithm R, `seed`); its order is
  shuffled per epoch by `seed` too.
  """

  sources: tuple[str, ...] = ()
  ratio: float = 0.2
  buffer_size: int = 10000
  seed: int = 0

  def validate(self, prefix: str) -> None:
    _require(0.0 < self.ratio < 1.0, f"{prefix}ratio must be in (0, 1), got {self.ratio}")
    _require(self.buffer_size >= 1, f"{prefix}buffer_size must be >= 1, got {self.buffer_size}")
    _require(all(self.sources), f"{prefix}sources must not hold an empty path")


@dataclasses.dataclass(frozen=True)
class ContinualSection(Section):
  """Continual learning (`jaxpost.continual`).

  `l2_to_init` (any run): loss += l2_to_init x ||theta - theta_0||^2 / 2 over what trains
  (the whole model, the LoRA adapters or the prompt), theta_0 = its value at the start of the
  run (of the stage, in a sequence). `max_new_tokens`: the greedy answer length of the
  forgetting report's exact match (None: each stage's `task.max_new_tokens`, else 16).
  """

  l2_to_init: float = 0.0
  max_new_tokens: int | None = None

  def validate(self, prefix: str) -> None:
    _require(self.l2_to_init >= 0, f"{prefix}l2_to_init must be >= 0, got {self.l2_to_init}")
    _require(self.max_new_tokens is None or self.max_new_tokens >= 1,
             f"{prefix}max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")


def check_continual(cfg) -> None:
  """The checks of a `RunConfig` across sections: `data.replay` against the batch it is part
  of and the algorithm's data, and every stage of `stages:` a valid run (its unknown keys,
  types and values, named by stage)."""
  r, b = cfg.data.replay, cfg.train.batch_size
  if r is not None:
    _require(bool(r.sources) or bool(cfg.stages),
             "data.replay.sources is empty: list data files or run folders to replay (a "
             "stages: recipe adds the earlier stages' training data on its own)")
    _require(cfg.reference.mode != "precomputed",
             "data.replay with reference.mode=precomputed: the precomputed reference covers "
             "the run's own pairs only; use reference.mode=in_step")
    # RL replays a share of each rollout's prompts: the rollout checks its own count
    if cfg.algorithm not in ("grpo", "ppo", "online_dpo"):
      k = replay_units(r.ratio, b)
      least = 2 if cfg.algorithm == "kto" else 1  # a KTO batch pairs its rows for the KL term
      _require(least <= k <= b - least,
               f"data.replay.ratio={r.ratio} of train.batch_size={b} is {k} replayed rows per "
               f"batch; it must leave at least {least} replayed and {least} new rows"
               + (" (KTO pairs rows)" if least == 2 else "") + ": change the ratio or the "
               "batch size")
  if cfg.stages:
    from jaxpost.config.stages import stage_configs  # pylint: disable=import-outside-toplevel
    stage_configs(cfg)
