"""Online RL end to end on a tiny model: rollouts, the temperature of the log-probs, a ratio of
exactly 1 at the first update, variants (Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, LoRA, KL),
dynamic sampling, metrics and samples, errors, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from kill_after_checkpoint import WRAPPER

from jaxpost.config import ConfigError, load_config

RECIPE = """\
algorithm: grpo
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
rl: {{num_generations: 4, max_new_tokens: 5, reward_funcs: "{rewards}:digits"}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 8, log_every: 1}}
checkpoint: {{every: {every}, async_save: false}}
"""

# A reward that varies between a random model's completions: the fraction of digit characters.
REWARDS = """\
def digits(prompts, completions, **kwargs):
  texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
  return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def boom(prompts, completions, **kwargs):
  raise RuntimeError("no reward today")
"""


def _recipe(tmp: Path, name: str, steps: int = 2, every: int = 0) -> Path:
  rewards = tmp / "my_rewards.py"
  rewards.write_text(REWARDS)
  path = tmp / f"{name}.yaml"
  path.write_text(RECIPE.format(run_dir=tmp / name, rewards=rewards, steps=steps,
                                every=every or steps))
  return path


def _train(tmp: Path, name: str, overrides=(), steps: int = 2):
  from jaxpost.train.trainer import train
  summary = train(load_config(_recipe(tmp, name, steps), list(overrides)))
  lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
  return summary, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A built GRPO run and its rollout source (4 prompts x 4 samples, 2 mini-batches)."""
  from jaxpost.train.build import build
  tmp = tmp_path_factory.mktemp("grpo")
  cfg = load_config(_recipe(tmp, "built"), ["rl.mini_batches=2", "rl.temperature=0.7",
                                             "rl.tis_cap=2.0"])
  run = build(cfg)
  state, frozen = run.init_state()
  source = run.algorithm.batches("train", run.policy(state.params, frozen, 0))
  return run, state, frozen, source


def test_completion_log_probs_are_the_sampled_distributions(built):
  """The training forward's log-probs at the rollout's completion tokens, at the sampling
  temperature, equal the sampler's own (trl#4159: not the untempered ones)."""
  from jaxpost.rl.rollout import _logps_fn
  run, state, frozen, source = built
  batch = source.next(run.policy(state.params, frozen, 0))
  assert batch["tokens"].shape == (8, source.width)
  mask = batch["loss_mask"] > 0
  rows = run.place({k: batch[k] for k in ("tokens", "targets", "loss_mask", "segment_ids",
                                          "positions")})
  model = run.trainable.model(state.params, frozen)
  tempered = np.asarray(_logps_fn(run.config, 0.7, None)(model, rows))
  np.testing.assert_allclose(tempered[mask], batch["sampler_logps"][mask], atol=1e-5)
  raw = np.asarray(_logps_fn(run.config, 1.0, None)(model, rows))
  assert np.abs(raw[mask] - batch["sampler_logps"][mask]).max() > 1e-3
  # two mini-batches: the old policy's log-probs come from the no-grad forward
  np.testing.assert_allclose(batch["old_logps"][mask], tempered[mask], atol=1e-6)
  assert batch["fresh"].tolist() == [1.0] * 8
  second = source.next(run.policy(state.params, frozen, 1))
  assert second["fresh"].tolist() == [0.0] * 8
  source.queue.clear()


def test_first_update_has_an_importance_ratio_of_exactly_one(built):
  run, state, frozen, source = built
  source.queue.clear()
  batch = source.next(run.policy(state.params, frozen, 0))
  _, metrics = run.evaluate_batch(state.params, frozen, run.place(batch))
  assert float(metrics["ratio/mean"]) == 1.0
  assert float(metrics["clip_ratio/region_mean"]) == 0.0
  # not fresh, same params: the no-grad forward's old log-probs agree to float rounding
  stale = dict(batch, fresh=np.zeros_like(batch["fresh"]))
  _, metrics = run.evaluate_batch(state.params, frozen, run.place(stale))
  assert abs(float(metrics["ratio/mean"]) - 1.0) < 1e-6
  source.queue.clear()


def test_state_restores_the_queue_and_the_prompt_order(built):
  run, state, frozen, source = built
  source.queue.clear()
  first = source.next(run.policy(state.params, frozen, 5))
  saved = json.loads(json.dumps(source.state()))
  second = source.next(run.policy(state.params, frozen, 6))
  third = source.next(run.policy(state.params, frozen, 7))  # a new rollout
  source.restore(saved)
  for want in (second, third):
    got = source.next(run.policy(state.params, frozen, 6 if want is second else 7))
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert first["fresh"][0] == 1.0
  source.queue.clear()


VARIANTS = {
    "grpo": ["rl.aggregation=grpo"],
    "dr_grpo": ["rl.scale_rewards=none", "rl.aggregation=dr_grpo"],
    "dapo": ["rl.clip_high=0.28", "rl.dynamic_sampling=true", "rl.overlong_buffer=2",
             "rl.reward_funcs={rewards}:digits,overlong"],
    "gspo": ["rl.importance_level=sequence", "rl.clip_low=3e-4", "rl.clip_high=4e-4",
             "rl.num_iterations=2"],
    "rloo": ["rl.advantage=rloo", "rl.aggregation=seq_mean_token_sum"],
    "reinforce_pp": ["rl.advantage=reinforce_pp", "train.micro_batches=2"],
    "lora_kl": ["lora.rank=4", "rl.beta=0.1", "rl.kl=low_var_kl", "rl.mini_batches=2"],
    "kl_full": ["rl.beta=0.05", "rl.kl=k3"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_and_reports(tmp_path, name):
  overrides = [o.format(rewards=tmp_path / "my_rewards.py") for o in VARIANTS[name]]
  summary, rows = _train(tmp_path, name, overrides)
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == 2 and all(np.isfinite(r["train/loss"]) for r in train_rows)
  last = train_rows[-1]
  for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy",
              "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length",
              "completions/clipped_ratio", "rewards/digits/mean", "timing/sampling_s",
              "rollout_tokens_per_s"):
    assert f"train/{key}" in last, key
  if "rl.beta=0.1" in overrides or "rl.beta=0.05" in overrides:
    assert "train/kl" in last
  samples = [json.loads(s) for s in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
  assert samples and {"step", "prompt", "completion", "reward"} <= set(samples[0])
  assert (tmp_path / name / "final" / "model.safetensors").exists()
  assert summary["headline"] == "eval/reward"


def test_dynamic_sampling_keeps_only_groups_with_a_spread(tmp_path):
  """A reward equal within a group for half of the prompts: those groups are dropped and more
  prompts are sampled; every kept group has a spread."""
  from jaxpost.train.build import build
  (tmp_path / "half.py").write_text(textwrap.dedent("""\
      def half(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        return [0.5 if int(a) % 2 else float(len(t) + len(set(t)))
                for a, t in zip(answer, texts)]
      """))
  cfg = load_config(_recipe(tmp_path, "dyn"), [
      "rl.dynamic_sampling=true", f"rl.reward_funcs={tmp_path / 'half.py'}:half",
      "rl.max_sampling_tries=8"])
  run = build(cfg)
  state, frozen = run.init_state()
  source = run.algorithm.batches("train", run.policy(state.params, frozen, 0))
  batch = source.next(run.policy(state.params, frozen, 0))
  metrics = source.host_metrics()
  assert metrics["dynamic_sampling/dropped_fraction"] > 0
  assert metrics["frac_reward_zero_std"] == 0.0
  adv = batch["advantages"].reshape(2, 4, -1)
  assert all(np.abs(adv[g]).max() > 0 for g in range(2))


def test_a_raising_reward_function_stops_the_run_naming_it(tmp_path):
  from jaxpost.errors import TrainingError
  with pytest.raises(TrainingError, match="boom") as info:
    _train(tmp_path, "boom", [f"rl.reward_funcs={tmp_path / 'my_rewards.py'}:boom"])
  assert "row" in str(info.value)


def test_rollout_batches_must_hold_whole_groups(tmp_path):
  with pytest.raises(ConfigError, match="multiple of rl.num_generations"):
    load_config(_recipe(tmp_path, "bad"), ["rl.num_generations=3"])


@pytest.mark.slow
def test_resume_after_sigkill_mid_rollout_gives_the_same_weights(tmp_path):
  """Killed after step 3's checkpoint, in the middle of a rollout's 2 x 2 updates, with
  dynamic sampling on: the rerun ends with the uninterrupted run's weights, bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  overrides = ["rl.num_iterations=2", "rl.mini_batches=2", "rl.dynamic_sampling=true",
               "rl.beta=0.05"]

  def recipe(name):
    path = _recipe(tmp_path, name, steps=8, every=3)
    cfg = path.read_text()
    for o in overrides:
      section, kv = o.split(".", 1)
      key, value = kv.split("=")
      cfg = cfg.replace(f"{section}: {{", f"{section}: {{{key}: {value}, ", 1)
    path.write_text(cfg)
    return str(path)

  straight, killed = recipe("straight"), recipe("killed")
  proc = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", straight], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-c", WRAPPER, "3", killed], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == -9, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", killed], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed" in proc.stdout + proc.stderr
  a = (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
  b = (tmp_path / "killed" / "final" / "model.safetensors").read_bytes()
  assert a == b


def _doc_block(marker: str) -> str:
  import re
  text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
  return re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S).group(1)


def test_the_docs_reward_function_and_custom_policy_loss_train(tmp_path):
  """docs/architecture.md's reward function (as a file beside the recipe) and custom policy
  loss (a factory passed to `train`) run as written."""
  from jaxpost.train.trainer import train
  (tmp_path / "doc_rewards.py").write_text(_doc_block("reward-function"))
  namespace: dict = {}
  exec(_doc_block("custom-policy-loss"), namespace)  # pylint: disable=exec-used
  cfg = load_config(_recipe(tmp_path, "doc"), [
      f"rl.reward_funcs={tmp_path / 'my_rewards.py'}:digits,{tmp_path / 'doc_rewards.py'}:brevity",
      "rl.reward_weights=1.0,0.1"])
  summary = train(cfg, algorithm=namespace["my_grpo"])
  assert np.isfinite(summary["final_metrics"]["train/loss"])
  assert "train/rewards/brevity/mean" in summary["final_metrics"]


def test_prompts_from_a_file_plain_chat_and_messages(tmp_path, built):
  """Prompt rows: plain text (BOS + text), chat messages (template + generation prompt), or a
  conversation whose final assistant turn becomes the `answer` column; other columns pass
  through; a bad row is one error naming file and row."""
  from jaxpost.data import DataError
  from jaxpost.rl.prompts import read_prompts
  tok = built[0].tokenizer
  path = tmp_path / "prompts.jsonl"
  rows = [{"prompt": "What is 2 + 3?", "solution": "5"},
          {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "answer": "8"},
          {"messages": [{"role": "user", "content": "What is 1 + 1?"},
                        {"role": "assistant", "content": "2"}]}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  plain, chat, conv = read_prompts(str(path), tok)
  assert plain.ids == tuple(tok.encode("What is 2 + 3?", add_bos=True))
  assert plain.columns == {"solution": "5"} and not plain.is_chat
  expect = tok.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True, tokenize=True)
  assert chat.ids == tuple(expect) and chat.columns == {"answer": "8"}
  assert conv.prompt == rows[2]["messages"][:1] and conv.columns == {"answer": "2"}
  assert conv.where.endswith("row 3") or "3" in conv.where
  path.write_text(json.dumps({"question": "no prompt"}) + "\n")
  with pytest.raises(DataError, match=r"prompts\.jsonl.*'prompt'"):
    read_prompts(str(path), tok)


def test_online_dpo_pairs_best_and_worst_and_trains(tmp_path):
  """algorithm=online_dpo: pairs [P, 2, T] of each prompt's best and worst sample by reward,
  ties skipped and counted; the DPO loss against the start model starts at log 2."""
  import math

  from jaxpost.train.build import build
  cfg = load_config(_recipe(tmp_path, "odpo"), ["algorithm=online_dpo", "train.batch_size=4"])
  run = build(cfg)
  state, frozen = run.init_state()
  source = run.algorithm.batches("train", run.policy(state.params, frozen, 0))
  batch = source.next(run.policy(state.params, frozen, 0))
  assert batch["tokens"].shape == (4, 2, source.width)
  metrics = source.host_metrics()
  assert metrics["scores/chosen"] > metrics["scores/rejected"]
  assert 0.0 <= metrics["ties_fraction"] <= 1.0
  loss, m = run.evaluate_batch(state.params, frozen, run.place(batch))
  assert abs(float(loss) - math.log(2)) < 1e-5 and float(m["weight"]) == 4.0
  summary, rows = _train(tmp_path, "odpo_run", ["algorithm=online_dpo", "train.batch_size=4",
                                                "dpo.loss_type=ipo"])
  last = [r for r in rows if "train/loss" in r][-1]
  assert np.isfinite(last["train/loss"]) and "train/scores/margin" in last
  assert summary["headline"] == "eval/reward"


@pytest.mark.parametrize("kwargs", [
    dict(aggregation="dapo"), dict(aggregation="grpo"),
    dict(aggregation="dr_grpo", max_completion_length=5),
    dict(aggregation="seq_mean_token_sum", importance_level="sequence", clip_high=0.3)])
def test_on_policy_route_equals_the_general_one(built, kwargs):
  """One update per rollout, no KL: `grpo_loss(on_policy=True)` (the fused LM-head gradient)
  gives the general route's loss and gradients on a fresh batch."""
  import jax

  from jaxpost.algorithms.grpo import grpo_loss
  run, state, frozen, source = built
  source.queue.clear()
  batch = run.place(source.next(run.policy(state.params, frozen, 0)))
  source.queue.clear()
  model = run.trainable.model(state.params, frozen)

  def loss(on_policy):
    fn = lambda p: grpo_loss(p, batch, None, config=run.config, temperature=0.7,  # noqa: E731
                             on_policy=on_policy, **kwargs)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(model)

  (plain, m_plain), g_plain = loss(False)
  (fused, m_fused), g_fused = loss(True)
  np.testing.assert_allclose(float(fused), float(plain), atol=1e-7)
  assert float(m_fused["weight"]) == float(m_plain["weight"])
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_plain)):
    # float32 sums in another order: within 1e-4 of the leaf's largest gradient
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4 * np.abs(b).max(), rtol=1e-5)
