"""The sentencepiece `.model` backend.

Added tokens (from `added_tokens_decoder`, beyond or inside the sp vocabulary) and the named
special tokens are split out of the text before sentencepiece sees it. If the model adds a dummy
prefix ("▁" before the text, as Llama 2 does), it is added only at the very start of the text, as
transformers 5's `LlamaTokenizer` does; `"legacy": true` in the config adds it before every piece
between added tokens instead. The model without its dummy prefix is made by editing the
serialized model proto directly (`_without_dummy_prefix`), so that protobuf is not needed.

This module is named `spm`, not `sentencepiece`, so that `import sentencepiece` is never
mistaken for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from jaxpost.tokenizer.base import Tokenizer
from jaxpost.tokenizer.config import AddedToken, TokenizerConfig, TokenizerError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model`, plus added tokens split out of the text around it."""

  def __init__(self, model_file: str | Path, config: TokenizerConfig | None = None) -> None:
    """Loads `model_file`; `config` holds what tokenizer_config.json & co. say."""
    config = config or TokenizerConfig()
    self.path = Path(model_file)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"Cannot read the sentencepiece model {model_file}: {e}") from e
    # Without the dummy prefix, for text that does not start the input (see module docstring).
    proto = _without_dummy_prefix(self._sp.serialized_model_proto())
    self._sp_inner = self._sp if proto is None else spm.SentencePieceProcessor(model_proto=proto)
    self._legacy = bool(config.legacy)
    self._added = dict(config.added_tokens)
    contents = {token.content for token in self._added.values()}
    next_id = max([self._sp.get_piece_size() - 1, *self._added]) + 1
    # The model's own control pieces stand in for named tokens the config does not name.
    own = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(),
           "unk_token": self._sp.unk_id(), "pad_token": self._sp.pad_id()}
    own = {key: index for key, index in own.items()
           if index >= 0 and key not in config.named_tokens}
    for content in (*config.named_tokens.values(), *config.extra_special_tokens,
                    *map(self._sp.id_to_piece, own.values())):
      if content in contents:
        continue
      index = self._piece_id(content)
      if index is None:  # a special token the model lacks: appended, as transformers does
        index, next_id = next_id, next_id + 1
      self._added[index] = AddedToken(content, special=True)
      contents.add(content)
    self._by_content = {token.content: index for index, token in self._added.items()}
    pattern = "|".join(map(re.escape, sorted(self._by_content, key=len, reverse=True)))
    self._pattern = re.compile(pattern) if pattern else None
    super().__init__(config, inferred=own)

  def _piece_id(self, piece: str) -> int | None:
    index = self._sp.piece_to_id(piece)
    return index if self._sp.id_to_piece(index) == piece else None

  def _split(self, text: str) -> list[tuple[str, int | None]]:
    """`text` -> [(piece, id of the added token or None for plain text)], strips applied."""
    if self._pattern is None:
      return [(text, None)]
    pieces: list[list[Any]] = []
    position = 0
    for match in self._pattern.finditer(text):
      if match.start() > position:
        pieces.append([text[position:match.start()], None])
      pieces.append([match.group(), self._by_content[match.group()]])
      position = match.end()
    if position < len(text):
      pieces.append([text[position:], None])
    for i, (_, index) in enumerate(pieces):
      if index is None:
        continue
      token = self._added[index]
      if token.lstrip and i > 0 and pieces[i - 1][1] is None:
        pieces[i - 1][0] = pieces[i - 1][0].rstrip()
      if token.rstrip and i + 1 < len(pieces) and pieces[i + 1][1] is None:
        pieces[i + 1][0] = pieces[i + 1][0].lstrip()
    return [(piece, index) for piece, index in pieces if piece or index is not None]

  def _encode_text(self, text: str) -> list[int]:
    ids: list[int] = []
    for i, (piece, index) in enumerate(self._split(text)):
      if index is not None:
        ids.append(index)
      else:
        sp = self._sp if (i == 0 or self._legacy) else self._sp_inner
        ids += sp.encode(piece)
    return ids

  def _is_special_id(self, index: int) -> bool:
    if index in self._added:
      return self._added[index].special
    return 0 <= index < self._sp.get_piece_size() and (
        self._sp.is_control(index) or self._sp.is_unknown(index))

  def _decode_ids(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    out: list[str] = []
    run: list[int] = []
    leading = True  # only BOS so far: the next text run was encoded at the input's start

    def flush() -> None:
      nonlocal leading
      if run:
        sp = self._sp if (leading or self._legacy) else self._sp_inner
        out.append(sp.decode(run))
        run.clear()
        leading = False

    for index in ids:
      if index in self._added or self._is_special_id(index):
        flush()
        if not (skip_special_tokens and self._is_special_id(index)):
          out.append(self.id_to_token(index) or "")
        leading = leading and index == self.bos_id
      elif 0 <= index < self._sp.get_piece_size():
        run.append(index)
    flush()
    return "".join(out)

  def _added_tokens(self) -> dict[int, AddedToken]:
    return dict(self._added)

  def token_to_id(self, token: str) -> int | None:
    if token in self._by_content:
      return self._by_content[token]
    return self._piece_id(token)

  def id_to_token(self, index: int) -> str | None:
    if index in self._added:
      return self._added[index].content
    if 0 <= index < self._sp.get_piece_size():
      return self._sp.id_to_piece(index)
    return None

  @property
  def vocab_size(self) -> int:
    return max([self._sp.get_piece_size() - 1, *self._added]) + 1


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7


def _encode_varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _proto_fields(buf: bytes) -> list[tuple[int, int, Any, bytes]]:
  """Protocol-buffer wire format -> [(field number, wire type, value, raw bytes)]."""
  fields = []
  pos = 0
  while pos < len(buf):
    start = pos
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      length, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise ValueError(f"Unsupported protobuf wire type {wire} in a sentencepiece model.")
    fields.append((number, wire, value, buf[start:pos]))
  return fields


def _without_dummy_prefix(model: bytes) -> bytes | None:
  """The sentencepiece model with `normalizer_spec.add_dummy_prefix` off; None if already off.

  Edits the serialized ModelProto directly (field 3 `normalizer_spec`, its field 3
  `add_dummy_prefix`, default true), so that protobuf is not needed.
  """
  out = bytearray()
  for number, wire, value, raw in _proto_fields(model):
    if number == 3 and wire == 2:
      spec = _proto_fields(value)
      flags = [v for n, w, v, _ in spec if n == 3 and w == 0]
      if flags and flags[-1] == 0:
        return None
      body = b"".join(r for n, _, _, r in spec if n != 3) + b"\x18\x00"
      out += b"\x1a" + _encode_varint(len(body)) + body
    else:
      out += raw
  return bytes(out)
