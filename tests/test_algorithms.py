"""Every algorithm and every trainable through `train()`: a conformance table on a tiny model.

Each run builds a tiny model and the arithmetic task's data in its own folder, trains a few
steps and exports. Shared invariants: finite losses, the algorithm's metrics on held-out data,
an export that loads back. Plus exact checks: a PEFT run's DPO loss at step 1 is log 2 (the
reference is the base, adapters off); precomputed reference log-probs give the in-step losses.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxpost.config import load_config

RECIPE = """\
algorithm: {algorithm}
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 40, pack: false}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 8, eval_every: {steps}, log_every: 1}}
checkpoint: {{every: {steps}}}
"""


def run(tmp_path, name, algorithm="dpo", steps=3, overrides=()):
  from jaxpost.train.trainer import train
  recipe = tmp_path / f"{name}.yaml"
  recipe.write_text(RECIPE.format(algorithm=algorithm, run_dir=tmp_path / name, steps=steps))
  summary = train(load_config(recipe, list(overrides)))
  lines = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in lines if "train/loss" in r]
  return summary, train_rows


CASES = {
    "dpo": ("dpo", []),
    "ipo": ("dpo", ["preference.loss_type=ipo"]),
    "simpo": ("dpo", ["preference.loss_type=simpo", "preference.gamma=0.5"]),
    "orpo": ("dpo", ["preference.loss_type=orpo"]),
    "rpo-robust": ("dpo", ["preference.loss_type=robust", "preference.label_smoothing=0.1",
                           "preference.sft_weight=1.0"]),
    "kto": ("kto", []),
    "reward": ("reward", []),
    "tr-dpo-lora": ("dpo", ["lora.rank=4", "preference.sync_every=2",
                            "preference.sync_alpha=0.5"]),
    "sft-dora-qlora": ("sft", ["lora.rank=4", "lora.dora=true", "lora.quantize=nf4",
                               "lora.dropout=0.1"]),
    "sft-prefix": ("sft", ["prompt.kind=prefix", "prompt.num_tokens=4"]),
    "dpo-prompt": ("dpo", ["prompt.kind=prompt", "prompt.num_tokens=4",
                           "prompt.init_text=What is"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_algorithm_trains_evaluates_and_exports(tmp_path, name):
  algorithm, overrides = CASES[name]
  summary, rows = run(tmp_path, name, algorithm, overrides=overrides)
  assert len(rows) == 3 and all(math.isfinite(r["train/loss"]) for r in rows)
  final = summary["final_metrics"]
  expected = {"dpo": "eval/rewards/accuracies", "kto": "eval/kl", "reward": "eval/accuracy",
              "sft": "eval/perplexity"}[algorithm]
  assert expected in final and math.isfinite(final[expected]), final
  run_dir = tmp_path / name
  if "prompt" in name or "prefix" in name:
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] in (
        "PROMPT_TUNING", "PREFIX_TUNING")
  elif algorithm == "reward":
    cfg = json.loads((run_dir / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1
  else:
    assert (run_dir / "final" / "model.safetensors").exists()
  if "lora" in overrides[0] if overrides else False:
    assert (run_dir / "adapter" / "adapter_config.json").exists()
  if name == "tr-dpo-lora":
    # the reference is the base (adapters off, B = 0): the first step's loss is exactly log 2
    assert abs(rows[0]["train/loss"] - math.log(2)) < 1e-6


def test_precomputed_reference_gives_the_in_step_losses(tmp_path):
  _, in_step = run(tmp_path, "in_step", "dpo", steps=3)
  _, pre = run(tmp_path, "pre", "dpo", steps=3, overrides=["preference.reference=precomputed"])
  a = np.array([r["train/loss"] for r in in_step])
  b = np.array([r["train/loss"] for r in pre])
  np.testing.assert_allclose(a, b, atol=2e-5)
  assert list((tmp_path / "pre" / "data").glob("reference_logps_*.npy"))


def test_tr_dpo_sync_mixes_the_reference_towards_the_policy():
  import jax.numpy as jnp
  from jaxpost.train.trainable import Trainable, sync_reference
  tr = Trainable(None, None, {}, {}, "full", None, None, None, "")
  policy = {"w": jnp.full((3,), 2.0)}
  frozen = {"ref": {"w": jnp.zeros((3,))}}
  mixed = sync_reference(tr, policy, frozen, 0.25)
  np.testing.assert_allclose(mixed["ref"]["w"], 0.5)  # 0.25 * 2 + 0.75 * 0
  assert float(frozen["ref"]["w"][0]) == 0.0  # the old reference is not modified
  np.testing.assert_allclose(sync_reference(tr, policy, frozen, 1.0)["ref"]["w"], 2.0)

