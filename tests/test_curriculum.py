"""`data.curriculum`: the competence schedules, batches drawn from the easiest fraction then the
ordinary epochs, packing, exact resume, every iterator kind (SFT, preference, RL prompts), the
scores (length, a column, a function, the start model's loss, cached) and their errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from jaxpost.config import ConfigError, load_config
from jaxpost.data import BatchIterator, DataError
from jaxpost.data.curriculum import Curriculum, competence, row_scores
from jaxpost.data.formats import Example


def _examples(n: int = 20) -> list[Example]:
  """Example i has i + 2 tokens."""
  return [Example(np.arange(i + 2), np.arange(i + 2) >= 1, where=f"d.jsonl row {i + 1}")
          for i in range(n)]


def _lengths(batch) -> list[int]:
  """Tokens of every example in a batch (one per segment)."""
  seg, out = batch["segment_ids"], []
  for row in seg:
    out += [int(np.sum(row == s)) for s in range(1, int(row.max()) + 1)]
  return out


def test_competence_schedules():
  kw = dict(start_fraction=0.2, full_at_step=100)
  assert [competence(t, pacing="linear", **kw) for t in (0, 50, 100, 150)] == pytest.approx(
      [0.2, 0.6, 1.0, 1.0])
  assert competence(50, pacing="root", **kw) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
  steps = [competence(t, pacing="step", stages=4, **kw) for t in (0, 24, 25, 74, 75, 99, 100)]
  assert steps == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.8, 0.8, 1.0])
  c = Curriculum(np.zeros(10), start_fraction=0.25, full_at_step=4)
  assert [c.pool_size(t, batch_size=2) for t in range(5)] == [3, 5, 7, 9, 10]
  assert Curriculum(np.zeros(10), start_fraction=0.01, full_at_step=4).pool_size(0, 4) == 4


def test_batches_come_from_the_easiest_fraction_then_the_epochs_follow():
  scores = -np.arange(20.0)  # the longest example is the easiest
  it = BatchIterator(_examples(), batch_size=2, seq_len=32, pack=False, seed=3)
  it.use_curriculum(Curriculum(scores, start_fraction=0.25, full_at_step=4))
  for t in range(4):
    pool = it.curriculum.pool_size(t, 2)
    assert it.competence() == pytest.approx(0.25 + 0.75 * t / 4)
    assert min(_lengths(next(it))) >= 22 - pool  # only the `pool` longest examples
  plain = BatchIterator(_examples(), batch_size=2, seq_len=32, pack=False, seed=3)
  assert it.competence() == 1.0
  for _ in range(12):  # then epoch 0, 1, ... exactly as without a curriculum
    a, b = next(it), next(plain)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  # ties are broken by the seed, and over the phase every easy item is drawn
  it = BatchIterator(_examples(), batch_size=2, seq_len=32, pack=False, seed=3)
  it.use_curriculum(Curriculum(np.zeros(20), start_fraction=0.5, full_at_step=50))
  assert len({n for _ in range(20) for n in _lengths(next(it))}) >= 10


def test_packed_rows_hold_only_the_pool_and_keep_their_shape():
  it = BatchIterator(_examples(), batch_size=2, seq_len=24, pack=True, seed=0)
  it.use_curriculum(Curriculum(np.arange(20.0), pacing="step", stages=2, start_fraction=0.3,
                               full_at_step=6))
  for t in range(6):
    batch = next(it)
    assert batch["tokens"].shape == (2, 24)
    assert max(_lengths(batch)) <= (7 if t < 3 else 16)  # pools of 6 then 13 shortest


def test_resume_mid_curriculum_is_exact():
  def make():
    it = BatchIterator(_examples(), batch_size=2, seq_len=24, pack=True, seed=1)
    it.use_curriculum(Curriculum(np.arange(20.0), pacing="root", full_at_step=5))
    return it

  straight, first = make(), make()
  expected = [next(straight) for _ in range(9)]
  for _ in range(3):
    next(first)
  state = first.state()
  assert state["curriculum_batch"] == 3
  resumed = make()
  resumed.restore(state)
  for want in expected[3:]:
    got = next(resumed)
    assert all(np.array_equal(want[k], got[k]) for k in want)
  plain = BatchIterator(_examples(), batch_size=2, seq_len=24, pack=True, seed=1)
  with pytest.raises(ValueError, match="fingerprint"):
    plain.restore(state)
  with pytest.raises(ValueError, match="before the first batch"):
    first.use_curriculum(Curriculum(np.arange(20.0)))
  with pytest.raises(ValueError, match="3 scores for 20"):
    make().use_curriculum(Curriculum(np.arange(3.0)))


def test_preference_pairs_and_prompts_follow_the_curriculum():
  from jaxpost.data.preference import Pair, pair_batch
  from jaxpost.data.preference_iterator import PreferenceIterator
  from jaxpost.rl.prompts import Prompt, PromptOrder
  pairs = [Pair(Example(np.arange(i + 3), np.arange(i + 3) >= 2),
                Example(np.arange(i + 4), np.arange(i + 4) >= 2), 2) for i in range(12)]
  it = PreferenceIterator(pairs, collate=pair_batch, batch_size=2, seq_len=32, seed=0)
  it.use_curriculum(Curriculum(it.item_lengths(), start_fraction=0.25, full_at_step=3))
  assert set(next(it)["index"]) <= {0, 1, 2}
  prompts = [Prompt(tuple(range(i + 1)), "q", {}, f"p row {i + 1}", i) for i in range(12)]
  order = PromptOrder(prompts, batch_size=3, seed=0)
  order.use_curriculum(Curriculum(-order.item_lengths(), start_fraction=0.25, full_at_step=3))
  assert set(next(order)["index"]) == {9, 10, 11}  # the 3 longest (the pool is one batch)


def test_row_scores_by_column_and_function_name_the_bad_row():
  rows = {"d.jsonl row 1": {"level": 3}, "d.jsonl row 2": {"level": "1.5"},
          "d.jsonl row 3": {"lvl": 1}}
  wheres = ["d.jsonl row 1", "d.jsonl row 2"]
  assert list(row_scores("level", wheres, rows)) == [3.0, 1.5]
  assert list(row_scores("m:f", wheres, rows, lambda r: -float(r["level"]))) == [-3.0, -1.5]
  with pytest.raises(DataError, match="d.jsonl row 3.*no column 'level'.*lvl"):
    row_scores("level", ["d.jsonl row 3"], rows)
  with pytest.raises(DataError, match="d.jsonl row 1.*not a finite number"):
    row_scores("level", ["d.jsonl row 1"], {"d.jsonl row 1": {"level": "hard"}})


RECIPE = """\
algorithm: {algorithm}
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 48, pack: true, curriculum: {{score: "{score}", start_fraction: 0.1,
        full_at_step: 4}}}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: 4, batch_size: 4, log_every: 1}}
"""


def _run(tmp: Path, score: str, algorithm: str = "sft", overrides=()):
  from jaxpost.train.build import build
  path = tmp / f"{algorithm}.yaml"
  path.write_text(RECIPE.format(algorithm=algorithm, run_dir=tmp / "run", score=score))
  run = build(load_config(path, list(overrides)))
  state, frozen = run.init_state()
  return run, run.policy(state.params, frozen)


def test_a_run_scores_by_a_function_and_by_the_start_models_loss(tmp_path, capsys):
  run, policy = _run(tmp_path, "jaxpost.tasks.arithmetic:operand_size")
  source = run.algorithm.batches("train", policy)
  batch = next(source.batches)
  texts = [run.tokenizer.decode([int(t) for t, s in zip(row, seg) if s])
           for row, seg in zip(batch["tokens"], batch["segment_ids"])]
  sizes = [max(int(a), int(b)) for t in texts for a, b in re.findall(r"(\d+) \+ (\d+)", t)]
  assert sizes and max(sizes) <= 3  # the easiest 10% of 88 questions: operands up to 3
  assert "curriculum: 88 items by jaxpost.tasks.arithmetic:operand_size" in capsys.readouterr().out

  run, policy = _run(tmp_path, "loss")
  source = run.algorithm.batches("train", policy)
  cached = list((tmp_path / "run" / "curriculum").glob("loss-*.npy"))
  assert len(cached) == 1
  losses = np.load(cached[0])
  assert losses.shape == (88,) and np.all(losses > 0)
  assert np.array_equal(source.batches.curriculum.scores, losses)
  before = cached[0].stat().st_mtime_ns
  run.algorithm.batches("train", policy)  # a resumed run reads the cache back
  assert cached[0].stat().st_mtime_ns == before


def test_preference_and_rl_runs_pace_their_data(tmp_path):
  run, policy = _run(tmp_path, "length", "dpo")
  assert run.algorithm.batches("train", policy).batches.competence() == pytest.approx(0.1)
  run, policy = _run(tmp_path, "length", "grpo", ["rl.num_generations=4"])
  assert run.algorithm.batches("train", policy).order.competence() == pytest.approx(0.1)


def test_curriculum_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="data.curriculum.start_fraction must be in"):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(algorithm="sft", run_dir=tmp_path / "run", score="length")
                    .replace("start_fraction: 0.1", "start_fraction: 0"))
    load_config(path)
  with pytest.raises(ConfigError, match="did you mean 'data.curriculum.pacing'"):
    load_config(tmp_path / "r.yaml", ["data.curriculum.pacng=root"])
  with pytest.raises(ConfigError, match="RL prompts have none"):
    run, policy = _run(tmp_path, "loss", algorithm="grpo", overrides=["rl.num_generations=4"])
    run.algorithm.batches("train", policy)
