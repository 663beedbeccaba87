"""Training metrics: a JSONL log plus TensorBoard scalars, and a terminal progress bar.

    with MetricWriter(run_dir) as writer:
      writer.write(step, {"train/loss": loss, "train/lr": lr})   # numpy/jax scalars are fine
    records = read_metrics(run_dir)           # [{"step": ..., "time": ..., "train/loss": ...}]

`run_dir/metrics.jsonl` is the record of truth: one JSON object per line, flushed on every
write, so a crashed run keeps everything up to its last step. A run that crashed mid-line
leaves a truncated last line: `read_metrics` skips it and a new `MetricWriter` (a resumed run)
cuts it off before appending. TensorBoard event files go to `run_dir/tb`.

In a multi-process run only one process should write: pass `enabled=(jax.process_index() ==
0)` and the others' writers do nothing.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def _scalar(name: str, value: Any) -> float | int | bool:
  """A plain Python number from a Python, numpy or jax scalar (or a one-element array)."""
  if isinstance(value, (bool, int, float)):
    return value
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    return value.item()
  raise TypeError(f"metric {name!r} must be a scalar, got {type(value).__name__} "
                  f"{getattr(value, 'shape', '')}")


def _drop_partial_line(path: Path) -> None:
  """Truncates `path` after its last newline (the tail of a write cut short by a crash)."""
  with open(path, "rb+") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    chunk = 1 << 16
    end = size
    while end > 0:
      start = max(0, end - chunk)
      f.seek(start)
      data = f.read(end - start)
      newline = data.rfind(b"\n")
      if newline >= 0:
        f.truncate(start + newline + 1)
        return
      end = start
    f.truncate(0)


def _summary_writer_class() -> type:
  """`tensorboardX.SummaryWriter`, imported without torch.

  tensorboardX's package `__init__` imports torch when it is installed (only to recognise torch
  tensors, which jaxpost never passes): ~2 s and hundreds of MB per run start. Unless torch is
  already loaded, the import runs with torch marked unavailable, and the mark is removed
  afterwards so a later `import torch` works as usual.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


SAMPLES_FILE = "samples.jsonl"


class MetricWriter:
  """Appends `{"step", "time", **metrics}` lines to `run_dir/metrics.jsonl` and writes each
  metric as a TensorBoard scalar under `run_dir/tb`.

  Args:
    run_dir: the run's folder (created if missing).
    enabled: False makes every method a no-op (non-zero processes of a multi-host run).
    tensorboard: False writes only the JSONL file.
  """

  def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.run_dir = Path(run_dir)
    self.path = self.run_dir / METRICS_FILE
    self.enabled = enabled
    self._file: IO[str] | None = None
    self._tb = None
    if not enabled:
      return
    self.run_dir.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      _drop_partial_line(self.path)
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    if tensorboard:
      self._tb = _summary_writer_class()(logdir=str(self.run_dir / TENSORBOARD_DIR))

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Records `metrics` at `step`; returns the record written (plain Python values)."""
    now = time.time()
    record: dict[str, Any] = {"step": int(step), "time": now}
    for name, value in metrics.items():
      if name in ("step", "time"):
        raise ValueError(f"metric name {name!r} is reserved")
      record[name] = _scalar(name, value)
    if self._file is None:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name not in ("step", "time"):
          self._tb.add_scalar(name, float(value), global_step=int(step), walltime=now)
      self._tb.flush()
    return record

  def write_samples(self, step: int, samples: list[Mapping[str, Any]]) -> None:
    """Appends `{"step", **sample}` lines to `run_dir/samples.jsonl` (e.g. an RL step's prompts,
    completions and rewards) and puts them in TensorBoard as text under `samples`."""
    if self._file is None or not samples:
      return
    lines = [json.dumps({"step": int(step), **s}, default=float) for s in samples]
    path = self.run_dir / SAMPLES_FILE
    if path.exists():
      _drop_partial_line(path)
    with open(path, "a", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
    if self._tb is not None:
      table = "\n\n".join(f"    {line}" for line in lines)  # markdown code block per sample
      self._tb.add_text("samples", table, global_step=int(step))
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; further writes are dropped."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `run_dir/metrics.jsonl` in file order.

  A malformed *last* line (a crash mid-write) is skipped; a malformed line elsewhere is a
  `ValueError` naming it. A resumed run may repeat steps; later records are the newer ones.
  Raises FileNotFoundError when the run has no metrics file.
  """
  path = Path(run_dir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir} (is it a jaxpost run folder?)")
  lines = path.read_text(encoding="utf-8").split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not an object")
    except ValueError as e:
      if all(not rest.strip() for rest in lines[number:]):
        break  # the truncated tail of a crashed write
      raise ValueError(f"{path}, line {number}: malformed metrics record ({e})") from None
    records.append(record)
  return records


class ProgressBar:
  """A tqdm bar over optimizer steps showing the loss, tokens/s and the ETA.

  `update(step, loss=..., tokens=...)` moves the bar to `step`; `tokens` is the number of
  tokens processed since the previous update, and tokens/s is measured over the last
  `window` updates (so the first step's compilation soon drops out of it). The bar is off
  when `disable=True`, or when `disable=None` and `file` is not a terminal.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, *, disable: bool | None = None,
               file: IO[str] | None = None, window: int = 20, desc: str = "train"):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    file = sys.stderr if file is None else file
    if disable is None:
      isatty = getattr(file, "isatty", None)
      disable = not (isatty is not None and isatty())
    self.disabled = disable
    self._bar = tqdm(total=total_steps, initial=initial_step, disable=disable, file=file,
                     desc=desc, unit="step", dynamic_ncols=True, leave=True)
    self._step = initial_step
    self._times: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
    self._tokens = 0
    self._times.append((time.perf_counter(), 0))

  @property
  def tokens_per_second(self) -> float | None:
    """Throughput over the recent window (None before any tokens were counted)."""
    (t0, n0), (t1, n1) = self._times[0], self._times[-1]
    if t1 <= t0 or n1 == n0:
      return None
    return (n1 - n0) / (t1 - t0)

  def update(self, step: int, *, loss: float | None = None, tokens: int | None = None,
             **extra: float) -> None:
    """Moves the bar to `step`, showing `loss`, tokens/s and any `extra` numbers."""
    if tokens is not None:
      self._tokens += int(tokens)
      self._times.append((time.perf_counter(), self._tokens))
    if step > self._step:
      self._bar.update(step - self._step)
      self._step = step
    if self.disabled:
      return
    postfix = {}
    if loss is not None:
      loss = float(loss)
      postfix["loss"] = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
    if (rate := self.tokens_per_second) is not None:
      postfix["tok/s"] = f"{rate:,.0f}"
    for name, value in extra.items():
      postfix[name] = f"{float(value):.4g}"
    self._bar.set_postfix(postfix, refresh=True)

  def write(self, message: str) -> None:
    """Prints a line above the bar (or plainly when the bar is off)."""
    self._bar.write(message, file=self._bar.fp if not self.disabled else sys.stdout)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
