"""Metrics: the JSONL log, TensorBoard scalars, crash tolerance, plots and the progress bar."""

from __future__ import annotations

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.metrics import MetricWriter, ProgressBar, read_metrics
from jaxpost.plot import metric_groups, metric_series, plot_run

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} read from TFRecord event files with tensorboardX's protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted(tb_dir.glob("events.out.tfevents.*"))
  assert files, f"no event file in {tb_dir}"
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]  # skip the length's crc
      pos += 12 + length + 4  # and the data's crc
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_writer_appends_json_lines_and_tensorboard(tmp_path):
  with MetricWriter(tmp_path) as writer:
    record = writer.write(0, {"train/loss": np.float32(2.5), "train/lr": jnp.asarray(1e-3),
                              "train/tokens": np.int64(512)})
    writer.write(10, {"train/loss": 1.25, "eval/loss": 1.5})
  assert record["train/tokens"] == 512 and isinstance(record["train/tokens"], int)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)
  assert first["step"] == 0 and isinstance(first["time"], float)
  assert first["train/loss"] == 2.5 and first["train/lr"] == pytest.approx(1e-3)
  assert second == {"step": 10, "time": second["time"], "train/loss": 1.25, "eval/loss": 1.5}
  assert read_metrics(tmp_path) == [first, second]
  scalars = _tensorboard_scalars(tmp_path / "tb")
  assert scalars["train/loss"] == [(0, 2.5), (10, 1.25)]
  assert scalars["eval/loss"] == [(10, 1.5)]
  assert scalars["train/lr"][0][1] == pytest.approx(1e-3)


def test_each_write_is_flushed(tmp_path):
  writer = MetricWriter(tmp_path, tensorboard=False)
  writer.write(1, {"train/loss": 1.0})
  assert read_metrics(tmp_path)[0]["train/loss"] == 1.0  # before close
  writer.close()
  assert not (tmp_path / "tb").exists()


def test_writer_rejects_arrays_and_reserved_names(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="'train/loss' must be a scalar"):
      writer.write(0, {"train/loss": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, {"step": 1})


def test_disabled_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / "run", enabled=False) as writer:
    writer.write(0, {"train/loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_truncated_last_line_is_tolerated_and_cut_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.9}\n'
                  '{"step": 3, "train/lo')
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  with MetricWriter(tmp_path, tensorboard=False) as writer:  # a resumed run appends
    writer.write(3, {"train/loss": 1.8})
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match="line 2: malformed"):
    read_metrics(tmp_path)


def test_non_finite_values_round_trip(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(1, {"train/loss": float("nan"), "train/grad_norm": np.float32(np.inf)})
  record = read_metrics(tmp_path)[0]
  assert math.isnan(record["train/loss"]) and record["train/grad_norm"] == math.inf


def test_read_metrics_without_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
    read_metrics(tmp_path)
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl in"):
    plot_run(tmp_path)


def test_series_and_groups():
  records = [{"step": 1, "time": 0.0, "train/loss": 3.0, "train/lr": 1e-3},
             {"step": 2, "time": 0.0, "train/loss": 2.0, "eval/loss": 2.5, "note": "x"},
             {"step": 2, "time": 0.0, "train/loss": 1.9}]  # a resumed run repeats step 2
  series = metric_series(records)
  assert series["train/loss"] == ([1, 2], [3.0, 1.9])
  assert "note" not in series and "time" not in series
  assert metric_groups(series) == {"loss": ["train/loss", "eval/loss"], "lr": ["train/lr"]}


def test_plot_run_writes_pngs(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    for step in range(1, 21):
      metrics = {"train/loss": 3.0 / step, "train/lr": 1e-3, "train/grad_norm": 1.0 + step}
      if step % 5 == 0:
        metrics["eval/loss"] = 3.2 / step
      writer.write(step, metrics)
  paths = plot_run(tmp_path)
  assert [p.name for p in paths] == ["loss.png", "metrics.png"]
  for path in paths:
    assert path.parent == tmp_path / "plots"
    assert path.read_bytes()[:8] == PNG_HEADER
  out = plot_run(tmp_path, out=tmp_path / "elsewhere")
  assert all(p.parent == tmp_path / "elsewhere" for p in out)


def test_plot_run_without_loss_or_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0}\n')
  with pytest.raises(ValueError, match="no numeric metrics"):
    plot_run(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0, "train/reward": 0.5}\n')
  assert [p.name for p in plot_run(tmp_path)] == ["metrics.png"]


class _FakeTTY(io.StringIO):

  def isatty(self) -> bool:
    return True


def test_progress_bar_disabled():
  with ProgressBar(10, disable=True) as bar:
    for step in range(1, 11):
      bar.update(step, loss=1.0, tokens=100)
    bar.write("a log line")
  assert bar.disabled


def test_progress_bar_off_when_not_a_tty():
  stream = io.StringIO()
  with ProgressBar(5, file=stream) as bar:
    bar.update(1, loss=1.0, tokens=10)
  assert bar.disabled and stream.getvalue() == ""


def test_progress_bar_on_a_tty_shows_loss_and_throughput():
  stream = _FakeTTY()
  with ProgressBar(10, initial_step=2, file=stream, window=3) as bar:
    assert not bar.disabled and bar.tokens_per_second is None
    for step in range(3, 11):
      bar.update(step, loss=1.0 / step, tokens=256, lr=1e-3)
    bar.update(10, loss=float("nan"))
    assert bar.tokens_per_second is not None and bar.tokens_per_second > 0
    bar.write("a log line")
  text = stream.getvalue()
  assert "10/10" in text and "loss=" in text and "tok/s=" in text and "a log line" in text
