"""The `data.curriculum:` section: training data ordered and paced easy first
(`jaxpost.data.curriculum`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import Section, _require


@dataclasses.dataclass(frozen=True)
class CurriculumSection(Section):
  """Competence-based curriculum (Platanios et al. 2019): batch t of the training data is drawn
  from the easiest fraction c(t) of the items, growing from `start_fraction` to 1 at
  `full_at_step` (None: half of train.steps) by `pacing` (`linear`, `root`, or `step` in
  `stages` equal steps); then the ordinary shuffled epochs follow.

  `score` is the difficulty, lower = easier: `length` (tokens), `loss` (the starting model's
  mean per-token loss on the item, computed once and cached under RUN_DIR/curriculum), the
  name of a numeric column of the data, or `module:function` (`function(row) -> float`, also
  `path/to/file.py:function`). A column named `length` or `loss` is reached by a function.
  """

  score: str = "length"
  pacing: Literal["linear", "root", "step"] = "linear"
  start_fraction: float = 0.2
  full_at_step: int | None = None
  stages: int = 4

  def validate(self, prefix: str) -> None:
    _require(bool(self.score), f"{prefix}score must name length, loss, a column or "
             "module:function")
    _require(0.0 < self.start_fraction <= 1.0,
             f"{prefix}start_fraction must be in (0, 1], got {self.start_fraction}")
    _require(self.full_at_step is None or self.full_at_step >= 1,
             f"{prefix}full_at_step must be >= 1 or null, got {self.full_at_step}")
    _require(self.stages >= 1, f"{prefix}stages must be >= 1, got {self.stages}")
