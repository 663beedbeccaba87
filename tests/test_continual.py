"""Continual learning: the replay mix (exact share per batch, reservoir, exact resume, every
iterator kind), task sequences (`stages:`: order, each stage from the previous model, a
restarted sequence skipping finished stages), the L2 pull to the start weights, the
forgetting metrics and report, the arithmetic variants, and the config errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.algorithms.base import Frozen
from jaxpost.config import ConfigError, load_config
from jaxpost.config.continual import replay_units
from jaxpost.continual import forgetting_metrics, retention, write_report
from jaxpost.data import BatchIterator
from jaxpost.data.formats import Example
from jaxpost.data.replay import ReplayMix, reservoir
from jaxpost.rl.prompts import Prompt, PromptOrder
from jaxpost.tasks import arithmetic, arithmetic_pref
from jaxpost.train.trainable import Full, l2_to_start, trainable_loss

NEW, OLD = 10, 50  # the token values of new and replayed examples


def _examples(n: int, marker: int, where: str) -> list[Example]:
  """n examples of 3..7 tokens, every token `marker` + (i % 5)."""
  return [Example(np.full(3 + i % 5, marker + i % 5), np.arange(3 + i % 5) >= 1,
                  where=f"{where} row {i + 1}") for i in range(n)]


def _mix(batch_size: int = 8, ratio: float = 0.25, pack: bool = True) -> ReplayMix:
  k = replay_units(ratio, batch_size)
  kw = dict(seq_len=16, pack=pack, example_index=True)
  return ReplayMix(BatchIterator(_examples(40, NEW, "new.jsonl"), batch_size=batch_size - k,
                                 seed=1, **kw),
                   BatchIterator(_examples(30, OLD, "old.jsonl"), batch_size=k, seed=7, **kw))


def test_replay_units_round_half_up():
  assert [replay_units(r, 16) for r in (0.1, 0.2, 0.3, 0.5)] == [2, 3, 5, 8]
  assert replay_units(0.25, 2) == 1 and replay_units(0.1, 4) == 0


@pytest.mark.parametrize("pack", [True, False])
def test_every_batch_has_exactly_the_replayed_share(pack):
  mixed = _mix(pack=pack)
  for _ in range(12):  # several epochs of both
    batch = next(mixed)
    assert batch["tokens"].shape == (8, 16)
    live = batch["segment_ids"] > 0
    new_rows = [np.all(row[m] < OLD) for row, m in zip(batch["tokens"], live)]
    assert new_rows == [True] * 6 + [False] * 2  # rows: 6 new, then round(0.25 x 8) = 2 replayed
    assert np.all(batch["tokens"][6:][live[6:]] >= OLD)
    # example_index counts the replayed examples after the 40 new ones
    index = batch["example_index"]
    assert np.all((index[:6][live[:6]] < 40)) and np.all(index[6:][live[6:]] >= 40)
    examples = mixed.examples
    for r, c in zip(*np.nonzero(live)):
      assert examples[index[r, c]].tokens[0] == batch["tokens"][r, c]


def test_prompt_batches_replay_by_index():
  def prompts(n, base):
    return [Prompt((base + i,), f"p{base + i}", {}, f"f row {i + 1}", i) for i in range(n)]
  new, old = prompts(20, 0), prompts(10, 100)
  mixed = ReplayMix(PromptOrder(new, batch_size=3, seed=0), PromptOrder(old, batch_size=1, seed=0))
  both = new + old
  for _ in range(10):
    ids = [both[i].ids[0] for i in next(mixed)["index"]]
    assert all(i < 100 for i in ids[:3]) and ids[3] >= 100


def test_reservoir_is_bounded_seeded_and_uniform():
  sample = reservoir(range(1000), 50, seed=3)
  assert len(sample) == 50 and sample == sorted(sample) and len(set(sample)) == 50
  assert reservoir(range(1000), 50, seed=3) == sample != reservoir(range(1000), 50, seed=4)
  assert reservoir(range(7), 50, seed=0) == list(range(7))
  counts = np.zeros(20)
  for seed in range(2000):
    counts[reservoir(range(20), 5, seed)] += 1
  assert np.allclose(counts / 2000, 0.25, atol=0.04)  # every row kept with probability 5 / 20
  with pytest.raises(ValueError, match="at least one"):
    reservoir(range(3), 0, seed=0)


def test_the_mix_resumes_exactly():
  first = _mix()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
  expected = [next(first) for _ in range(9)]
  resumed = _mix()
  resumed.restore(state)
  for a, b in zip(expected, (next(resumed) for _ in range(9))):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="saved without data.replay"):
    _mix().restore(state["new"])
  with pytest.raises(ValueError, match="fingerprint differs"):
    _mix(ratio=0.4).restore(state)


# -- L2 pull to the start weights -------------------------------------------------------------


def test_l2_to_init_pulls_towards_the_start():
  start = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.0, 3.0]])}

  def no_loss(model, batch, rng, frozen):
    del batch, rng, frozen
    return 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(model)), {}

  loss = trainable_loss(Full(config=None, shardings=None), no_loss, training=True,
                        reference=False, l2_to_init=0.3)
  frozen = Frozen(start=start)
  values = []
  for scale in (0.0, 0.5, 1.0, 2.0):
    tree = jax.tree.map(lambda x, s=scale: x + s * jnp.ones_like(x), start)
    value, metrics = loss(tree, {}, jax.random.key(0), frozen)
    values.append(float(value))
    assert float(metrics["distance_to_init"]) == pytest.approx(scale * np.sqrt(5), rel=1e-6)
  assert values[0] == 0.0 and values == sorted(values)  # grows with the distance
  assert values[2] == pytest.approx(0.3 * 5 / 2)
  tree = {"w": jnp.array([0.0, 1.0, 2.0]), "b": jnp.array([[1.0, 1.0]])}
  grad = jax.grad(lambda t: loss(t, {}, jax.random.key(0), frozen)[0])(tree)
  for g, t, s in zip(jax.tree.leaves(grad), jax.tree.leaves(tree), jax.tree.leaves(start)):
    np.testing.assert_allclose(g, 0.3 * (t - s), rtol=1e-6)
  assert float(l2_to_start(tree, tree)) == 0.0


def test_l2_to_init_under_lora_pulls_the_adapters(tmp_path):
  from jaxpost.train.build import build
  run = build(load_config(_recipe(tmp_path, stages=False),
                          ["lora.rank=2", "continual.l2_to_init=0.5"]))
  state, frozen = run.init_state()
  assert frozen.start.keys() == state.params.keys() and frozen.base is not None
  for a, b in zip(jax.tree.leaves(frozen.start), jax.tree.leaves(state.params)):
    assert np.array_equal(a, b)  # the start is the initial adapters (B = 0), not the base

  def no_loss(model, batch, rng, frozen):  # the model with the adapters attached
    del batch, rng, frozen
    return 0.0 * jnp.sum(model["layers"]["attn"]["q"].a), {}

  loss = trainable_loss(run.trainable, no_loss, training=False, reference=False, l2_to_init=0.5)
  moved = jax.tree.map(lambda x: x + 0.1, state.params)
  n = sum(x.size for x in jax.tree.leaves(moved))
  value, grad = jax.jit(jax.value_and_grad(lambda t, f: loss(t, {}, jax.random.key(0), f)[0]))(
      moved, frozen)
  assert float(value) == pytest.approx(0.5 * n * 0.01 / 2, rel=1e-4)
  for g in jax.tree.leaves(grad):
    np.testing.assert_allclose(g, 0.5 * 0.1, rtol=1e-4)


# -- the forgetting metrics and report ----------------------------------------------------------

R = [[0.9, 0.1, 0.0],
     [0.5, 0.8, 0.1],
     [0.3, 0.6, 0.7]]
BEFORE = [0.0, 0.05, 0.0]


def test_forgetting_metrics_of_a_hand_made_matrix():
  m = forgetting_metrics(R, BEFORE)
  assert m["average_accuracy"] == pytest.approx((0.3 + 0.6 + 0.7) / 3)
  assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.6)) / 2)  # 0.4
  assert m["backward_transfer"] == pytest.approx(((0.3 - 0.9) + (0.6 - 0.8)) / 2)  # -0.4
  assert m["forward_transfer"] == pytest.approx(((0.1 - 0.05) + (0.1 - 0.0)) / 2)  # 0.075
  after_two = forgetting_metrics(R[:2], BEFORE)  # the first two tasks after stage 1
  assert after_two == pytest.approx({"average_accuracy": 0.65, "forgetting": 0.4,
                                     "backward_transfer": -0.4, "forward_transfer": 0.05})
  assert forgetting_metrics(R[:1]) == pytest.approx({"average_accuracy": 0.9})
  assert retention(R) == pytest.approx([0.3 / 0.9, 0.6 / 0.8, 1.0])
  # forgetting takes the best earlier accuracy, not the one just after learning
  m = forgetting_metrics([[0.5, 0.0, 0.0], [0.8, 0.9, 0.0], [0.1, 0.9, 0.7]])
  assert m["forgetting"] == pytest.approx(((0.8 - 0.1) + (0.9 - 0.9)) / 2)  # 0.35, not 0.2
  assert m["backward_transfer"] == pytest.approx(((0.1 - 0.5) + (0.9 - 0.9)) / 2)
  with pytest.raises(ValueError, match="stages done, tasks"):
    forgetting_metrics([[0.5], [0.2]])


def test_the_report_has_the_matrix_the_metrics_and_a_png(tmp_path):
  path = write_report(tmp_path, ["add", "sub", "mul"], R[:2], before=BEFORE, title="T")
  text = path.read_text()
  assert "| before | 0.000 | 0.050 | 0.000 |" in text
  assert "| sub (stage 1) | 0.500 | 0.800 | 0.100 |" in text
  assert "| sub (1) | 0.650 | 0.400 | -0.400 | 0.050 |" in text
  data = json.loads((tmp_path / "report.json").read_text())
  assert data["accuracy"] == R[:2] and data["tasks"] == ["add", "sub", "mul"]
  assert (tmp_path / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


# -- the arithmetic variants ----------------------------------------------------------------------


def test_arithmetic_variants_share_questions_and_split():
  assert arithmetic.row(3, 17, "sub")["answer"] == "-14"
  assert arithmetic.row(12, 25, "mul")["messages"][0]["content"] == "What is 12 * 25?"
  kw = dict(max_operand=8, num_eval=10, seed=1)
  held = {op: arithmetic.make_split(op=op, **kw)[1] for op in arithmetic.OPS}
  assert [r["messages"][0]["content"] for r in held["add"]] == [
      r["messages"][0]["content"].replace(" - ", " + ") for r in held["sub"]]
  assert arithmetic.operand_size(arithmetic.row(3, 17, "mul")) == 17.0
  pairs, _ = arithmetic_pref.make_preference_split(op="sub", **kw)
  for p in pairs:
    good, bad = int(p["chosen"][0]["content"]), int(p["rejected"][0]["content"])
    assert good != bad and (good >= 0) == (bad >= 0)


# -- config errors ----------------------------------------------------------------------------------

RECIPE = """\
algorithm: {algorithm}
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 8, num_eval: 10, exact_match: false, max_new_tokens: 3}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 48, pack: true}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: 2, batch_size: 4, log_every: 1}}
checkpoint: {{every: 1, keep_last: 1}}
continual: {{l2_to_init: 0.05}}
stages:
  - {{name: add, task: {{op: add}}}}
  - {{name: sub, task: {{op: sub}}}}
"""


def _recipe(tmp: Path, algorithm: str = "sft", stages: bool = True) -> Path:
  text = RECIPE.format(algorithm=algorithm, run_dir=tmp / "run")
  path = tmp / f"{algorithm}{'' if stages else '_one'}.yaml"
  path.write_text(text if stages else text.split("stages:")[0])
  return path


@pytest.mark.parametrize("overrides,message", [
    (["data.replay.ratio=1.5"], r"data.replay.ratio must be in \(0, 1\), got 1.5"),
    (["data.replay.ratio=0.05"], r"data.replay.ratio=0.05 of train.batch_size=4 is 0 replayed"),
    (["data.replay.buffer_size=0"], "data.replay.buffer_size must be >= 1"),
    (["continual.l2_to_init=-1"], "continual.l2_to_init must be >= 0"),
    (["data.replay.ratio=0.5", "reference.mode=precomputed"], "use reference.mode=in_step"),
])
def test_config_errors(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    load_config(_recipe(tmp_path), overrides)
  assert "\n" not in str(e.value)


def test_stage_errors_name_the_stage(tmp_path):
  path = _recipe(tmp_path)
  text = path.read_text()
  bad = {"{name: sub, task: {op: sub}}": "{name: sub, task: {opp: sub}}"}
  for old, new in bad.items():
    path.write_text(text.replace(old, new))
  with pytest.raises(ConfigError, match=r"stages\[1\] \(sub\): unknown key 'task.opp'.*did you "
                     r"mean 'task.op'") as e:
    load_config(path)
  assert "\n" not in str(e.value)
  path.write_text(text.replace("{name: sub, task: {op: sub}}", "{name: sub, run_dir: x}"))
  with pytest.raises(ConfigError, match=r"stages\[1\] \(sub\): run_dir is RUN_DIR/stage_<i>"):
    load_config(path)
  path.write_text(text.replace("{name: sub, task: {op: sub}}", "{name: add}"))
  with pytest.raises(ConfigError, match=r"stages\[1\]: name must be a string naming one stage"):
    load_config(path)
  with pytest.raises(ConfigError, match="data.replay.sources is empty"):
    load_config(_recipe(tmp_path, stages=False), ["data.replay.ratio=0.5"])


# -- runs: every kind of data replays; a sequence of stages ---------------------------------------


def _build(tmp: Path, algorithm: str, overrides=()):
  from jaxpost.train.build import build
  run = build(load_config(_recipe(tmp, algorithm, stages=False), list(overrides)))
  state, frozen = run.init_state()
  return run, run.policy(state.params, frozen)


def test_preference_and_rl_runs_replay_a_run_folders_data(tmp_path):
  sft, _ = _build(tmp_path, "sft")  # a finished run's folder: its config and task data
  from jaxpost.config import save_config
  save_config(sft.cfg, sft.run_dir / "config.yaml")
  source = f"data.replay.sources={sft.run_dir}"
  run, policy = _build(tmp_path, "dpo", [source, "data.replay.ratio=0.5",
                                         f"run_dir={tmp_path / 'dpo_run'}"])
  batches = run.algorithm.batches("train", policy).batches
  batch = next(batches)
  assert batch["tokens"].shape == (4, 2, 48) and list(batch["index"][2:] >= 54) == [True, True]
  assert batches.replay.num_examples == 54  # the sft run's questions, as pairs
  run, policy = _build(tmp_path, "kto", [source, "data.replay.ratio=0.5",
                                         f"run_dir={tmp_path / 'kto_run'}"])
  batch = next(run.algorithm.batches("train", policy).batches)
  assert batch["tokens"].shape == (4, 48) and list(batch["index"] >= 108) == [False] * 2 + [True] * 2
  run, policy = _build(tmp_path, "grpo", [source, "data.replay.ratio=0.5",
                                          "rl.num_generations=2",
                                          f"run_dir={tmp_path / 'grpo_run'}"])
  order = run.algorithm.batches("train", policy)
  index = next(order.order)["index"]
  assert len(index) == 2 and index[0] < 54 <= index[1] < len(order.prompts) == 108


class _Stop(Exception):
  pass


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
  """A two-stage sequence with replay and an L2 pull, killed in its second stage after one
  step, then started again."""
  from jaxpost.train.trainer import train
  tmp = tmp_path_factory.mktemp("sequence")
  cfg = load_config(_recipe(tmp), ["data.replay.ratio=0.25"])
  steps = []

  def stop(step, metrics):
    steps.append(step)
    if len(steps) == 3:  # stage 1's step 1, seen at step 2 before its checkpoint
      raise _Stop

  first = io.StringIO()
  with contextlib.redirect_stdout(first), pytest.raises(_Stop):
    train(cfg, on_step=stop)
  run_dir = Path(cfg.run_dir)
  stage0 = (run_dir / "stage_0" / "final" / "model.safetensors").stat().st_mtime_ns
  second = io.StringIO()
  from jaxpost.cli import main
  with contextlib.redirect_stdout(second):  # again, by the command line
    assert main(["train", str(_recipe(tmp)), "data.replay.ratio=0.25"]) == 0
  return dict(cfg=cfg, run_dir=run_dir, first=first.getvalue(), second=second.getvalue(),
              stage0_mtime=stage0)


def test_stages_run_in_order_each_from_the_previous_model(sequence):
  from jaxpost.config.stages import stage_configs
  from jaxpost.models import load_hf
  from jaxpost.train.build import build
  run_dir, out = sequence["run_dir"], sequence["first"]
  assert out.index("stage 0 of 2 (add)") < out.index("stage 1 of 2 (sub)")
  stages = stage_configs(sequence["cfg"])
  assert stages[0].cfg.model.path == str(run_dir / "model")
  assert stages[1].cfg.model.path == str(run_dir / "stage_0" / "final")
  run = build(stages[1].cfg)  # stage 1 starts from stage 0's final weights
  _, final0 = load_hf(run_dir / "stage_0" / "final")
  state, _ = run.init_state()
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                  jax.tree.leaves(final0)))
  assert "replay: 1 of the 4 rows of every batch from a buffer of 54 rows of " \
         f"{run_dir / 'stage_0'}" in out
  last = json.loads((run_dir / "stage_1" / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["train/l2_penalty"] == pytest.approx(0.05 * last["train/distance_to_init"] ** 2
                                                   / 2, rel=1e-4)


def test_a_restarted_sequence_skips_finished_stages(sequence):
  out, run_dir = sequence["second"], sequence["run_dir"]
  assert "stage 0 (add) finished earlier: skipped" in out
  assert "stage 0 of 2" not in out and "resumed from" in out and "at step 1" in out
  assert (run_dir / "stage_0" / "final" / "model.safetensors").stat().st_mtime_ns == \
      sequence["stage0_mtime"]
  assert "accuracy (rows: after each stage; columns: add, sub)" in out
  assert f"forgetting report: {run_dir / 'continual' / 'report.md'}" in out
  result = json.loads((run_dir / "continual" / "report.json").read_text())
  assert result["tasks"] == ["add", "sub"] and np.shape(result["accuracy"]) == (2, 2)
  assert set(result["after_each_stage"][1]) == {"average_accuracy", "forgetting",
                                                "backward_transfer", "forward_transfer"}
  report = (run_dir / "continual" / "report.md").read_text()
  assert "| sub (stage 1) |" in report and (run_dir / "continual" / "accuracy_matrix.png").exists()
