"""Evaluation report: `write_report(run_dir / "eval")` -> `report.md` plus PNG curves.

    evals = read_eval(run_dir / "eval")      # {step: {"eval/arith/exact_match": 0.81, ...}}
    path = write_report(run_dir / "eval")    # run_dir/eval/report.md, run_dir/eval/plots/*.png

The evaluation loop writes `eval/metrics.jsonl` with `MetricWriter(run_dir / "eval")`. Names
are `eval/<suite>/<metric>`; step 0 is the reference (the model before training), other steps
are checkpoints. A step may be written on several lines (the in-loop evaluator and a sidecar, a
restart): they merge, later values winning. `eval/examples_per_s` and `eval/seconds` (also per
suite) are throughput and go to a separate "speed" section.

The report holds one HELM-style table per suite (rows: metrics; columns: the reference, then the
checkpoints, each cell `value (change against the reference)`), one PNG of curves per suite
(the reference as a dashed line) and the speed table.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from matplotlib.figure import Figure

from jaxpost.metrics import METRICS_FILE, read_metrics
from jaxpost.plot import PLOTS_DIR, draw_series, metric_series, save_figure

REPORT_FILE = "report.md"
MAX_CHECKPOINT_COLUMNS = 8
SPEED_METRICS = ("examples_per_s", "seconds")  # the last part of a throughput metric's name
_OTHER_SUITE = "other"  # `eval/<metric>` names without a suite


def read_eval(eval_dir: str | os.PathLike) -> dict[int, dict[str, float]]:
  """{step: {metric: value}} of the `eval/...` metrics in `eval_dir/metrics.jsonl`, steps in
  ascending order; lines of the same step merge, later values winning.

  Raises FileNotFoundError when the file is missing.
  """
  path = Path(eval_dir) / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no evaluation metrics: {path} does not exist (the evaluation loop "
                            "writes it with jaxpost.metrics.MetricWriter(run_dir / 'eval'))")
  by_step: dict[int, dict[str, float]] = {}
  for name, (steps, values) in metric_series(read_metrics(eval_dir)).items():
    if name.startswith("eval/"):
      for step, value in zip(steps, values):
        by_step.setdefault(step, {})[name] = value
  return dict(sorted(by_step.items()))


def _is_speed(name: str) -> bool:
  return name.rsplit("/", 1)[-1] in SPEED_METRICS


def _split(name: str) -> tuple[str, str]:
  """(suite, metric) of `eval/<suite>/<metric>`; `eval/<metric>` falls in the "other" suite."""
  parts = name.split("/", 2)
  return (parts[1], parts[2]) if len(parts) == 3 else (_OTHER_SUITE, parts[-1])


def _decimals(values) -> int:
  """Decimals for a row of numbers, by its largest magnitude: 0.812, 12.34, 123.4, 1,234, and
  three significant digits below 0.1 (0.0123, 0.00440)."""
  scale = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
  if scale == 0 or 0.1 <= scale < 10:
    return 3
  if scale < 0.1:
    return min(8, 2 - math.floor(math.log10(scale)))
  return 2 if scale < 100 else 1 if scale < 1000 else 0


def _cell(value: float | None, decimals: int, reference: float | None = None) -> str:
  """`0.812`, or with a reference `0.812 (+0.472)`; `-` for a missing value."""
  if value is None:
    return "-"
  text = f"{value + 0.0:,.{decimals}f}" if math.isfinite(value) else str(value)
  if reference is None or not (math.isfinite(value) and math.isfinite(reference)):
    return text
  return f"{text} ({value - reference + 0.0:+,.{decimals}f})"


def _thin(checkpoints: list[int], most: int = MAX_CHECKPOINT_COLUMNS) -> list[int]:
  """At most `most` of the checkpoints: the first, the last and evenly spaced ones between."""
  n = len(checkpoints)
  if n <= most:
    return checkpoints
  return [checkpoints[i] for i in sorted({round(j * (n - 1) / (most - 1)) for j in range(most)})]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  """The lines of a Markdown table: the first column left-aligned, the others right."""
  rule = "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"
  return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows]


def _file_name(suite: str) -> str:
  return "eval_" + re.sub(r"[^\w.-]", "_", suite) + ".png"


def _plot_suite(suite: str, names: list[str], evals: dict[int, dict[str, float]], path: Path,
                reference_label: str) -> Path:
  """One subplot per metric: the checkpoints' values over steps, the reference dashed."""
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  fig = Figure(figsize=(4.8 * cols, 3.4 * rows))
  reference = evals.get(0, {})
  for i, name in enumerate(names):
    ax = fig.add_subplot(rows, cols, i + 1)
    if name in reference:
      ax.axhline(reference[name], linestyle="--", color="0.4", linewidth=1, label=reference_label)
    steps = [s for s, metrics in evals.items() if s != 0 and name in metrics]
    series = {name: (steps, [evals[s][name] for s in steps])}
    draw_series(ax, _split(name)[1], [name], series)
  fig.suptitle(suite)
  return save_figure(fig, path)


def write_report(eval_dir: str | os.PathLike, *, title: str | None = None,
                 reference_label: str = "reference") -> Path:
  """Writes `eval_dir/report.md` and one PNG per suite in `eval_dir/plots/`; returns the
  report's path.

  Args:
    eval_dir: the folder of the evaluation loop's `metrics.jsonl` (usually `run_dir/eval`).
    title: the report's heading (default: "Evaluation: <run folder name>").
    reference_label: the name of the step-0 column and of the dashed line in the curves.

  Raises:
    FileNotFoundError: `eval_dir/metrics.jsonl` does not exist.
    ValueError: it holds no `eval/...` metrics other than throughput.
  """
  eval_dir = Path(eval_dir)
  evals = read_eval(eval_dir)
  suites: dict[str, list[str]] = {}
  for name in sorted({n for metrics in evals.values() for n in metrics if not _is_speed(n)}):
    suites.setdefault(_split(name)[0], []).append(name)
  if not suites:
    raise ValueError(f"{eval_dir / METRICS_FILE} holds no eval/<suite>/<metric> metrics")
  has_reference = 0 in evals
  checkpoints = [s for s in evals if s != 0]
  shown = _thin(checkpoints)
  columns = ([0] if has_reference else []) + shown
  header = ["metric"] + [reference_label if s == 0 else f"step {s}" for s in columns]
  run_name = (eval_dir.resolve().parent if eval_dir.name == "eval" else eval_dir.resolve()).name
  lines = [f"# {title or f'Evaluation: {run_name}'}", ""]
  if has_reference:
    lines += [(f"Step 0 is the {reference_label} (the model before training); each checkpoint "
               f"cell is `value (change against the {reference_label})`."), ""]
  else:
    lines += ["No step 0 (reference) was evaluated, so no changes are shown.", ""]

  lines += ["## Results", ""]
  reference = evals.get(0, {})
  for suite, names in suites.items():
    rows = []
    for name in names:
      values = [evals[step].get(name) for step in columns]
      decimals = _decimals(values)
      rows.append([_split(name)[1]] + [
          _cell(v, decimals, None if step == 0 else reference.get(name))
          for step, v in zip(columns, values)])
    lines += [f"### {suite}", ""] + markdown_table(header, rows) + [""]
  if len(shown) < len(checkpoints):
    lines += [(f"Showing {len(shown)} of {len(checkpoints)} checkpoints (the first, the last "
               "and evenly spaced ones between); the curves and metrics.jsonl hold them all."), ""]

  plots_dir = eval_dir / PLOTS_DIR
  plots_dir.mkdir(parents=True, exist_ok=True)
  lines += ["## Curves", ""]
  for suite, names in suites.items():
    path = _plot_suite(suite, names, evals, plots_dir / _file_name(suite), reference_label)
    lines += [f"![{suite}]({PLOTS_DIR}/{path.name})", ""]

  speed = sorted({n for metrics in evals.values() for n in metrics if _is_speed(n)})
  speed_steps = [s for s in columns if any(n in evals[s] for n in speed)]
  if speed_steps:
    decimals = [_decimals([evals[s].get(n) for s in speed_steps]) for n in speed]
    rows = [[reference_label if s == 0 else f"step {s}"]
            + [_cell(evals[s].get(n), d) for n, d in zip(speed, decimals)] for s in speed_steps]
    lines += ["## Speed", ""] + markdown_table(
        ["step"] + [n.removeprefix("eval/") for n in speed], rows)
    lines += [""]

  report = eval_dir / REPORT_FILE
  tmp = report.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
  tmp.write_text("\n".join(lines), encoding="utf-8")
  os.replace(tmp, report)
  return report
