"""The forgetting report of a task sequence: the accuracy matrix and what it says.

R[i, j] is the held-out accuracy (greedy exact match) on task j after stage i, for T stages
(tasks) in order; b[j] is the start model's accuracy on task j. After the last stage
(0-based, T - 1):

    average accuracy   A   = 1/T sum_j R[T-1, j]
    forgetting         F   = 1/(T-1) sum_{j<T-1} max_{i<T-1} (R[i, j] - R[T-1, j])
                                                                   (Chaudhry et al. 2018)
    backward transfer  BWT = 1/(T-1) sum_{j<T-1} (R[T-1, j] - R[j, j])
    forward transfer   FWT = 1/(T-1) sum_{j>=1} (R[j-1, j] - b[j])   (Lopez-Paz & Ranzato 2017)
    retention of j         = R[T-1, j] / R[j, j]        (the accuracy a task keeps, as the
                                                         evaluation suites' `retention`)

F >= 0 is how much of its best accuracy a task lost; BWT < 0 is forgetting, > 0 earlier
tasks improved by later ones. After stage k < T - 1 the same formulas apply to the first
k + 1 tasks (the report's per-stage table). Chaudhry et al. 2018: "Riemannian Walk for
Incremental Learning", arXiv 1801.10112; Lopez-Paz and Ranzato 2017: "Gradient Episodic
Memory for Continual Learning", arXiv 1706.08840.

    metrics = forgetting_metrics(R, before=b)          # after the last stage done
    write_report(RUN_DIR / "continual", names, R, before=b)   # report.md, report.json, PNG
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxpost.eval.report import markdown_table
from jaxpost.plot import save_figure

REPORT_FILE, JSON_FILE, PLOT_FILE = "report.md", "report.json", "accuracy_matrix.png"
NAMES = {"average_accuracy": "A", "forgetting": "F", "backward_transfer": "BWT",
         "forward_transfer": "FWT"}


def forgetting_metrics(R: Any, before: Sequence[float] | None = None) -> dict[str, float]:
  """A, F, BWT and (with the start model's accuracies `before`) FWT after the last stage in
  `R` (module docstring). `R` is [k, T] (the rows of the k stages done, k <= T) or [k, k];
  only its first k columns (the tasks trained so far) count. F, BWT and FWT need k >= 2."""
  R = np.asarray(R, np.float64)
  k = R.shape[0]
  if R.ndim != 2 or k < 1 or R.shape[1] < k:
    raise ValueError(f"R must be [stages done, tasks] with at least one stage, got {R.shape}")
  R = R[:, :k]
  out = {"average_accuracy": float(R[-1].mean())}
  if k >= 2:
    best = R[:-1, :-1].max(axis=0)  # max over stages i < k-1 of each earlier task
    out["forgetting"] = float(np.mean(best - R[-1, :-1]))
    out["backward_transfer"] = float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))
    if before is not None:
      b = np.asarray(before, np.float64)[:k]
      out["forward_transfer"] = float(np.mean([R[j - 1, j] - b[j] for j in range(1, k)]))
  return out


def retention(R: Any) -> list[float]:
  """R[last, j] / R[j, j] for each task trained so far (nan where R[j, j] is 0)."""
  R = np.asarray(R, np.float64)
  k = R.shape[0]
  return [float(R[-1, j] / R[j, j]) if R[j, j] > 0 else math.nan for j in range(k)]


def _plot(names: Sequence[str], rows: list[str], values: np.ndarray, path: Path,
          title: str) -> Path:
  """A heat map of the accuracy matrix (rows: before, then each stage; columns: tasks)."""
  fig = Figure(figsize=(1.6 + 1.3 * len(names), 1.2 + 0.55 * len(rows)))
  ax = fig.add_subplot(1, 1, 1)
  image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
  for i in range(values.shape[0]):
    for j in range(values.shape[1]):
      if np.isfinite(values[i, j]):
        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                color="black" if values[i, j] > 0.6 else "white", fontsize=9)
  ax.set_xticks(range(len(names)), labels=list(names))
  ax.set_yticks(range(len(rows)), labels=rows)
  ax.set_xlabel("task (held-out exact match)")
  ax.set_ylabel("after")
  ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, fraction=0.05)
  return save_figure(fig, path)


def _number(x: float | None) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x + 0.0:.3f}"


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def write_report(folder: str | os.PathLike, names: Sequence[str], R: Any, *,
                 before: Sequence[float] | None = None, title: str = "Continual learning",
                 notes: Sequence[str] = (), extra: dict[str, Any] | None = None) -> Path:
  """Writes `folder/report.md` (the matrix, the metrics after each stage, the formulas),
  `folder/report.json` (the same numbers, and `extra`) and `folder/accuracy_matrix.png`;
  returns the report's path. `R` holds the rows of the stages done ([k, T]), `names` the T
  tasks (stages), `before` the start model's accuracies, `notes` lines under the title."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  R = np.asarray(R, np.float64).reshape(-1, len(names))
  k = R.shape[0]
  per_stage = [forgetting_metrics(R[:i + 1], before) for i in range(k)]
  rows = (["before"] if before is not None else []) + [f"{names[i]} (stage {i})"
                                                        for i in range(k)]
  values = np.concatenate([[before], R]) if before is not None else R
  header = ["after \\ task"] + list(names)
  lines = [f"# {title}", "", *notes, "" if notes else None,
           "R[i][j]: held-out exact match (greedy) on task j after stage i; \"before\" is the "
           "start model.", ""]
  lines = [x for x in lines if x is not None]
  lines += markdown_table(header, [[r] + [_number(v) for v in row] for r, row in zip(rows, values)])
  lines += ["", f"![accuracy matrix]({PLOT_FILE})", "", "## After each stage", ""]
  metric_names = [m for m in NAMES if any(m in s for s in per_stage)]
  lines += markdown_table(["after stage"] + [NAMES[m] for m in metric_names],
                          [[f"{names[i]} ({i})"] + [_number(s.get(m)) for m in metric_names]
                           for i, s in enumerate(per_stage)])
  keep = retention(R)
  lines += ["", "Retention R[last][j] / R[j][j]: " + ", ".join(
      f"{names[j]} {_number(keep[j])}" for j in range(k)), "",
            "A = mean_j R[last][j]; F = mean_{j<last} max_{i<last} (R[i][j] - R[last][j]) "
            "(Chaudhry et al. 2018); BWT = mean_{j<last} (R[last][j] - R[j][j]); FWT = "
            "mean_{j>=1} (R[j-1][j] - before[j]) (Lopez-Paz & Ranzato 2017), over the tasks "
            "trained so far.", ""]
  _plot(names, rows, values, folder / PLOT_FILE, title)
  data = {"tasks": list(names), "accuracy": R.tolist(),
          "before": None if before is None else [float(x) for x in before],
          "after_each_stage": per_stage, "retention": keep, **(extra or {})}
  _write(folder / JSON_FILE, json.dumps(data, indent=2, allow_nan=True) + "\n")
  report = folder / REPORT_FILE
  _write(report, "\n".join(lines))
  return report
