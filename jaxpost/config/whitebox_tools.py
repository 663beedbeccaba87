"""The configs of the white-box commands: `jaxpost steer`, `jaxpost probe`, `jaxpost heads`.

Each is a whole YAML file (like `EvalConfig`), read by `load_config(path, overrides,
root=SteerConfig)`: unknown keys, wrong types and impossible values are one `ConfigError`
naming the key. `model` is a Hugging Face folder or a finished run folder (its `final/`);
`out_dir` defaults to `<run folder>/steer` (`probe`, `heads`). `chat: true` renders each text
as a user turn with the assistant's turn opened (when the tokenizer has a chat template).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.sections_base import Section, _require

# The per-token sites of `jaxpost.models.sites.SITES` (attn_probs is not a vector per token);
# spelled out so that reading a config imports no JAX (a test keeps the two lists equal).
Site = Literal["resid_pre", "q", "k", "v", "head_out", "attn_out", "resid_mid", "mlp_hidden",
               "mlp_out", "resid_post"]
ArithmeticLabel = Literal["larger_operand", "answer_tens", "carry"]


def _is_function(spec: str) -> bool:
  return ":" in spec and not spec.startswith(":") and not spec.endswith(":")


@dataclasses.dataclass(frozen=True)
class _WhiteboxConfig(Section):
  model: str = ""
  out_dir: str | None = None
  chat: bool = True
  site: Site = "resid_post"
  batch_size: int = 32

  def validate(self, prefix: str = "") -> None:
    _require(bool(self.model), f"missing required key '{prefix}model' (a Hugging Face folder or "
             "a finished run folder)")
    _require(self.batch_size >= 1, f"{prefix}batch_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class SteerConfig(_WhiteboxConfig):
  """`jaxpost steer STEER.yaml`: a CAA steering vector from `pairs` (JSON lines of
  {"positive": text, "negative": text}) at `site`, `layer` (default: the middle layer), then
  greedy generations for the held-out `prompts` (JSON lines of {"prompt": text, ...}: the
  row's other fields reach a custom metric) at `num_coefs` coefficients evenly from -k to k.
  `metric` scores each completion: `number` (its first number), `length` (characters), or
  `module:function` / `file.py:function` `(completion, row) -> float | None`, summarised per
  coefficient by its mean, its median and, with a `threshold`, the fraction of completions
  scoring >= it; rows with an `answer` also get exact-match accuracy. `positions`: steer the
  last prompt token and the generated ones (`answer`, CAA's choice) or every token (`all`).
  `limit` caps the pairs and prompts read; `show` prompts' completions are printed per
  coefficient."""

  pairs: str = ""
  prompts: str = ""
  layer: int | None = None
  k: float = 1.0
  num_coefs: int = 5
  max_new_tokens: int = 16
  temperature: float = 0.0
  seed: int = 0
  metric: str = "number"
  threshold: float | None = None
  positions: Literal["answer", "all"] = "answer"
  limit: int | None = None
  show: int = 3

  def validate(self, prefix: str = "") -> None:
    super().validate(prefix)
    _require(bool(self.pairs), f"missing required key '{prefix}pairs' (a JSON lines file of "
             '{"positive": ..., "negative": ...})')
    _require(bool(self.prompts), f"missing required key '{prefix}prompts' (a JSON lines file "
             'of {"prompt": ...})')
    _require(self.layer is None or self.layer >= 0, f"{prefix}layer must be >= 0")
    _require(self.k > 0, f"{prefix}k must be > 0 (coefficients run from -k to k)")
    _require(self.num_coefs >= 2, f"{prefix}num_coefs must be >= 2")
    _require(self.max_new_tokens >= 1, f"{prefix}max_new_tokens must be >= 1")
    _require(self.temperature >= 0, f"{prefix}temperature must be >= 0")
    _require(self.metric in ("number", "length") or _is_function(self.metric),
             f"{prefix}metric must be number, length or module:function, got {self.metric!r}")
    _require(self.limit is None or self.limit >= 1, f"{prefix}limit must be >= 1")
    _require(self.show >= 0, f"{prefix}show must be >= 0")

  def coefficients(self) -> list[float]:
    return [float(-self.k + 2 * self.k * i / (self.num_coefs - 1))
            for i in range(self.num_coefs)]


@dataclasses.dataclass(frozen=True)
class ProbeConfig(_WhiteboxConfig):
  """`jaxpost probe PROBE.yaml`: a logistic-regression probe per layer on `site`'s activation
  at each text's last token, trained on a seeded split and tested on the `eval_fraction` held
  out. The rows are `data` (JSON lines of {"text": ..., "label": ...}; labels are strings,
  integers or booleans) or a built-in `task` over the arithmetic questions with operands below
  `max_operand`: `larger_operand`, `answer_tens`, `carry`. `l2` is the weight penalty,
  `steps` the L-BFGS iterations. A control probe is trained on shuffled labels (its accuracy
  is what chance looks like)."""

  data: str | None = None
  task: ArithmeticLabel | None = None
  max_operand: int = 30
  layers: tuple[int, ...] | None = None
  eval_fraction: float = 0.3
  seed: int = 0
  l2: float = 1e-2
  steps: int = 200
  limit: int | None = None

  def validate(self, prefix: str = "") -> None:
    super().validate(prefix)
    _require((self.data is None) != (self.task is None),
             f"set exactly one of {prefix}data (a JSON lines file of {{\"text\", \"label\"}}) "
             f"and {prefix}task (larger_operand, answer_tens or carry)")
    _require(self.max_operand >= 2, f"{prefix}max_operand must be >= 2")
    _require(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
             f"{prefix}layers must be a non-empty list of layer indices >= 0")
    _require(0 < self.eval_fraction < 1, f"{prefix}eval_fraction must be in (0, 1)")
    _require(self.l2 >= 0, f"{prefix}l2 must be >= 0")
    _require(self.steps >= 1, f"{prefix}steps must be >= 1")
    _require(self.limit is None or self.limit >= 4, f"{prefix}limit must be >= 4")


@dataclasses.dataclass(frozen=True)
class HeadsConfig(_WhiteboxConfig):
  """`jaxpost heads HEADS.yaml`: the change in a metric when each attention head is knocked
  out (`ablation`: `zero`, or `mean`: its mean output over the rows' tokens), as an [L, H]
  heat map. The rows are `data` (JSON lines of {"prompt": ..., "target": ...}, other fields
  passed to a reward) or `task: arithmetic` (the task's held-out questions; `max_operand`).
  `metric`: `logprob` (the mean log-probability of each row's target continuation) or a
  reward function `module:function` in TRL's signature `(prompts, completions, **columns)`
  scored on greedy completions of `max_new_tokens`. `site` is fixed to head_out."""

  data: str | None = None
  task: Literal["arithmetic"] | None = None
  max_operand: int = 30
  limit: int | None = 64
  ablation: Literal["zero", "mean"] = "zero"
  metric: str = "logprob"
  max_new_tokens: int = 8
  site: Literal["head_out"] = "head_out"

  def validate(self, prefix: str = "") -> None:
    super().validate(prefix)
    _require((self.data is None) != (self.task is None),
             f"set exactly one of {prefix}data (a JSON lines file of {{\"prompt\", \"target\"}}) "
             f"and {prefix}task (arithmetic)")
    _require(self.max_operand >= 2, f"{prefix}max_operand must be >= 2")
    _require(self.limit is None or self.limit >= 1, f"{prefix}limit must be >= 1")
    _require(self.metric == "logprob" or _is_function(self.metric),
             f"{prefix}metric must be logprob or module:function, got {self.metric!r}")
    _require(self.max_new_tokens >= 1, f"{prefix}max_new_tokens must be >= 1")
