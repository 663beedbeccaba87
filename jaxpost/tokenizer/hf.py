"""The Hugging Face `tokenizer.json` backend, run by the `tokenizers` library."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from jaxpost.tokenizer.base import Tokenizer
from jaxpost.tokenizer.config import AddedToken, TokenizerConfig, TokenizerError


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, run by the `tokenizers` library."""

  def __init__(self, tokenizer_file: str | Path, config: TokenizerConfig | None = None) -> None:
    """Loads `tokenizer_file`; `config` holds what tokenizer_config.json & co. say."""
    config = config or TokenizerConfig()
    self.path = Path(tokenizer_file)
    try:
      self._tk = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
      raise TokenizerError(f"Cannot read the Hugging Face tokenizer file {tokenizer_file}: {e}"
                           ) from e
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
