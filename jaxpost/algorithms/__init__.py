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

from typing import Any, Callable

from jaxpost.algorithms.base import (Algorithm, BatchSource, Frozen, Offline, Policy,
                                     mix_reference, reference_sync, tokens_in)


def _sft(run):
  from jaxpost.algorithms import sft  # pylint: disable=import-outside-toplevel
  return sft.make(run)


def _dpo(run):
  from jaxpost.algorithms import preference  # pylint: disable=import-outside-toplevel
  return preference.make_dpo(run)


def _kto(run):
  from jaxpost.algorithms import preference  # pylint: disable=import-outside-toplevel
  return preference.make_kto(run)


def _grpo(run):
  from jaxpost.algorithms import grpo  # pylint: disable=import-outside-toplevel
  return grpo.make(run)


def _online_dpo(run):
  from jaxpost.algorithms import online_dpo  # pylint: disable=import-outside-toplevel
  return online_dpo.make(run)


def _ppo(run):
  from jaxpost.algorithms import ppo  # pylint: disable=import-outside-toplevel
  return ppo.make(run)


def _reward(run):
  from jaxpost.algorithms import reward  # pylint: disable=import-outside-toplevel
  return reward.make(run)


# name -> factory(run) -> Algorithm. `register` adds one.
ALGORITHMS: dict[str, Callable[[Any], Algorithm]] = {
    "sft": _sft, "dpo": _dpo, "kto": _kto, "reward": _reward, "grpo": _grpo,
    "online_dpo": _online_dpo, "ppo": _ppo}


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
