"""`train` and `export_run`: a run from its config, through `build`, the loop and the export.

    summary = train(load_config("configs/quickstart.yaml", ["train.steps=200"]))
    summary = train(cfg, algorithm=my_factory)     # a custom algorithm: `run -> Algorithm`

cli -> load_config -> build -> loop(source -> step -> hooks) -> export. The held-out batches
are taken once; checkpoints save the state with the batch source's position, so a killed run
resumes exactly; the run's `config.yaml` is written once the run is built (the model loaded,
the algorithm made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxpost.config import RunConfig, save_config
from jaxpost.data import describe_truncation
from jaxpost.metrics import MetricWriter, ProgressBar
from jaxpost.train.build import AlgorithmArg, Run, build, log
from jaxpost.train.checkpoint import Checkpointer
from jaxpost.errors import TrainingError
from jaxpost.train.hooks import Checkpoint, Evaluate, Metrics, Suites, evaluate
from jaxpost.train.loop import loop

__all__ = ["TrainingError", "export_run", "train"]


def _checkpointer(cfg: RunConfig, run_dir: Path) -> Checkpointer:
  ck = cfg.checkpoint
  return Checkpointer(run_dir / "checkpoints", save_every=ck.every or cfg.train.steps,
                      keep_last=ck.keep_last, keep_best=ck.keep_best, best_metric=ck.best_metric,
                      best_mode=ck.best_mode, async_save=ck.async_save)


def _exact_match(run: Run, state, frozen) -> float | None:
  """The task's held-out exact match of greedy answers (None: no task, or not asked for)."""
  task = run.cfg.task
  if task is None or not task.exact_match or not run.algorithm.generates:
    return None
  from jaxpost.eval import EvalModel  # pylint: disable=import-outside-toplevel
  from jaxpost.eval.generation import greedy_exact_match  # pylint: disable=import-outside-toplevel
  model = EvalModel(run.config, run.trainable.model(state.params, frozen), run.tokenizer,
                    batch_size=256)
  return greedy_exact_match(model, run.data.exact_match_rows(),
                            max_new_tokens=task.max_new_tokens)


def _report_data(cfg: RunConfig, source, writer: MetricWriter, step: int) -> None:
  """Says what truncation cut and which rows were skipped (never silent), and writes the
  counts as `data/...` metrics. Sources that know nothing of it (online ones) say nothing."""
  stats = getattr(source, "stats", None)
  if stats is None:
    return
  d = cfg.data
  line = describe_truncation(stats, d.seq_len, max_length=d.max_length,
                             max_prompt_length=d.max_prompt_length)
  if line:
    log(f"warning: {line}")
  skipped = sum(stats.skipped_rows.values())
  if skipped:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.skipped_rows.items()))
    log(f"warning: {skipped} bad rows were skipped (data.on_bad_row=skip): {reasons}")
  writer.write(step, {"data/examples": stats.examples,
                      "data/truncated_examples": stats.truncated_examples,
                      "data/dropped_examples": stats.dropped_examples,
                      "data/skipped_rows": skipped})


def _suites(run: Run, state, frozen):
  """The `eval:` section's hook (None without one), made before any checkpoint is restored:
  its reference is the start model (a copy under full fine-tuning, taken only when a suite
  compares with it; the base under PEFT)."""
  sec = run.cfg.eval
  if sec is None:
    return None
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaxpost.eval.runner import Evaluator, resolve_data  # pylint: disable=import-outside-toplevel
  evaluator = Evaluator(sec, run.config, run.tokenizer, data=resolve_data(run.data),
                        compute_dtype=run.model_kwargs["compute_dtype"], log=log)
  lm = run.algorithm.reference_of or (lambda p: p)
  reference = None
  if evaluator.needs_reference():
    if run.trainable.kind == "full":
      reference = jax.tree.map(jnp.copy, lm(run.trainable.model(state.params, frozen)))
    else:
      reference = frozen.base
  writer = MetricWriter(run.run_dir / "eval", enabled=jax.process_index() == 0)
  every = sec.every or run.cfg.checkpoint.every or run.cfg.train.steps
  return Suites(run, evaluator, writer, every=every, steps=run.cfg.train.steps,
                reference=reference, lm=lm, report=sec.report)


def train(cfg: RunConfig, *, algorithm: AlgorithmArg = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Runs `cfg` to `train.steps`, resuming from the latest checkpoint in `run_dir` if any.

  `algorithm`: an `Algorithm`, a factory `run -> Algorithm`, or None for `cfg.algorithm`.
  Returns a summary: final metrics, the exported model folder, the held-out headline metric
  and, for a task with `exact_match`, the held-out accuracy before and after.

  A recipe with `stages:` is a task sequence (`jaxpost.continual.train_stages`): each stage is
  such a run in RUN_DIR/stage_<i>, and the summary adds `continual` (the forgetting report).
  """
  if cfg.stages:
    from jaxpost.continual import train_stages  # pylint: disable=import-outside-toplevel
    return train_stages(cfg, algorithm=algorithm, on_step=on_step)
  started = time.perf_counter()
  run = build(cfg, algorithm)
  log(run.trainable.describe)
  checkpointer = _checkpointer(cfg, run.run_dir)
  try:
    summary = _train(run, checkpointer, on_step, started)
  except BaseException:
    with contextlib.suppress(Exception):  # the error that stopped the run is the one to report
      checkpointer.close()
    raise
  checkpointer.close()
  return summary


class _FirstStep:
  """Logs the seconds from `train`'s start to the end of this process's first step (model
  loading, evaluation before training and every compile included: what the persistent
  compilation cache shortens) and puts them in the summary as `time_to_first_step`."""

  def __init__(self, started: float, summary: dict):
    self.started, self.summary = started, summary

  def after_step(self, info) -> None:
    if "time_to_first_step" not in self.summary:
      jax.block_until_ready(info.metrics)
      seconds = time.perf_counter() - self.started
      self.summary["time_to_first_step"] = seconds
      log(f"time to first step: {seconds:.1f}s")

  def end(self) -> None:
    pass


def _train(run: Run, checkpointer: Checkpointer, on_step, started: float) -> dict:
  """`train` once the run is built and its checkpointer open."""
  cfg = run.cfg
  state, frozen = run.init_state()
  t, a = cfg.train, run.algorithm
  suites = _suites(run, state, frozen)
  start_policy = run.policy(state.params, frozen)
  source = a.batches("train", start_policy)
  held_out = a.batches("eval", start_policy)
  eval_batches = list(held_out) if held_out is not None else []

  start = 0
  if cfg.checkpoint.resume and (latest := checkpointer.latest_step()) is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    fallback = cfg.checkpoint.fallback_on_corrupt
    try:
      tree, data_state, _, start = checkpointer.restore(run.checkpoint_abstract(abstract),
                                                        fallback=fallback)
      state, frozen = run.from_checkpoint(tree, frozen)
    except ValueError as e:  # a moving reference's checkpoint from before it was saved
      if not (run.algorithm.moving_reference and "does not match" in str(e)):
        raise
      state, data_state, _, start = checkpointer.restore(abstract, fallback=fallback)
      log("warning: this checkpoint predates saving the moving reference (TR-DPO): the "
          "reference restarts from the start model")
    source.restore(data_state)
    log(f"resumed from {checkpointer.directory} at step {start}")
    if start < latest:
      log(f"warning: the checkpoints after step {start} (up to step {latest}) could not be read "
          f"and were renamed <step>.corrupt; steps {start + 1}..{latest} are trained again "
          f"(exactly: the data position and RNG come from step {start}'s checkpoint)")
  # Only a run that can start replaces config.yaml: a mistyped re-run fails above and leaves
  # the earlier run's config (which `jaxpost export` reads) as it was.
  if jax.process_index() == 0:  # without this launch's process id and coordinator
    launch = dataclasses.replace(cfg.distributed, coordinator_address=None, num_processes=None,
                                 process_id=None)
    save_config(dataclasses.replace(cfg, distributed=launch), run.run_dir / "config.yaml")

  summary: dict[str, Any] = {"run_dir": str(run.run_dir), "headline": f"eval/{a.headline}"}
  if start == 0 and (before := _exact_match(run, state, frozen)) is not None:
    summary["exact_match_before"] = before
    log(f"held-out exact match before training: {before:.3f}")
  writer = MetricWriter(run.run_dir, enabled=jax.process_index() == 0)
  _report_data(cfg, source, writer, start)
  if eval_batches and t.eval_every and start == 0:  # the starting point, for before/after
    summary["eval_before"] = evaluate(run, eval_batches, state.params, frozen)
    writer.write(0, summary["eval_before"])
  if suites is not None:
    if start == 0:
      summary["suites_before"] = suites.evaluate(0, state.params, frozen, is_reference=True)
    else:  # resumed: `retention` divides by the start model's results in the ledger
      from jaxpost.eval.command import ledger_reference  # pylint: disable=import-outside-toplevel
      suites.evaluator.reference_results = ledger_reference(run.run_dir / "eval")
  bar = ProgressBar(t.steps, initial_step=start, disable=None if jax.process_index() == 0 else True)
  metrics = Metrics(writer, bar, steps=t.steps, log_every=t.log_every,
                    max_bad_steps=t.max_bad_steps, headline=a.headline, on_step=on_step)
  hooks = [_FirstStep(started, summary), metrics,
           Evaluate(run, eval_batches, writer, every=t.eval_every, steps=t.steps),
           *([suites] if suites is not None else []),
           Checkpoint(checkpointer, source, steps=t.steps, tree=run.checkpoint_tree)]
  t0 = time.perf_counter()
  try:
    state, frozen = loop(run, state, frozen, source, hooks, start=start, steps=t.steps)
  finally:
    checkpointer.wait()
    writer.close()
    if suites is not None:
      suites.writer.close()
    bar.close()
  elapsed = time.perf_counter() - t0
  if (bad := int(state.bad_steps)) > 0:  # the final state is not the result of t.steps steps
    raise TrainingError(
        f"the last {bad} of {t.steps} steps had a non-finite loss or gradient and were not "
        f"applied ({metrics.skipped} skipped in this run): the model is step {t.steps - bad}'s, "
        "so nothing was exported and no final checkpoint written. Lower optim.lr or check the "
        "data, then rerun with more train.steps to continue from the last checkpoint.")
  if metrics.skipped:
    log(f"warning: {metrics.skipped} steps were skipped (non-finite loss or gradient)")

  run.export(state.params, frozen, run.run_dir)  # every process gathers, the first writes
  summary.update(final_metrics=metrics.last, final_model=str(run.run_dir / "final"),
                 steps=t.steps, seconds=elapsed, start_step=start,
                 skipped_steps=metrics.skipped)
  if (after := _exact_match(run, state, frozen)) is not None:
    summary["exact_match_after"] = after
  return summary


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None,
               *, algorithm: AlgorithmArg = None) -> list[Path]:
  """`jaxpost export`: rebuilds a run from `run_dir/config.yaml` and its checkpoint (the latest,
  or `step`) and writes `final/` and `adapter/` into `out_dir` (default `run_dir`)."""
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").exists():
    raise TrainingError(f"{run_dir} has no config.yaml; is it a jaxpost run folder?")
  folder = run_dir / "checkpoints"
  if not folder.is_dir():
    raise TrainingError(f"no finalised checkpoint in {folder} to export")
  # The folder given is the run, wherever it was trained (it may have been moved since).
  cfg = dataclasses.replace(load_config(run_dir / "config.yaml"), run_dir=str(run_dir))
  run = build(cfg, algorithm, training=False)
  checkpointer = Checkpointer(folder, save_every=1, read_only=True)  # writes nothing there
  if checkpointer.latest_step() is None:
    checkpointer.close()
    raise TrainingError(f"no finalised checkpoint in {checkpointer.directory} to export")
  tree, _, _, restored = checkpointer.restore(run.checkpoint_abstract(run.abstract_state()),
                                              step=step)
  checkpointer.close()
  state, frozen = run.from_checkpoint(tree, run.frozen)
  written = run.export(state.params, frozen, Path(out_dir or run_dir))
  log(f"exported step {restored} of {run_dir}: {', '.join(str(d) for d in written)}")
  return written
