"""Plots of a run's metrics: `plot_run(run_dir)` -> PNGs in `run_dir/plots/`.

Metrics are grouped by name without their first prefix, so `train/loss` and `eval/loss` share
the axes of the "loss" group (and `train/reward/mean` with `eval/reward/mean`). The evaluation
loop's `run_dir/eval/metrics.jsonl` (names `eval/<suite>/<metric>`), when present, is drawn
beside the training metrics, grouped the same way. Two files:

* `loss.png`: the loss group alone (when the run logged a loss);
* `metrics.png`: one subplot per group, loss first, then the groups by name.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change), so it runs
headless and inside other programs. A resumed run may log a step twice; the later value wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxpost.metrics import METRICS_FILE, read_metrics

PLOTS_DIR = "plots"
EVAL_DIR = "eval"
_RESERVED = ("step", "time")


def metric_series(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
  """{metric name: (steps, values)} sorted by step, from metric records (later records win
  at a repeated step; non-numeric values are skipped, infinities become NaN gaps)."""
  by_name: dict[str, dict[int, float]] = {}
  for record in records:
    step = record.get("step")
    if not isinstance(step, int):
      continue
    for name, value in record.items():
      if name in _RESERVED or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      value = float(value)
      by_name.setdefault(name, {})[step] = value if math.isfinite(value) else math.nan
  out = {}
  for name, points in by_name.items():
    steps = sorted(points)
    out[name] = (steps, [points[s] for s in steps])
  return out


def group_name(metric: str) -> str:
  """The group a metric is drawn in: its name without the first `prefix/`."""
  return metric.split("/", 1)[1] if "/" in metric else metric


def metric_groups(names: Iterable[str]) -> dict[str, list[str]]:
  """{group: metric names}: the loss group first, then groups by name; in a group `train/...`
  first, then the rest by name."""
  groups: dict[str, list[str]] = {}
  for name in sorted(names, key=lambda n: (not n.startswith("train/"), n)):
    groups.setdefault(group_name(name), []).append(name)
  order = sorted(groups, key=lambda g: (g != "loss", g))
  return {g: groups[g] for g in order}


def draw_series(ax, title: str, names: list[str], series: dict) -> None:
  """Draws `series[name]` for each of `names` on `ax` (a legend unless it is one series named
  like the title)."""
  for name in names:
    steps, values = series[name]
    marker = "o" if len(steps) <= 50 else None
    ax.plot(steps, values, label=name, marker=marker, markersize=3, linewidth=1.2)
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.grid(True, alpha=0.3)
  if len(names) > 1 or names[0] != title:
    ax.legend(fontsize="small")


def save_figure(fig: Figure, path: Path) -> Path:
  """Renders `fig` with the Agg canvas to the PNG `path`; returns `path`."""
  FigureCanvasAgg(fig)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def run_series(run_dir: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
  """The series `plot_run` draws: `run_dir/metrics.jsonl` and, when present,
  `run_dir/eval/metrics.jsonl` (whose values win where both hold a metric at a step).

  Raises FileNotFoundError when the folder has neither file.
  """
  run_dir = Path(run_dir)
  eval_dir = run_dir / EVAL_DIR
  has_eval = (eval_dir / METRICS_FILE).is_file()
  try:
    records = read_metrics(run_dir)
  except FileNotFoundError:
    if not has_eval:
      raise
    records = []
  if has_eval:
    records += read_metrics(eval_dir)
  return metric_series(records)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
  """Draws the metrics of `run_dir/metrics.jsonl` (and `run_dir/eval/metrics.jsonl`) into PNGs;
  returns their paths.

  Args:
    run_dir: a run folder written by `jaxpost.metrics.MetricWriter`.
    out: the folder for the PNGs (default `run_dir/plots`).

  Raises:
    FileNotFoundError: the folder has no metrics.jsonl (nor eval/metrics.jsonl).
    ValueError: it has no numeric metric to draw.
  """
  run_dir = Path(run_dir)
  series = run_series(run_dir)
  if not series:
    raise ValueError(f"{run_dir / METRICS_FILE} has no numeric metrics to plot")
  out_dir = Path(out) if out is not None else run_dir / PLOTS_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  groups = metric_groups(series)
  title = run_dir.resolve().name
  paths = []
  if "loss" in groups:
    fig = Figure(figsize=(7, 4.5))
    draw_series(fig.add_subplot(1, 1, 1), "loss", groups["loss"], series)
    fig.suptitle(title)
    paths.append(save_figure(fig, out_dir / "loss.png"))
  cols = min(3, len(groups))
  rows = math.ceil(len(groups) / cols)
  fig = Figure(figsize=(4.8 * cols, 3.4 * rows))
  for i, (group, names) in enumerate(groups.items()):
    draw_series(fig.add_subplot(rows, cols, i + 1), group, names, series)
  fig.suptitle(title)
  paths.append(save_figure(fig, out_dir / "metrics.png"))
  return paths
