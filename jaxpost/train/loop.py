"""The training loop: batches from a source, the one compiled step, then hooks.

    state, frozen = loop(run, state, frozen, source, hooks, start=0, steps=600)

Per step: `source.next(policy)` gives a host batch (an online source samples it from the
policy; its optional `host_metrics()` and `samples()` say how the batch was made), it is
placed on the batch sharding (a per-process source, with `process_rows`, gives only this
process's rows of it), the compiled step updates the donated state, the algorithm's
`after_step` may change the frozen inputs (TR-DPO's reference sync), and each hook sees the
step (metrics, held-out evaluation, checkpoints: `jaxpost.train.hooks`). The loop never asks
which algorithm it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

from jaxpost import multihost
from jaxpost.algorithms import BatchSource, Frozen, tokens_in


@dataclasses.dataclass
class StepInfo:
  """What hooks see after a step. `metrics` are the step's device metrics (not fetched);
  `extra` collects host metrics hooks add for later hooks (held-out results for the
  checkpointer's best-k)."""

  step: int  # steps done
  state: Any
  frozen: Frozen
  metrics: dict
  tokens: int
  extra: dict = dataclasses.field(default_factory=dict)
  host_metrics: dict = dataclasses.field(default_factory=dict)  # the source's, e.g. rewards
  samples: list = dataclasses.field(default_factory=list)  # a few examples (RL completions)


class Hook(Protocol):
  def after_step(self, info: StepInfo) -> None: ...
  def end(self) -> None: ...


def loop(run, state, frozen: Frozen, source: BatchSource, hooks: Sequence[Hook], *,
         start: int, steps: int) -> tuple[Any, Frozen]:
  """Steps `start` .. `steps` - 1; returns the final state and frozen inputs. Every hook's
  `end` runs once the steps are done (not after an error)."""
  after = run.algorithm.after_step
  host_metrics = getattr(source, "host_metrics", None)
  samples = getattr(source, "samples", None)
  rows = getattr(source, "process_rows", None)  # a per-process source's (lo, global rows)
  for step in range(start, steps):
    batch = source.next(run.policy(state.params, frozen, step))
    tokens = tokens_in(batch) if rows is None else multihost.total(tokens_in(batch))
    extra = dict(host_metrics=host_metrics() if host_metrics else {},
                 samples=samples() if samples else [])
    state, metrics = run.step(state, run.place(batch, rows), frozen)
    done = step + 1
    if after is not None:
      frozen = after(done, state.params, frozen)
    info = StepInfo(done, state, frozen, metrics, tokens, **extra)
    for hook in hooks:
      hook.after_step(info)
  for hook in hooks:
    hook.end()
  return state, frozen
