"""The evaluation config: the suites (shared by a recipe's `eval:` section and `jaxpost eval`),
and the standalone `EvalConfig` of an `EVAL.yaml`.

    suites:                      # a mapping: name -> suite; metrics are eval/<name>/<metric>
      arith:
        kind: generation         # likelihood | generation | multiple_choice | preference
        data: "@eval"            #   | drift | diversity | custom
        k: 4
        temperature: 1.0

`data` is a JSONL / JSON / Parquet file, or `@eval` / `@train`: the run's own split (its
`data.eval` / `data.train`, or the generated task's), of the kind the suite reads.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import Section, _require

SuiteKind = Literal["likelihood", "generation", "multiple_choice", "preference", "drift",
                    "diversity", "custom"]
Scorer = str  # exact | numeric | regex | module:function | path.py:function


@dataclasses.dataclass(frozen=True)
class SuiteSection(Section):
  """One metric suite (`jaxpost.eval.suites` documents each kind's rows and metrics).

  `limit` caps the rows read. Generation (`generation`, `drift`, `diversity`, `preference`'s
  reward-model win rate) samples `k` completions per prompt at `temperature` (0: greedy),
  `top_p`, up to `max_new_tokens`. `scorer` says when a completion is right: `exact`,
  `numeric` (within `tolerance`), `regex` (the answer is `pattern`'s first group), or a
  function `module:function` / `file.py:function` `(completion, row) -> float`. `reward_model`
  is an `algorithm=reward` run or folder (its mean score, and the win rate against the
  reference's completions). `probes` is a JSONL of `{prompt?, chosen, rejected}` pairs for the
  value-drift audit. `beta` scales DPO's implicit reward. `retention` also reports each metric
  divided by the reference's (1.0: nothing forgotten). `function` is a custom suite
  `module:function` `(model, reference, rows, section, cache) -> {metric: value}`.
  """

  kind: SuiteKind = "generation"
  data: str | None = None
  limit: int | None = None
  k: int = 1
  temperature: float = 0.0
  top_p: float | None = None
  max_new_tokens: int = 32
  scorer: Scorer = "exact"
  pattern: str | None = None
  tolerance: float = 1e-6
  reward_model: str | None = None
  probes: str | None = None
  beta: float = 0.1
  entropy_tokens: int = 8
  retention: bool = False
  function: str | None = None

  def validate(self, prefix: str) -> None:
    _require(self.kind in ("drift", "custom") or self.data is not None,
             f"{prefix}data is required for kind={self.kind} (a file, @eval or @train)")
    _require(self.kind != "drift" or self.data is not None or self.probes is not None,
             f"{prefix}data (prompts) or {prefix}probes (pairs) is required for kind=drift")
    _require(self.kind != "custom" or self.function is not None,
             f"{prefix}function is required for kind=custom (module:function)")
    _require(self.limit is None or self.limit >= 1, f"{prefix}limit must be >= 1")
    _require(self.k >= 1, f"{prefix}k must be >= 1, got {self.k}")
    _require(self.temperature >= 0, f"{prefix}temperature must be >= 0")
    _require(self.k == 1 or self.temperature > 0,
             f"{prefix}k={self.k} samples of a greedy decoder are all the same: set "
             f"{prefix}temperature > 0 (e.g. 1.0) or k=1")
    _require(self.kind != "diversity" or (self.k >= 2 and self.temperature > 0),
             f"{prefix}k={self.k}, {prefix}temperature={self.temperature}: a diversity suite "
             f"compares k >= 2 samples at temperature > 0")
    _require(self.max_new_tokens >= 1, f"{prefix}max_new_tokens must be >= 1")
    _require(self.scorer in ("exact", "numeric", "regex") or ":" in self.scorer,
             f"{prefix}scorer must be exact, numeric, regex or module:function, got "
             f"{self.scorer!r}")
    _require(self.scorer != "regex" or self.pattern is not None,
             f"{prefix}scorer=regex needs {prefix}pattern")
    _require(self.entropy_tokens >= 1, f"{prefix}entropy_tokens must be >= 1")


@dataclasses.dataclass(frozen=True)
class LmEvalSection(Section):
  """lm-evaluation-harness tasks run on the model (`pip install 'jaxpost[lmeval]'`):
  `tasks` comma-separated, `include_path` a folder of local task YAMLs."""

  tasks: str = ""
  include_path: str | None = None
  limit: int | None = None
  num_fewshot: int | None = None

  def task_list(self) -> list[str]:
    return [t.strip() for t in self.tasks.split(",") if t.strip()]

  def validate(self, prefix: str) -> None:
    _require(bool(self.task_list()), f"{prefix}tasks must name at least one task")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
  """A recipe's `eval:` section: the suites run inside `jaxpost train` every `every` steps
  (0: at each checkpoint) and on the start model (step 0), written to `RUN_DIR/eval`.

  `batch_size` rows per compiled call; `max_length` cuts longer rows from the left; `seed`
  seeds sampling (the same draws for every checkpoint)."""

  every: int = 0
  batch_size: int = 32
  max_length: int | None = None
  seed: int = 0
  report: bool = True
  suites: dict[str, SuiteSection] = dataclasses.field(default_factory=dict)
  lm_eval: LmEvalSection | None = None

  def validate(self, prefix: str) -> None:
    _require(self.every >= 0, f"{prefix}every must be >= 0")
    _require(self.batch_size >= 1, f"{prefix}batch_size must be >= 1")
    _require(bool(self.suites) or self.lm_eval is not None,
             f"{prefix}suites is empty: name at least one suite (or lm_eval.tasks)")
    for name, suite in self.suites.items():
      _require(name.replace("_", "").replace("-", "").isalnum(),
               f"{prefix}suites.{name}: a suite name is letters, digits, _ and -")
      suite.validate(f"{prefix}suites.{name}.")
    if self.lm_eval is not None:
      self.lm_eval.validate(f"{prefix}lm_eval.")


@dataclasses.dataclass(frozen=True)
class EvalConfig(EvalSection):
  """`jaxpost eval EVAL.yaml`: evaluates `model` (a Hugging Face folder, a run folder, or one
  of its `checkpoints/<step>`), or, with `follow`, every checkpoint of a run as it is written.

  `reference`: `base` (a run's start model), a Hugging Face folder, or null (no reference:
  no deltas, drift or win rate). `out_dir`: default `RUN_DIR/eval` (or `MODEL/eval`).
  `mesh_*` shard the evaluation (any device count; checkpoints restore onto it).
  A follower polls every `poll_seconds` and gives up after `idle_timeout` seconds without a
  new checkpoint while the run is unfinished (0: never).
  """

  model: str | None = None
  follow: str | None = None
  reference: str | None = "base"
  out_dir: str | None = None
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  compute_dtype: Literal["float32", "bfloat16"] | None = None
  poll_seconds: float = 2.0
  idle_timeout: float = 0.0

  def validate(self, prefix: str = "") -> None:  # pylint: disable=arguments-differ
    super().validate(prefix)
    _require((self.model is None) != (self.follow is None),
             "set exactly one of model=PATH (evaluate one model) and follow=RUN_DIR (evaluate "
             "each checkpoint of a run as it is written)")
    _require(self.poll_seconds > 0, "poll_seconds must be > 0")
    _require(self.idle_timeout >= 0, "idle_timeout must be >= 0")
