"""Tokenizers: one interface over sentencepiece `.model` files and HF `tokenizer.json` files.

`load_tokenizer(path)` reads a model folder (or a tokenizer file directly) the way transformers
reads it, without importing transformers and without running any code from the folder:

* the tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) if present, else `tokenizer.model`
  (sentencepiece). Pickled tokenizers (`*.bin`, `*.pkl`) are never loaded.
* `tokenizer_config.json`: the named special tokens (`bos_token`, `eos_token`, `pad_token`,
  `unk_token`, ... as strings or `{"content": ...}` dicts), `added_tokens_decoder`,
  `add_bos_token` / `add_eos_token` (sentencepiece only: with a tokenizer.json, its
  post-processor decides, as in transformers 5), `legacy`, `chat_template` (a string, or a list of
  `{name, template}` of which "default" is used unless another is asked for);
  `special_tokens_map.json` fills in named tokens the config lacks; `added_tokens.json` is read
  for old sentencepiece folders.
* `chat_template.jinja` (what transformers 5 writes) and `additional_chat_templates/*.jinja`
  take precedence over the config's `chat_template`.
* `generation_config.json`: its `eos_token_id` (an int or a list) gives every stop id.

Encoding follows transformers' ids (tests compare them), with one deliberate difference: BOS is
never doubled. `encode(text)` with a text that already starts with the BOS token (a rendered chat
template, say) does not add a second one, where transformers would.

Sentencepiece models: added tokens (from `added_tokens_decoder`, beyond or inside the sp
vocabulary) and the named special tokens are split out of the text before sentencepiece sees it.
If the model adds a dummy prefix ("▁" before the text, as Llama 2 does), it is added only at the
very start of the text, as transformers 5's `LlamaTokenizer` does; `"legacy": true` in the config
adds it before every piece between added tokens instead (transformers' legacy behaviour, and
Meta's original encoding of each piece separately). Models without a dummy prefix (Gemma) give
the same ids either way.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers

from jaxpost.chat_template import Message, render_chat_template, select_chat_template

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json", "added_tokens.json")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth")


@dataclasses.dataclass(frozen=True)
class AddedToken:
  """A token matched in the text before the tokenizer model runs (as in `tokenizers`)."""

  content: str
  special: bool = False
  lstrip: bool = False  # eat whitespace on its left
  rstrip: bool = False  # eat whitespace on its right
  normalized: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """What a model folder says about its tokenizer, beyond the tokenizer file itself.

  Attributes:
    named_tokens: named special tokens as strings, e.g. {"bos_token": "<s>", ...}; also any
      other `*_token` entry (e.g. "image_token") and named `extra_special_tokens`. These are
      the special-token variables chat templates see.
    extra_special_tokens: further special tokens (`additional_special_tokens`).
    added_tokens: id -> added token, from `added_tokens_decoder` / `added_tokens.json`.
    add_bos_token, add_eos_token: explicit defaults for adding BOS / EOS (None: not given).
    legacy: sentencepiece dummy-prefix behaviour (see the module docstring; None: not given).
    chat_templates: name -> Jinja source ("default" is the model's main template).
    generation_eos_ids: `eos_token_id` of `generation_config.json`, as a tuple.
  """

  named_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  extra_special_tokens: tuple[str, ...] = ()
  added_tokens: Mapping[int, AddedToken] = dataclasses.field(default_factory=dict)
  add_bos_token: bool | None = None
  add_eos_token: bool | None = None
  legacy: bool | None = None
  chat_templates: Mapping[str, str] = dataclasses.field(default_factory=dict)
  generation_eos_ids: tuple[int, ...] = ()

  @classmethod
  def read(cls, folder: str | Path) -> TokenizerConfig:
    """Reads the config files of `folder` (each is optional)."""
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    named: dict[str, str] = {}
    for key, value in config.items():
      if key.endswith("_token") and _token_content(value) is not None:
        named[key] = _token_content(value)
    for key, value in special_map.items():  # fills in what the config does not mention
      if key.endswith("_token") and key not in config and _token_content(value) is not None:
        named[key] = _token_content(value)
    extra: list[str] = []
    for source in (config, special_map):
      tokens = source.get("extra_special_tokens") or source.get("additional_special_tokens")
      if isinstance(tokens, Mapping):  # transformers 5: named model-specific tokens
        for key, value in tokens.items():
          if _token_content(value) is not None:
            named.setdefault(key, _token_content(value))
      elif isinstance(tokens, list):
        extra += [t for t in map(_token_content, tokens) if t is not None and t not in extra]
    added: dict[int, AddedToken] = {}
    for index, spec in (config.get("added_tokens_decoder") or {}).items():
      added[int(index)] = _added_token(spec)
    special_strings = set(named.values()) | set(extra)
    for content, index in _read_json(folder / "added_tokens.json").items():
      added.setdefault(int(index), AddedToken(content, special=content in special_strings))
    generation = _read_json(folder / "generation_config.json").get("eos_token_id")
    if isinstance(generation, int):
      generation = [generation]
    return cls(
        named_tokens=named, extra_special_tokens=tuple(extra), added_tokens=added,
        add_bos_token=_optional_bool(config.get("add_bos_token")),
        add_eos_token=_optional_bool(config.get("add_eos_token")),
        legacy=_optional_bool(config.get("legacy")),
        chat_templates=_read_chat_templates(folder, config.get("chat_template")),
        generation_eos_ids=tuple(int(i) for i in generation or ()))


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}.")
  return data


def _token_content(value: Any) -> str | None:
  """A token given as a string or as an AddedToken dict -> its string (else None)."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _added_token(spec: Any) -> AddedToken:
  if isinstance(spec, str):
    return AddedToken(spec)
  return AddedToken(spec["content"], special=bool(spec.get("special", False)),
                    lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)))


def _optional_bool(value: Any) -> bool | None:
  return value if isinstance(value, bool) else None


def _read_chat_templates(folder: Path, from_config: Any) -> dict[str, str]:
  """Template files (transformers 5) take precedence over the config's `chat_template`."""
  templates: dict[str, str] = {}
  if (folder / "chat_template.jinja").is_file():
    templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
  extra_dir = folder / "additional_chat_templates"
  if extra_dir.is_dir():
    for path in sorted(extra_dir.glob("*.jinja")):
      templates[path.stem] = path.read_text(encoding="utf-8")
  if templates:
    return templates
  if isinstance(from_config, str):
    return {"default": from_config}
  if isinstance(from_config, list):
    return {t["name"]: t["template"] for t in from_config}
  return {}


class Tokenizer(abc.ABC):
  """Text <-> token ids, special tokens and chat templates of one model.

  Subclasses provide the tokenizer model (`_encode_text`, `_decode_ids`, the vocabulary); this
  class adds BOS/EOS handling, the special-token views and chat templates. Use
  `load_tokenizer` to make one from a model folder.
  """

  def __init__(self, config: TokenizerConfig, *, inferred: Mapping[str, int | None] | None = None,
               adds_bos: bool = False, adds_eos: bool = False) -> None:
    """Resolves the named special tokens of `config` against the vocabulary.

    Subclasses call this last, once their vocabulary is ready. `inferred` gives ids for named
    tokens the config does not name (e.g. {"bos_token": 1} from the tokenizer file); `adds_bos`
    / `adds_eos` are the tokenizer file's own defaults, overridden by `add_bos_token` /
    `add_eos_token` in the config.
    """
    self._config = config
    named = dict(config.named_tokens)
    for key, index in (inferred or {}).items():
      if key not in named and index is not None:
        named[key] = self.id_to_token(index)
    self._named_tokens = {key: value for key, value in named.items() if value is not None}
    self._named_ids = {key: self.token_to_id(value) for key, value in self._named_tokens.items()}
    special = {content: self.token_to_id(content)
               for content in (*self._named_tokens.values(), *config.extra_special_tokens)}
    special.update({token.content: index for index, token in self._added_tokens().items()
                    if token.special})
    self._special = {content: index for content, index in special.items() if index is not None}
    bos_default = config.add_bos_token if config.add_bos_token is not None else adds_bos
    eos_default = config.add_eos_token if config.add_eos_token is not None else adds_eos
    self._add_bos_default = bool(bos_default) and self.bos_id is not None
    self._add_eos_default = bool(eos_default) and self.eos_id is not None
    stops = ([self.eos_id] if self.eos_id is not None else []) + list(config.generation_eos_ids)
    self._eos_ids = tuple(dict.fromkeys(stops))

  # -- the tokenizer model (subclasses) ---------------------------------------------------------

  @abc.abstractmethod
  def _encode_text(self, text: str) -> list[int]:
    """Ids of `text`, added tokens matched, no BOS/EOS added."""

  @abc.abstractmethod
  def _decode_ids(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    """Text of `ids`."""

  @abc.abstractmethod
  def _added_tokens(self) -> dict[int, AddedToken]:
    """Every added token by id."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """The id of a token (a vocabulary piece or added token), or None if there is none."""

  @abc.abstractmethod
  def id_to_token(self, index: int) -> str | None:
    """The token (vocabulary piece or added token) of an id, or None if out of range."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the largest id + 1)."""

  # -- encoding ------------------------------------------------------------------------------------

  def encode(self, text: str, *, add_bos: bool | None = None,
             add_eos: bool | None = False) -> list[int]:
    """Token ids of `text`.

    Args:
      text: the text; added and special tokens written in it (e.g. "<|im_start|>") become
        their ids.
      add_bos: prepend BOS. None: the tokenizer's default (what the post-processor of
        tokenizer.json does; for sentencepiece, `add_bos_token` in tokenizer_config.json, else
        False as in transformers 5). BOS is never added twice: not if the text already starts
        with it.
      add_eos: append EOS (None: the tokenizer's default). Not added if already last.

    Raises:
      ValueError: `add_bos`/`add_eos` is True and the tokenizer has no such token.
    """
    ids = self._encode_text(text)
    add_bos = self._add_bos_default if add_bos is None else add_bos
    add_eos = self._add_eos_default if add_eos is None else add_eos
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no BOS token.")
      if ids[:1] != [self.bos_id]:
        ids = [self.bos_id, *ids]
    if add_eos:
      if self.eos_id is None:
        raise ValueError("add_eos=True but this tokenizer has no EOS token.")
      if ids[-1:] != [self.eos_id]:
        ids = [*ids, self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are written out unless `skip_special_tokens`."""
    return self._decode_ids([int(i) for i in ids], skip_special_tokens)

  # -- special tokens ------------------------------------------------------------------------------

  @property
  def bos_id(self) -> int | None:
    """Id of the beginning-of-sequence token, or None."""
    return self._named_ids.get("bos_token")

  @property
  def eos_id(self) -> int | None:
    """Id of the end-of-sequence token (`eos_token`), or None."""
    return self._named_ids.get("eos_token")

  @property
  def pad_id(self) -> int | None:
    """Id of the padding token, or None (many models have none: pad with `eos_id`)."""
    return self._named_ids.get("pad_token")

  @property
  def unk_id(self) -> int | None:
    """Id of the unknown token, or None."""
    return self._named_ids.get("unk_token")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends generation: `eos_id` first, then generation_config's `eos_token_id`."""
    return self._eos_ids

  @property
  def special_tokens(self) -> dict[str, int]:
    """Every special token, as token string -> id: the named ones (bos/eos/pad/unk, ...) and
    the added tokens marked special. Use `named_special_tokens` for which is which."""
    return dict(self._special)

  @property
  def named_special_tokens(self) -> dict[str, str]:
    """Named special tokens as strings, e.g. {"bos_token": "<s>", "eos_token": "</s>"}: the
    special-token variables chat templates see."""
    return dict(self._named_tokens)

  @property
  def added_tokens(self) -> dict[str, int]:
    """Every added token (special or not), as token string -> id."""
    return {token.content: index for index, token in self._added_tokens().items()}

  @property
  def add_bos_default(self) -> bool:
    """Whether `encode(text)` prepends BOS by default."""
    return self._add_bos_default

  # -- chat templates ------------------------------------------------------------------------------

  @property
  def chat_template(self) -> str | None:
    """The default chat template (Jinja source), or None."""
    templates = self._config.chat_templates
    return templates.get("default") if templates else None

  @property
  def chat_templates(self) -> dict[str, str]:
    """Every chat template by name ("default", "tool_use", ...)."""
    return dict(self._config.chat_templates)

  def apply_chat_template(
      self,
      messages: Sequence[Message],
      *,
      add_generation_prompt: bool = False,
      tokenize: bool = False,
      chat_template: str | None = None,
      tools: Sequence[Mapping[str, Any]] | None = None,
      documents: Sequence[Mapping[str, Any]] | None = None,
      continue_final_message: bool | str = False,
      **extra: Any,
  ) -> str | list[int]:
    """Renders `messages` with the model's chat template (see `jaxpost.chat_template`).

    Args:
      messages: the conversation, dicts with "role" and "content".
      add_generation_prompt: end with the header of a new assistant turn.
      tokenize: return token ids instead of the string. The template writes the BOS token
        itself where the model wants one, so none is added (transformers does the same).
      chat_template: a template's name (in `chat_templates`) or its Jinja source; default: the
        model's "default" template ("tool_use" when `tools` are given and it exists).
      tools, documents, continue_final_message, **extra: passed to the template, see
        `jaxpost.chat_template.render_chat_template`.

    Raises:
      ChatTemplateError: (a ValueError) the template rejected the conversation.
    """
    template = select_chat_template(self._config.chat_templates, chat_template,
                                    has_tools=tools is not None)
    text = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tools=tools, documents=documents,
        special_tokens=self._named_tokens, **extra)
    if not tokenize:
      return text
    return self.encode(text, add_bos=False, add_eos=False)


# -------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# -------------------------------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, run by the `tokenizers` library."""

  def __init__(self, tokenizer_file: str | Path, config: TokenizerConfig | None = None) -> None:
    """Loads `tokenizer_file`; `config` holds what tokenizer_config.json & co. say."""
    config = config or TokenizerConfig()
    try:
      self._tk = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise ValueError(f"Cannot read the Hugging Face tokenizer file {tokenizer_file}: {e}") from e
    self._tk.no_truncation()
    self._tk.no_padding()
    # Tokens the config adds (as transformers does): its added tokens, then the special tokens
    # that the tokenizer file does not have as added tokens.
    present = {token.content for token in self._tk.get_added_tokens_decoder().values()}
    for _, token in sorted(config.added_tokens.items()):
      if token.content not in present:
        add = self._tk.add_special_tokens if token.special else self._tk.add_tokens
        add([_to_hf(token)])
        present.add(token.content)
    for content in (*config.named_tokens.values(), *config.extra_special_tokens):
      if content not in present:
        self._tk.add_special_tokens([tokenizers.AddedToken(content, special=True,
                                                           normalized=False)])
        present.add(content)
    # The file's post-processor says whether BOS/EOS are added; like transformers 5, the config's
    # add_bos_token / add_eos_token are ignored when there is a tokenizer.json.
    config = dataclasses.replace(config, add_bos_token=None, add_eos_token=None)
    prefix, suffix = self._post_processor_additions()
    # Without a named BOS/EOS in the config, a single token the post-processor adds is one.
    bos, eos = config.named_tokens.get("bos_token"), config.named_tokens.get("eos_token")
    bos_id = self._tk.token_to_id(bos) if bos else (prefix[0] if len(prefix) == 1 else None)
    eos_id = self._tk.token_to_id(eos) if eos else (suffix[0] if len(suffix) == 1 else None)
    super().__init__(config, inferred={"bos_token": bos_id, "eos_token": eos_id},
                     adds_bos=bos_id is not None and prefix == [bos_id],
                     adds_eos=eos_id is not None and suffix == [eos_id])

  def _post_processor_additions(self) -> tuple[list[int], list[int]]:
    """The ids the tokenizer file's post-processor puts before and after a text."""
    plain = self._tk.encode("a", add_special_tokens=False).ids
    full = self._tk.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start:start + len(plain)] == plain:
        return full[:start], full[start + len(plain):]
    return [], []

  def _encode_text(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def _decode_ids(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def _added_tokens(self) -> dict[int, AddedToken]:
    return {index: AddedToken(t.content, special=t.special, lstrip=t.lstrip, rstrip=t.rstrip,
                              normalized=t.normalized)
            for index, t in self._tk.get_added_tokens_decoder().items()}

  def token_to_id(self, token: str) -> int | None:
    return self._tk.token_to_id(token)

  def id_to_token(self, index: int) -> str | None:
    return self._tk.id_to_token(index)

  @property
  def vocab_size(self) -> int:
    return self._tk.get_vocab_size(with_added_tokens=True)


def _to_hf(token: AddedToken) -> tokenizers.AddedToken:
  return tokenizers.AddedToken(token.content, single_word=False, lstrip=token.lstrip,
                               rstrip=token.rstrip, normalized=token.normalized,
                               special=token.special)


# -------------------------------------------------------------------------------------------------
# sentencepiece
# -------------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `.model`, plus added tokens split out of the text around it."""

  def __init__(self, model_file: str | Path, config: TokenizerConfig | None = None) -> None:
    """Loads `model_file`; `config` holds what tokenizer_config.json & co. say."""
    config = config or TokenizerConfig()
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"Cannot read the sentencepiece model {model_file}: {e}") from e
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


# -------------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Tokenizer:
  """Loads the tokenizer of a model folder, or a `tokenizer.json` / `.model` file directly.

  In a folder, `tokenizer.json` is preferred to `tokenizer.model` (the other `*.model` file, if
  exactly one, also works). The config files described in the module docstring are read from the
  folder (the file's folder for a file path). No code from the folder is run.

  Raises:
    FileNotFoundError: `path` does not exist, or the folder holds no tokenizer file.
    ValueError: `path` is a file of a kind that cannot be loaded (e.g. pickled).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer at {path}: the path does not exist.")
  if path.is_dir():
    folder = path
    file = _find_tokenizer_file(folder)
  else:
    folder, file = path.parent, path
  config = TokenizerConfig.read(folder)
  if file.suffix == ".model":
    return SentencePieceTokenizer(file, config)
  if file.suffix == ".json" and file.name not in _CONFIG_FILES:
    return HFTokenizer(file, config)
  why = (" Pickled tokenizers are never loaded: unpickling can run arbitrary code."
         if file.suffix in _PICKLE_SUFFIXES else "")
  raise ValueError(f"Cannot load {file} as a tokenizer: expected a Hugging Face tokenizer.json "
                   f"or a sentencepiece .model file.{why}")


def _find_tokenizer_file(folder: Path) -> Path:
  for name in ("tokenizer.json", "tokenizer.model"):
    if (folder / name).is_file():
      return folder / name
  models = sorted(folder.glob("*.model"))
  if len(models) == 1:
    return models[0]
  found = sorted(p.name for p in folder.iterdir())
  message = (f"No tokenizer found in {folder}: expected tokenizer.json (Hugging Face "
             f"tokenizers) or tokenizer.model (sentencepiece). Found: "
             f"{', '.join(found) if found else 'nothing'}.")
  if any(Path(name).suffix in _PICKLE_SUFFIXES for name in found):
    message += " Pickled files (*.bin, *.pkl) are never loaded: unpickling can run arbitrary code."
  if len(models) > 1:
    message += " Several *.model files: pass the one to use."
  if (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
    message += (" vocab.json/merges.txt without tokenizer.json is not supported: convert it with "
                "transformers once (AutoTokenizer.from_pretrained(...).save_pretrained(...)).")
  raise FileNotFoundError(message)
