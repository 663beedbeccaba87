"""Orbax checkpoints of the train state that resume exactly.

A step folder `<directory>/<step>/` holds the items `state` (the `TrainState` pytree, orbax
StandardSave) and `extras` (JSON: the data iterator's position, the step's metrics, the PRNG
implementation of every typed key and a checksum of every array), plus `metrics` (orbax's copy,
for `keep_best`). Typed keys are stored as their `jax.random.key_data` and re-wrapped with
`jax.random.wrap_key_data`, so the parameters, optimizer state and key come back bitwise
identical, each leaf in its dtype.

Atomicity (orbax 0.12.8, local disks): a step is written under `<step>.orbax-checkpoint-tmp`;
each item and then the step get a `commit_success.txt`; only then is the folder renamed to
`<step>` (on GCS it is written in place and the marker comes last). Old checkpoints are pruned
only after the new one is committed, and a pruned step folder is first renamed into
`<directory>/.deleting/` and only then removed, so neither a crash mid-save nor one mid-prune
leaves a damaged folder under a step's name. `latest_step` and `all_steps` count a folder only
if the step and each item carry the marker.

Integrity: `extras["checksums"]` holds, for every array leaf, a 64-bit checksum of its bytes
computed on its device at save time (`CHECKSUM_ALGORITHM`); `restore` recomputes it on the
arrays read back, so damage that orbax reads without error (changed bytes in a chunk that zstd
stored verbatim, as it does incompressible data) is still reported as corruption. Checkpoints
written before checksums existed restore unverified.

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=500, keep_last=2, keep_best=1)
    if ckpt.latest_step() is not None:
      state, data_state, metrics, step = ckpt.restore(abstract_state, fallback=True)
    ...
    ckpt.save(step, state, data_state=loader.state(), metrics=eval_metrics)  # async
    ...
    ckpt.close()  # waits for the last save
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import jax
import orbax.checkpoint as ocp

from jaxpost.train.checksums import CHECKSUM_ALGORITHM, checksums
from jaxpost.train.saveable import abstract_saveable, check_matches, rewrap_keys, to_saveable
from jaxpost.train.orbax_guards import (ORBAX_GUARDS, join_all, new_orbax_threads, os_error_in,
                                        remove, remove_pruned)

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
EXTRAS_ITEM = "extras"
_ITEMS = (STATE_ITEM, EXTRAS_ITEM)
_COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE  # "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step metadata file
_STEP_NAME = re.compile(r"0|[1-9][0-9]*")
_TMP_NAME = re.compile(r"(0|[1-9][0-9]*)\.orbax-checkpoint-tmp.*")  # orbax's unfinished save
_TRASH = ".deleting"  # orbax's todelete_subdir: pruned steps are renamed here, then removed
_FORMAT = 1  # extras format; "checksums" is an optional key, so format 1 readers still work
_SAVE_THREAD_JOIN_S = 60.0  # after a failed save, how long to wait for orbax's other writers


class CheckpointCorruptError(ValueError):
  """A finalised checkpoint that cannot be read; `step`, `path` and `reason` say which and why."""

  def __init__(self, message: str, *, step: int | None = None, path: Path | None = None,
               reason: str = ""):
    super().__init__(message)
    self.step, self.path, self.reason = step, path, reason


class CheckpointSaveError(OSError):
  """A checkpoint that could not be written, raised once, by the `save`, `wait` or `close` that
  follows the failure (an asynchronous save fails in orbax's background threads). `step` and
  `path` name the step folder; `errno` is the underlying OSError's (28: disk full), if any; the
  original exception is the `__cause__`. The finalised checkpoints are untouched."""

  def __init__(self, message: str, *, step: int | None, path: Path,
               errno_: int | None = None):
    super().__init__(message)
    self.step, self.path, self.errno = step, path, errno_


@dataclasses.dataclass
class _KeepLastAndBest:
  """Orbax preservation policy: keep a checkpoint if it is among the newest `keep_last`, or
  among the `keep_best` best by `metric` (only finite values compete; ties go to the earlier
  step). Orbax evaluates it in `save`, with the step being written (`in_flight`) last; step
  folders orbax lists but that are not finalised (`is_finalised` False) neither count nor get
  deleted."""

  keep_last: int
  keep_best: int
  metric: str
  mode: Literal["min", "max"]
  is_finalised: Callable[[int], bool]
  in_flight: int | None = None

  def _score(self, metrics: Any) -> float | None:
    value = metrics.get(self.metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
        or not math.isfinite(value):
      return None
    return value if self.mode == "min" else -value

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    ours = [c.step == self.in_flight or self.is_finalised(c.step) for c in checkpoints]
    keep = [not o for o in ours]
    newest = sorted((c.step, i) for i, c in enumerate(checkpoints) if ours[i])
    for _, i in newest[max(0, len(newest) - self.keep_last):]:
      keep[i] = True
    scored = sorted((s, c.step, i) for i, c in enumerate(checkpoints)
                    if ours[i] and (s := self._score(c.metrics)) is not None)
    for _, _, i in scored[:self.keep_best]:
      keep[i] = True
    return keep


class Checkpointer:
  """Periodic, asynchronous, atomic checkpoints of a train state over orbax.

  Args:
    directory: the folder holding one sub-folder per saved step (created if missing).
    save_every: `save(step, ...)` writes when `step % save_every == 0` (or `force=True`).
    keep_last: the newest `keep_last` checkpoints are kept (at least 1).
    keep_best: additionally keep the `keep_best` best checkpoints by `metrics[best_metric]`
      (`best_mode` "min" or "max"). The two combine as a union: a checkpoint survives if it is
      among the newest `keep_last` OR among the `keep_best` best, so at most
      `keep_last + keep_best` checkpoints remain (one more while a save is being written,
      since pruning happens only after the new checkpoint is committed). A checkpoint whose
      metrics lack a finite `best_metric` is kept only by `keep_last`. Step folders that are
      not finalised checkpoints are neither counted nor pruned.
    async_save: write in a background thread; `save` returns once the arrays are copied to
      host memory, so the caller may donate or overwrite the state right away.

  Pruning renames a step folder into `<directory>/.deleting/` (orbax's `todelete_subdir`, in
  its background thread after the new save is committed); a background thread of ours then
  removes it, once orbax's threads of that save have ended (joined by `save`, `wait` and
  `close`).

  Creating a Checkpointer cleans up after a run that was killed: it removes whatever is in
  `.deleting/` (and any `*.deleting`), step folders that are not finalised and are older than
  the newest finalised step, and orbax's temporary folders (`<step>.orbax-checkpoint-tmp`),
  logging one warning line per removed folder. Unfinalised folders newer than the newest
  finalised step are left alone (orbax still removes newer temporary folders). Use one
  Checkpointer per run directory (the training job), as with orbax's CheckpointManager.
  """

  def __init__(self, directory: str | Path, *, save_every: int, keep_last: int = 2,
               keep_best: int = 0, best_metric: str = "eval/loss",
               best_mode: Literal["min", "max"] = "min", async_save: bool = True,
               read_only: bool = False):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep_last < 1:
      raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if keep_best < 0:
      raise ValueError(f"keep_best must be >= 0, got {keep_best}")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.directory = Path(directory).absolute()
    self.save_every = save_every
    self.keep_best = keep_best
    self.best_metric = best_metric
    self._policy = _KeepLastAndBest(keep_last, keep_best, best_metric, best_mode,
                                    is_finalised=lambda s: self._is_finalised(self._step_dir(s)))
    if not read_only:
      self._sweep()
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=self._policy,
        # best_fn only makes orbax write (and reload) the `metrics` item the policy ranks by.
        best_fn=(lambda m: m.get(best_metric, math.nan)) if keep_best > 0 else None,
        best_mode=best_mode,
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else _TRASH,  # prune by a rename out of the steps
        create=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._metadata_handler = ocp.StandardCheckpointHandler()
    self._saving: int | None = None  # the step of the save that may still be running
    self._save_threads: list[threading.Thread] = []  # orbax's writer threads of that save
    self._purger: threading.Thread | None = None
    self._closed = False
    self._read_only = read_only
    ORBAX_GUARDS.acquire()

  # ---- saving -----------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, data_state: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Start writing `state` (plus the JSON-able `data_state` and float `metrics`) as `step`.

    Returns whether a save was started: only when `step % save_every == 0` or `force`, and
    never over an existing step (a final forced save at an already-saved step is a no-op).
    With `async_save` the write continues in the background. A save that failed (in the
    background or not) raises `CheckpointSaveError` once, from the next `save`, `wait` or
    `close`; a new save is not started by the `save` that raises it.

    Each array's checksum (`checksums`) is computed on its device before `save` returns and
    stored in the `extras` item, inside the step folder orbax commits atomically.
    """
    step = int(step)
    if self._read_only:
      raise ValueError(f"this Checkpointer of {self.directory} is read-only (read_only=True)")
    if not force and step % self.save_every != 0:
      return False
    self._wait_for_save()
    self._join_purger()
    if step in self._manager.all_steps():
      logger.info("checkpoint step %d already exists in %s; not overwritten", step,
                  self.directory)
      return False
    saveable, key_impls = to_saveable(state)
    try:  # a snapshot: the caller may keep mutating its dicts while we write
      data_state = json.loads(json.dumps(data_state))
    except (TypeError, ValueError) as e:
      raise TypeError(f"data_state must be JSON-serialisable: {e}") from e
    if metrics is not None:
      try:
        metrics = {str(k): float(v) for k, v in metrics.items()}
      except (TypeError, ValueError) as e:
        raise TypeError(f"metrics must map names to numbers: {e}") from e
    extras = {"format": _FORMAT, "step": step, "data_state": data_state, "metrics": metrics,
              "key_impls": key_impls,
              "checksums": {"algorithm": CHECKSUM_ALGORITHM, "leaves": checksums(saveable)}}
    args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(saveable),
                                 EXTRAS_ITEM: ocp.args.JsonSave(extras)})
    if self.keep_best > 0 and metrics is None:
      metrics = {}  # orbax warns when a tracked step has no metrics
    self._policy.in_flight = step
    self._saving = step
    ORBAX_GUARDS.logs.rearm()
    before = set(threading.enumerate())
    try:
      started = bool(self._manager.save(step, args=args, metrics=metrics, force=True))
    except Exception as e:
      self._save_threads = new_orbax_threads(before)
      if not os_error_in(e):
        self._saving = None
        raise  # not an I/O failure: the caller's error, as raised
      raise self._save_failed(e) from e
    self._save_threads = new_orbax_threads(before)
    self._start_purger(self._save_threads)
    return started

  def wait(self) -> None:
    """Block until pending asynchronous saves are committed and old ones pruned (their
    folders removed). A failed save raises `CheckpointSaveError` (once)."""
    self._wait_for_save()
    self._join_purger()
    if jax.process_index() == 0:
      remove_pruned(self._pruned())  # what an earlier removal left

  def close(self) -> None:
    """Wait for pending saves, then release orbax's threads. Idempotent; a save that failed
    and was not reported yet raises `CheckpointSaveError` after everything is released."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
      with contextlib.suppress(OSError):
        (self.directory / _TRASH).rmdir()  # only if empty
    finally:
      try:
        self._manager.close()  # nothing left to wait for: a failure was raised above
      finally:
        self._metadata_handler.close()
        ORBAX_GUARDS.release()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # do not mask the exception that is leaving the `with` block
      self.close()
    except CheckpointSaveError as e:
      logger.error("%s", e)

  def _wait_for_save(self) -> None:
    """orbax's `wait_until_finished`, with a background failure raised as one
    CheckpointSaveError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever failed in the background
      raise self._save_failed(e) from e
    self._saving, self._save_threads = None, []

  def _save_failed(self, e: BaseException) -> CheckpointSaveError:
    """The CheckpointSaveError for the failure `e` of the save of `self._saving`, once orbax's
    other writer threads of that save have ended (so none logs or fails after the error is
    handled, or at interpreter exit)."""
    step, self._saving = self._saving, None
    join_all(self._save_threads, timeout=_SAVE_THREAD_JOIN_S)
    self._save_threads = []
    for _ in range(8):  # the same save's other errors (orbax keeps one per component): drop
      try:
        self._manager.check_for_errors()
        break
      except Exception:  # noqa: BLE001
        continue
    cause = os_error_in(e) or e
    what = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"
    path = self._step_dir(step) if step is not None else self.directory
    if step is not None and self._is_finalised(path):
      head = (f"checkpoint step {step} ({path}) was saved, but pruning older checkpoints "
              f"failed ({what})")
    else:
      head = f"checkpoint step {step} was not saved: writing {path} failed ({what})"
    code = getattr(cause, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
      todo = f"free disk space (or quota) on the file system of {self.directory}"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
      todo = f"make {self.directory} writable"
    else:
      todo = f"check that {self.directory} is writable and has free space"
    return CheckpointSaveError(
        f"{head}. To go on, {todo}, then resume. The finalised checkpoints "
        f"{self.all_steps()} are intact; a partial folder is removed when a Checkpointer "
        "next starts.", step=step, path=path, errno_=code)

  # ---- cleaning up --------------------------------------------------------------------------

  def _sweep(self) -> None:
    """Before orbax lists the folder (process 0, then a barrier): remove what a killed run left
    behind, one warning line per folder (see the class docstring)."""
    if jax.process_index() == 0 and self.directory.is_dir():
      entries = sorted(self.directory.iterdir())
      finalised = [int(p.name) for p in entries
                   if _STEP_NAME.fullmatch(p.name) and self._is_finalised(p)]
      newest = max(finalised, default=None)
      for path in entries:
        tmp = _TMP_NAME.fullmatch(path.name)
        if path.name == _TRASH and path.is_dir():
          for pruned in sorted(path.iterdir()):
            remove(pruned)
            logger.warning("removed %s: a pruned checkpoint whose deletion was interrupted",
                           pruned)
          path.rmdir()
        elif path.name.endswith(_TRASH):
          remove(path)
          logger.warning("removed %s: a checkpoint whose deletion was interrupted", path)
        elif newest is None:
          continue
        elif _STEP_NAME.fullmatch(path.name) and int(path.name) < newest \
            and not self._is_finalised(path):
          remove(path)
          logger.warning("removed %s: a step folder that is not finalised, older than the "
                         "newest finalised step %d", path, newest)
        elif tmp is not None and int(tmp.group(1)) < newest:
          remove(path)
          logger.warning("removed %s: an unfinished save older than the newest finalised "
                         "step %d", path, newest)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("jaxpost_checkpoint_sweep")

  def _pruned(self) -> list[Path]:
    """The step folders pruning moved into `.deleting/` and that are not removed yet."""
    trash = self.directory / _TRASH
    return sorted(trash.iterdir()) if trash.is_dir() else []

  def _start_purger(self, save_threads: list[threading.Thread]) -> None:
    """On process 0, a background thread that waits for `save_threads` (orbax's threads of the
    save just started; its finalize thread prunes after the commit), then removes the folders
    moved into `.deleting/` by then. Orbax renames more only in a later save, which starts
    after `save` has joined this thread."""
    if jax.process_index() != 0:
      return

    def purge():
      join_all(save_threads)
      remove_pruned(self._pruned())

    self._purger = threading.Thread(target=purge, daemon=True, name="jaxpost_checkpoint_purge")
    self._purger.start()

  def _join_purger(self) -> None:
    if self._purger is not None:
      self._purger.join()
      self._purger = None

  # ---- listing ------------------------------------------------------------------------------

  def _step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  @staticmethod
  def _is_finalised(path: Path) -> bool:
    """Committed by orbax: the step and each item folder carry the commit marker. Orbax's
    `<step>.orbax-checkpoint-tmp` folders never match the step-name pattern."""
    if not (path.is_dir() and (path / _COMMIT_MARKER).is_file()):
      return False
    return all((path / item / _COMMIT_MARKER).is_file() for item in _ITEMS)

  def all_steps(self) -> list[int]:
    """The finalised steps on disk, ascending (an in-flight save is not among them)."""
    if not self.directory.is_dir():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if _STEP_NAME.fullmatch(p.name) and self._is_finalised(p))

  def latest_step(self) -> int | None:
    """The newest finalised step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # ---- restoring ----------------------------------------------------------------------------

  def restore(self, abstract_state: Any, *, step: int | None = None,
              fallback: bool = False) -> tuple[Any, Any, dict | None, int]:
    """Restore `(state, data_state, metrics, step)` from `step` (default: the latest
    finalised one).

    `abstract_state` is the state's pytree of `jax.ShapeDtypeStruct` (or arrays) with
    `.sharding`: every array is read straight onto its sharding, with its saved dtype (a
    different dtype or shape in `abstract_state` is an error, never a silent cast).

    A checkpoint that cannot be read, or whose arrays do not match the checksums saved with
    them, raises `CheckpointCorruptError` naming its step and folder (and, for a checksum
    mismatch, the first mismatching leaf). With `fallback=True` it is logged as a warning and
    the previous finalised step is tried, and so on; after a successful fallback the corrupt
    folders newer than the restored step are renamed `<step>.corrupt` so that the resumed run
    can save those steps again. A checkpoint saved without checksums restores unverified.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"step {step} is not a finalised checkpoint in {self.directory} "
                              f"(finalised steps: {steps})")
    candidates = [s for s in reversed(steps) if step is None or s <= step]
    abstract, key_structs = abstract_saveable(abstract_state)
    corrupt: list[CheckpointCorruptError] = []
    for s in candidates:
      try:
        result = self._restore_step(s, abstract, key_structs)
      except CheckpointCorruptError as e:
        if not fallback:
          raise
        logger.warning("checkpoint step %d (%s) is corrupt or unreadable (%s); falling back "
                       "to the previous finalised checkpoint: training repeats the steps "
                       "since", e.step, e.path, e.reason)
        corrupt.append(e)
        continue
      if corrupt:
        self._quarantine([e.step for e in corrupt])
      return result
    raise CheckpointCorruptError(
        f"no readable checkpoint in {self.directory}: every finalised step is corrupt: "
        + "; ".join(f"step {e.step} ({e.reason})" for e in corrupt))

  def _restore_step(self, step: int, abstract: Any,
                    key_structs: dict[str, Any]) -> tuple[Any, Any, dict | None, int]:
    path = self._step_dir(step)

    def corrupt(reason: str) -> CheckpointCorruptError:
      return CheckpointCorruptError(
          f"checkpoint step {step} ({path}) is corrupt or unreadable ({reason}). To resume "
          "from the previous finalised checkpoint instead, set "
          "checkpoint.fallback_on_corrupt=true (Checkpointer.restore(..., fallback=True)).",
          step=step, path=path, reason=reason)

    def failed(e: BaseException) -> CheckpointCorruptError:
      return corrupt(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}")

    try:
      json.loads((path / _STEP_METADATA).read_text())
      saved_tree = self._metadata_handler.metadata(path / STATE_ITEM).tree
      if not saved_tree:
        raise ValueError(f"no array metadata in {path / STATE_ITEM}")
    except Exception as e:  # noqa: BLE001 - any failure to read is corruption
      raise failed(e) from e
    check_matches(saved_tree, abstract, path)  # a mismatch is the caller's error
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract),
          EXTRAS_ITEM: ocp.args.JsonRestore()}))
      state, extras = restored[STATE_ITEM], restored[EXTRAS_ITEM]
      if not isinstance(extras, dict) or extras.get("format") != _FORMAT:
        raise ValueError(f"unexpected extras {str(extras)[:200]}")
      key_impls = dict(extras["key_impls"])
      mismatch = self._verify(step, state, extras.get("checksums"))
    except Exception as e:  # noqa: BLE001
      raise failed(e) from e
    if mismatch is not None:
      raise corrupt(mismatch)
    if set(key_impls) != set(key_structs):
      raise ValueError(f"checkpoint {path} has typed keys at {sorted(key_impls)}, "
                       f"abstract_state at {sorted(key_structs)}")
    return rewrap_keys(state, key_impls, key_structs), extras["data_state"], \
        extras["metrics"], step

  @staticmethod
  def _verify(step: int, state: Any, saved: Any) -> str | None:
    """Compare the checksums of the restored arrays (key data for typed keys) with those saved
    in `extras`: the reason naming the first mismatching leaf, or None. A checkpoint without
    checksums (written before they existed) or with an unknown algorithm is restored
    unverified."""
    if saved is None:
      logger.info("checkpoint step %d has no checksums (written before jaxpost saved them); "
                  "restored unverified", step)
      return None
    if saved["algorithm"] != CHECKSUM_ALGORITHM:
      logger.warning("checkpoint step %d has checksums of an unknown algorithm %r; restored "
                     "unverified", step, saved["algorithm"])
      return None
    want = saved["leaves"]
    for name, got in checksums(state).items():
      if name in want and want[name] != got:
        return (f"checksum mismatch at leaf {name}: saved {want[name]}, read {got}; the "
                "array data on disk changed after it was written")
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Rename corrupt step folders `<step>.corrupt[-n]`: out of orbax's and our listings (the
    name is no step), kept for inspection, and no longer blocking a re-save of that step."""
    if jax.process_index() == 0:
      for step in steps:
        src = self._step_dir(step)
        dst, n = src.with_name(f"{src.name}.corrupt"), 1
        while dst.exists():
          dst, n = src.with_name(f"{src.name}.corrupt-{n}"), n + 1
        src.rename(dst)
        logger.warning("moved corrupt checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("jaxpost_checkpoint_quarantine")
    self._manager.reload()
