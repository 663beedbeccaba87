"""White-box sections: `drift:` (representation drift from the reference model as a metric and
a penalty, `jaxpost.whitebox.drift`, for any algorithm) and `edit:` (train only a steering
vector or a low-rank edit at one site, `jaxpost.whitebox.edit`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import Section, _require
from jaxpost.models.sites import SITES


@dataclasses.dataclass(frozen=True)
class DriftSection(Section):
  """Keep the model's internal activations near the reference model's.

  `weight` > 0 adds weight x drift to the loss, drift being the relative squared distance of
  the activations at `site` and `layers` (null: every layer) from the reference model's on
  the batch's tokens (`jaxpost.whitebox.drift`); `measure: true` reports the drift (train and
  held-out `drift` metrics) without the penalty, e.g. for the baseline run. Either keeps a
  reference model in the run (for full fine-tuning a frozen copy of the start weights; under
  LoRA or prompt tuning the base) and costs a policy and a reference forward per step.
  """

  weight: float = 0.0
  measure: bool = False
  site: str = "resid_post"
  layers: tuple[int, ...] | None = None

  @property
  def enabled(self) -> bool:
    return self.weight > 0 or self.measure

  def validate(self, prefix: str) -> None:
    _require(self.weight >= 0, f"{prefix}weight must be >= 0, got {self.weight}")
    _require(self.site in SITES, f"{prefix}site: unknown site {self.site!r}; the sites are "
             f"{', '.join(SITES)}")
    _require(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
             f"{prefix}layers must be null or a non-empty list of layer indices >= 0")


@dataclasses.dataclass(frozen=True)
class EditSection(Section):
  """Train only an edit of the activations at one site over a frozen model (a trainable
  beside `lora:` and `prompt:`).

  `kind: vector` learns a vector added at `site` in each of `layers` (a trained steering
  vector); `kind: low_rank` learns x + (x A) B there, A [D, rank], B [rank, D], B starting at
  zero (a low-rank representation edit, cf. ReFT, Wu et al. 2024). Both start as the
  unchanged model. `site` is a residual-stream-shaped site ([B, T, D]); `layers` null means
  every layer. The run writes the edit to `run_dir/edit/` (`edit.safetensors`, `edit.json`).
  """

  kind: Literal["vector", "low_rank"] = "vector"
  site: str = "resid_post"
  layers: tuple[int, ...] | None = None
  rank: int = 4

  def validate(self, prefix: str) -> None:
    sites = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    _require(self.site in sites, f"{prefix}site must be one of {', '.join(sites)} (an edit "
             f"adds along the hidden size), got {self.site!r}")
    _require(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
             f"{prefix}layers must be null or a non-empty list of layer indices >= 0")
    _require(self.rank >= 1, f"{prefix}rank must be >= 1, got {self.rank}")
