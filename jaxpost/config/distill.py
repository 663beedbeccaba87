"""The `distill:` section of `algorithm: distill` (`jaxpost.algorithms.distill`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import Section, _require


@dataclasses.dataclass(frozen=True)
class DistillSection(Section):
  """Knowledge distillation from a frozen `teacher` (a Hugging Face folder, or a run folder:
  its `final/`), of any size or family with the student's vocabulary.

  `kind`: `forward_kl`, `reverse_kl` or `jsd` (GKD's generalized JSD, interpolated by `beta`);
  `temperature` softens both distributions; `sft_weight` adds the cross-entropy of the data's
  tokens. `lambda_on_policy` is GKD's fraction of batches whose completions the student
  samples itself (at `sample_temperature`, up to `max_new_tokens`): 0 trains on the dataset's
  completions, 1 only on its own. `seq_kd`: the teacher answers every training prompt once
  (greedy), then the student is trained by SFT on those answers (Kim & Rush 2016).
  `quantize` stores the teacher as int8 / NF4 weight objects; `chunk` positions of both LM
  heads are computed at a time. `cache_top_k` K > 0: the teacher runs once over the data
  before training and its top-K log-probs (and the mass of the rest) are cached under
  RUN_DIR/distill; training reads them with no teacher in memory, the divergence taken over
  the K ids and one bucket for the rest (`jaxpost.losses.topk_divergence`: exact at K =
  vocabulary size, else the tail's shape is lost). Off-policy only: not with
  `lambda_on_policy` > 0 nor `seq_kd`.
  """

  teacher: str | None = None
  kind: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
  beta: float = 0.5
  temperature: float = 1.0
  sft_weight: float = 0.0
  lambda_on_policy: float = 0.0
  sample_temperature: float = 1.0
  max_new_tokens: int = 32
  seq_kd: bool = False
  quantize: Literal["none", "int8", "nf4"] = "none"
  chunk: int = 256
  cache_top_k: int = 0

  def validate(self, prefix: str) -> None:
    _require(0.0 <= self.beta <= 1.0, f"{prefix}beta must be in [0, 1], got {self.beta}")
    _require(self.temperature > 0, f"{prefix}temperature must be > 0, got {self.temperature}")
    _require(self.sft_weight >= 0, f"{prefix}sft_weight must be >= 0, got {self.sft_weight}")
    _require(0.0 <= self.lambda_on_policy <= 1.0,
             f"{prefix}lambda_on_policy must be in [0, 1], got {self.lambda_on_policy}")
    _require(self.sample_temperature >= 0, f"{prefix}sample_temperature must be >= 0")
    _require(self.max_new_tokens >= 1, f"{prefix}max_new_tokens must be >= 1")
    _require(self.chunk >= 1, f"{prefix}chunk must be >= 1")
    _require(not (self.seq_kd and self.lambda_on_policy > 0),
             f"{prefix}seq_kd trains on the teacher's answers by SFT; lambda_on_policy "
             "(the student's own answers, scored by the teacher) is the other recipe: keep one")
    _require(self.cache_top_k >= 0, f"{prefix}cache_top_k must be >= 1 (0: off), got "
             f"{self.cache_top_k}")
    _require(not (self.cache_top_k and self.lambda_on_policy > 0),
             f"{prefix}cache_top_k caches the teacher over the dataset's rows before training; "
             f"{prefix}lambda_on_policy > 0 trains on completions the student samples during "
             "training, which no cache holds (they need the teacher in the step): keep one")
    _require(not (self.cache_top_k and self.seq_kd),
             f"{prefix}cache_top_k caches the teacher's distributions; {prefix}seq_kd trains by "
             "SFT on the teacher's answers and reads no distribution: keep one")
