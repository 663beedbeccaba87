"""`jaxpost eval EVAL.yaml [key=value ...]`: one model, or (`follow=RUN_DIR`) a sidecar that
evaluates each checkpoint of a run as the trainer commits it.

The sidecar's ledger is `OUT/metrics.jsonl` (one line per evaluated step, the reference at
step 0): a step already there is never evaluated again, so a killed sidecar resumes where it
stopped, and a half-written last line (killed mid-write) is dropped and redone. It opens only
committed checkpoints (`Checkpointer.all_steps`), in step order; a checkpoint the trainer
deleted first is skipped with a message. It stops once the run's last step (`train.steps` of
its config.yaml, read again each poll) is evaluated, or after `idle_timeout` seconds with
nothing new.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpost.config import EvalConfig
from jaxpost.errors import TrainingError
from jaxpost.eval.runner import Evaluator, resolve_data
from jaxpost.eval.targets import open_target
from jaxpost.metrics import MetricWriter, read_metrics


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _mesh_shape(cfg: EvalConfig) -> tuple[int, int, int]:
  n = len(jax.devices())
  other = cfg.mesh_fsdp * cfg.mesh_tensor
  data = cfg.mesh_data if cfg.mesh_data > 0 else max(n // other, 1)
  return data, cfg.mesh_fsdp, cfg.mesh_tensor


def ledger_reference(out_dir: Path) -> dict[str, float]:
  """The reference's results (step 0) in the ledger `out_dir/metrics.jsonl`, or {} (what
  `retention` divides by, after a restart)."""
  if not (Path(out_dir) / "metrics.jsonl").exists():
    return {}
  return {k: v for r in read_metrics(out_dir) if r["step"] == 0 for k, v in r.items()}


def done_steps(out_dir: Path) -> set[int]:
  """The steps already in the ledger `out_dir/metrics.jsonl`."""
  if not (out_dir / "metrics.jsonl").exists():
    return set()
  return {int(r["step"]) for r in read_metrics(out_dir) if "eval/seconds" in r}


class Session:
  """One evaluation process: the target, its evaluator, the reference and the writer."""

  def __init__(self, cfg: EvalConfig, log: Callable[[str], None] = _log):
    self.cfg, self.log = cfg, log
    self.target, self.step = open_target(cfg.follow or cfg.model, mesh_shape=_mesh_shape(cfg))
    base = Path(cfg.follow or cfg.model)
    if self.step is not None:
      base = base.parent.parent
    self.out_dir = Path(cfg.out_dir) if cfg.out_dir else base / "eval"
    compute = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else None
    self.evaluator = Evaluator(cfg, self.target.config, self.target.tokenizer,
                               data=resolve_data(self.target.data), compute_dtype=compute,
                               log=log)
    self.reference_params = self._reference()
    self.writer = MetricWriter(self.out_dir, enabled=jax.process_index() == 0)

  def _reference(self):
    ref = self.cfg.reference
    if ref is None:
      return None
    if ref == "base":
      params = self.target.reference()
      if params is None:
        self.log("eval: reference=base, but a model folder has no base: evaluating without a "
                 "reference (give reference=FOLDER to compare)")
      return params
    other, _ = open_target(ref, mesh_shape=_mesh_shape(self.cfg))
    if other.config != self.target.config:
      name = self.cfg.model or self.cfg.follow
      raise TrainingError(f"reference {ref} is a different model than {name} (another "
                          "architecture or size); a reference must share the architecture")
    return other.params()

  def evaluate(self, step: int, params, *, is_reference: bool = False) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = self.evaluator.evaluate(params, self.reference_params, is_reference=is_reference)
    self.writer.write(step, metrics)
    if self.cfg.report and jax.process_index() == 0:
      from jaxpost.eval.report import write_report  # pylint: disable=import-outside-toplevel
      write_report(self.out_dir, title=f"Evaluation of {self.cfg.follow or self.cfg.model}")
    shown = ", ".join(f"{k[5:]}={v:.4g}" for k, v in metrics.items()
                      if not k.endswith(("seconds", "examples_per_s")))
    self.log(f"eval step {step} ({time.perf_counter() - t0:.1f}s): {shown}")
    return metrics

  def reference_results(self, done: set[int]) -> None:
    """Evaluates the reference as step 0 (once), or reads its results back for `retention`."""
    if self.reference_params is None:
      return
    if 0 in done:
      self.evaluator.reference_results = ledger_reference(self.out_dir)
      return
    self.evaluate(0, self.reference_params, is_reference=True)
    done.add(0)

  def close(self) -> None:
    self.writer.close()
    if hasattr(self.target, "close"):
      self.target.close()


def evaluate_once(session: Session) -> dict[str, Any]:
  """`model=`: the reference (step 0, once per ledger), then the model: a checkpoint at its
  step, a run at its latest checkpoint; a Hugging Face folder has no step and is written at
  step 1 (step 0 without a reference)."""
  done = done_steps(session.out_dir)
  target = session.target
  session.reference_results(set(done))
  steps = target.steps()
  if session.step is not None:
    step = session.step
  elif steps:
    step = steps[-1]
  else:
    step = 0 if session.reference_params is None else 1
  metrics = session.evaluate(step, target.params(step if steps else None))
  return {"out_dir": str(session.out_dir), "steps": [step], "metrics": metrics}


def _expected_steps(target, final: int) -> list[int]:
  """The steps the run saves at (`checkpoint.every` and the last), if the target knows."""
  every = getattr(getattr(getattr(target, "cfg", None), "checkpoint", None), "every", None)
  return [*range(every, final, every), final] if every else []


def follow(session: Session, *, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
  """`follow=RUN_DIR`: the sidecar loop (see the module docstring)."""
  cfg, target = session.cfg, session.target
  if target.run_dir is None:
    raise TrainingError(f"follow={cfg.follow} is not a run folder (no config.yaml)")
  done = done_steps(session.out_dir)
  session.reference_results(done)
  evaluated, skipped, said = [], [], set()
  last_new = time.monotonic()
  while True:
    newest = max(done, default=0)
    steps = target.steps()
    for step in [s for s in steps if s > newest]:
      try:
        params = target.params(step)
      except FileNotFoundError:
        skipped.append(step)
        session.log(f"eval: checkpoint {step} was deleted by the trainer before it could be "
                    "evaluated (checkpoint.keep_last); skipped")
        continue
      session.evaluate(step, params)
      done.add(step)
      evaluated.append(step)
      last_new = time.monotonic()
    final = target.final_step()
    newest = max(done, default=0)
    for s in sorted(set(steps) | set(_expected_steps(target, final))):
      if 0 < s < newest and s not in done and s not in skipped and s not in said:
        said.add(s)
        if s in steps:  # committed after a later one was evaluated: skipped, for step order
          session.log(f"eval: checkpoint {s} appeared after step {newest} was evaluated; "
                      "skipped to keep step order")
        else:
          session.log(f"eval: checkpoint {s} was deleted by the trainer before this sidecar "
                      "saw it (checkpoint.keep_last); skipped")
    if final in done:
      session.log(f"eval: the run's last step {final} is evaluated; done "
                  f"({len(evaluated)} checkpoints this time, ledger {session.out_dir})")
      break
    if cfg.idle_timeout and time.monotonic() - last_new > cfg.idle_timeout:
      session.log(f"eval: no new checkpoint for {cfg.idle_timeout:.0f}s and the run has not "
                  f"reached step {final}; stopping (rerun to continue)")
      break
    sleep(cfg.poll_seconds)
  return {"out_dir": str(session.out_dir), "steps": evaluated, "skipped": skipped}


def _wait_for_run(cfg: EvalConfig, log, sleep) -> None:
  """A sidecar started beside `jaxpost train` waits for the run's config.yaml (written once
  the run is built)."""
  path = Path(cfg.follow) / "config.yaml"
  start, said = time.monotonic(), False
  while not path.exists():
    if not said:
      log(f"eval: waiting for {path} (the run starts)")
      said = True
    if cfg.idle_timeout and time.monotonic() - start > cfg.idle_timeout:
      raise TrainingError(f"{path} did not appear within idle_timeout={cfg.idle_timeout:g}s: "
                          "is follow= the run_dir of a started `jaxpost train`?")
    sleep(cfg.poll_seconds)


def run_eval(cfg: EvalConfig, log: Callable[[str], None] = _log,
             sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
  """`jaxpost eval`: evaluates `cfg.model` once, or follows `cfg.follow`."""
  if cfg.follow:
    _wait_for_run(cfg, log, sleep)
  session = Session(cfg, log)
  try:
    return follow(session, sleep=sleep) if cfg.follow else evaluate_once(session)
  finally:
    session.close()

