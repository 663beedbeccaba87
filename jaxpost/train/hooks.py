"""What happens around the step, as hooks of `jaxpost.train.loop`: metrics (progress bar,
JSONL / TensorBoard, the non-finite guard), held-out evaluation, checkpoints.

Each hook has `after_step(info)` and `end()`; the loop calls them in order, so the evaluator
runs before the checkpointer and its results reach the checkpoint's best-k ranking.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxpost.metrics import MetricWriter, ProgressBar
from jaxpost.errors import TrainingError


class Metrics:
  """Fetches each step's metrics one step late (the host never waits on the device it just
  fed), stops the run after `max_bad_steps` consecutive non-finite steps, shows the loss and
  the `headline` metric on the bar, and writes every `log_every` steps."""

  def __init__(self, writer: MetricWriter, bar: ProgressBar, *, steps: int, log_every: int,
               max_bad_steps: int, headline: str = "loss",
               on_step: Callable[[int, dict], None] | None = None):
    self.writer, self.bar, self.steps, self.log_every = writer, bar, steps, log_every
    self.max_bad_steps, self.headline, self.on_step = max_bad_steps, headline, on_step
    self.pending = None  # the last step's info, its metrics not fetched yet
    self.last: dict[str, float] = {}  # the last fetched step's metrics and held-out results
    self.skipped = 0  # steps not applied (non-finite), in this process's run

  def after_step(self, info) -> None:
    if self.pending is not None:
      self.last = self._finish(self.pending)
    self.pending = info

  def end(self) -> None:
    if self.pending is not None:
      self.last = self._finish(self.pending)
      self.pending = None

  def _finish(self, info) -> dict:
    step = info.step
    values = {f"train/{k}": float(v) for k, v in jax.device_get(info.metrics).items()}
    values.update({f"train/{k}": float(v) for k, v in info.host_metrics.items()})
    bad = int(values.pop("train/bad_steps"))
    self.skipped += int(values.get("train/skipped", 0))
    if self.max_bad_steps and bad >= self.max_bad_steps:
      raise TrainingError(
          f"{bad} consecutive steps had a non-finite loss or gradient (the last at step {step}); "
          "they were not applied and the last good checkpoint is kept. Lower optim.lr, check "
          "the data, or raise train.max_bad_steps.")
    shown = {"loss": values["train/loss"]}
    if self.headline != "loss" and f"train/{self.headline}" in values:
      shown[self.headline.split("/")[-1]] = values[f"train/{self.headline}"]
    self.bar.update(step, tokens=info.tokens, **shown)
    if step % self.log_every == 0 or step == self.steps:
      self.writer.write(step, values)
      self.writer.write_samples(step, info.samples)
    if self.on_step is not None:
      self.on_step(step, values)
    return values | info.extra  # info.extra: filled by later hooks of the same step


def evaluate(run, batches: list, params, frozen) -> dict[str, float]:
  """Held-out metrics `eval/...`: every metric of the loss averaged with the loss's weights,
  then the algorithm's derived metrics (e.g. perplexity)."""
  sums: dict[str, float] = {}
  weight = 0.0
  for b in batches:
    loss, m = run.evaluate_batch(params, frozen, run.place(b))
    m = jax.device_get(m)
    w = float(m.pop("weight", 1.0))
    sums["loss"] = sums.get("loss", 0.0) + float(loss) * w
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * w
    weight += w
  out = {k: v / max(weight, 1.0) for k, v in sums.items()}
  if run.algorithm.eval_metrics is not None:
    out = run.algorithm.eval_metrics(out)
  return {f"eval/{k}": v for k, v in out.items()}


class Evaluate:
  """Held-out evaluation every `every` steps and at the last step; results are written and
  put in `info.extra` for later hooks."""

  def __init__(self, run, batches: list, writer: MetricWriter, *, every: int, steps: int):
    self.run, self.batches, self.writer, self.every, self.steps = run, batches, writer, every, steps

  def after_step(self, info) -> None:
    if not (self.every and self.batches and (info.step % self.every == 0
                                             or info.step == self.steps)):
      return
    extra = evaluate(self.run, self.batches, info.state.params, info.frozen)
    self.writer.write(info.step, extra)
    info.extra.update(extra)

  def end(self) -> None:
    pass


class Checkpoint:
  """Saves `tree(state, frozen)` (the state, and what of the frozen inputs moves) and the batch
  source's position every `checkpointer.save_every` steps and
  at the last step, never in the middle of non-finite steps (a good checkpoint is not replaced
  by a state that skipped its updates)."""

  def __init__(self, checkpointer, source: Any, *, steps: int,
               tree: Callable[[Any, Any], Any] = lambda state, frozen: state):
    self.checkpointer, self.source, self.steps, self.tree = checkpointer, source, steps, tree

  def after_step(self, info) -> None:
    ck = self.checkpointer
    if (info.step % ck.save_every == 0 or info.step == self.steps) and int(
        info.state.bad_steps) == 0:
      ck.save(info.step, self.tree(info.state, info.frozen), data_state=self.source.state(),
              metrics=info.extra or None, force=True)

  def end(self) -> None:
    self.checkpointer.wait()


class Suites:
  """A recipe's `eval:` suites (`jaxpost.eval.Evaluator`, the code `jaxpost eval` runs) every
  `every` steps and at the last step, written to `RUN_DIR/eval` under the same names; the
  start model is evaluated as step 0 by the trainer (`start`). `lm` picks the language model
  out of the full params (e.g. PPO's policy)."""

  def __init__(self, run, evaluator, writer: MetricWriter, *, every: int, steps: int,
               reference=None, lm: Callable[[Any], Any] = lambda p: p, report: bool = True):
    self.run, self.evaluator, self.writer = run, evaluator, writer
    self.every, self.steps, self.reference, self.lm = every, steps, reference, lm
    self.report = report

  def evaluate(self, step: int, params, frozen, *, is_reference: bool = False) -> dict:
    model = self.lm(self.run.trainable.model(params, frozen))
    metrics = self.evaluator.evaluate(model, self.reference, is_reference=is_reference)
    self.writer.write(step, metrics)
    if self.report and jax.process_index() == 0:
      from jaxpost.eval.report import write_report  # pylint: disable=import-outside-toplevel
      write_report(self.writer.run_dir, title=f"Evaluation of {self.run.run_dir}")
    return metrics

  def after_step(self, info) -> None:
    if info.step % self.every == 0 or info.step == self.steps:
      info.extra.update(self.evaluate(info.step, info.state.params, info.frozen))

  def end(self) -> None:
    self.writer.close()
