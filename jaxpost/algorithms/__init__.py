"""Algorithms: each is an `Algorithm`, a pure loss plus what makes its batches.

    from jaxpost.algorithms import ALGORITHMS, Algorithm, Frozen
    train(cfg)                                  # cfg.algorithm picks a factory from ALGORITHMS
    train(cfg, algorithm=my_factory)            # your own: `my_factory(run) -> Algorithm`

A factory takes the built run (`jaxpost.train.build.Run`: model config, tokenizer, data,
settings) and returns the `Algorithm`. One module per family: `sft`, `preference` (the DPO
family and KTO), `reward` (Bradley-Terry reward models), `grpo` (online RL: the GRPO family),
`online_dpo` (DPO on pairs the policy samples), `ppo` (PPO with a critic).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from jaxpost.algorithms.base import (Algorithm, BatchSource, Frozen, Offline, Policy,
                                     mix_reference, reference_sync, tokens_in)


def _lazy(module: str, factory: str = "make") -> Callable[[Any], Algorithm]:
  """The factory `jaxpost.algorithms.<module>.<factory>`, imported when first called (the
  families' modules pull in data, sampling and reward code that a run of another needs not)."""

  def make(run):
    return getattr(importlib.import_module(f"jaxpost.algorithms.{module}"), factory)(run)

  make.__name__ = f"{module}.{factory}"
  return make


# name -> factory(run) -> Algorithm. `register` adds one.
ALGORITHMS: dict[str, Callable[[Any], Algorithm]] = {
    "sft": _lazy("sft"), "dpo": _lazy("preference", "make_dpo"),
    "kto": _lazy("preference", "make_kto"), "reward": _lazy("reward"), "grpo": _lazy("grpo"),
    "online_dpo": _lazy("online_dpo"), "ppo": _lazy("ppo"), "distill": _lazy("distill")}


def register(name: str, factory: Callable[[Any], Algorithm]) -> None:
  """Makes `factory` the algorithm called `name` (for `make_algorithm`)."""
  ALGORITHMS[name] = factory


def make_algorithm(name: str, run) -> Algorithm:
  """The registered algorithm `name` for a built run."""
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}")
  return ALGORITHMS[name](run)


__all__ = ["ALGORITHMS", "Algorithm", "BatchSource", "Frozen", "Offline", "Policy",
           "make_algorithm", "mix_reference", "reference_sync", "register", "tokens_in"]
