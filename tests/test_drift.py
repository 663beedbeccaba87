"""Representation drift from the reference: the metric, the penalty, and `drift:` in runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.algorithms.base import Frozen
from jaxpost.config import ConfigError, load_config
from jaxpost.models import forward, init_params
from jaxpost.whitebox.drift import batch_rows, representation_drift, with_drift_penalty
from test_algorithms import run
from test_models import LLAMA as CFG


@pytest.fixture(scope="module")
def models():
  ref = init_params(CFG, jax.random.key(0))
  moved = jax.tree.map(lambda p, n: p + 0.05 * n, ref,
                       init_params(CFG, jax.random.key(1)))
  return ref, moved


def _rows():
  tokens = jax.random.randint(jax.random.key(2), (3, 10), 1, 90)
  segments = jnp.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 4 + [2] * 6])
  return {"tokens": tokens, "segment_ids": segments}


def test_drift_is_the_relative_squared_distance_over_real_tokens(models):
  ref, moved = models
  rows = _rows()
  assert float(representation_drift(CFG, ref, ref, rows)) == 0.0
  got = representation_drift(CFG, moved, ref, rows, site="mlp_out", layers=(1,))
  h = forward(CFG, moved, rows["tokens"], segment_ids=rows["segment_ids"],
              capture=["mlp_out"]).captured["mlp_out"][1]
  r = forward(CFG, ref, rows["tokens"], segment_ids=rows["segment_ids"],
              capture=["mlp_out"]).captured["mlp_out"][1]
  real = np.asarray(rows["segment_ids"] != 0)
  want = (np.sum(np.square(h - r).sum(-1) * real) / np.sum(np.square(r).sum(-1) * real))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert want > 1e-4


def test_pairs_become_rows():
  batch = {"tokens": jnp.zeros((4, 2, 7), jnp.int32), "segment_ids": jnp.ones((4, 2, 7)),
           "loss_mask": jnp.ones((4, 2, 7))}
  rows = batch_rows(batch)
  assert rows["tokens"].shape == (8, 7) and set(rows) == {"tokens", "segment_ids"}


def test_the_penalty_adds_weight_times_drift_and_its_gradient_pulls_back(models):
  ref, moved = models
  batch = _rows()

  def base_loss(params, batch, rng, frozen):
    del rng, frozen
    return jnp.mean(forward(CFG, params, batch["tokens"]).logits ** 2), {}

  frozen = Frozen(reference=ref)
  value, metrics = base_loss(moved, batch, None, frozen)
  measured = with_drift_penalty(base_loss, CFG, weight=0.0)
  v0, m0 = measured(moved, batch, None, frozen)
  assert float(v0) == float(value) and "drift_penalty" not in m0
  drift = representation_drift(CFG, moved, ref, batch)
  np.testing.assert_allclose(m0["drift"], drift, rtol=1e-6)
  penalised = with_drift_penalty(base_loss, CFG, weight=2.0)
  v2, m2 = penalised(moved, batch, None, frozen)
  np.testing.assert_allclose(v2, value + 2.0 * drift, rtol=1e-6)
  # The measured-only loss's gradient is the base loss's; the penalty's points back to ref.
  g_base = jax.grad(lambda p: base_loss(p, batch, None, frozen)[0])(moved)
  g0 = jax.grad(lambda p: measured(p, batch, None, frozen)[0])(moved)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), g_base, g0)
  g_drift = jax.grad(lambda p: representation_drift(CFG, p, ref, batch))(moved)
  sq = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(g_drift))
  lr = 0.1 * float(drift) / sq  # a step predicted to remove a tenth of the drift
  step = jax.tree.map(lambda p, g: p - lr * g, moved, g_drift)
  assert float(representation_drift(CFG, step, ref, batch)) < float(drift)
  with pytest.raises(ValueError, match="no reference model"):
    penalised(moved, batch, None, Frozen())


@pytest.mark.slow
def test_dpo_with_a_drift_penalty_drifts_less(tmp_path):
  """Same run, same seed: measured only, then penalised; both report train and eval drift."""
  kw = dict(algorithm="dpo", steps=6)
  _, free = run(tmp_path, "free", overrides=["drift.measure=true", "optim.lr=1e-2"], **kw)
  _, held = run(tmp_path, "held", overrides=["drift.weight=50", "drift.layers=[1]",
                                             "optim.lr=1e-2"], **kw)
  assert free[0]["train/drift"] == pytest.approx(0.0, abs=1e-7)  # step 1: policy = reference
  assert "train/drift_penalty" not in free[-1] and "train/drift_penalty" in held[-1]
  assert held[-1]["train/drift"] < 0.5 * free[-1]["train/drift"]


@pytest.mark.slow
def test_sft_and_lora_runs_measure_drift(tmp_path):
  _, full = run(tmp_path, "sft", algorithm="sft", steps=3, overrides=["drift.measure=true"])
  _, lora = run(tmp_path, "lora", algorithm="sft", steps=3,
                overrides=["drift.measure=true", "lora.rank=4"])
  assert full[-1]["train/drift"] > 0 and lora[-1]["train/drift"] >= 0


def test_config_errors_name_the_key(tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text(f"algorithm: sft\nrun_dir: {tmp_path / 'run'}\nmodel: {{tiny: true}}\n"
                    "task: {name: arithmetic}\ntrain: {steps: 1, batch_size: 2}\n")
  with pytest.raises(ConfigError, match="drift.site: unknown site 'resid'"):
    load_config(recipe, ["drift.site=resid"])
  with pytest.raises(ConfigError, match="drift.weight must be >= 0"):
    load_config(recipe, ["drift.weight=-1"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vector", "low_rank"])
def test_an_edit_trains_alone_and_exports(tmp_path, kind):
  """Only the edit trains (the base stays bit for bit); step 1's loss is the base model's; the
  saved edit loads back and reproduces the trained model's logits."""
  from jaxpost.whitebox.edit import attach_edit, load_edit
  overrides = [f"edit.kind={kind}", "edit.layers=[1]", "edit.rank=2", "optim.lr=3e-2"]
  summary, rows = run(tmp_path, kind, algorithm="sft", steps=6, overrides=overrides)
  _, full = run(tmp_path, "full_" + kind, algorithm="sft", steps=1)
  assert rows[0]["train/loss"] == pytest.approx(full[0]["train/loss"], rel=1e-6)
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  spec, tree = load_edit(tmp_path / kind / "edit")
  assert spec.kind == kind and spec.layers == (1,)
  assert sum(float(jnp.abs(v).sum()) for v in tree.values()) > 0
  from jaxpost.models import load_hf
  config, base = load_hf(tmp_path / kind / "model")
  tokens = jnp.array([[3, 5, 7, 9]])
  edited = forward(config, attach_edit(base, spec, tree), tokens).logits
  assert not np.allclose(edited, forward(config, base, tokens).logits)


def test_edit_config_errors(tmp_path):
  recipe = tmp_path / "r.yaml"
  recipe.write_text(f"algorithm: sft\nrun_dir: {tmp_path / 'run'}\nmodel: {{tiny: true}}\n"
                    "task: {name: arithmetic}\ntrain: {steps: 1, batch_size: 2}\n")
  with pytest.raises(ConfigError, match="edit.site must be one of"):
    load_config(recipe, ["edit.site=q"])
  with pytest.raises(ConfigError, match="edit, lora and prompt are exclusive"):
    load_config(recipe, ["edit.kind=vector", "lora.rank=4"])
