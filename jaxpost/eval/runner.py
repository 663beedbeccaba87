"""The evaluation engine shared by `jaxpost eval`, its sidecar and a recipe's `eval:` section:
`Evaluator.evaluate(params, reference)` runs every suite and returns `eval/<suite>/<metric>`.

    ev = Evaluator(section, run.config, run.tokenizer, data=resolve_data(run))
    metrics = ev.evaluate(params, reference_params)     # one checkpoint
    ev.evaluate(other_params, reference_params)          # no recompilation: same shapes

Rows are read once per suite. A suite's `cache` keeps what only the reference determines (its
scores, completions and rewards), so the reference is run once per process, not once per
checkpoint. With `retention`, each metric is also given relative to the reference's value
(`<metric>_retention`, 1.0 = nothing lost), from the reference's own evaluation (step 0).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from jaxpost.config import EvalSection
from jaxpost.data import DataError, read_rows
from jaxpost.eval import generation, suites
from jaxpost.eval.engine import EvalModel

# kind -> suite function (see `jaxpost.eval.suites`); `custom` suites name their own.
SUITES: dict[str, Callable] = {
    "likelihood": suites.likelihood,
    "multiple_choice": suites.multiple_choice,
    "preference": suites.preference,
    "generation": generation.generation,
    "drift": generation.drift,
    "diversity": generation.diversity,
}
# What a `@eval` / `@train` split means for each kind: the run's chat rows, or its pairs.
DATA_KIND = {"preference": "paired"}
NEEDS_REFERENCE = ("drift",)


def read_suite_rows(path: str, limit: int | None) -> list[dict[str, Any]]:
  """The rows of a suite's file (the first `limit`), each with its `_where` ("file row N");
  an unreadable row is a `DataError` naming it."""
  rows = []
  for row in read_rows(path):
    if isinstance(row.data, DataError):
      raise row.data
    rows.append({**row.data, "_where": row.where})
    if limit is not None and len(rows) >= limit:
      break
  return rows


def resolve_data(source) -> Callable[[str, str], str]:
  """`(data, kind) -> path` for a run's data source (`jaxpost.tasks.source`): `@eval` and
  `@train` are the run's own splits; anything else is a path."""

  def resolve(data: str, kind: str) -> str:
    if not data.startswith("@"):
      return data
    split = data[1:]
    if split not in ("eval", "train"):
      raise ValueError(f"data {data!r}: a split is @eval or @train")
    if source is None:
      raise ValueError(f"data {data!r} names a run's split, but the model is not a run folder: "
                       "give a file")
    path = source.path(DATA_KIND.get(kind, "sft"), split)
    if path is None:
      raise ValueError(f"data {data!r}: the run has no data.{split} file")
    return path

  return resolve


class Evaluator:
  """Runs an `EvalSection`'s suites on models of one shape (see the module docstring)."""

  def __init__(self, section: EvalSection, config, tokenizer, *,
               data: Callable[[str, str], str] | None = None, compute_dtype=None,
               log: Callable[[str], None] = print):
    self.section, self.config, self.tokenizer = section, config, tokenizer
    self.compute_dtype, self.log = compute_dtype, log
    resolve = data or resolve_data(None)
    self.rows: dict[str, list] = {}
    self.cache: dict[str, dict] = {}
    self.functions: dict[str, Callable] = {}
    for name, s in section.suites.items():
      self.rows[name] = (read_suite_rows(resolve(s.data, s.kind), s.limit)
                         if s.data is not None else [])
      self.cache[name] = {}
      if s.probes is not None:
        self.cache[name]["probes"] = read_suite_rows(s.probes, s.limit)
      if s.kind == "custom":
        from jaxpost.user_code import import_function  # pylint: disable=import-outside-toplevel
        self.functions[name] = import_function(s.function, key=f"suites.{name}.function")[1]
      else:
        self.functions[name] = SUITES[s.kind]
    self.reference_results: dict[str, float] = {}

  def needs_reference(self) -> bool:
    """Whether any suite compares with a reference model (drift, implicit reward, win rate)."""
    return any(s.kind in NEEDS_REFERENCE or s.kind == "preference" or s.retention
               for s in self.section.suites.values())

  def model(self, params, label: str = "model") -> EvalModel:
    sec = self.section
    return EvalModel(self.config, params, self.tokenizer, batch_size=sec.batch_size,
                     max_length=sec.max_length, compute_dtype=self.compute_dtype, label=label,
                     seed=sec.seed)

  def evaluate(self, params, reference_params=None, *, is_reference: bool = False
               ) -> dict[str, float]:
    """Every suite on the model `params` (full params: adapters or prompt attached), against
    `reference_params` when given; `is_reference` marks the reference's own evaluation (its
    results are what `retention` divides by)."""
    model = self.model(params)
    reference = None if reference_params is None else self.model(reference_params, "reference")
    out: dict[str, float] = {}
    t0, examples = time.perf_counter(), 0
    for name, s in self.section.suites.items():
      rows = self.rows[name]
      if s.kind in NEEDS_REFERENCE and reference is None:
        self.log(f"eval: suite {name} ({s.kind}) needs a reference model; skipped")
        continue
      t1 = time.perf_counter()
      result = self.functions[name](model, reference, rows, s, self.cache[name])
      examples += len(rows) * (s.k if s.kind in ("generation", "diversity") else 1)
      named = {f"eval/{name}/{k}": float(v) for k, v in result.items()}
      if s.retention:
        named.update(self._retention(name, named, is_reference))
      named[f"eval/{name}/seconds"] = time.perf_counter() - t1
      out.update(named)
    if self.section.lm_eval is not None:
      out.update(self._lm_eval(model))
    seconds = time.perf_counter() - t0
    out["eval/seconds"] = seconds
    out["eval/examples_per_s"] = examples / seconds if seconds > 0 else 0.0
    if is_reference:
      self.reference_results = dict(out)
    return out

  def _retention(self, name: str, named: dict[str, float], is_reference: bool):
    base = named if is_reference else self.reference_results
    out = {}
    for key, value in named.items():
      ref = base.get(key)
      if ref is not None and ref != 0:
        out[f"{key}_retention"] = value / ref
    return out

  def _lm_eval(self, model: EvalModel) -> dict[str, float]:
    from jaxpost.eval.lm_eval_adapter import run_lm_eval  # pylint: disable=import-outside-toplevel
    le = self.section.lm_eval
    results = run_lm_eval(model, le.task_list(), include_path=le.include_path, limit=le.limit,
                          num_fewshot=le.num_fewshot)
    return {f"eval/lm_eval/{k}": v for k, v in results.items()}

