"""Guards around orbax while a `checkpoint.Checkpointer` is open: one line instead of dozens
of tracebacks when a background save fails, event loops that drain before they close (no
"Event loop is closed" after a failed read), and the thread and folder helpers of a failed
save and of pruning.

Both guards act process-wide while any Checkpointer is open (`ORBAX_GUARDS.acquire` /
`release`): a filter on the `absl` logger that orbax writes to, and an asyncio event loop
policy whose new loops wait for their pending tasks before closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Sequence

import orbax.checkpoint as ocp

logger = logging.getLogger("jaxpost.train.checkpoint")

_DRAIN_S = 60.0  # how long an event loop of orbax's waits for its pending tasks before closing


def _drain_then_close(loop_ref: weakref.ref) -> None:
  """Await the tasks still pending on the loop (cancelling those still running after
  `_DRAIN_S` seconds); then close it. Installed as the loop's `close`.

  Orbax runs each read or write on a fresh loop and closes it as soon as one operation fails,
  with the others (tensorstore reads and writes) still pending. Those then end on a closed
  loop: "Event loop is closed" and "Exception ignored in: <coroutine ...>" tracebacks, at some
  later garbage collection, long after the error was handled (asyncio.run would have cancelled
  them; orbax avoids it)."""
  loop = loop_ref()
  if loop is None:
    return
  if not loop.is_running() and not loop.is_closed():
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if pending:  # let them end (a cancelled task may leave its tensorstore future running)
      _, late = loop.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_S))
      for task in late:
        task.cancel()
      loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
  type(loop).close(loop)


def _draining_policy(base: Any) -> Any:
  """The event loop policy `base`, except that its new loops drain before closing
  (`_drain_then_close`); each thread's current loop stays `base`'s."""

  class DrainingLoops(asyncio.AbstractEventLoopPolicy):
    def get_event_loop(self):
      return base.get_event_loop()

    def set_event_loop(self, loop):
      base.set_event_loop(loop)

    def new_event_loop(self):
      loop = base.new_event_loop()
      with contextlib.suppress(AttributeError):  # a compiled loop class (uvloop): as is
        loop.close = functools.partial(_drain_then_close, weakref.ref(loop))
      return loop

    def get_child_watcher(self):  # Python < 3.14
      return base.get_child_watcher()

    def set_child_watcher(self, watcher):
      base.set_child_watcher(watcher)

  return DrainingLoops()


_ORBAX_DIR = str(Path(ocp.__file__).parent)


class _OrbaxSaveErrorLogs(logging.Filter):
  """On the `absl` logger orbax writes to: a failed background save is logged with a traceback
  by every orbax thread it passes through (and by each of dozens of writers when the disk is
  full). Of orbax's records with a traceback, the first since the last `rearm` is kept as one
  line; the others are dropped. The failure itself is raised once, as a CheckpointSaveError,
  by the next `save`, `wait` or `close`. Installed while a Checkpointer is open."""

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._reported = False

  def rearm(self) -> None:
    self._reported = False

  def filter(self, record: logging.LogRecord) -> bool:
    if not record.exc_info or not record.pathname.startswith(_ORBAX_DIR):
      return True
    with self._lock:
      first, self._reported = not self._reported, True
    if first:
      exc = record.exc_info[1]
      line = (record.getMessage().strip().splitlines() or [""])[0][:500]
      if exc is not None and str(exc) and str(exc).splitlines()[0] not in line:
        line += f" ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
      record.msg, record.args = line, None
      record.exc_info, record.exc_text, record.stack_info = None, None, None
    return first


class _OrbaxGuards:
  """While any Checkpointer is open: `_OrbaxSaveErrorLogs` on the `absl` logger, and the
  event loop policy `_draining_policy` (restored at the last `release`, unless someone else
  replaced it meanwhile)."""

  def __init__(self):
    self.logs = _OrbaxSaveErrorLogs()
    self._lock = threading.Lock()
    self._users = 0
    self._base_policy: Any = None
    self._policy: Any = None

  def acquire(self) -> None:
    with self._lock:
      self._users += 1
      if self._users > 1:
        return
      logging.getLogger("absl").addFilter(self.logs)
      if not hasattr(asyncio, "set_event_loop_policy"):  # gone from Python 3.16
        return
      with warnings.catch_warnings():  # event loop policies are deprecated from Python 3.14
        warnings.simplefilter("ignore", DeprecationWarning)
        self._base_policy = asyncio.get_event_loop_policy()
        self._policy = _draining_policy(self._base_policy)
        asyncio.set_event_loop_policy(self._policy)

  def release(self) -> None:
    with self._lock:
      self._users -= 1
      if self._users > 0:
        return
      logging.getLogger("absl").removeFilter(self.logs)
      if self._policy is None:
        return
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if asyncio.get_event_loop_policy() is self._policy:
          asyncio.set_event_loop_policy(self._base_policy)
      self._base_policy = self._policy = None


ORBAX_GUARDS = _OrbaxGuards()


# tensorstore (orbax's array writer) reports a failed system call as a ValueError whose text
# ends "[os_error_code='28']" (here: no space left on device).
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)'?")


def os_error_in(e: BaseException | None) -> OSError | None:
  """The first OSError in `e`'s chain of causes and contexts (`e` included), or None; a
  tensorstore error that carries an `os_error_code` counts as that OSError."""
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    if (m := _TENSORSTORE_OS_ERROR.search(str(e))) is not None:
      code = int(m.group(1))
      return OSError(code, f"{os.strerror(code)} ({str(e).splitlines()[0][:300]})")
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def new_orbax_threads(before: set[threading.Thread]) -> list[threading.Thread]:
  """The threads orbax started since `before` was taken: a save's commit and finalize threads."""
  return [t for t in threading.enumerate()
          if t not in before and type(t).__module__.startswith("orbax.")]


def join_all(threads: Sequence[threading.Thread], timeout: float | None = None) -> None:
  """Wait for `threads` (at most `timeout` seconds in all). With `Thread.join`: orbax's own
  `join` re-raises a thread's error."""
  deadline = None if timeout is None else time.monotonic() + timeout
  for thread in threads:
    threading.Thread.join(thread, None if deadline is None
                          else max(0.0, deadline - time.monotonic()))


def remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink()


def remove_pruned(paths: Sequence[Path]) -> None:
  """Remove step folders that pruning renamed into `.deleting/`; a failure is logged and the
  folder is retried at the next save (or start-up)."""
  for path in paths:
    try:
      remove(path)
    except OSError as e:
      logger.warning("could not remove pruned checkpoint %s (%s); retried later", path, e)
