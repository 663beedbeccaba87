"""Reward functions for online RL, in TRL's signature, and their weighted sum.

A reward function scores a batch of completions (TRL's `GRPOTrainer` convention, so TRL reward
functions work unchanged):

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns)
        -> list[float | None]                           one value per completion

* Plain-text rows: each prompt and completion is a string.
* Chat rows: each prompt is a list of messages and each completion is
  `[{"role": "assistant", "content": text}]` (TRL's conversational format).
* `completion_ids`: the completion's sampled token ids (a list of ints per completion).
* `columns`: the dataset row's other fields, one list each, a value per completion (e.g.
  `answer=["68", "68", "12", ...]`: completions sampled from one prompt repeat its row).
* `None`: no reward for that completion from this function (e.g. a gold answer that cannot be
  parsed); it is left out of the weighted sum rather than counted as 0.

Built-ins (names for `rl.reward_funcs`; `load_reward_func` configures them from the `rl:`
section): `answer` (exact match), `math_verify` (math-verify's equivalence, TRL's
`accuracy_reward`), `format` (a regex on the whole completion), `overlong` (DAPO's soft length
penalty, in tokens) and `reward_model` (a trained Bradley-Terry reward model, scored on device).
Anything else is `module:function` or `path/to/file.py:function`.

`RewardFns` runs several and sums them with weights,

    total_i = sum over functions f with r_f,i not None of  w_f * r_f,i      (TRL's nansum)

a completion where every function returned None being invalid (`valid_N` False, total 0). A
function that raises, returns the wrong number of values, or a value that is not a finite
number stops the run with one `RewardError` naming the function, the dataset row and its prompt.

    fns = load_reward_funcs(cfg.rl, tokenizer=tok)
    scores = fns.score(prompts, completions, {"answer": answers}, completion_ids, row_ids)
    scores.total_N, scores.valid_N, scores.metrics()  # {"rewards/answer/mean": ..., ...}
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxpost.config.sections_base import ConfigError
from jaxpost.errors import TrainingError
from jaxpost.user_code import import_function
from jaxpost.rl.builtin_rewards import (RewardFn, _import_math_verify, answer_reward, completion_text,
                                        format_reward, math_verify_reward, overlong_reward,
                                        reward_model_folder, reward_model_reward)

if TYPE_CHECKING:
  from jaxpost.config.rl import RLSection
  from jaxpost.tokenizer import Tokenizer

# Keys a reward function gets as arguments of its own (TRL leaves "prompt" and "completion" out
# of the columns too): a dataset column of one of these names is not passed.
RESERVED = frozenset({"prompts", "completions", "completion_ids", "prompt", "completion"})


__all__ = ["BUILTINS", "RESERVED", "RewardError", "RewardFn", "RewardFns", "Scores",
           "answer_reward", "completion_text", "format_reward", "load_reward_func",
           "load_reward_funcs", "math_verify_reward", "overlong_reward", "reward_model_folder",
           "reward_model_reward"]


class RewardError(TrainingError):
  """A reward function failed or returned an unusable value; the message names the function,
  the dataset row and its prompt."""


# ---------------------------------------------------------------------------------------------
# Loading by name
# ---------------------------------------------------------------------------------------------


def _load_math_verify(rl, tokenizer):
  del rl, tokenizer
  try:
    _import_math_verify()
  except ImportError as e:
    raise ConfigError(f"rl.reward_funcs: {e}") from None
  return math_verify_reward


def _load_format(rl, tokenizer):
  del tokenizer
  try:
    return format_reward(rl.format_pattern)
  except re.error as e:
    raise ConfigError(f"rl.format_pattern {rl.format_pattern!r} is not a regular expression: "
                      f"{e}") from None


def _load_overlong(rl, tokenizer):
  del tokenizer
  try:
    return overlong_reward(rl.max_new_tokens, rl.overlong_buffer)
  except ValueError as e:
    raise ConfigError(f"rl.overlong_buffer / rl.max_new_tokens: {e}") from None


def _load_reward_model(rl, tokenizer):
  if rl.reward_model is None:
    raise ConfigError("rl.reward_funcs names reward_model: set rl.reward_model to its folder")
  try:
    return reward_model_reward(rl.reward_model, tokenizer=tokenizer)
  except (OSError, ValueError) as e:
    raise ConfigError(f"rl.reward_model: {e}") from e


_BUILTIN_LOADERS: dict[str, Callable[[Any, Any], RewardFn]] = {
    "answer": lambda rl, tokenizer: answer_reward,
    "math_verify": _load_math_verify,
    "format": _load_format,
    "overlong": _load_overlong,
    "reward_model": _load_reward_model,
}
BUILTINS = tuple(_BUILTIN_LOADERS)


def load_reward_func(name_or_path: str, rl: RLSection, *,
                     tokenizer: Tokenizer | None = None) -> tuple[str, RewardFn]:
  """(name, function) for one entry of `rl.reward_funcs`.

  * A built-in name (`BUILTINS`), configured from `rl`: `format` by `rl.format_pattern`,
    `overlong` by `rl.max_new_tokens` and `rl.overlong_buffer`, `reward_model` by
    `rl.reward_model` (loaded now; `tokenizer` only if its folder has none).
  * `module:function` (an importable module, e.g. `my_rewards:correct`, or `pkg.mod:Class.fn`)
    or `path/to/file.py:function` (the file is imported as a module; its own imports of sibling
    files need their folder on PYTHONPATH). The name is the part after the colon.

  Only local code is imported; nothing is downloaded.

  Raises:
    ConfigError: an unknown name, a module or file that cannot be imported, a missing or
      non-callable attribute, a bad `format_pattern`, math-verify not installed (one line each).
  """
  spec = name_or_path.strip()
  if ":" not in spec:
    loader = _BUILTIN_LOADERS.get(spec)
    if loader is None:
      raise ConfigError(f"rl.reward_funcs: unknown reward function {spec!r}; the built-ins are "
                        f"{', '.join(BUILTINS)}, or give module:function (e.g. "
                        "my_rewards:correct) or path/to/file.py:function")
    return spec, loader(rl, tokenizer)
  return import_function(spec, key="rl.reward_funcs")


def load_reward_funcs(rl: RLSection, *, tokenizer: Tokenizer | None = None) -> RewardFns:
  """Every function of `rl.reward_funcs` (`load_reward_func`) with `rl.reward_weights`."""
  loaded = [load_reward_func(n, rl, tokenizer=tokenizer) for n in rl.names()]
  names = [n for n, _ in loaded]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ConfigError(f"rl.reward_funcs names {', '.join(map(repr, twice))} more than once (a "
                      "function's name keys its metrics)")
  return RewardFns(tuple(names), tuple(f for _, f in loaded), tuple(rl.weights()))


# ---------------------------------------------------------------------------------------------
# The weighted sum
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scores:
  """Rewards of N completions.

  total_N: float32, the weighted sum over functions of their values that are not None (0 for
    an invalid completion).
  per_fn: name -> [N] float32, each function's raw (unweighted) values, NaN for None.
  valid_N: bool, False where every function returned None.
  """
  total_N: np.ndarray
  per_fn: dict[str, np.ndarray]
  valid_N: np.ndarray

  def metrics(self) -> dict[str, float]:
    """`rewards/<name>/mean` and `rewards/<name>/std` (population std) of each function over
    the completions it scored (None left out); none for a function that scored none."""
    out = {}
    for name, v_N in self.per_fn.items():
      real = v_N[~np.isnan(v_N)].astype(np.float64)
      if real.size:
        out[f"rewards/{name}/mean"] = float(real.mean())
        out[f"rewards/{name}/std"] = float(real.std())
    return out


@dataclasses.dataclass(frozen=True)
class RewardFns:
  """Reward functions with their names (metric keys) and weights; `score` runs them all."""
  names: tuple[str, ...]
  fns: tuple[RewardFn, ...]
  weights: tuple[float, ...]

  def __post_init__(self):
    if not len(self.names) == len(self.fns) == len(self.weights):
      raise ValueError(f"{len(self.names)} names, {len(self.fns)} functions and "
                       f"{len(self.weights)} weights")
    if not self.fns:
      raise ValueError("RewardFns needs at least one reward function")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"reward function names must differ, got {list(self.names)}")
    if not all(math.isfinite(w) for w in self.weights):
      raise ValueError(f"reward weights must be finite, got {list(self.weights)}")

  def score(self, prompts: Sequence, completions: Sequence, columns: Mapping[str, Sequence],
            completion_ids: Sequence[Sequence[int]], row_ids: Sequence) -> Scores:
    """Runs every function on the N completions and sums their values with the weights.

    Args:
      prompts, completions: N each (strings, or message lists and
        `[{"role": "assistant", "content": text}]`); a prompt repeats per completion.
      columns: the rows' other fields, name -> N values; passed as keyword arguments, except
        `RESERVED` names.
      completion_ids: N token-id lists.
      row_ids: N dataset row ids, for error messages.

    Raises:
      RewardError: a function raised (the dataset row is the first that fails alone; the
        function is called again row by row to find it), returned other than N values, or a
        value that is not a finite number or None.
      ValueError: inputs of different lengths.
    """
    n = len(completions)
    lengths = {"prompts": len(prompts), "completion_ids": len(completion_ids),
               "row_ids": len(row_ids), **{f"columns[{k!r}]": len(v) for k, v in columns.items()}}
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
      raise ValueError(f"RewardFns.score got {n} completions but {wrong}")
    batch = _Batch(list(prompts), list(completions), [list(ids) for ids in completion_ids],
                   {k: list(v) for k, v in columns.items() if k not in RESERVED}, list(row_ids))
    per_fn = {name: batch.run(name, fn) for name, fn in zip(self.names, self.fns)}
    v_FxN = np.stack([per_fn[name] for name in self.names]).astype(np.float64)
    w_F = np.asarray(self.weights, np.float64)
    valid_N = ~np.all(np.isnan(v_FxN), axis=0)
    total_N = np.nansum(w_F[:, None] * v_FxN, axis=0).astype(np.float32)
    return Scores(total_N, per_fn, valid_N)


@dataclasses.dataclass(frozen=True)
class _Batch:
  prompts: list
  completions: list
  completion_ids: list
  columns: dict[str, list]
  row_ids: list

  def call(self, fn: RewardFn, rows: Sequence[int]):
    pick = lambda xs: [xs[i] for i in rows]
    return fn(prompts=pick(self.prompts), completions=pick(self.completions),
              completion_ids=pick(self.completion_ids),
              **{k: pick(v) for k, v in self.columns.items()})

  def where(self, i: int) -> str:
    return (f"dataset row {self.row_ids[i]!r} (prompt {_short(self.prompts[i])}, completion "
            f"{_short(self.completions[i])})")

  def rows(self) -> str:
    ids = list(dict.fromkeys(self.row_ids))
    shown = ", ".join(map(repr, ids[:5])) + (f", ... ({len(ids)} rows)" if len(ids) > 5 else "")
    return f"dataset rows {shown}; first prompt {_short(self.prompts[0]) if self.prompts else ''}"

  def run(self, name: str, fn: RewardFn) -> np.ndarray:
    """[N] float32 values of fn, NaN for None; RewardError naming fn and the row otherwise."""
    n = len(self.completions)
    try:
      out = self.call(fn, range(n))
    except Exception as e:  # pylint: disable=broad-except
      for i in range(n):  # the first row that fails alone
        try:
          self.call(fn, [i])
        except Exception as row_error:  # pylint: disable=broad-except
          raise RewardError(f"reward function {name!r} failed on {self.where(i)}: "
                            f"{_describe(row_error)}") from row_error
      raise RewardError(f"reward function {name!r} failed on a batch of {n} completions "
                        f"({self.rows()}), though on none of them alone: {_describe(e)}") from e
    if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__"):
      raise RewardError(f"reward function {name!r} returned a {type(out).__name__}, not a list "
                        f"of {n} values ({self.rows()})")
    if len(out) != n:
      raise RewardError(f"reward function {name!r} returned {len(out)} values for {n} "
                        f"completions ({self.rows()}); return one value (or None) per completion")
    values_N = np.empty(n, np.float32)
    for i, v in enumerate(out):
      if v is None:
        values_N[i] = np.nan
        continue
      try:
        x = float(v) if _is_number(v) else None
      except (TypeError, ValueError):
        x = None
      if x is None:
        raise RewardError(f"reward function {name!r} returned {v!r:.80} ({type(v).__name__}) "
                          f"for {self.where(i)}; return a float, or None for no reward")
      if not math.isfinite(x) or abs(x) > _FLOAT32_MAX:
        raise RewardError(f"reward function {name!r} returned {x} for {self.where(i)}; return a "
                          "finite float, or None for no reward")
      values_N[i] = x
    return values_N


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_number(v) -> bool:
  if isinstance(v, (str, bytes)):
    return False
  return isinstance(v, numbers.Real) or hasattr(v, "__float__")


def _describe(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  if isinstance(e, TypeError) and "argument" in str(e):
    text += (" (reward functions are called as fn(prompts=..., completions=..., "
             "completion_ids=..., **columns); take **kwargs for the columns you do not use)")
  return text


def _short(item, limit: int = 80) -> str:
  """A prompt or completion in one short line: a string, or a conversation's last message."""
  if not isinstance(item, str):
    try:
      item = str(item[-1]["content"])
    except (TypeError, KeyError, IndexError):
      item = str(item)
  text = item if len(item) <= limit else item[:limit - 3] + "..."
  return repr(text)
