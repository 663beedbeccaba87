"""`distill.cache_top_k`: the teacher's top K computed once into RUN_DIR/distill, reused after
a restart and recomputed when K changes; steps with no teacher in memory; at K = vocabulary
size the cached loss equals the live teacher's; exact resume of the batches; a LoRA student
end to end; the configuration errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_distill import _recipe, teacher  # noqa: F401  (the module-scoped tiny teacher)

from jaxpost.config import ConfigError, load_config


def _build(tmp, teacher, k, extra=()):  # noqa: F811
  """A built run of the distillation recipe with `distill.cache_top_k=k`."""
  from jaxpost.train.build import build
  run = build(load_config(_recipe(tmp, "topk", teacher), [f"distill.cache_top_k={k}", *extra]))
  state, frozen = run.init_state()
  return run, state, frozen


def test_cache_is_written_once_reused_and_keyed_by_k(tmp_path, teacher, capsys):  # noqa: F811
  run, state, frozen = _build(tmp_path, teacher, 8)
  assert frozen.teacher is None  # no teacher in the step
  batch = run.algorithm.batches("train", None).next()
  files = sorted((tmp_path / "topk" / "distill").glob("topk-*.npz"))
  assert len(files) == 2  # train and held-out examples
  assert "example_index" not in batch
  B, T = batch["tokens"].shape
  assert batch["teacher_ids"].shape == (B, T, 8) and batch["teacher_ids"].dtype == np.int32
  assert batch["teacher_logp"].shape == (B, T, 8) and batch["teacher_rest"].shape == (B, T)
  # the top K in order, and with the rest a distribution at every trained position
  m = batch["loss_mask"]
  logp = batch["teacher_logp"][m]
  assert (np.diff(logp, axis=-1) <= 0).all()
  total = np.exp(logp).sum(-1) + np.exp(batch["teacher_rest"][m])
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  state, metrics = run.step(state, run.place(batch), frozen)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["divergence"]) > 0

  stamps = [f.stat().st_mtime_ns for f in files]
  capsys.readouterr()
  run, _, _ = _build(tmp_path, teacher, 8)
  again = run.algorithm.batches("train", None).next()
  assert [f.stat().st_mtime_ns for f in files] == stamps
  assert capsys.readouterr().out.count("top 8 over the") == 2
  np.testing.assert_array_equal(again["teacher_logp"], batch["teacher_logp"])
  run, _, _ = _build(tmp_path, teacher, 4)
  run.algorithm.batches("train", None).next()
  assert len(list((tmp_path / "topk" / "distill").glob("topk-*.npz"))) == 4


def test_full_support_cache_equals_the_live_teacher(tmp_path, teacher):  # noqa: F811
  """K at least the vocabulary (clipped to it): the cached loss of a batch equals
  `distill_batch_loss` with the teacher in memory."""
  from jaxpost.losses import distill_batch_loss
  from jaxpost.models import load_hf
  run, state, frozen = _build(tmp_path, teacher, 10**6)
  V = run.config.vocab_size
  batch = run.algorithm.batches("train", None).next()
  assert batch["teacher_ids"].shape[-1] == V
  cached, m = jax.jit(lambda p, b: run.algorithm.loss(p, b, None, frozen))(state.params,
                                                                            run.place(batch))
  t_config, t_params = load_hf(teacher)
  d = run.cfg.distill
  live = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
  want, wm = jax.jit(lambda p, b: distill_batch_loss(
      p, b, None, t_params, config=run.config, teacher_config=t_config, kind=d.kind,
      beta=d.beta, temperature=d.temperature, chunk=d.chunk))(state.params, run.place(live))
  np.testing.assert_allclose(float(cached), float(want), rtol=1e-5)
  assert float(m["weight"]) == float(wm["weight"])


def test_resume_gives_the_same_batches_and_teacher_arrays(tmp_path, teacher):  # noqa: F811
  """Under a curriculum too (another order of the examples; the cache is by example)."""
  run, _, _ = _build(tmp_path, teacher, 4, ["data.curriculum.score=length",
                                            "data.curriculum.full_at_step=5"])
  source = run.algorithm.batches("train", None)
  for _ in range(3):
    source.next()
  saved = json.loads(json.dumps(source.state()))
  later = [source.next() for _ in range(4)]
  again = run.algorithm.batches("train", None)
  again.restore(saved)
  for a, b in zip(later, [again.next() for _ in range(4)]):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_lora_student_int8_teacher_from_the_cache(tmp_path, teacher):  # noqa: F811
  """End to end: the held-out divergence comes from the held-out examples' cache."""
  from jaxpost.train.trainer import train
  cfg = load_config(_recipe(tmp_path, "lora", teacher, steps=4),
                    ["lora.rank=4", "distill.quantize=int8", "distill.cache_top_k=8",
                     "distill.sft_weight=0.5", "train.eval_every=2"])
  summary = train(cfg)
  rows = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
  divergence = [r["train/divergence"] for r in rows if "train/divergence" in r]
  assert len(divergence) == 4 and np.isfinite(divergence).all()
  assert any(np.isfinite(r.get("eval/divergence", np.nan)) for r in rows)
  assert (tmp_path / "lora" / "adapter").is_dir() and summary["final_model"]


def test_cache_config_errors(tmp_path, teacher):  # noqa: F811
  path = _recipe(tmp_path, "cfg", teacher)
  with pytest.raises(ConfigError, match="not in|no cache holds"):
    load_config(path, ["distill.cache_top_k=8", "distill.lambda_on_policy=0.5"])
  with pytest.raises(ConfigError, match="seq_kd"):
    load_config(path, ["distill.cache_top_k=8", "distill.seq_kd=true"])
  with pytest.raises(ConfigError, match="cache_top_k must be >= 1"):
    load_config(path, ["distill.cache_top_k=-1"])
