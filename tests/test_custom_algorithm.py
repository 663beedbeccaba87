"""The custom algorithm of docs/architecture.md, run as written through `train()`.

The example is read from the doc (the fenced block after "custom-algorithm"), so the doc and
this test cannot drift apart. With z_weight=0 its loss is SFT's token cross-entropy: its first
step's loss equals the built-in SFT's on the same run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from jaxpost.config import load_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
RECIPE = """\
algorithm: sft
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 40, pack: false}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: 3, batch_size: 8, eval_every: 3, log_every: 1}}
"""


def _example() -> dict:
  text = DOC.read_text()
  code = re.search(r"<!-- custom-algorithm -->\s*```python\n(.*?)```", text, re.S).group(1)
  assert 15 <= len(code.strip().splitlines()) <= 25, "the doc promises a ~20-line example"
  namespace: dict = {}
  exec(compile(code, str(DOC), "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def _rows(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from jaxpost.train import train
  ns = _example()
  tmp = tmp_path_factory.mktemp("custom")
  out = {}
  for name, kwargs in (("sft", {}), ("z0", {"algorithm": lambda run: ns["z_loss_sft"](run, 0.0)}),
                       ("z", {"algorithm": ns["z_loss_sft"]})):
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(RECIPE.format(run_dir=tmp / name))
    summary = train(load_config(recipe), **kwargs)
    out[name] = (summary, _rows(tmp / name))
  return out


def test_a_custom_algorithm_trains_through_train(runs):
  summary, rows = runs["z"]
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == 3 and all(math.isfinite(r["train/loss"]) for r in train_rows)
  assert all("train/nll" in r for r in train_rows)  # the custom loss's own metric
  assert "eval/nll" in summary["final_metrics"] and (Path(summary["final_model"]) /
                                                     "model.safetensors").exists()


def test_with_no_z_loss_it_is_sft(runs):
  first = lambda name: [r for r in runs[name][1] if "train/loss" in r][0]["train/loss"]  # noqa: E731
  assert abs(first("z0") - first("sft")) < 1e-5
  assert first("z") > first("z0")  # the z-loss term is positive
