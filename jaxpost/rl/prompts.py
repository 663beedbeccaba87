"""The prompts an RL run samples from: read once, tokenised once, taken in a resumable order.

    prompts = read_prompts("data/train.jsonl", tokenizer, max_prompt_length=256)
    order = PromptOrder(len(prompts), batch_size=4, seed=0)
    batch = [prompts[i] for i in next(order)["index"]]      # state() / restore() resume exactly

A row is a chat prompt (`{"prompt": [messages]}`, or `{"messages": [...]}` whose final
assistant turn, if any, is the reference answer and is dropped from the prompt) or a plain one
(`{"prompt": "text"}`). Every other column (e.g. `answer`, `solution`) passes through to the
reward functions, as TRL passes dataset columns. Chat prompts are rendered with the model's chat
template and a generation prompt; text prompts get the tokenizer's BOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxpost.data import DataError, read_rows
from jaxpost.data import errors
from jaxpost.data.epochs import EpochIterator, fingerprint_of
from jaxpost.tokenizer import Tokenizer

PROMPT_KEYS = ("prompt", "messages")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: its token ids, what reward functions see of it (the text or the messages),
  the row's other columns, and where it came from ("file row N") with its index."""

  ids: tuple[int, ...]
  prompt: str | list[dict[str, Any]]
  columns: dict[str, Any]
  where: str
  index: int

  @property
  def is_chat(self) -> bool:
    return not isinstance(self.prompt, str)


def _prompt_of(data: dict[str, Any], where: str) -> tuple[str | list[dict], dict[str, Any]]:
  """(the prompt, the other columns) of a row."""
  if "prompt" in data:
    prompt, rest = data["prompt"], {k: v for k, v in data.items() if k != "prompt"}
  elif "messages" in data:
    messages = data["messages"]
    rest = {k: v for k, v in data.items() if k != "messages"}
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and \
        messages[-1].get("role") == "assistant":
      rest.setdefault("answer", messages[-1].get("content"))
      messages = messages[:-1]
    prompt = messages
  else:
    raise DataError(errors.MISSING_FIELD, "an RL prompt row needs a 'prompt' (text or "
                    f"messages) or 'messages' column; it has {sorted(data)}", where=where)
  if isinstance(prompt, str):
    if not prompt:
      raise DataError(errors.EMPTY, "the prompt is empty", where=where, field="prompt")
    return prompt, rest
  if not (isinstance(prompt, list) and prompt and all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in prompt)):
    raise DataError(errors.WRONG_TYPE, "the prompt must be a string or a non-empty list of "
                    "{'role', 'content'} messages", where=where, field="prompt")
  return prompt, rest


def read_prompts(source: Any, tokenizer: Tokenizer, *, max_prompt_length: int | None = None,
                 on_bad_row: str = "error") -> list[Prompt]:
  """Every prompt of `source` (a file, folder, dataset name or `datasets.Dataset`), tokenised.

  A prompt longer than `max_prompt_length` tokens keeps its last `max_prompt_length` tokens
  (the question is usually at the end; TRL truncates on the left too). A bad row raises
  `DataError` naming the file and row, unless `on_bad_row="skip"`."""
  prompts: list[Prompt] = []
  for row in read_rows(source):
    try:
      if isinstance(row.data, DataError):
        raise row.data
      prompt, columns = _prompt_of(row.data, row.where)
      if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=True)
      else:
        tokenizer.require_chat_template("RL chat prompts")
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    except DataError:
      if on_bad_row == "skip":
        continue
      raise
    if max_prompt_length is not None and len(ids) > max_prompt_length:
      ids = ids[-max_prompt_length:]
    prompts.append(Prompt(tuple(int(i) for i in ids), prompt, columns, row.where, len(prompts)))
  if not prompts:
    raise DataError(errors.NO_ROWS, "no usable prompt rows", where=str(source))
  return prompts


class PromptOrder(EpochIterator):
  """Batches of prompt indices, `{"index": int [batch_size]}`, shuffled per epoch by `seed`,
  endless; `state()` / `restore()` as every jaxpost data iterator (exact resume)."""

  _NAME = "prompt"
  _unit = "prompts"

  def __init__(self, prompts: Sequence[Prompt], *, batch_size: int, seed: int,
               shuffle: bool = True):
    fingerprint = fingerprint_of(["prompts", batch_size, seed, shuffle],
                                 (np.asarray(p.ids, np.int32).tobytes() for p in prompts))
    super().__init__(len(prompts), batch_size=batch_size, shuffle=shuffle, seed=seed,
                     drop_remainder=True, epochs=None, fingerprint=fingerprint, state=None)
    self._prompts = prompts

  def _collate(self, units: Sequence[Any]) -> dict[str, np.ndarray]:
    return {"index": np.asarray(units, np.int64)}

  def item_lengths(self) -> np.ndarray:
    return np.array([len(p.ids) for p in self._prompts], np.int64)

  def item_wheres(self) -> list[str | None]:
    return [p.where for p in self._prompts]
