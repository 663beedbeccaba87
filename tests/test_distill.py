"""`algorithm: distill` end to end on tiny models: a teacher of another size as a frozen input,
off-policy and GKD on-policy batches (exact resume), seq-KD's cached teacher answers, LoRA
student and quantised teacher, micro-batch equality, the tokenizer check, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from kill_after_checkpoint import WRAPPER

from jaxpost.config import ConfigError, load_config

RECIPE = """\
algorithm: distill
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 48, pack: true}}
distill: {{teacher: {teacher}, kind: jsd, beta: 0.3, max_new_tokens: 6}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 4, log_every: 1}}
checkpoint: {{every: {every}, async_save: false}}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A wider, deeper tiny teacher on the task's tokenizer (the corpus the student's tiny
  tokenizer is trained on, so the vocabularies are the same)."""
  from jaxpost import tiny
  from jaxpost.tasks.source import ArithmeticTask
  tmp = tmp_path_factory.mktemp("teacher")
  task = ArithmeticTask(max_operand=10, num_eval=12, seed=0, folder=tmp / "data")
  return tiny.make_model(tmp / "teacher", task.corpus(), seed=0, hidden_size=48, num_layers=3,
                         intermediate_size=96)


def _recipe(tmp: Path, name: str, teacher: Path, *, steps=3, every=0, extra=""):
  path = tmp / f"{name}.yaml"
  path.write_text(RECIPE.format(run_dir=tmp / name, teacher=teacher, steps=steps,
                                every=every or steps) + extra)
  return path


def _built(tmp, teacher, overrides=()):
  from jaxpost.train.build import build
  run = build(load_config(_recipe(tmp, "built", teacher), list(overrides)))
  state, frozen = run.init_state()
  return run, state, frozen


def test_teacher_is_a_frozen_input_and_the_step_trains_the_student(tmp_path, teacher):
  run, state, frozen = _built(tmp_path, teacher)
  from jaxpost.models import load_hf
  t_config, t_params = load_hf(teacher)
  assert t_config.hidden_size == 48 and run.config.hidden_size == 32
  chex.assert_trees_all_close(jax.device_get(frozen.teacher), jax.device_get(t_params))
  batch = run.algorithm.batches("train", run.policy(state.params, frozen)).next(None)
  new_state, metrics = run.step(state, run.place(batch), frozen)
  assert float(metrics["divergence"]) > 0 and int(new_state.step) == 1
  # the teacher is not part of what trains or what a checkpoint holds
  assert all(48 not in x.shape for x in jax.tree.leaves(state.params))
  assert run.checkpoint_tree(state, frozen) is state


def test_on_policy_batches_are_the_students_own_and_resume_exactly(tmp_path, teacher):
  run, state, frozen = _built(tmp_path, teacher, ["distill.lambda_on_policy=0.5"])
  policy = run.policy(state.params, frozen)
  source = run.algorithm.batches("train", policy)
  first = [source.next(policy) for _ in range(3)]
  saved = json.loads(json.dumps(source.state()))
  later = [source.next(policy) for _ in range(5)]
  again = run.algorithm.batches("train", policy)
  again.restore(saved)
  for a, b in zip(later, [again.next(policy) for _ in range(5)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  on = [b for b in first + later if b["segment_ids"].max() == 1 and not b["loss_mask"][:, 0].any()
        and (b["loss_mask"].sum(1) <= 6).all()]
  assert 0 < source.on_policy_batches < 8 and len(on) >= source.on_policy_batches
  assert source.host_metrics()["on_policy_fraction"] == source.on_policy_batches / 8
  for b in first + later:  # the same shapes and dtypes as the dataset's rows: one program
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: (v.shape, v.dtype) for k, v in first[0].items()}


def test_seq_kd_writes_the_teachers_answers_once(tmp_path, teacher):
  from jaxpost.train.trainer import train
  cfg = load_config(_recipe(tmp_path, "seq", teacher), ["distill.seq_kd=true"])
  train(cfg)
  (path,) = (tmp_path / "seq" / "distill").glob("seq_kd-*.jsonl")
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows and all(r["messages"][-1]["role"] == "assistant" for r in rows)
  stamp = path.stat().st_mtime_ns
  train(load_config(_recipe(tmp_path, "seq", teacher, steps=4), ["distill.seq_kd=true"]))
  assert path.stat().st_mtime_ns == stamp  # reused after a restart, not regenerated


def test_lora_student_and_quantised_teacher(tmp_path, teacher):
  from jaxpost.train.trainer import train
  summary = train(load_config(_recipe(tmp_path, "v", teacher),
                              ["lora.rank=4", "distill.quantize=int8"]))
  rows = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite([r["train/divergence"] for r in rows if "train/divergence" in r]).all()
  assert Path(summary["final_model"]).is_dir()


def test_micro_batches_equal_one_batch(tmp_path, teacher):
  from jaxpost.train.build import build
  params = {}
  for micro in (1, 2):
    cfg = load_config(_recipe(tmp_path, f"m{micro}", teacher),
                      [f"train.micro_batches={micro}", "distill.sft_weight=0.5",
                       "optim.name=sgd"])  # sgd: the update is lr x the gradient
    run = build(cfg)
    state, frozen = run.init_state()
    batch = run.algorithm.batches("train", None).next(None)
    state, metrics = run.step(state, run.place(batch), frozen)
    params[micro] = jax.device_get(state.params)
  chex.assert_trees_all_close(params[1], params[2], atol=1e-6)


def test_config_and_tokenizer_errors(tmp_path, teacher):
  path = _recipe(tmp_path, "cfg", teacher)
  with pytest.raises(ConfigError, match="needs distill.teacher"):
    load_config(path, ["distill.teacher=null"])
  with pytest.raises(ConfigError, match="keep one"):
    load_config(path, ["distill.seq_kd=true", "distill.lambda_on_policy=0.5"])
  with pytest.raises(ConfigError, match="beta must be in"):
    load_config(path, ["distill.beta=2"])
  from jaxpost.train.build import build
  with pytest.raises(ConfigError, match="neither a Hugging Face model folder"):
    build(load_config(path, [f"distill.teacher={tmp_path}"]))
  # a tokenizer trained on other text: one error naming both folders
  with pytest.raises(ConfigError, match=r"student's tokenizer \(.*\) and the teacher's \(.*\)"):
    build(load_config(path, ["task.max_operand=7", f"run_dir={tmp_path / 'other'}"]))


@pytest.mark.slow
def test_resume_after_sigkill_with_on_policy_batches_and_a_curriculum(tmp_path, teacher):
  """Killed after step 3's checkpoint of an on-policy (lambda 0.5) run whose data (dataset rows
  and prompts) are paced by a curriculum until step 5: the rerun ends with the uninterrupted
  run's weights, bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  paths = {}
  for name in ("straight", "killed"):
    paths[name] = _recipe(tmp_path, name, teacher, steps=7, every=3)
    text = paths[name].read_text().replace(
        "max_new_tokens: 6}", "max_new_tokens: 6, lambda_on_policy: 0.5}").replace(
        "pack: true}", "pack: true, curriculum: {score: length, full_at_step: 5}}")
    paths[name].write_text(text)
  run = lambda *a: subprocess.run([sys.executable, *a], env=env, capture_output=True,  # noqa: E731
                                  text=True, timeout=900)
  proc = run("-m", "jaxpost.cli", "train", str(paths["straight"]))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("curriculum: ") == 2  # the dataset's rows and the prompts
  proc = run("-c", WRAPPER, "3", str(paths["killed"]))
  assert proc.returncode == -9, proc.stderr[-3000:]
  proc = run("-m", "jaxpost.cli", "train", str(paths["killed"]))
  assert proc.returncode == 0 and "resumed" in proc.stdout + proc.stderr, proc.stderr[-3000:]
  a = (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
  b = (tmp_path / "killed" / "final" / "model.safetensors").read_bytes()
  assert a == b
