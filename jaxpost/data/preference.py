"""Preference data: pairs for DPO-family losses, labelled unpaired rows for KTO.

    batches = build_preference_batches("pairs.jsonl", tokenizer, seq_len=512, batch_size=8)
    batch = next(batches)                          # arrays [8, 2, 512]: axis 1 = (chosen, rejected)
    tokens_2BxT = batch["tokens"].reshape(-1, 512)   # both sides through the model in one forward

Row formats (TRL's):

* paired, explicit prompt: {"prompt", "chosen", "rejected"}.
  - Standard (every value a string): each side is the prompt's ids (with the tokenizer's default
    BOS) followed by the completion's ids and EOS, the two tokenised apart. Strings are standard
    text even when the tokenizer has a chat template, as in TRL: write the prompt as a list of
    messages to have the template applied.
  - Conversational (`prompt` a list of messages): the prompt is rendered with the chat template
    and the generation prompt; `chosen` / `rejected` (a string, or a list of assistant messages)
    become the assistant turn(s) after it, up to and including the end-of-turn token.
  Each side is exactly the sequence SFT's prompt + completion format gives
  (`formats.to_example`), so SFT and DPO on the same rows see the same tokens.
* paired, implicit prompt: {"chosen", "rejected"}, two whole conversations; the prompt is their
  longest common prefix of messages (TRL's `extract_prompt`) and what follows in each must be
  assistant messages. Conversations only: a common prefix of two strings cuts words ("is 4" /
  "is 5" would share "is ").
* unpaired, for KTO: {"prompt", "completion", "label"}: prompt and completion as a paired side,
  `label` a bool (true: a desirable completion).

Only completion tokens are trained (`loss_mask`); chosen and rejected start with the same prompt
tokens. Bad rows (a missing field, a wrong type, an empty completion, identical chosen and
rejected, a label that is not a bool) raise `DataError` naming file, row and field, or with
`on_bad_row="skip"` are skipped and counted by reason.

Truncation, as in TRL: `max_prompt_length` keeps the prompt's last tokens (dropping its start,
BOS included), then `max_length` (default and at most `seq_len`) keeps each sequence's first
tokens (cutting the completion's end). A pair left with no completion token on a side, or with
identical sides, and an unpaired row left with no completion token, are dropped and counted.

Batch layout: one sequence per row, right-padded, no packing; the row layout of SFT batches
(`jaxpost.data.packing`): `tokens`, `targets` (next tokens), `loss_mask` (bool: the target at t
is a completion token), `segment_ids` (1 on the sequence, 0 on padding), `positions`; int32.

* paired, `pair_batch`: each array [B, 2, T], index 0 of axis 1 the chosen side, 1 the rejected.
  A loss reshapes to [2B, T] for one forward; splitting along axis 0 (micro-batches, data
  parallelism) keeps every pair together. `shared_prompt=True` lays each pair out as one row
  `prompt, chosen, rejected` instead ([B, T] arrays plus `branch_ids`; the prompt is scored
  once: `jaxpost.data.shared_prompt`).
* unpaired, `kto_batch`: each array [B, T], `label` [B] int32 (1 desirable, 0 undesirable), and
  the same five arrays prefixed `kl_` [B, T] for KTO's KL baseline: row i's prompt followed by
  the completion of row (i + 1) mod B of the same batch (TRL's mismatched pairs, rotated within
  the batch; the batch is shuffled afresh every epoch, so the pairs change). KTO needs
  batch_size >= 2; a final partial batch rotates among its real rows.

A padding row (a final partial batch with `drop_remainder=False`) is all padding: segment 0,
`loss_mask` all False, label 0. A loss should count a pair or row only where its mask has a
token: `loss_mask.any(-1)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxpost.data.errors import (EMPTY, MISSING_FIELD, TEMPLATE, WRONG_TYPE, DataError,
                                 field_error)
from jaxpost.data.formats import (Chat, Example, check_messages, check_string, convert_rows,
                                  get_field, prompt_completion_example)
from jaxpost.data.packing import make_rows
from jaxpost.data.pipeline import pad_id_of
from jaxpost.data.preference_iterator import PreferenceIterator, PreferenceStats
from jaxpost.data.shared_prompt import shared_pair_batch
from jaxpost.data.sources import Row, read_rows
from jaxpost.tokenizer import Tokenizer

IDENTICAL = "identical"  # the skipped-rows reason of a pair whose sides are the same

__all__ = [
    "IDENTICAL", "Pair", "PreferenceIterator", "PreferenceStats", "PreferenceTokenized",
    "Unpaired", "build_kto_batches", "build_preference_batches", "kto_batch", "pair_batch",
    "to_pair", "to_unpaired", "tokenize_pairs", "tokenize_unpaired",
]


# ---------------------------------------------------------------------------------------------
# Tokenised items
# ---------------------------------------------------------------------------------------------


def _cut(example: Example, start: int, end: int) -> Example:
  """example[start:end], its first token untrained (nothing predicts it)."""
  if start == 0 and end >= len(example):
    return example
  mask = example.loss_mask[start:end].copy()
  mask[:1] = False
  return Example(example.tokens[start:end], mask)


def _window(length: int, prompt_length: int, max_length: int | None,
            max_prompt_length: int | None) -> tuple[int, int]:
  """The [start, end) a sequence keeps: the prompt's last `max_prompt_length` tokens, then the
  first `max_length` tokens from there."""
  start = 0 if max_prompt_length is None else max(0, prompt_length - max_prompt_length)
  end = length if max_length is None else min(length, start + max_length)
  return start, end


@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
  """A tokenised preference pair.

  chosen, rejected: `Example`s (token ids and the mask of trained tokens: the completion's)
    that start with the same `prompt_length` prompt tokens.
  where: the row it came from ("pairs.jsonl row 3"), or None; only for messages.
  """

  chosen: Example
  rejected: Example
  prompt_length: int
  where: str | None = None

  @property
  def examples(self) -> tuple[Example, Example]:
    return self.chosen, self.rejected

  @property
  def trainable(self) -> bool:
    """Both sides have a trained token, and they differ."""
    return (self.chosen.num_targets > 0 and self.rejected.num_targets > 0
            and not np.array_equal(self.chosen.tokens, self.rejected.tokens))

  def truncate(self, max_length: int | None, max_prompt_length: int | None) -> Pair:
    """The pair cut as the module docstring says (both sides lose the same prompt tokens)."""
    windows = [_window(len(e), self.prompt_length, max_length, max_prompt_length)
               for e in self.examples]
    chosen, rejected = (_cut(e, *w) for e, w in zip(self.examples, windows))
    start, end = windows[0]
    return Pair(chosen, rejected, min(self.prompt_length, end) - start, self.where)


@dataclasses.dataclass(frozen=True, eq=False)
class Unpaired:
  """A tokenised KTO row: `example` starts with `prompt_length` prompt tokens; `label` is True
  for a desirable completion; `where` the row it came from, or None (only for messages)."""

  example: Example
  prompt_length: int
  label: bool
  where: str | None = None

  @property
  def examples(self) -> tuple[Example]:
    return (self.example,)

  @property
  def trainable(self) -> bool:
    return self.example.num_targets > 0

  def truncate(self, max_length: int | None, max_prompt_length: int | None) -> Unpaired:
    start, end = _window(len(self.example), self.prompt_length, max_length, max_prompt_length)
    return Unpaired(_cut(self.example, start, end), min(self.prompt_length, end) - start,
                    self.label, self.where)


# ---------------------------------------------------------------------------------------------
# Checking rows
# ---------------------------------------------------------------------------------------------


def _prompt(value: Any) -> str | list[dict[str, Any]]:
  if isinstance(value, list):
    return check_messages(value, "prompt")
  if not isinstance(value, str):
    raise field_error(WRONG_TYPE, "prompt", f"should be a string or a list of messages, got "
                      f"{type(value).__name__}")
  return value


def _completion(value: Any, field: str, *, conversational: bool,
                offset: int = 0) -> str | list[dict[str, Any]]:
  """A checked completion (`field` names it; `offset`: index of its first message in the row's
  list, for an implicit prompt's remainder)."""
  if not isinstance(value, list):
    if not isinstance(value, str):
      kinds = "a string or a list of assistant messages" if conversational else "a string"
      raise field_error(WRONG_TYPE, field, f"should be {kinds}, got {type(value).__name__}")
    return check_string(value, field)
  if not conversational:
    raise field_error(WRONG_TYPE, field, "should be a string, as 'prompt' is, got list (make "
                      "'prompt' a list of messages for conversational data)")
  if not value:
    raise field_error(EMPTY, field, "is empty")
  # An implicit prompt's remainder was checked whole already (with its indices in the row).
  messages = check_messages(value, field) if offset == 0 else value
  for i, message in enumerate(messages, start=offset):
    if message["role"] != "assistant":
      raise field_error(WRONG_TYPE, f"{field}[{i}].role",
                        f"should be 'assistant', got {message['role']!r}")
  if not any((m.get("content") or "").strip() or m.get("tool_calls") for m in messages):
    raise field_error(EMPTY, field, "has no text")
  return messages


def _split_prompt(chosen: list[dict[str, Any]],
                  rejected: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
  """The prompt two conversations share (their longest common prefix) and its length."""
  k = 0
  while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
    k += 1
  if k == 0:
    raise field_error(MISSING_FIELD, "prompt", "is missing, and 'chosen' and 'rejected' share no "
                      "first message to take it from")
  for field, side in (("chosen", chosen), ("rejected", rejected)):
    if len(side) == k:
      raise field_error(EMPTY, field, "has no message after the prompt it shares with the other "
                        "side")
  return chosen[:k], k


def _identical() -> DataError:
  return field_error(IDENTICAL, "rejected", "is identical to 'chosen'")


def _tokenize_side(prompt: Any, prompt_ids: list[int], completion: Any,
                   tokenizer: Tokenizer) -> Example:
  """The sequence SFT's prompt + completion format gives (checked to start with `prompt_ids`)."""
  example = prompt_completion_example({"prompt": prompt, "completion": completion}, tokenizer,
                                      "completion", add_eos=True)
  if example.tokens[:len(prompt_ids)].tolist() != prompt_ids:
    raise DataError(TEMPLATE, "field 'prompt': the prompt's tokens change when a completion "
                    "follows it", field="prompt")
  return example


def _prompt_ids(prompt: str | list[dict[str, Any]], tokenizer: Tokenizer) -> list[int]:
  if isinstance(prompt, list):
    return Chat(tokenizer).ids(prompt, add_generation_prompt=True)
  return tokenizer.encode(prompt)


def to_pair(row: Mapping[str, Any], tokenizer: Tokenizer) -> Pair:
  """One paired row (the module docstring's formats) -> `Pair`.

  Raises:
    DataError: a missing field, a wrong type, an empty side, identical sides, a template that
      rejects the conversation; its `where` is unset (`tokenize_pairs` adds it).
    TokenizerError: conversational data and a tokenizer without a chat template.
  """
  chosen, rejected = get_field(row, "chosen"), get_field(row, "rejected")
  offset = 0
  if row.get("prompt") is None and isinstance(chosen, list) and isinstance(rejected, list):
    chosen, rejected = check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
    if chosen == rejected:
      raise _identical()
    prompt, offset = _split_prompt(chosen, rejected)
    chosen, rejected = chosen[offset:], rejected[offset:]
  else:
    prompt = _prompt(get_field(row, "prompt"))
  conversational = isinstance(prompt, list)
  chosen = _completion(chosen, "chosen", conversational=conversational, offset=offset)
  rejected = _completion(rejected, "rejected", conversational=conversational, offset=offset)
  if chosen == rejected:
    raise _identical()
  prompt_ids = _prompt_ids(prompt, tokenizer)
  pair = Pair(_tokenize_side(prompt, prompt_ids, chosen, tokenizer),
              _tokenize_side(prompt, prompt_ids, rejected, tokenizer), len(prompt_ids))
  if np.array_equal(pair.chosen.tokens, pair.rejected.tokens):
    raise _identical()
  return pair


def to_unpaired(row: Mapping[str, Any], tokenizer: Tokenizer) -> Unpaired:
  """One KTO row {"prompt", "completion", "label"} -> `Unpaired` (raises like `to_pair`)."""
  prompt, completion = get_field(row, "prompt"), get_field(row, "completion")
  label = get_field(row, "label")
  if not isinstance(label, (bool, np.bool_)):
    raise field_error(WRONG_TYPE, "label", f"should be a bool (true: desirable, false: "
                      f"undesirable), got {type(label).__name__} {label!r}")
  prompt = _prompt(prompt)
  completion = _completion(completion, "completion", conversational=isinstance(prompt, list))
  prompt_ids = _prompt_ids(prompt, tokenizer)
  return Unpaired(_tokenize_side(prompt, prompt_ids, completion, tokenizer), len(prompt_ids),
                  bool(label))


class PreferenceTokenized(NamedTuple):
  """`tokenize_pairs` / `tokenize_unpaired`' result: the items and the skipped rows by reason."""

  items: list[Pair] | list[Unpaired]
  skipped: dict[str, int]


def _tokenize(rows: Iterable[Row], convert: Callable[[Mapping[str, Any]], Any],
              on_bad_row: str) -> PreferenceTokenized:
  return PreferenceTokenized(*convert_rows(rows, convert, on_bad_row))


def tokenize_pairs(rows: Iterable[Row], tokenizer: Tokenizer, *,
                   on_bad_row: str = "error") -> PreferenceTokenized:
  """Tokenises paired rows (from `sources.read_rows`): "error" raises the first bad row's
  `DataError` ("file row N: field ..."), "skip" counts bad rows by reason."""
  return _tokenize(rows, lambda data: to_pair(data, tokenizer), on_bad_row)


def tokenize_unpaired(rows: Iterable[Row], tokenizer: Tokenizer, *,
                      on_bad_row: str = "error") -> PreferenceTokenized:
  """Tokenises KTO rows {"prompt", "completion", "label"} like `tokenize_pairs`."""
  return _tokenize(rows, lambda data: to_unpaired(data, tokenizer), on_bad_row)


# ---------------------------------------------------------------------------------------------
# Batch layout
# ---------------------------------------------------------------------------------------------


def pair_batch(pairs: Sequence[Pair | None], seq_len: int, *, pad_id: int = 0,
               max_length: int | None = None) -> dict[str, np.ndarray]:
  """Pairs (None: a padding pair) -> arrays [B, 2, seq_len]; axis 1: chosen, rejected.

  Each side is one row of `packing.make_rows`' layout. `max_length` is unused (the pairs are
  truncated already); it is there so that `pair_batch` and `kto_batch` are interchangeable.
  """
  del max_length
  examples, plan = [], []
  for pair in pairs:
    if pair is None:
      plan += [[], []]
    else:
      plan += [[len(examples)], [len(examples) + 1]]
      examples += pair.examples
  rows_2BxT = make_rows(examples, plan, seq_len, pad_id=pad_id)
  return {key: value.reshape(len(pairs), 2, seq_len) for key, value in rows_2BxT.items()}


def _mismatched(prompt_of: Unpaired, completion_of: Unpaired, max_length: int) -> Example:
  """`prompt_of`'s prompt, then `completion_of`'s completion (trained), cut to `max_length`."""
  p, q = prompt_of.prompt_length, completion_of.prompt_length
  completion = completion_of.example.tokens[q:]
  tokens = np.concatenate([prompt_of.example.tokens[:p], completion])[:max_length]
  mask = np.concatenate([np.zeros(p, np.bool_), np.ones(len(completion), np.bool_)])[:max_length]
  mask[:1] = False
  return Example(tokens, mask)


def _check_kto_batch_size(batch_size: int) -> None:
  if batch_size < 2:
    raise ValueError(f"KTO batches need batch_size >= 2 (the KL baseline pairs each prompt with "
                     f"another row's completion), got {batch_size}.")


def kto_batch(items: Sequence[Unpaired | None], seq_len: int, *, pad_id: int = 0,
              max_length: int | None = None) -> dict[str, np.ndarray]:
  """Unpaired rows (None: padding) -> arrays [B, seq_len], `label` [B] and the `kl_` arrays.

  KL row i: row i's prompt and the completion of real row (i + 1) mod n (n real rows in the
  batch), cut to `max_length` (default `seq_len`) tokens; only the completion is in its mask
  (which a long prompt may leave empty). A lone real row is paired with its own completion.
  """
  B = len(items)
  _check_kto_batch_size(B)
  real = [i for i, item in enumerate(items) if item is not None]
  limit = seq_len if max_length is None else min(max_length, seq_len)
  examples = [item.example for item in items if item is not None]
  kl_examples = [_mismatched(items[i], items[real[(j + 1) % len(real)]], limit)
                 for j, i in enumerate(real)]
  plan: list[list[int]] = [[] for _ in range(B)]
  for j, i in enumerate(real):
    plan[i] = [j]
  batch = make_rows(examples, plan, seq_len, pad_id=pad_id)
  kl = make_rows(kl_examples, plan, seq_len, pad_id=pad_id)
  batch.update({f"kl_{key}": value for key, value in kl.items()})
  batch["label"] = np.array([int(item is not None and item.label) for item in items], np.int32)
  return batch


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _build(tokenize, collate, path, tokenizer: Tokenizer, *, split: str = "train",
           on_bad_row: str = "error", **iterator_kwargs) -> PreferenceIterator:
  """Rows of `path` -> `tokenize` -> a `PreferenceIterator` of `collate` batches."""
  tokenized = tokenize(read_rows(path, split=split), tokenizer, on_bad_row=on_bad_row)
  return PreferenceIterator(tokenized, collate=collate, pad_id=pad_id_of(tokenizer),
                            **iterator_kwargs)


def build_preference_batches(
    path: str | Path | Any,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    max_prompt_length: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    on_bad_row: str = "error",
    shuffle: bool = True,
    epochs: int | None = None,
    drop_remainder: bool = True,
    state: Mapping[str, Any] | None = None,
    split: str = "train",
    shared_prompt: bool = False,
) -> PreferenceIterator:
  """Paired preference batches ([B, 2, T], see the module docstring) from a data file.

  Args:
    path: a local .jsonl/.json/.parquet/.csv file or a folder of them, a hub dataset name, or
      an in-memory `datasets.Dataset`.
    tokenizer: the model's tokenizer (its chat template renders conversations).
    seq_len, batch_size: every array is [batch_size, 2, seq_len].
    max_prompt_length: keep only the prompt's last tokens (TRL's truncation).
    max_length: cut every sequence to this many tokens (default and at most `seq_len`).
    seed: shuffling seed (the order of epoch e comes from (seed, e)).
    on_bad_row: "error" (raise `DataError` naming file, row and field) or "skip" (count them
      in `stats.skipped_rows` by reason).
    shuffle, epochs, drop_remainder, state: see `PreferenceIterator`.
    split: the split of a hub dataset (local files are "train"; slices like "train[:100]").
    shared_prompt: lay each pair out as one [seq_len] row `prompt, chosen, rejected` with
      `branch_ids` (`jaxpost.data.shared_prompt`), so the prompt is scored once: [B, T] arrays.
  """
  collate = shared_pair_batch if shared_prompt else pair_batch
  return _build(tokenize_pairs, collate, path, tokenizer, split=split, on_bad_row=on_bad_row,
                batch_size=batch_size, seq_len=seq_len, max_length=max_length,
                max_prompt_length=max_prompt_length, shuffle=shuffle, seed=seed,
                drop_remainder=drop_remainder, epochs=epochs, state=state)


def build_kto_batches(path: str | Path | Any, tokenizer: Tokenizer, *, seq_len: int,
                      batch_size: int, **kwargs: Any) -> PreferenceIterator:
  """KTO batches ([B, T] arrays, `label`, `kl_` arrays; see the module docstring) from rows
  {"prompt", "completion", "label"}. Arguments (and their defaults) as
  `build_preference_batches`'; batch_size >= 2.
  """
  _check_kto_batch_size(batch_size)
  return _build(tokenize_unpaired, kto_batch, path, tokenizer, seq_len=seq_len,
                batch_size=batch_size, **kwargs)
