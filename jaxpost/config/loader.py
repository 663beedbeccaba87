"""YAML recipe + `key.path=value` overrides -> a validated `RunConfig`, and back to YAML.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "optim.lr=3e-4"])
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")   # loads back to an equal config

The tree is walked generically: each dataclass's fields and type hints say which keys exist
and what they hold, so nothing here names a section. Every problem is one `ConfigError` with a
one-line message naming the dotted key and where it came from (the file or the override):
unknown keys (with the nearest valid key), missing required keys, wrong types, values outside
a `Literal`'s choices, then the sections' own `validate` checks.

YAML is read with PyYAML's safe loader plus two fixes: floats in exponent form without a dot
(`3e-4`, a string under YAML 1.1) are floats, and a key repeated in one mapping is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from jaxpost.config.sections import ConfigError, RunConfig


class _Loader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
  """Safe YAML with YAML 1.2 floats (`1e-3`) and duplicate keys refused."""

  def construct_mapping(self, node, deep=False):
    if isinstance(node, yaml.MappingNode):
      seen = set()
      for key_node, _ in node.value:
        key = self.construct_object(key_node, deep=True)
        if key != "<<" and isinstance(key, typing.Hashable):
          if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
          seen.add(key)
    return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_error(err: yaml.YAMLError, where: str) -> ConfigError:
  mark = getattr(err, "problem_mark", None)
  problem = getattr(err, "problem", None) or str(err).splitlines()[0]
  at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
  return ConfigError(f"invalid YAML in {where}{at}: {problem}")


# -- overrides ------------------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_value(text: str, *, collections: bool = False) -> Any:
  """A YAML scalar (`100`, `3e-4`, `true`, `null`, `'quoted'`); anything that does not parse
  as a scalar (`[a].jsonl`) stays the literal string, unless `collections` allows YAML lists
  and mappings (`[0, 0.5, 1]`)."""
  try:
    value = yaml.load(text, Loader=_Loader)  # nosec: _Loader is a SafeLoader
  except yaml.YAMLError:
    return text
  return text if isinstance(value, (dict, list)) and not collections else value


def read_yaml(path: str | os.PathLike) -> dict:
  """The mapping in the YAML file at `path` ({} for an empty file), read with the safe loader
  (YAML 1.2 floats, duplicate keys refused).

  Raises `ConfigError` naming the file: missing, unreadable, invalid YAML, not a mapping.
  """
  where = str(path)
  try:
    text = Path(path).read_text(encoding="utf-8")
  except FileNotFoundError:
    raise ConfigError(f"config file not found: {where}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f"cannot read config file {where}: {e}") from None
  try:
    raw = yaml.load(text, Loader=_Loader)  # nosec: _Loader is a SafeLoader
  except yaml.YAMLError as e:
    raise _yaml_error(e, where) from None
  raw = {} if raw is None else raw
  if not isinstance(raw, dict):
    raise ConfigError(f"{where} must hold a mapping of sections, got {_shown(raw)}")
  return raw


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict[str, str]:
  """Sets each `key.path=value` in `raw` (in place, creating sections as needed).

  Returns {dotted key: "override 'key.path=value'"} for error messages.
  """
  sources = {}
  for text in overrides:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
      raise ConfigError(f"invalid override {text!r}: expected key.path=value, e.g. "
                        "train.steps=100")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
      child = node.get(part)
      if child is None:
        child = node[part] = {}
      elif not isinstance(child, dict):
        where = ".".join(parents[:i + 1])
        raise ConfigError(f"invalid override {text!r}: '{where}' is a value, not a section")
      node = child
    node[leaf] = parse_value(value)
    sources[key] = f"override {text!r}"
  return sources


# -- building the tree ----------------------------------------------------------------------


class NamedSections(dict):
  """A config mapping of named entries (e.g. `eval.suites`): a dict that hashes by value, so
  the config tree stays hashable."""

  def __hash__(self) -> int:  # type: ignore[override]
    return hash(tuple(sorted(self.items())))


def _is_dataclass_type(hint: Any) -> bool:
  return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_free_mapping(hint: Any) -> bool:
  """A free-form mapping type (e.g. a stage's overrides): a dict subclass whose `of(value)`
  freezes the YAML value; its keys are checked where it is used."""
  return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "of")


def _union_args(hint: Any) -> tuple[Any, ...] | None:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return typing.get_args(hint)
  return None


def _describe(hint: Any) -> str:
  """The expected type of a field, in words."""
  if (args := _union_args(hint)) is not None:
    return " or ".join("null" if a is type(None) else _describe(a) for a in args)
  if typing.get_origin(hint) is Literal:
    return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
  if _is_dataclass_type(hint):
    return "a mapping (section)"
  if typing.get_origin(hint) is tuple:
    return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
  if _is_free_mapping(hint):
    return "a mapping"
  if typing.get_origin(hint) is dict:
    return "a mapping of named sections"
  return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
      hint, getattr(hint, "__name__", str(hint)))


def _shown(value: Any) -> str:
  kind = {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)
  text = repr(value)
  text = text if len(text) <= 60 else text[:57] + "..."
  return f"{text} ({kind})"


class _Builder:
  """Builds a dataclass tree from nested dicts, naming each problem's key and origin.

  `source` names the file (or other origin) of the values, `sources` the overrides' keys, and
  `root` the tree whose keys are suggested for an unknown one.
  """

  def __init__(self, source: str, sources: dict[str, str], root: type = RunConfig):
    self.source = source
    self.sources = sources
    self.root = root

  def origin(self, key: str) -> str:
    """Where `key`'s value came from: the override that set it (or a section above or below
    it), else the file."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
      if (found := self.sources.get(".".join(parts[:n]))) is not None:
        return found
    below = [v for k, v in self.sources.items() if k.startswith(key + ".")]
    return below[-1] if below else self.source

  def build(self, cls: type, raw: Any, prefix: str, keys: list[str] | None = None) -> Any:
    """An instance of the dataclass `cls` from the mapping `raw` (keys under `prefix`);
    `keys` are the valid keys an unknown one is compared with (default: the root's)."""
    if raw is None:
      raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in raw:
      if name not in fields:
        key = f"{prefix}{name}"
        message = f"unknown key '{key}' in {self.origin(key)}"
        if (nearest := suggest_key(key, keys or valid_keys(self.root))) is not None:
          message += f"; did you mean '{nearest}'?"
        raise ConfigError(message)
    kwargs = {}
    for name, f in fields.items():
      key = f"{prefix}{name}"
      if name in raw:
        kwargs[name] = self.coerce(raw[name], hints[name], key)
      elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        if not _is_dataclass_type(hints[name]):
          raise ConfigError(f"missing required key '{key}' in {self.origin(key)}")
        kwargs[name] = self.build(hints[name], {}, f"{key}.")
    return cls(**kwargs)

  def coerce(self, value: Any, hint: Any, key: str, shown: Any = None) -> Any:
    """`value` checked against (and converted to) the type `hint` of `key`; `shown` is the
    type named in messages (the whole `X | None` while checking its `X`)."""
    shown = hint if shown is None else shown
    args = _union_args(hint)
    if args is not None:
      if value is None and type(None) in args:
        return None
      options = [a for a in args if a is not type(None)]
      if len(options) == 1:
        return self.coerce(value, options[0], key, shown)
      for option in options:
        try:
          return self.coerce(value, option, key)
        except ConfigError:
          pass
      raise self.type_error(key, shown, value)
    if typing.get_origin(hint) is Literal:
      choices = typing.get_args(hint)
      if any(value == c and type(value) is type(c) for c in choices):
        return value
      allowed = ", ".join(repr(c) for c in choices) + (" or null" if shown is not hint else "")
      raise ConfigError(f"invalid value {value!r} for '{key}' in {self.origin(key)}; "
                        f"choose one of {allowed}")
    if _is_dataclass_type(hint):
      if value is not None and not isinstance(value, dict):
        raise self.type_error(key, shown, value)
      return self.build(hint, value, f"{key}.")
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list
      item = typing.get_args(hint)[0]
      if isinstance(value, str) and item is str:  # an override: comma-separated
        value = [v.strip() for v in value.split(",") if v.strip()]
      elif isinstance(value, str):  # an override of numbers: "1,3" or "[1, 3]"
        value = [parse_value(v.strip()) for v in value.strip().strip("[]").split(",")
                 if v.strip()]
      if not isinstance(value, (list, tuple)):
        raise self.type_error(key, shown, value)
      return tuple(self.coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if _is_free_mapping(hint):
      if not isinstance(value, dict):
        raise self.type_error(key, shown, value)
      return hint.of(value)
    if typing.get_origin(hint) is dict:  # dict[str, Section]: named entries (eval suites)
      if value is None:
        return NamedSections()
      if not isinstance(value, dict):
        raise self.type_error(key, shown, value)
      item = typing.get_args(hint)[1]
      out = NamedSections()
      for name, entry in value.items():
        if not isinstance(name, str):
          raise ConfigError(f"'{key}' in {self.origin(key)}: entry names must be strings, "
                            f"got {name!r}")
        sub = f"{key}.{name}"
        if _is_dataclass_type(item):
          if entry is not None and not isinstance(entry, dict):
            raise self.type_error(sub, item, entry)
          out[name] = self.build(item, entry, f"{sub}.", valid_keys(item, f"{sub}."))
        else:
          out[name] = self.coerce(entry, item, sub)
      return out
    if hint is bool and isinstance(value, bool):
      return value
    if hint is int and not isinstance(value, bool):
      if isinstance(value, int):
        return value
      if isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      if not math.isfinite(value):
        raise ConfigError(f"invalid value {value!r} for '{key}' in {self.origin(key)}: it must "
                          "be a finite number")
      return float(value)
    if hint is str and isinstance(value, str):
      return value
    raise self.type_error(key, shown, value)

  def type_error(self, key: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(f"wrong type for '{key}' in {self.origin(key)}: expected "
                       f"{_describe(hint)}, got {_shown(value)}")


# -- suggestions ----------------------------------------------------------------------------


def valid_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
  """Every dotted key of the config tree, sections included (`optim`, `optim.lr`, ...)."""
  keys = []
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  for name, hint in typing.get_type_hints(cls).items():
    if name not in names:
      continue
    keys.append(prefix + name)
    for option in (_union_args(hint) or (hint,)):
      if _is_dataclass_type(option):
        keys.extend(valid_keys(option, f"{prefix}{name}."))
  return keys


def _acronym(name: str) -> str:
  return "".join(word[0] for word in name.split("_") if word)


def suggest_key(key: str, keys: Sequence[str] | None = None) -> str | None:
  """The valid key nearest to an unknown dotted `key`, or None.

  In order: a sibling whose name is the key's acronym or vice versa (`learning_rate` ->
  `lr`); a sibling close by `difflib`; the same name in another section (`train.lr` ->
  `optim.lr`); the closest dotted key anywhere.
  """
  keys = valid_keys() if keys is None else list(keys)
  parent, _, leaf = key.rpartition(".")
  siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
  for name, full in siblings.items():
    if len(leaf) > 1 and len(name) > 1 and leaf.count("_") != name.count("_") and (
        _acronym(leaf) == name or _acronym(name) == leaf):
      return full
  close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
  if close:
    return siblings[close[0]]
  elsewhere = [k for k in keys if k.rpartition(".")[2] == leaf]
  if elsewhere:
    return elsewhere[0]
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  return close[0] if close else None


# -- the sections of older recipes ----------------------------------------------------------

# jaxpost <= 0.1 had one `preference:` section for every preference algorithm; each algorithm
# now owns its section. Old recipes (and the config.yaml of old runs) still load: each old key
# moves to its new place, with one warning that names the new keys.
_PREFERENCE_KEYS = {
    "loss_type": ("dpo.loss_type",), "beta": ("dpo.beta", "kto.beta"),
    "label_smoothing": ("dpo.label_smoothing",), "gamma": ("dpo.gamma",),
    "length_normalize": ("dpo.length_normalize",), "sft_weight": ("dpo.sft_weight",),
    "reference": ("reference.mode",), "sync_every": ("reference.sync_every",),
    "sync_alpha": ("reference.sync_alpha",), "desirable_weight": ("kto.desirable_weight",),
    "undesirable_weight": ("kto.undesirable_weight",), "margin": ("reward.margin",),
    "center_coefficient": ("reward.center_coefficient",),
    "max_prompt_length": ("data.max_prompt_length",),
}


def _migrate_preference(raw: dict, source: str, sources: dict[str, str]) -> dict:
  """`raw` with an old `preference:` section's keys moved to their new sections."""
  old = raw.get("preference")
  if old is None or not isinstance(old, dict):
    return raw
  raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items() if k != "preference"}
  moved = []
  for name, value in old.items():
    if name not in _PREFERENCE_KEYS:
      where = sources.get(f"preference.{name}", source)
      raise ConfigError(f"unknown key 'preference.{name}' in {where}; the preference section "
                        "was split into dpo, kto, reward and reference sections")
    for new in _PREFERENCE_KEYS[name]:
      section, leaf = new.split(".")
      node = raw.setdefault(section, {})
      if not isinstance(node, dict):
        raise ConfigError(f"'{section}' in {source} must be a mapping, got {_shown(node)}")
      if leaf in node and node[leaf] != value:
        raise ConfigError(f"both 'preference.{name}' and '{new}' are set in {source}; "
                          f"'preference.{name}' is the old name of '{new}': keep only '{new}'")
      node[leaf] = value
      if (origin := sources.get(f"preference.{name}")) is not None:
        sources[new] = origin
    moved.append(f"preference.{name} -> {' / '.join(_PREFERENCE_KEYS[name])}")
  if moved:
    shown = "; ".join(moved[:4]) + (f"; and {len(moved) - 4} more" if len(moved) > 4 else "")
    print(f"jaxpost: warning: {source} uses the old 'preference' section; it still works, but "
          f"rename {shown} (docs/architecture.md, configs/dpo.yaml)", file=sys.stderr)
  return raw


# -- public entry points --------------------------------------------------------------------


def config_from_dict(raw: Any, *, source: str = "the config",
                     sources: dict[str, str] | None = None, root: type = RunConfig) -> Any:
  """A validated config (a `RunConfig`, or an extension `root` of it) from nested dicts as
  read from YAML. `source` names where the values came from in messages; `sources` maps
  dotted keys to a more precise origin (see `apply_overrides`)."""
  if not isinstance(raw, dict):
    raise ConfigError(f"{source} must be a mapping of sections, got {_shown(raw)}")
  sources = dict(sources or {})
  raw = _migrate_preference(raw, source, sources)
  cfg = _Builder(source, sources, root).build(root, raw, "")
  cfg.validate()
  return cfg


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                root: type = RunConfig) -> Any:
  """Reads the YAML recipe at `path`, applies `key.path=value` overrides, validates; `root`
  is the config's class (`RunConfig`, or e.g. `EvalConfig` for `jaxpost eval`).

  Raises `ConfigError` (a `ValueError`) with a one-line message for any problem.
  """
  raw = read_yaml(path)
  sources = apply_overrides(raw, overrides)
  return config_from_dict(raw, source=str(path), sources=sources, root=root)


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """The config tree as plain nested dicts (YAML/JSON-ready)."""

  def plain(x):
    if isinstance(x, dict):
      return {k: plain(v) for k, v in x.items()}
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

  return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> Path:
  """Writes the resolved config as YAML (atomically); `load_config` reads it back equal."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = ("# The resolved configuration of this run (defaults and overrides applied).\n"
          + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)
  return path
