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


class TokenizerError(ValueError):
  """A tokenizer or tokenizer file that cannot be used; the message names the file (and key) or
  the model folder, and what to do."""


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
    """Reads the config files of `folder` (each is optional).

    Raises:
      TokenizerError: a file is not UTF-8, not valid JSON or not a JSON object, or one of the
        keys read has the wrong type (the message names the file and the key).
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path)
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
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping):
      raise _key_error(config_path, "added_tokens_decoder",
                       f"should be an object of id -> token, got {type(decoder).__name__}")
    for index, spec in decoder.items():
      added[_token_id(config_path, f"added_tokens_decoder[{index!r}]", index)] = _added_token(
          spec, config_path, f"added_tokens_decoder[{index!r}]")
    special_strings = set(named.values()) | set(extra)
    added_path = folder / "added_tokens.json"
    for content, index in _read_json(added_path).items():
      index = _token_id(added_path, repr(content), index)
      added.setdefault(index, AddedToken(content, special=content in special_strings))
    generation_path = folder / "generation_config.json"
    generation = _read_json(generation_path).get("eos_token_id")
    if isinstance(generation, int):
      generation = [generation]
    if generation is not None and not (isinstance(generation, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in generation)):
      raise _key_error(generation_path, "eos_token_id",
                       f"should be a token id or a list of ids, got {generation!r}")
    return cls(
        named_tokens=named, extra_special_tokens=tuple(extra), added_tokens=added,
        add_bos_token=_optional_bool(config.get("add_bos_token")),
        add_eos_token=_optional_bool(config.get("add_eos_token")),
        legacy=_optional_bool(config.get("legacy")),
        chat_templates=_read_chat_templates(folder, config.get("chat_template")),
        generation_eos_ids=tuple(generation or ()))


def _key_error(path: Path, key: str, problem: str) -> TokenizerError:
  return TokenizerError(f"{path}: {key} {problem}; fix it, or take the file from the original "
                        "model")


def _read_text(path: Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise TokenizerError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                         "the file must be UTF-8: convert it or download it again") from None


def _read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path} is not valid JSON: {e}; fix it or download it again") from None
  if not isinstance(data, dict):
    raise TokenizerError(f"{path} must hold a JSON object, got a {_json_type(data)}; fix it or "
                         "download it again")
  return data


def _json_type(value: Any) -> str:
  """The JSON name of a parsed value's type ("list", "string", "number", ...)."""
  if isinstance(value, bool):
    return "boolean"
  names = {list: "list", str: "string", int: "number", float: "number", dict: "object"}
  return "null" if value is None else names.get(type(value), type(value).__name__)


def _token_id(path: Path, key: str, value: Any) -> int:
  """`value` as a token id (an int, or a string of one, as JSON object keys are)."""
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  if isinstance(value, str) and value.isdigit():
    return int(value)
  raise _key_error(path, key, f"should have a token id (an integer >= 0), got {value!r}")


def _token_content(value: Any) -> str | None:
  """A token given as a string or as an AddedToken dict -> its string (else None)."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _added_token(spec: Any, path: Path, key: str) -> AddedToken:
  if isinstance(spec, str):
    return AddedToken(spec)
  if not isinstance(spec, Mapping) or not isinstance(spec.get("content"), str):
    raise _key_error(path, key, f"should be a token, {{\"content\": \"...\", ...}}, got {spec!r}")
  return AddedToken(spec["content"], special=bool(spec.get("special", False)),
                    lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)))


def _optional_bool(value: Any) -> bool | None:
  return value if isinstance(value, bool) else None


def _read_chat_templates(folder: Path, from_config: Any) -> dict[str, str]:
  """Template files (transformers 5) take precedence over the config's `chat_template`."""
  templates: dict[str, str] = {}
  if (folder / "chat_template.jinja").is_file():
    templates["default"] = _read_text(folder / "chat_template.jinja")
  extra_dir = folder / "additional_chat_templates"
  if extra_dir.is_dir():
    for path in sorted(extra_dir.glob("*.jinja")):
      templates[path.stem] = _read_text(path)
  if templates or from_config is None:
    return templates
  if isinstance(from_config, str):
    return {"default": from_config}
  config_path = folder / "tokenizer_config.json"
  if not isinstance(from_config, list):
    raise _key_error(config_path, "chat_template", "should be a template string or a list of "
                     f"{{\"name\", \"template\"}}, got a {_json_type(from_config)}")
  for i, entry in enumerate(from_config):
    if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)):
      raise _key_error(config_path, f"chat_template[{i}]", "should be "
                       f"{{\"name\": \"...\", \"template\": \"...\"}}, got {entry!r}")
  return {t["name"]: t["template"] for t in from_config}
