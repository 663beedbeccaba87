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
    "ipo": ("dpo", ["dpo.loss_type=ipo"]),
    "simpo": ("dpo", ["dpo.loss_type=simpo", "dpo.gamma=0.5"]),
    "orpo": ("dpo", ["dpo.loss_type=orpo"]),
    "rpo-robust": ("dpo", ["dpo.loss_type=robust", "dpo.label_smoothing=0.1",
                           "dpo.sft_weight=1.0"]),
    "kto": ("kto", []),
    "reward": ("reward", []),
    "tr-dpo-lora": ("dpo", ["lora.rank=4", "reference.sync_every=2",
                            "reference.sync_alpha=0.5"]),
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
  _, pre = run(tmp_path, "pre", "dpo", steps=3, overrides=["reference.mode=precomputed"])
  a = np.array([r["train/loss"] for r in in_step])
  b = np.array([r["train/loss"] for r in pre])
  np.testing.assert_allclose(a, b, atol=2e-5)
  assert list((tmp_path / "pre" / "data").glob("reference_logps_*.npy"))


def test_tr_dpo_sync_mixes_the_reference_towards_the_policy():
  import jax.numpy as jnp
  from jaxpost.algorithms import Frozen, reference_sync
  policy = {"w": jnp.full((3,), 2.0)}
  frozen = Frozen(reference={"w": jnp.zeros((3,))})
  sync = reference_sync(every=2, alpha=0.25)
  assert sync(1, policy, frozen) is frozen  # not a sync step
  mixed = sync(2, policy, frozen)
  np.testing.assert_allclose(mixed.reference["w"], 0.5)  # 0.25 * 2 + 0.75 * 0
  assert float(frozen.reference["w"][0]) == 0.0  # the old reference is not modified
  np.testing.assert_allclose(reference_sync(1, 1.0)(1, policy, frozen).reference["w"], 2.0)


def test_an_old_preference_section_still_loads_into_the_new_sections(tmp_path, capsys):
  recipe = tmp_path / "old.yaml"
  recipe.write_text(RECIPE.format(algorithm="dpo", run_dir=tmp_path / "r", steps=3)
                    + "preference: {loss_type: ipo, beta: 0.3, reference: precomputed,"
                    " max_prompt_length: 7, margin: 1.5}\n")
  cfg = load_config(recipe, ["preference.sync_alpha=0.5"])
  assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.kto.beta) == ("ipo", 0.3, 0.3)
  assert (cfg.reference.mode, cfg.reference.sync_alpha) == ("precomputed", 0.5)
  assert (cfg.data.max_prompt_length, cfg.reward.margin) == (7, 1.5)
  err = capsys.readouterr().err
  assert "preference.loss_type -> dpo.loss_type" in err and "preference.beta -> dpo.beta / kto.beta" in err
  from jaxpost.config import ConfigError
  with pytest.raises(ConfigError, match="'preference.beta' and 'dpo.beta'.*keep only 'dpo.beta'"):
    load_config(recipe, ["dpo.beta=0.2"])
  with pytest.raises(ConfigError, match="unknown key 'preference.betta'"):
    load_config(recipe, ["preference.betta=0.2"])


@pytest.mark.slow
@pytest.mark.parametrize("trainable", [[], ["lora.rank=4"]], ids=["full", "lora"])
def test_tr_dpo_resumes_exactly_with_its_moved_reference(tmp_path, trainable):
  """The moving reference is checkpointed: 4 steps, then on to 8, ends bitwise as 8 straight."""
  sync = ["reference.sync_every=2", "reference.sync_alpha=0.5", "checkpoint.every=2",
          *trainable]
  run(tmp_path, "straight", "dpo", steps=8, overrides=sync)
  run(tmp_path, "resumed", "dpo", steps=4, overrides=sync)
  recipe = tmp_path / "resumed.yaml"
  from jaxpost.train.trainer import train
  summary = train(load_config(recipe, [*sync, "train.steps=8", "train.eval_every=8"]))
  assert summary["start_step"] == 4
  a = (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
  b = (tmp_path / "resumed" / "final" / "model.safetensors").read_bytes()
  assert a == b
