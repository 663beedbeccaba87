"""Row formats -> `Example`s: token ids and the mask of the tokens trained as targets.

Three row formats, as in TRL:

* `messages`: a conversation, `[{"role": ..., "content": ...}, ...]`, rendered with the
  tokenizer's chat template. Trained tokens (`train_on`): "assistant" (every assistant turn,
  default), "last_assistant", or "all".
* `prompt` + `completion`: strings (the prompt is tokenised with the tokenizer's default BOS,
  the completion after it with EOS appended), or a conversational prompt (a messages list,
  rendered with `add_generation_prompt=True`) whose completion (a string, or a list of
  assistant messages) becomes the assistant turn. Trained: "completion" (default) or "all".
* `text`: BOS (if the tokenizer adds one by default) + text + EOS; every token trained.

An assistant turn's trained tokens are its text and its end-of-turn token (`<|im_end|>`,
`<|eot_id|>`, ...: the turn's last token among the tokenizer's stop ids, `eos_ids`), not what
the template writes after it (a newline): those are the tokens generation must produce, as in
TRL's `assistant_only_loss`. Turns are located by rendering incrementally: the
conversation up to an assistant turn with the generation prompt, then up to and including the
turn; both token sequences must be prefixes of the whole conversation's tokens. A template that
marks assistant text with `{% generation %}` blocks is read by its spans instead, which also
works for templates that render earlier turns differently (e.g. dropping old reasoning).

A row that cannot be used raises `DataError` naming the field; `tokenize_rows` adds the file and
row, or with `on_bad_row="skip"` skips the row and counts it by reason. Rows whose format cannot
be told (no row has a known field) raise `DataError` naming the file, the row and its fields;
conversational rows and a tokenizer without a chat template raise `TokenizerError` naming the
tokenizer's folder and the row.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxpost.chat_template import ChatTemplateError, render_chat_template_with_spans
from jaxpost.data.errors import (EMPTY, MISSING_FIELD, NO_ROWS, NO_TARGET, TEMPLATE,
                                 UNKNOWN_FORMAT, WRONG_TYPE, DataError, field_error)
from jaxpost.data.sources import Row
from jaxpost.tokenizer import Tokenizer, TokenizerError

FORMATS = ("messages", "prompt_completion", "text")
TRAIN_ON = {"messages": ("assistant", "last_assistant", "all"),
            "prompt_completion": ("completion", "all"), "text": ("all",)}
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "ipython"})
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One tokenised row.

  tokens:    int32 [n]
  loss_mask: bool [n]; `loss_mask[t]`: token t is a target, trained to be predicted from
             tokens[:t]. `loss_mask[0]` is always False (nothing predicts the first token).
  where:     the row it came from ("data/train.jsonl row 17"), or None; only for messages
             (e.g. naming truncated rows): fingerprints and batches never depend on it.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  where: str | None = None

  def __post_init__(self) -> None:
    tokens = np.asarray(self.tokens, np.int32)
    mask = np.asarray(self.loss_mask, np.bool_)
    if tokens.ndim != 1 or tokens.shape != mask.shape:
      raise ValueError(f"Example tokens and loss_mask should be 1-D of one length, got "
                       f"{tokens.shape} and {mask.shape}.")
    object.__setattr__(self, "tokens", tokens)
    object.__setattr__(self, "loss_mask", mask)

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def num_targets(self) -> int:
    """Number of trained target tokens."""
    return int(self.loss_mask[1:].sum())


class Tokenized(NamedTuple):
  """`tokenize_rows`' result: the examples, skipped rows by reason, the format used."""

  examples: list[Example]
  skipped: dict[str, int]
  format: str


_EXPECTED_FIELDS = ("'messages' (a list of {role, content} messages) for format messages, "
                    "'prompt' and 'completion' for prompt_completion, or 'text' for text")
_SET_FORMAT = "rename the fields, or set the format (format=..., or data.format in a run config)"


def detect_format(fields: Iterable[str]) -> str:
  """The format of rows with these fields: messages, else prompt/completion, else text.

  Raises:
    DataError: (reason "unknown_format") no field of a known format.
  """
  fields = set(fields)
  if "messages" in fields:
    return "messages"
  if fields & {"prompt", "completion"}:
    return "prompt_completion"
  if "text" in fields:
    return "text"
  raise DataError(UNKNOWN_FORMAT, f"cannot tell the data format from the fields "
                  f"{sorted(fields)}: expected {_EXPECTED_FIELDS}; {_SET_FORMAT}")


def detect_rows_format(rows: Sequence[Row]) -> str:
  """The format of `rows` (from `sources.read_rows`): `detect_format` of the fields of every
  readable row.

  Raises:
    DataError: there is no row; or no row could be read (the first row's own error: "file row
      1: invalid JSON: ..."); or no row has a field of a known format, or the rows are
      preference pairs (naming the first row and its fields).
  """
  readable = [row for row in rows if isinstance(row.data, dict)]
  if not readable:
    if rows:  # every row is unreadable: the first one says why
      raise rows[0].data
    raise DataError(NO_ROWS, "no rows to tell the data format from")
  fields = {key for row in readable for key in row.data}
  if {"chosen", "rejected"} <= fields and not fields & {"messages", "completion", "text"}:
    first = readable[0]
    raise DataError(UNKNOWN_FORMAT, f"this row has {_listed(first.data)}: preference pairs, "
                    "not SFT data; train them with a preference algorithm (e.g. "
                    "algorithm=dpo), or give rows with 'messages', 'prompt' + 'completion' or "
                    "'text'", where=first.where)
  try:
    return detect_format(fields)
  except DataError:
    first = readable[0]
    found = sorted(first.data)
    others = "" if set(found) == fields else f" (all rows together: {_listed(fields)})"
    unreadable = next((row.data for row in rows if not isinstance(row.data, dict)), None)
    also = f"; also, {unreadable}" if unreadable is not None else ""
    raise DataError(UNKNOWN_FORMAT, f"cannot tell the data format: no row has a field of a "
                    f"known format; this row has {_listed(found)}{others}; expected "
                    f"{_EXPECTED_FIELDS}; {_SET_FORMAT}{also}", where=first.where) from None


def _listed(fields: Iterable[str], limit: int = 12) -> str:
  """"the fields 'a', 'b'" (the first `limit`, then how many more), or "no field"."""
  fields = sorted(fields)
  if not fields:
    return "no field"
  shown = ", ".join(repr(f) for f in fields[:limit])
  more = f" and {len(fields) - limit} more" if len(fields) > limit else ""
  return f"the field{'s' if len(fields) > 1 else ''} {shown}{more}"


def check_train_on(format: str, train_on: str | None) -> str:  # pylint: disable=redefined-builtin
  """`train_on`, defaulted for `format` and checked (a ValueError names the choices)."""
  if format not in FORMATS:
    raise ValueError(f"Unknown data format {format!r}; expected 'auto' or one of {FORMATS}.")
  choices = TRAIN_ON[format]
  train_on = choices[0] if train_on is None else train_on
  if train_on not in choices:
    raise ValueError(f"train_on={train_on!r} does not apply to the {format} format; expected one "
                     f"of {choices}.")
  return train_on


# ---------------------------------------------------------------------------------------------
# Checking fields
# ---------------------------------------------------------------------------------------------


def get_field(row: Mapping[str, Any], field: str) -> Any:
  """`row[field]`; a `DataError` (missing field) if it is absent or None."""
  value = row.get(field)
  if value is None:  # Arrow fills absent fields with None
    raise field_error(MISSING_FIELD, field, "is missing")
  return value


def check_string(value: Any, field: str, *, allow_empty: bool = False) -> str:
  """`value`, checked to be a string, and unless `allow_empty` one with a non-space character
  (else a `DataError` naming `field`)."""
  if not isinstance(value, str):
    raise field_error(WRONG_TYPE, field, f"should be a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise field_error(EMPTY, field, "is empty" if not value else "is only whitespace")
  return value


def check_messages(value: Any, field: str) -> list[dict[str, Any]]:
  """A checked conversation: a non-empty list of {role, content} with known roles."""
  if not isinstance(value, list):
    raise field_error(WRONG_TYPE, field, f"should be a list of messages, got "
                      f"{type(value).__name__}")
  if not value:
    raise field_error(EMPTY, field, "is empty")
  for i, message in enumerate(value):
    name = f"{field}[{i}]"
    if not isinstance(message, Mapping):
      raise field_error(WRONG_TYPE, name, f"should be a message object, got "
                        f"{type(message).__name__}")
    role = message.get("role")
    if role is None:
      raise field_error(MISSING_FIELD, f"{name}.role", "is missing")
    check_string(role, f"{name}.role")
    if role not in ROLES:
      raise field_error(WRONG_TYPE, f"{name}.role", f"has unknown role {role!r} (expected one of "
                        f"{sorted(ROLES)})")
    content = message.get("content")
    if content is None and not message.get("tool_calls"):
      raise field_error(MISSING_FIELD, f"{name}.content", "is missing")
    if content is not None:
      check_string(content, f"{name}.content", allow_empty=True)
  return [dict(message) for message in value]


# ---------------------------------------------------------------------------------------------
# Rendering and locating assistant turns
# ---------------------------------------------------------------------------------------------


class Chat:
  """A tokenizer's chat template, rendered to token ids; locates turns by token prefixes."""

  def __init__(self, tokenizer: Tokenizer) -> None:
    self.tokenizer = tokenizer
    self.template = tokenizer.require_chat_template(
        "conversational data (a 'messages' list, or a 'prompt' that is a list of messages)",
        alternative="or use plain-text data: string prompts with format prompt_completion, or "
        "format text")
    self.stops = frozenset(tokenizer.eos_ids)
    self.has_generation = bool(_GENERATION_TAG.search(self.template))

  def render(self, messages: Sequence[Mapping[str, Any]], *,
             add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    try:
      return render_chat_template_with_spans(
          self.template, messages, add_generation_prompt=add_generation_prompt,
          special_tokens=self.tokenizer.named_special_tokens)
    except ChatTemplateError as e:
      raise DataError(TEMPLATE, f"the chat template rejected the conversation: {e}") from e

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_bos=False, add_eos=False)

  def ids(self, messages: Sequence[Mapping[str, Any]], *,
          add_generation_prompt: bool = False) -> list[int]:
    return self.encode(self.render(messages, add_generation_prompt=add_generation_prompt)[0])

  def prefix_length(self, ids: list[int], prefix: list[int], field: str) -> int:
    if ids[:len(prefix)] != prefix:
      raise DataError(TEMPLATE, f"field '{field}': the chat template does not render the "
                      "conversation up to a turn as a prefix of the whole conversation's tokens, "
                      "so the turn cannot be located; use a template with {% generation %} "
                      "blocks", field=field)
    return len(prefix)

  def turn_end(self, ids: list[int], start: int, end: int, *, lookahead: bool = False) -> int:
    """End of the turn rendered as ids[start:end]: just after its last stop token.

    Without a stop token in the span: `end`, or `end + 1` with `lookahead` if ids[end] is one
    (a `{% generation %}` block that leaves the end-of-turn token outside).
    """
    for t in range(end - 1, start - 1, -1):
      if ids[t] in self.stops:
        return t + 1
    if lookahead and end < len(ids) and ids[end] in self.stops:
      return end + 1
    return end

  def assistant_spans(self, messages: list[dict[str, Any]],
                      field: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the conversation and the [start, end) token span of each assistant turn."""
    text, char_spans = self.render(messages)
    ids = self.encode(text)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if self.has_generation and len(char_spans) == len(turns):
      spans = []
      for start, end in char_spans:
        a = self.prefix_length(ids, self.encode(text[:start]), field)
        b = self.prefix_length(ids, self.encode(text[:end]), field)
        spans.append((a, self.turn_end(ids, a, b, lookahead=True)))
      return ids, spans
    spans = []
    for i in turns:
      a = self.prefix_length(ids, self.ids(messages[:i], add_generation_prompt=True), field)
      b = self.prefix_length(ids, self.ids(messages[:i + 1]), field)
      spans.append((a, self.turn_end(ids, a, b)))
    return ids, spans


# ---------------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------------


def _mask(n: int, spans: Iterable[tuple[int, int]] = (), *, all_tokens: bool = False) -> np.ndarray:
  mask = np.full(n, all_tokens, np.bool_)
  for start, end in spans:
    mask[start:end] = True
  mask[:1] = False
  return mask


def _messages_example(row: Mapping[str, Any], chat: Chat, train_on: str) -> Example:
  messages = check_messages(get_field(row, "messages"), "messages")
  if train_on == "all":
    ids = chat.ids(messages)
    return Example(np.asarray(ids), _mask(len(ids), all_tokens=True))
  ids, spans = chat.assistant_spans(messages, "messages")
  if train_on == "last_assistant":
    spans = spans[-1:]
  return Example(np.asarray(ids), _mask(len(ids), spans))


def _completion_messages(value: Any) -> list[dict[str, Any]]:
  if isinstance(value, str):
    check_string(value, "completion")
    return [{"role": "assistant", "content": value}]
  completion = check_messages(value, "completion")
  for i, message in enumerate(completion):
    if message["role"] != "assistant":
      raise field_error(WRONG_TYPE, f"completion[{i}].role",
                        f"should be 'assistant', got {message['role']!r}")
  return completion


def prompt_completion_example(row: Mapping[str, Any], tokenizer: Tokenizer, train_on: str,
                              add_eos: bool) -> Example:
  """A prompt + completion row (strings, or a conversational prompt) -> `Example`, as the module
  docstring says; `train_on` "completion" or "all" (unchecked), no check of trained tokens."""
  prompt, completion = get_field(row, "prompt"), get_field(row, "completion")
  if isinstance(prompt, list):
    chat = Chat(tokenizer)
    prompt = check_messages(prompt, "prompt")
    completion = _completion_messages(completion)
    ids = chat.ids(prompt + completion)
    start = chat.prefix_length(ids, chat.ids(prompt, add_generation_prompt=True), "prompt")
    ids = ids[:chat.turn_end(ids, start, len(ids))]  # not what follows the end-of-turn token
    if add_eos and tokenizer.eos_id is not None and not chat.stops & set(ids[start:]):
      ids.append(tokenizer.eos_id)
  else:
    prompt_ids = tokenizer.encode(check_string(prompt, "prompt", allow_empty=True))
    completion_ids = tokenizer.encode(check_string(completion, "completion"), add_bos=False,
                                      add_eos=add_eos and tokenizer.eos_id is not None)
    start, ids = len(prompt_ids), prompt_ids + completion_ids
  return Example(np.asarray(ids), _mask(len(ids), [(start, len(ids))],
                                        all_tokens=train_on == "all"))


def _text_example(row: Mapping[str, Any], tokenizer: Tokenizer, add_eos: bool) -> Example:
  text = check_string(get_field(row, "text"), "text")
  ids = tokenizer.encode(text, add_eos=add_eos and tokenizer.eos_id is not None)
  return Example(np.asarray(ids), _mask(len(ids), all_tokens=True))


def to_example(row: Mapping[str, Any], tokenizer: Tokenizer, *,
               format: str,  # pylint: disable=redefined-builtin
               train_on: str | None = None, add_eos: bool = True) -> Example:
  """One row -> `Example` (see the module docstring for the formats and `train_on`).

  `add_eos` appends EOS to a completion or text (a conversational completion ends with the
  template's end-of-turn token instead, if it has one).

  Raises:
    DataError: the row is bad (missing field, wrong type, empty completion or text, unknown
      role, no token to train on, a template that rejects it); its `where` is unset.
    TokenizerError: a conversational row and a tokenizer without a chat template.
  """
  train_on = check_train_on(format, train_on)
  if format == "messages":
    example = _messages_example(row, Chat(tokenizer), train_on)
  elif format == "prompt_completion":
    example = prompt_completion_example(row, tokenizer, train_on, add_eos)
  else:
    example = _text_example(row, tokenizer, add_eos)
  if example.num_targets == 0:
    field = {"messages": "messages", "prompt_completion": "completion"}.get(format, "text")
    raise field_error(NO_TARGET, field, f"gives no token to train on (train_on={train_on!r})")
  return example


def tokenize_rows(rows: Iterable[Row], tokenizer: Tokenizer, *,
                  format: str = "auto",  # pylint: disable=redefined-builtin
                  train_on: str | None = None, add_eos: bool = True,
                  on_bad_row: str = "error") -> Tokenized:
  """Tokenises every row (from `sources.read_rows`) once.

  Args:
    format: "auto" (from the fields present in any row: messages, else prompt/completion,
      else text; `detect_rows_format`), or one of `FORMATS`.
    on_bad_row: "error" raises the first bad row's `DataError` ("file row N: field ..."),
      "skip" skips bad rows and counts them by reason in `Tokenized.skipped`.

  Each example's `where` is its row's. A tokenizer without the chat template a conversational
  row needs raises `TokenizerError` ("file row N: the tokenizer in <folder> has no chat
  template ...") in both modes: skipping would drop every conversation.
  """
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row should be 'error' or 'skip', got {on_bad_row!r}.")
  rows = list(rows)
  if format == "auto":
    format = detect_rows_format(rows)
  train_on = check_train_on(format, train_on)
  examples, skipped = convert_rows(
      rows, lambda data: to_example(data, tokenizer, format=format, train_on=train_on,
                                    add_eos=add_eos), on_bad_row)
  return Tokenized(examples, skipped, format)


def convert_rows(rows: Iterable[Row], convert: Callable[[Mapping[str, Any]], Any],
                 on_bad_row: str) -> tuple[list[Any], dict[str, int]]:
  """Each row's data through `convert` (its result, a dataclass with a `where` field, gets the
  row's origin): a bad row's `DataError` is raised naming the row (`on_bad_row="error"`) or
  counted by reason (`"skip"`); a tokenizer's error is not the row's fault, so it is always
  raised, naming the row that needed it. Returns (items, {reason: skipped rows})."""
  if on_bad_row not in ("error", "skip"):
    raise ValueError(f"on_bad_row should be 'error' or 'skip', got {on_bad_row!r}.")
  items, skipped = [], collections.Counter()
  for row in rows:
    try:
      if isinstance(row.data, DataError):
        raise row.data
      items.append(dataclasses.replace(convert(row.data), where=row.where))
    except DataError as e:
      if on_bad_row == "error":
        raise e.at(row.where) from None
      skipped[e.reason] += 1
    except TokenizerError as e:  # not the row's fault: never skipped, but located
      raise located(e, row.where) from None
  return items, dict(skipped)


def located(error: TokenizerError, where: str) -> TokenizerError:
  """`error` with "<where>: " in front (the row that needed what the tokenizer lacks)."""
  message = str(error)
  return TokenizerError(f"{where}: {message[:1].lower()}{message[1:]}")
