"""The tokenizer interface: BOS/EOS handling, special tokens and chat templates.

`Tokenizer` is the abstract base of the backends (`jaxpost.tokenizer.hf`,
`jaxpost.tokenizer.spm`); they provide the tokenizer model, it provides everything built on it.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxpost.chat_template import Message, render_chat_template, select_chat_template
from jaxpost.tokenizer.config import AddedToken, TokenizerConfig, TokenizerError


class Tokenizer(abc.ABC):
  """Text <-> token ids, special tokens and chat templates of one model.

  Subclasses provide the tokenizer model (`_encode_text`, `_decode_ids`, the vocabulary); this
  class adds BOS/EOS handling, the special-token views and chat templates. Use
  `load_tokenizer` to make one from a model folder.

  Attributes:
    path: the tokenizer file it was loaded from (`tokenizer.json`, `tokenizer.model`), or None;
      its folder is named in errors ("the tokenizer in models/x has no chat template ...").
  """

  path: Path | None = None

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

  def describe(self) -> str:
    """"the tokenizer in <folder>" (or "this tokenizer" when not loaded from a file)."""
    return "this tokenizer" if self.path is None else f"the tokenizer in {self.path.parent}"

  def require_chat_template(self, needed_for: str = "rendering a conversation", *,
                            alternative: str | None = None) -> str:
    """The default chat template.

    Raises:
      TokenizerError: there is none; the message names the folder, `needed_for`, how to add
        one and `alternative` (another way to go, e.g. another data format).
    """
    template = self.chat_template
    if template is not None:
      return template
    folder = "the model folder" if self.path is None else str(self.path.parent)
    named = sorted(self._config.chat_templates)
    what = (f"has chat templates {named} but no 'default' one" if named
            else "has no chat template")
    fix = (f"add chat_template.jinja to {folder} or a \"chat_template\" to its "
           "tokenizer_config.json (e.g. the instruct model's)")
    who = self.describe()
    raise TokenizerError(f"{who[:1].upper()}{who[1:]} {what}, needed for {needed_for}: {fix}"
                         + (f", {alternative}" if alternative else "") + ".")

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
      TokenizerError: (a ValueError) no `chat_template` is given and the tokenizer has none.
    """
    if chat_template is None and not self._config.chat_templates:
      self.require_chat_template(alternative="or pass one as `chat_template=`")
    template = select_chat_template(self._config.chat_templates, chat_template,
                                    has_tools=tools is not None)
    text = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tools=tools, documents=documents,
        special_tokens=self._named_tokens, **extra)
    if not tokenize:
      return text
    return self.encode(text, add_bos=False, add_eos=False)
