"""What a model folder says about its tokenizer, beyond the tokenizer file itself.

Reads `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`,
`generation_config.json` and the chat-template files (`chat_template.jinja`,
`additional_chat_templates/*.jinja`) into a `TokenizerConfig`; see the `jaxpost.tokenizer`
package docstring for what is taken from each.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    legacy: sentencepiece dummy-prefix behaviour (see `jaxpost.tokenizer`; None: not given).
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
