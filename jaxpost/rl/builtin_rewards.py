"""The built-in reward functions, in TRL's signature (see `jaxpost.rl.rewards`): `answer`,
`math_verify`, `format`, `overlong` (in tokens) and `reward_model`."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any



if TYPE_CHECKING:
  from jaxpost.tokenizer import Tokenizer

RewardFn = Callable[..., Sequence[float | None]]


# ---------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
  """The text of a completion: the string itself, or the contents of a conversational
  completion's messages (TRL's `[{"role": "assistant", "content": text}]`) joined."""
  if isinstance(completion, str):
    return completion
  parts = []
  for message in completion:
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, str):
      raise TypeError(f"a completion should be a string or a list of messages with string "
                      f"contents, got {completion!r:.200}")
    parts.append(content)
  return "".join(parts)


def _gold(fn_name: str, first: Sequence | None, second: Sequence | None, names: tuple[str, str],
          columns: Mapping[str, Any]) -> Sequence:
  if first is not None:
    return first
  if second is not None:
    return second
  raise ValueError(f"{fn_name} needs an {names[0]!r} or {names[1]!r} column with the gold "
                   f"answers; the rows have {sorted(columns) or 'no other columns'}")


def answer_reward(prompts: Sequence, completions: Sequence, *, answer: Sequence | None = None,
                  solution: Sequence | None = None, **columns) -> list[float | None]:
  """1.0 when a completion's text, stripped, equals its row's `answer` (else `solution`), else
  0.0 (`jaxpost.tasks.arithmetic.reward`); None for a row whose answer is None."""
  del prompts
  gold = _gold("answer_reward", answer, solution, ("answer", "solution"), columns)
  return [None if g is None else float(completion_text(c).strip() == str(g))
          for c, g in zip(completions, gold, strict=True)]


def _import_math_verify():
  try:
    # pylint: disable=import-outside-toplevel
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify
  except ImportError as e:
    raise ImportError("the math_verify reward needs the math-verify package: "
                      "pip install 'jaxpost[math]'") from e
  return NormalizationConfig, LatexExtractionConfig, parse, verify


def math_verify_reward(prompts: Sequence, completions: Sequence, *,
                       solution: Sequence | None = None, answer: Sequence | None = None,
                       **columns) -> list[float | None]:
  r"""1.0 when the completion's answer is mathematically equal to the gold, else 0.0, by the
  `math-verify` package (TRL's `accuracy_reward`; `pip install 'jaxpost[math]'`).

  The gold is the row's `solution` (else `answer`), parsed with math-verify's defaults (LaTeX
  or a plain expression: "42", "\frac{1}{3}", "$x^2$"). The completion's answer must be LaTeX
  with an anchor: a `\boxed{...}` first, else e.g. "the answer is $...$" (a bare number in
  prose is not an answer). A row whose gold cannot be parsed gets None (no reward), as in TRL.

  math-verify's timeouts use `signal.alarm`, which works only on the main thread; on another
  thread parsing and verifying run without a time limit.
  """
  del prompts
  NormalizationConfig, LatexExtractionConfig, parse, verify = _import_math_verify()
  gold = _gold("math_verify_reward", solution, answer, ("solution", "answer"), columns)
  main = threading.current_thread() is threading.main_thread()
  parse_timeout, verify_timeout = (10, 5) if main else (None, None)
  if not main:  # math-verify warns on every call that its timeout is off
    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
  answer_config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True),
                                         boxed_match_priority=0, try_extract_without_anchor=False)]
  out: list[float | None] = []
  for c, g in zip(completions, gold, strict=True):
    gold_parsed = [] if g is None else parse(str(g), parsing_timeout=parse_timeout)
    if not gold_parsed:
      out.append(None)
      continue
    got = parse(completion_text(c), extraction_config=answer_config,
                extraction_mode="first_match", parsing_timeout=parse_timeout)
    out.append(float(verify(gold_parsed, got, timeout_seconds=verify_timeout)))
  return out


def format_reward(pattern: str) -> RewardFn:
  """A reward function: 1.0 when the whole completion text matches the regex `pattern`
  (`re.fullmatch` with `re.DOTALL`: "." also matches newlines), else 0.0.

  Example: `format_reward(r"<think>.*?</think>\\s*<answer>.*?</answer>")`.

  Raises:
    re.error: `pattern` is not a regular expression.
  """
  regex = re.compile(pattern, re.DOTALL)

  def format(prompts, completions, **columns) -> list[float]:
    del prompts, columns
    return [float(regex.fullmatch(completion_text(c)) is not None) for c in completions]

  return format


def overlong_reward(max_new_tokens: int, buffer: int) -> RewardFn:
  """A reward function: DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source
  LLM Reinforcement Learning System at Scale", arXiv 2503.14476, eq. 13), the length L being
  the completion's number of tokens (`len(completion_ids[i])`, as sampled):

      r(L) = 0                                   L <= Lmax - buffer
             ((Lmax - buffer) - L) / buffer      Lmax - buffer < L <= Lmax
             -1                                  L > Lmax

  with Lmax = `max_new_tokens`: no penalty up to the last `buffer` tokens, then a linear one
  reaching -1 at Lmax. Counted in tokens, not characters (as Tunix does), so it is the length
  the sampler limits.

  Raises:
    ValueError: max_new_tokens < 1, or buffer not in [0, max_new_tokens).
  """
  if max_new_tokens < 1 or not 0 <= buffer < max_new_tokens:
    raise ValueError(f"overlong_reward needs max_new_tokens >= 1 and 0 <= buffer < "
                     f"max_new_tokens, got max_new_tokens={max_new_tokens}, buffer={buffer}")
  start = max_new_tokens - buffer

  def overlong(prompts, completions, completion_ids=None, **columns) -> list[float]:
    del prompts, columns
    if completion_ids is None:
      raise ValueError("the overlong reward counts tokens: it needs completion_ids")
    if len(completion_ids) != len(completions):
      raise ValueError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
    out = []
    for ids in completion_ids:
      n = len(ids)
      out.append(0.0 if n <= start else (start - n) / buffer if n <= max_new_tokens else -1.0)
    return out

  return overlong


def reward_model_folder(folder: str | Path) -> Path:
  """The Hugging Face folder of a reward model: `folder` itself, or `folder/final` for a
  jaxpost run folder (an `algorithm: reward` run's export).

  Raises:
    FileNotFoundError: no such folder, or a run folder without its export.
    ValueError: the folder's config.json names a model class that is not a
      `*ForSequenceClassification` (a causal LM, say).
  """
  folder = Path(folder).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"reward model {folder}: no such folder")
  if not (folder / "config.json").exists() and (folder / "config.yaml").exists():
    if not (folder / "final" / "config.json").exists():
      raise FileNotFoundError(f"reward model {folder}: a jaxpost run folder without final/ (the "
                              f"run has not finished; `jaxpost export {folder}` writes it)")
    folder = folder / "final"
  config_file = folder / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"reward model {folder}: no config.json (expected a Hugging Face "
                            "*ForSequenceClassification folder or a jaxpost reward run folder)")
  try:
    architectures = json.loads(config_file.read_text()).get("architectures") or []
  except (ValueError, AttributeError) as e:
    raise ValueError(f"reward model {config_file}: not a JSON object ({e})") from None
  if architectures and not any(str(a).endswith("ForSequenceClassification")
                               for a in architectures):
    raise ValueError(f"{folder} is not a reward model: its config.json names {architectures}, "
                     "not a *ForSequenceClassification model (train one with algorithm: reward)")
  return folder


def reward_model_reward(folder: str | Path, *, tokenizer: Tokenizer | None = None, dtype=None,
                        mesh=None, batch_size: int = 8,
                        max_length: int | None = None) -> RewardFn:
  """A reward function scoring prompt + completion with a Bradley-Terry reward model on device.

  Args:
    folder: a `*ForSequenceClassification` folder (`jaxpost.reward.save_reward_model_hf`, or
      transformers') or a jaxpost run folder of an `algorithm: reward` run (its `final/`).
    tokenizer: used only when the folder has no tokenizer of its own (a reward model must be
      fed the ids it was trained on, so the folder's wins).
    dtype, mesh: as `jaxpost.reward.load_reward_model_hf` (parameter dtype; sharded placement).
    batch_size, max_length: as `jaxpost.reward.score`.

  The returned function scores chat rows as the conversation prompt messages + the completion
  message, text rows as the string prompt + completion (`jaxpost.reward.reward_input_ids`:
  exactly as the reward model's training pairs were tokenised).

  Raises:
    FileNotFoundError, ValueError: see `reward_model_folder`; a folder without tokenizer and
      none given; `CheckpointError` (a ValueError) from loading.
  """
  # Imported here: the other rewards need no JAX.
  from jaxpost.reward import load_reward_model_hf, score  # pylint: disable=import-outside-toplevel
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  path = reward_model_folder(folder)
  config, params = load_reward_model_hf(path, dtype=dtype, mesh=mesh)
  try:
    tok = load_tokenizer(path)
  except FileNotFoundError:
    if tokenizer is None:
      raise FileNotFoundError(f"reward model {path} has no tokenizer files; copy its "
                              "tokenizer into the folder") from None
    tok = tokenizer
  if tok.vocab_size > config.vocab_size:
    raise ValueError(f"reward model {path}: its tokenizer has {tok.vocab_size} tokens, more than "
                     f"the model's vocabulary ({config.vocab_size}); is it the right tokenizer?")

  def reward_model(prompts, completions, **columns) -> list[float]:
    del columns
    items = [_joined(p, c) for p, c in zip(prompts, completions, strict=True)]
    return score(config, params, tok, items, batch_size=batch_size,
                 max_length=max_length).tolist()

  return reward_model


def _joined(prompt, completion) -> str | list[Mapping[str, Any]]:
  """A reward model's input: messages + the completion's message(s), or text + text."""
  if isinstance(prompt, str):
    if not isinstance(completion, str):
      raise TypeError("a text prompt with a conversational completion: give both as text or "
                      "both as messages")
    return prompt + completion
  if isinstance(completion, str):
    return [*prompt, {"role": "assistant", "content": completion}]
  return [*prompt, *completion]


