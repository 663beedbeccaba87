"""The evaluation report (tables, deltas, column thinning, curves) and eval curves in plot_run."""

from __future__ import annotations

import itertools

import pytest

from jaxpost.eval.report import read_eval, write_report
from jaxpost.metrics import MetricWriter
from jaxpost.plot import metric_groups, plot_run, run_series

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _write_eval(eval_dir, steps: dict[int, dict[str, float]]) -> None:
  with MetricWriter(eval_dir, tensorboard=False) as writer:
    for step, metrics in steps.items():
      writer.write(step, metrics)


def _eval_run(eval_dir) -> None:
  """Step 0 and three checkpoints; step 20 is written twice and a sidecar adds a metric."""
  with MetricWriter(eval_dir, tensorboard=False) as writer:
    writer.write(0, {"eval/arith/exact_match": 0.34, "eval/arith/pass@4": 0.5,
                     "eval/heldout/perplexity": 12.34, "eval/examples_per_s": 250.0,
                     "eval/seconds": 4.0})
    writer.write(10, {"eval/arith/exact_match": 0.5, "eval/arith/pass@4": 0.6,
                      "eval/heldout/perplexity": 11.0})
    writer.write(20, {"eval/arith/exact_match": 0.1, "eval/arith/pass@4": 0.2,
                      "eval/heldout/perplexity": 99.0})
    writer.write(30, {"eval/arith/exact_match": 0.9, "eval/heldout/perplexity": 9.5,
                      "eval/seconds": 3.5})
    writer.write(20, {"eval/arith/exact_match": 0.812, "eval/heldout/perplexity": 10.21})
    writer.write(20, {"eval/drift/kl": 0.0123})


def _row(report: str, heading: str, metric: str) -> list[str]:
  section = report.split(f"### {heading}\n\n", 1)[1].split("\n\n", 1)[0]
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[0] == metric:
      return cells[1:]
  raise AssertionError(f"no row {metric!r} under {heading!r}:\n{section}")


def _header(report: str, heading: str) -> list[str]:
  line = report.split(f"### {heading}\n\n", 1)[1].splitlines()[0]
  return [c.strip() for c in line.strip("|").split("|")]


def test_read_eval_merges_steps_later_values_win(tmp_path):
  _eval_run(tmp_path)
  evals = read_eval(tmp_path)
  assert list(evals) == [0, 10, 20, 30]
  assert evals[20] == {"eval/arith/exact_match": 0.812, "eval/arith/pass@4": 0.2,
                       "eval/heldout/perplexity": 10.21, "eval/drift/kl": 0.0123}


def test_report_tables_deltas_curves_and_speed(tmp_path):
  eval_dir = tmp_path / "my-run" / "eval"
  _eval_run(eval_dir)
  path = write_report(eval_dir)
  assert path == eval_dir / "report.md"
  report = path.read_text()
  assert report.startswith("# Evaluation: my-run\n")
  assert _header(report, "arith") == ["metric", "reference", "step 10", "step 20", "step 30"]
  assert _row(report, "arith", "exact_match") == [
      "0.340", "0.500 (+0.160)", "0.812 (+0.472)", "0.900 (+0.560)"]
  assert _row(report, "arith", "pass@4") == ["0.500", "0.600 (+0.100)", "0.200 (-0.300)", "-"]
  assert _row(report, "heldout", "perplexity") == [
      "12.34", "11.00 (-1.34)", "10.21 (-2.13)", "9.50 (-2.84)"]
  assert _row(report, "drift", "kl") == ["-", "-", "0.0123", "-"]  # no reference value
  assert "examples_per_s" not in report.split("## Speed")[0]  # throughput is not in the tables
  assert "Showing" not in report
  speed = report.split("## Speed\n", 1)[1]
  assert "| reference | 250.0 | 4.000 |" in speed and "| step 30 | - | 3.500 |" in speed
  for suite in ("arith", "drift", "heldout"):
    assert f"![{suite}](plots/eval_{suite}.png)" in report
    png = eval_dir / "plots" / f"eval_{suite}.png"
    data = png.read_bytes()
    assert data[:8] == PNG_HEADER and len(data) > 1000
  assert not list(eval_dir.glob("*.tmp")) and not list(eval_dir.glob(".*.tmp"))


def test_no_reference_means_no_deltas(tmp_path):
  _write_eval(tmp_path, {5: {"eval/arith/exact_match": 0.25}, 9: {"eval/arith/exact_match": 0.5}})
  report = write_report(tmp_path, title="Arithmetic", reference_label="base").read_text()
  assert report.startswith("# Arithmetic\n")
  assert _header(report, "arith") == ["metric", "step 5", "step 9"]
  assert _row(report, "arith", "exact_match") == ["0.250", "0.500"]


def test_many_checkpoints_are_thinned_to_eight_columns(tmp_path):
  steps = {0: {"eval/arith/exact_match": 0.0}}
  steps.update({s: {"eval/arith/exact_match": s / 1000} for s in range(10, 210, 10)})
  _write_eval(tmp_path, steps)
  report = write_report(tmp_path, reference_label="base").read_text()
  header = _header(report, "arith")
  shown = [int(h.split()[1]) for h in header[2:]]
  assert header[:2] == ["metric", "base"] and len(shown) == 8
  assert shown[0] == 10 and shown[-1] == 200 and shown == sorted(shown)
  assert max(b - a for a, b in itertools.pairwise(shown)) <= 30  # roughly evenly spaced
  assert "Showing 8 of 20 checkpoints" in report
  assert _row(report, "arith", "exact_match")[-1] == "0.200 (+0.200)"


def test_report_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"eval[/\\]metrics\.jsonl does not exist"):
    write_report(tmp_path / "eval")
  _write_eval(tmp_path, {1: {"train/loss": 1.0, "eval/seconds": 2.0}})
  with pytest.raises(ValueError, match="holds no eval/<suite>/<metric> metrics"):
    write_report(tmp_path)


def test_plot_run_draws_eval_curves_beside_training(tmp_path):
  _write_eval(tmp_path, {s: {"train/loss": 3.0 / s} for s in range(1, 11)})
  _eval_run(tmp_path / "eval")
  series = run_series(tmp_path)
  assert series["eval/arith/exact_match"] == ([0, 10, 20, 30], [0.34, 0.5, 0.812, 0.9])
  groups = metric_groups(series)
  assert groups["loss"] == ["train/loss"] and groups["arith/exact_match"] == [
      "eval/arith/exact_match"]
  paths = plot_run(tmp_path)
  assert [p.name for p in paths] == ["loss.png", "metrics.png"]
  assert all(p.read_bytes()[:8] == PNG_HEADER for p in paths)
  (tmp_path / "metrics.jsonl").unlink()  # an evaluation-only run folder still plots
  assert [p.name for p in plot_run(tmp_path)] == ["metrics.png"]
