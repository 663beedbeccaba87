"""RL reward functions: the built-ins' values (text and chat rows), loading by name and by
`module:function`, the weighted sum with None masking, one clear error per failure, and the
reward-model reward against `jaxpost.reward.score`."""

from __future__ import annotations

import json
import shutil
import sys

import jax
import numpy as np
import pytest
import tokenizer_fixtures

from jaxpost.config.rl import RLSection
from jaxpost.config.sections_base import ConfigError
from jaxpost.errors import TrainingError
from jaxpost.models import init_params
from jaxpost.reward import save_reward_model_hf, score, with_score_head
from jaxpost.rl import rewards
from jaxpost.tiny import make_tokenizer, tiny_config
from jaxpost.tokenizer import load_tokenizer


def user(text):
  return [{"role": "user", "content": text}]


def assistant(text):
  return [{"role": "assistant", "content": text}]


# -- built-ins ---------------------------------------------------------------------------------


def test_completion_text():
  assert rewards.completion_text(" 5 ") == " 5 "
  assert rewards.completion_text(assistant("5")) == "5"
  with pytest.raises(TypeError, match="list of messages"):
    rewards.completion_text([{"role": "assistant"}])


def test_answer_reward_text_and_chat():
  completions = [" 68\n", "69", "68 apples", "68"]
  expect = [1.0, 0.0, 0.0, None]
  answers = ["68", "68", "68", None]  # the last row has no answer: no reward
  assert rewards.answer_reward(["q"] * 4, completions, answer=answers) == expect
  assert rewards.answer_reward([user("q")] * 4, [assistant(c) for c in completions],
                               answer=answers) == expect
  assert rewards.answer_reward(["q"], ["12"], solution=[12], other=["x"]) == [1.0]  # not a string
  with pytest.raises(ValueError, match=r"'answer' or 'solution' column.*\['other'\]"):
    rewards.answer_reward(["q"], ["12"], other=["x"])


def test_format_reward_matches_the_whole_completion():
  fn = rewards.format_reward(r"<think>.*</think>\s*<answer>\d+</answer>")
  texts = ["<think>a\nb</think>\n<answer>5</answer>",  # "." crosses newlines
           "<think>a</think><answer>5</answer> and more",  # not the whole text
           "so <think>a</think><answer>5</answer>",
           "<think>a</think><answer>five</answer>"]
  assert fn(["q"] * 4, texts) == [1.0, 0.0, 0.0, 0.0]
  assert fn([user("q")] * 4, [assistant(t) for t in texts]) == [1.0, 0.0, 0.0, 0.0]
  assert fn.__name__ == "format"


def test_overlong_counts_tokens_at_the_boundaries():
  fn = rewards.overlong_reward(10, 4)  # no penalty up to 6 tokens, -1 at 10 and beyond
  lengths = [0, 6, 7, 8, 9, 10, 11, 30]
  got = fn(["q"] * len(lengths), ["x" * 1000] * len(lengths),  # characters do not count
           completion_ids=[[3] * n for n in lengths])
  np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -0.75, -1, -1, -1], rtol=0, atol=1e-12)
  hard = rewards.overlong_reward(10, 0)  # no soft zone: only past Lmax
  assert hard(["q"] * 2, ["a"] * 2, completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
  with pytest.raises(ValueError, match="needs completion_ids"):
    fn(["q"], ["a"])
  for bad in ((10, 10), (10, -1), (0, 0)):
    with pytest.raises(ValueError, match="0 <= buffer < max_new_tokens"):
      rewards.overlong_reward(*bad)


def test_math_verify_reward():
  pytest.importorskip("math_verify")
  completions = [r"so the answer is \boxed{42}", r"\boxed{41}", "42", r"\boxed{\frac{2}{6}}",
                 r"\boxed{42}"]
  gold = ["42", "42", "42", r"\frac{1}{3}", "no number here"]
  expect = [1.0, 0.0, 0.0, 1.0, None]  # a bare "42" is no answer; an unparsable gold: None
  assert rewards.math_verify_reward(["q"] * 5, completions, solution=gold) == expect
  assert rewards.math_verify_reward([user("q")] * 5, [assistant(c) for c in completions],
                                    answer=gold) == expect


def test_math_verify_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails as if not installed
  with pytest.raises(ImportError, match=r"pip install 'jaxpost\[math\]'"):
    rewards.math_verify_reward(["q"], [r"\boxed{1}"], solution=["1"])
  with pytest.raises(ConfigError, match=r"pip install 'jaxpost\[math\]'"):
    rewards.load_reward_func("math_verify", RLSection())


# -- loading -----------------------------------------------------------------------------------


def test_builtins_load_from_the_rl_section():
  rl = RLSection(reward_funcs="answer, format,overlong", reward_weights="1,0.5,2",
                 format_pattern=r"\d+", max_new_tokens=4, overlong_buffer=2)
  fns = rewards.load_reward_funcs(rl)
  assert fns.names == ("answer", "format", "overlong") and fns.weights == (1.0, 0.5, 2.0)
  scores = fns.score(["q", "q"], ["12", "x"], {"answer": ["12", "12"]}, [[5, 6], [5, 6, 7]],
                     [0, 0])
  np.testing.assert_array_equal(scores.per_fn["format"], [1.0, 0.0])
  np.testing.assert_array_equal(scores.per_fn["overlong"], [0.0, -0.5])
  np.testing.assert_array_equal(scores.total_N, [1.5, -1.0])
  assert set(rewards.BUILTINS) >= set(fns.names)

  with pytest.raises(ConfigError, match="unknown reward function 'accuracy'.*module:function"):
    rewards.load_reward_func("accuracy", rl)
  with pytest.raises(ConfigError, match="set rl.reward_model"):
    rewards.load_reward_func("reward_model", rl)
  with pytest.raises(ConfigError, match="rl.format_pattern '\\(' is not a regular expression"):
    rewards.load_reward_func("format", RLSection(format_pattern="("))
  with pytest.raises(ConfigError, match="'answer' more than once"):
    rewards.load_reward_funcs(RLSection(reward_funcs="answer,answer"))


USER_MODULE = '''
def length_reward(prompts, completions, **kwargs):
  return [float(len(c)) for c in completions]

class Rewards:
  @staticmethod
  def shout(prompts, completions, **kwargs):
    return [float(c.isupper()) for c in completions]

NOT_A_FUNCTION = 3
'''


def test_user_functions_by_module_and_by_file(tmp_path, monkeypatch):
  name = "jaxpost_test_user_rewards"
  (tmp_path / f"{name}.py").write_text(USER_MODULE)
  (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, name, raising=False)
  rl = RLSection()

  fn_name, fn = rewards.load_reward_func(f"{name}:length_reward", rl)
  assert fn_name == "length_reward" and fn(["q"], ["abc"]) == [3.0]
  fn_name, fn = rewards.load_reward_func(f"{name}:Rewards.shout", rl)
  assert fn_name == "shout" and fn(["q", "q"], ["HI", "hi"]) == [1.0, 0.0]
  fn_name, fn = rewards.load_reward_func(f"{tmp_path / name}.py:length_reward", rl)
  assert fn_name == "length_reward" and fn(["q"], ["ab"]) == [2.0]
  fns = rewards.load_reward_funcs(RLSection(reward_funcs=f"answer,{name}:length_reward"))
  assert fns.names == ("answer", "length_reward")

  for spec, message in [
      ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
      ("broken_rewards:f", "importing broken_rewards failed: ModuleNotFoundError"),
      (f"{name}:missing", f"{name} has no attribute 'missing'"),
      (f"{name}:NOT_A_FUNCTION", "is a int, not a function"),
      (f"{tmp_path}/absent.py:f", "no file"),
      (f"{tmp_path}/broken_rewards.py:f", "importing .*broken_rewards.py failed"),
      (f"{name}:", "should be module:function"),
  ]:
    with pytest.raises(ConfigError, match=message) as info:
      rewards.load_reward_func(spec, rl)
    assert "\n" not in str(info.value) and str(info.value).startswith("rl.reward_funcs")
  sys.modules.pop(name, None)


# -- the weighted sum --------------------------------------------------------------------------


def test_weights_none_masking_columns_and_metrics():
  seen = {}

  def a(prompts, completions, completion_ids, answer, **kwargs):
    seen.update(prompts=prompts, completion_ids=completion_ids, answer=answer, kwargs=kwargs)
    return [1.0, None, None, 0.5]

  def b(prompts, completions, **kwargs):
    return [2, 3, None, None]

  def never(prompts, completions, **kwargs):
    return [None] * len(completions)

  fns = rewards.RewardFns(("a", "b", "never"), (a, b, never), (0.5, 2.0, 1.0))
  prompts = [user("p0"), user("p0"), user("p1"), user("p1")]
  columns = {"answer": ["1", "1", "2", "2"], "level": [3, 3, 4, 4],
             "prompt": ["dropped"] * 4}  # a reserved name: not passed
  ids = [[1], [1, 2], [3], [4, 5, 6]]
  scores = fns.score(prompts, [assistant(c) for c in "wxyz"], columns, ids, [10, 10, 11, 11])
  assert seen["prompts"] == prompts and seen["completion_ids"] == ids
  assert seen["answer"] == ["1", "1", "2", "2"] and seen["kwargs"] == {"level": [3, 3, 4, 4]}

  assert scores.total_N.dtype == np.float32 and scores.valid_N.dtype == bool
  np.testing.assert_array_equal(scores.total_N, [0.5 + 4.0, 6.0, 0.0, 0.25])
  np.testing.assert_array_equal(scores.valid_N, [True, True, False, True])
  np.testing.assert_array_equal(scores.per_fn["a"], [1.0, np.nan, np.nan, 0.5])
  np.testing.assert_array_equal(scores.per_fn["b"], [2.0, 3.0, np.nan, np.nan])
  assert scores.metrics() == {"rewards/a/mean": 0.75, "rewards/a/std": 0.25,
                              "rewards/b/mean": 2.5, "rewards/b/std": 0.5}

  with pytest.raises(ValueError, match=r"3 completions but \{'row_ids': 2"):
    fns.score(["p"] * 3, ["c"] * 3, {}, [[1]] * 3, [0, 1])
  with pytest.raises(ValueError, match="names must differ"):
    rewards.RewardFns(("a", "a"), (a, b), (1.0, 1.0))


def _one(fn, name="bad"):
  return rewards.RewardFns((name,), (fn,), (1.0,))


def _score(fns, n=3):
  prompts = [f"prompt {i} " + "long " * 40 for i in range(n)]
  return fns.score(prompts, [f"c{i}" for i in range(n)], {"answer": ["1"] * n},
                   [[1]] * n, [5, 7, 9][:n])


@pytest.mark.parametrize("fn, message", [
    (lambda prompts, completions, **kw: [1.0 / (c != "c1") for c in completions],
     (r"reward function 'bad' failed on dataset row 7 \(prompt 'prompt 1 long long.*\.\.\.', "
      r"completion 'c1'\): ZeroDivisionError: float division by zero")),
    (lambda prompts, completions, **kw: [0.0, float("nan"), 1.0],
     r"'bad' returned nan for dataset row 7 \(prompt 'prompt 1 .*; return a finite float"),
    (lambda prompts, completions, **kw: [0.0, 1.0, np.float32("-inf")],
     r"'bad' returned -inf for dataset row 9 \(prompt 'prompt 2 "),
    (lambda prompts, completions, **kw: [0.0, 1e40, 1.0],  # not a float32
     r"'bad' returned 1e\+40 for dataset row 7 "),
    (lambda prompts, completions, **kw: [0.0, "1.0", 1.0],
     r"'bad' returned '1.0' \(str\) for dataset row 7 .*return a float, or None"),
    (lambda prompts, completions, **kw: [0.0, 1.0],
     (r"'bad' returned 2 values for 3 completions \(dataset rows 5, 7, 9; first prompt "
      r"'prompt 0 ")),
    (lambda prompts, completions, **kw: 1.0,
     r"'bad' returned a float, not a list of 3 values \(dataset rows 5, 7, 9"),
    (lambda prompts, completions, **kw: [1.0 / (len(completions) == 1)] * len(completions),
     (r"'bad' failed on a batch of 3 completions \(dataset rows 5, 7, 9; .*\), though on "
      r"none of them alone: ZeroDivisionError")),
    (lambda prompts, completions: [1.0] * len(completions),
     r"'bad' failed on dataset row 5 .*TypeError: .*unexpected keyword argument.*take \*\*kwargs"),
])
def test_each_error_names_the_function_and_the_row(fn, message):
  with pytest.raises(rewards.RewardError, match=message) as info:
    _score(_one(fn))
  assert isinstance(info.value, TrainingError) and "\n" not in str(info.value)
  if "failed" in message:
    assert info.value.__cause__ is not None  # the function's own exception, chained


def test_values_of_other_numeric_types_are_accepted():
  scores = _score(_one(lambda prompts, completions, **kw: [True, np.float64(0.5), np.int32(2)]))
  np.testing.assert_array_equal(scores.total_N, [1.0, 0.5, 2.0])


# -- the reward model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
  """A tiny reward model folder with its tokenizer (as `RUN/final`), and its parts."""
  folder = make_tokenizer(tmp_path_factory.mktemp("run") / "final", tokenizer_fixtures.corpus(300))
  tok = load_tokenizer(folder)
  config = tiny_config(tok.vocab_size)
  params = with_score_head(config, init_params(config, jax.random.key(3)), jax.random.key(4),
                           std=0.2)
  save_reward_model_hf(config, params, folder)
  return folder, tok, config, params


def test_reward_model_reward_equals_score(reward_model):
  folder, tok, config, params = reward_model
  prompts = [user("what is two plus three"), user("what is two plus three"),
             [{"role": "system", "content": "you are helpful"}, *user("hello")],
             "the quick brown", "hello"]
  completions = [assistant("five"), assistant("six"), assistant("how are you"), " fox jumps",
                 " world"]
  fn = rewards.reward_model_reward(folder)  # one batch: one compile, shared with `score`
  got = fn(prompts, completions, answer=["5"] * 5, completion_ids=[[1]] * 5)
  joined = [prompts[0] + completions[0], prompts[1] + completions[1],
            prompts[2] + completions[2], "the quick brown fox jumps", "hello world"]
  expect = score(config, params, tok, joined)
  assert isinstance(got, list) and len(got) == 5
  np.testing.assert_array_equal(np.asarray(got, np.float32), expect)
  assert len(set(got)) == 5

  # a chat prompt with a plain-string completion is the same conversation
  np.testing.assert_array_equal(fn(prompts[:1], ["five"]), expect[:1])
  # the run folder (its final/ export), loaded by name from the rl section
  (folder.parent / "config.yaml").write_text("algorithm: reward\n")
  rl = RLSection(reward_funcs="reward_model", reward_model=str(folder.parent))
  name, by_run = rewards.load_reward_func("reward_model", rl)
  assert name == "reward_model"
  np.testing.assert_array_equal(np.asarray(by_run(prompts, completions), np.float32), expect)
  with pytest.raises(TypeError, match="text prompt with a conversational completion"):
    fn(["text"], [assistant("five")])


def test_reward_model_folder_errors(reward_model, tmp_path):
  folder, tok, _, _ = reward_model
  run = tmp_path / "unfinished_run"
  run.mkdir()
  (run / "config.yaml").write_text("algorithm: reward\n")
  with pytest.raises(FileNotFoundError, match="without final/.*jaxpost export"):
    rewards.reward_model_reward(run)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    rewards.reward_model_reward(tmp_path / "absent")
  with pytest.raises(ConfigError, match="rl.reward_model: reward model .*absent: no such folder"):
    rewards.load_reward_func("reward_model", RLSection(reward_funcs="reward_model",
                                                      reward_model=str(tmp_path / "absent")))

  lm = tmp_path / "lm"
  shutil.copytree(folder, lm)
  config = json.loads((lm / "config.json").read_text())
  (lm / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
  with pytest.raises(ValueError, match="is not a reward model.*LlamaForCausalLM"):
    rewards.reward_model_reward(lm)

  bare = tmp_path / "bare"  # weights only: the tokenizer must be given
  bare.mkdir()
  for f in folder.iterdir():
    if f.name == "config.json" or f.suffix == ".safetensors":
      shutil.copy(f, bare / f.name)
  with pytest.raises(FileNotFoundError, match="has no tokenizer"):
    rewards.reward_model_reward(bare)
  fn = rewards.reward_model_reward(bare, tokenizer=tok)
  np.testing.assert_array_equal(fn(["hello"], [" world"]),
                                rewards.reward_model_reward(folder)(["hello"], [" world"]))
