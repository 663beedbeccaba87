"""mergekit's YAML schema: read, validate, and resolve each tensor's parameters.

    merge_method: ties                      # linear, slerp, task_arithmetic, ties,
    base_model: runs/quickstart/final       #   dare_linear, dare_ties, model_stock
    models:
      - model: runs/grpo                    # HF folder, jaxpost run (or RUN/checkpoints/N),
        parameters: {weight: 0.5, density: 0.5}   # or BASE+ADAPTER (a PEFT adapter)
      - model: runs/ppo
        parameters:
          weight: [0.2, 0.8]                # a gradient over the layers
          density: [{filter: mlp, value: 0.3}, {value: 0.6}]   # by tensor name
    parameters: {normalize: true}
    dtype: float32

A value is a scalar, a list (interpolated over the layers: layer i of L has t = i / (L - 1);
embeddings, final norm and LM head have t = 0), or `{filter, value}` entries, the first whose
filter is in the tensor's name winning. A model's own `parameters` come first, then the
slice's, then the top-level ones (mergekit's precedence). `slices:` with one slice whose
sources span every layer is the same as `models:`. Everything else mergekit reads (other
methods, frankenmerge slices, `modules`, `tokenizer`, `chat_template`, ...) is one
`ConfigError` naming the key; so is a parameter the method does not take.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

from jaxpost.config import ConfigError, parse_value, read_yaml, suggest_key

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
  """A method parameter: its type, whose it is (the merge's, every input's, or every input's
  but the base's) and its default."""

  kind: type
  scope: str  # "shared" | "input" | "non_base"
  default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method reads from the YAML (mergekit 0.1.5's spec of the same name)."""

  params: dict
  base: str  # "required" | "ignored"
  min_inputs: int = 1
  max_inputs: int | None = None
  sparsify: str | None = None
  consensus: str | None = None


def _generalized(sparsify, consensus, normalize, rescale) -> Method:
  return Method(params={"int8_mask": Param(bool, "shared", False),
                        "normalize": Param(bool, "shared", normalize),
                        "rescale": Param(bool, "shared", rescale),
                        "lambda": Param(float, "shared", 1.0),
                        "weight": Param(float, "non_base"),
                        "density": Param(float, "non_base", 1.0)},
                base="required", sparsify=sparsify, consensus=consensus)


METHODS = {
    "linear": Method(params={"weight": Param(float, "input"),
                             "normalize": Param(bool, "shared", True)}, base="ignored"),
    "slerp": Method(params={"t": Param(float, "shared")}, base="required", min_inputs=2,
                    max_inputs=2),
    "task_arithmetic": _generalized(None, None, False, False),
    "ties": _generalized("magnitude", "sum", True, False),
    "dare_ties": _generalized("random", "sum", False, True),
    "dare_linear": _generalized("random", None, False, True),
    "model_stock": Method(params={"filter_wise": Param(bool, "shared", False)},
                          base="required", min_inputs=3),
}
# in [0, 1]: an interpolation weight and a fraction kept
_UNIT = ("t", "density")
DTYPES = ("float32", "float16", "bfloat16")
_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
         "tokenizer_source")
_MERGEKIT_ONLY = {
    "modules": "per-module merges", "tokenizer": "tokenizer surgery (the base's tokenizer is "
    "copied)", "chat_template": "setting a chat template (the base's is copied)",
}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """One input: `model` as written (a path, or BASE+ADAPTER), its own parameters, where it is
  in the YAML (`models[1]`), and a slice source's layer_range (checked against the model)."""

  model: str
  parameters: dict
  where: str
  layer_range: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """A validated merge: the inputs in mergekit's order (the base appended when not listed),
  the method, the parameters by scope, dtypes, and notes on settings mergekit ignores."""

  merge_method: str
  models: tuple[ModelEntry, ...]
  base_model: str | None
  parameters: dict
  slice_parameters: dict
  dtype: str | None
  out_dtype: str | None
  source: str
  raw: dict
  notes: tuple[str, ...] = ()

  @property
  def method(self) -> Method:
    return METHODS[self.merge_method]

  @property
  def base_index(self) -> int | None:
    """The base's position among the inputs (None when the method ignores it or none)."""
    if self.base_model is None or self.method.base == "ignored":
      return None
    return next(i for i, m in enumerate(self.models) if m.model == self.base_model)


# -- reading ---------------------------------------------------------------------------------


def apply_merge_overrides(raw: dict, overrides: Sequence[str]) -> None:
  """Sets each `key.path=value` in `raw`: list entries by index (`models.0.parameters.weight=0.7`,
  or `models[0]...`), values as YAML (`parameters.t=[0, 0.5, 1]`)."""
  for text in overrides:
    key, sep, value = text.partition("=")
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.(\w+))*", key):
      raise ConfigError(f"invalid override {text!r}: expected key.path=value, e.g. "
                        "parameters.t=0.3 or models.0.parameters.weight=0.7")
    *parents, leaf = key.split(".")
    node: Any = raw
    for i, part in enumerate(parents + [leaf]):
      last = i == len(parents)
      here = ".".join((parents + [leaf])[:i + 1])
      if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
          raise ConfigError(f"invalid override {text!r}: '{here}' is not an entry of a list of "
                            f"{len(node)}")
        part = int(part)
      elif not isinstance(node, dict):
        raise ConfigError(f"invalid override {text!r}: '{here}' is inside a value, not a "
                          "section")
      if last:
        node[part] = parse_value(value, collections=True)
      else:
        if isinstance(node, dict) and node.get(part) is None:
          node[part] = {}
        node = node[part]


def load_merge_config(path: str | Path, overrides: Sequence[str] = ()) -> MergeConfig:
  """Reads a mergekit YAML file, applies overrides, and validates it (see the module doc).

  Raises `ConfigError` with one line naming the key."""
  raw = read_yaml(path)
  apply_merge_overrides(raw, overrides)
  return merge_config_from_dict(raw, source=str(path))


def _fail(where: str, message: str) -> ConfigError:
  return ConfigError(f"{where}: {message}")


def _mapping(value, where: str, source: str) -> dict:
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _fail(source, f"'{where}' must be a mapping, got {value!r}")
  return value


def _model_string(value, where: str, source: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise _fail(source, f"'{where}' must be a model folder (a path), got {value!r}")
  if value.count("+") > 1:
    raise _fail(source, f"'{where}' = {value!r}: at most one '+' (MODEL+ADAPTER)")
  return value.strip()


def merge_config_from_dict(raw: dict, *, source: str = "the merge config") -> MergeConfig:
  """Validates a mergekit config already read into a dict (see `load_merge_config`)."""
  for key in raw:
    if key in _MERGEKIT_ONLY:
      raise _fail(source, f"key '{key}' ({_MERGEKIT_ONLY[key]}) is not supported by jaxpost "
                  "merge")
    if key not in _KEYS:
      near = suggest_key(str(key), list(_KEYS))
      raise _fail(source, f"unknown key '{key}'" + (f"; did you mean '{near}'?" if near else
                                                    f" (keys: {', '.join(_KEYS)})"))
  name = raw.get("merge_method")
  if name not in METHODS:
    what = "is missing" if name is None else f"{name!r} is not supported"
    raise _fail(source, f"merge_method {what} (supported: {', '.join(METHODS)})")
  method = METHODS[name]
  for key in ("dtype", "out_dtype"):
    value = raw.get(key)
    if isinstance(value, str) and value.startswith("torch."):
      value = raw[key] = value[len("torch."):]
    if value is not None and value not in DTYPES:
      raise _fail(source, f"'{key}' = {value!r} is not supported ({', '.join(DTYPES)})")
  base = raw.get("base_model")
  base = None if base is None else _model_string(base, "base_model", source)
  tokenizer_source = raw.get("tokenizer_source")
  if tokenizer_source not in (None, "base") and tokenizer_source != base:
    raise _fail(source, f"tokenizer_source {tokenizer_source!r} is not supported: the merged "
                "model gets the base's tokenizer (tokenizer_source: base), and every model must "
                "share it")

  slice_parameters: dict = {}
  if ("models" in raw) == ("slices" in raw):
    raise _fail(source, "give exactly one of 'models' and 'slices'")
  if "models" in raw:
    entries = _entries(raw["models"], "models", ("model", "parameters"), source)
  else:
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1:
      raise _fail(source, "'slices' must hold one slice whose sources span every layer "
                  "(several slices stack layers: a frankenmerge, which jaxpost merge does not "
                  "support)")
    sl = _mapping(slices[0], "slices[0]", source)
    for key in sl:
      if key not in ("sources", "parameters"):
        raise _fail(source, f"key 'slices[0].{key}' is not supported (a slice has sources and "
                    "parameters)")
    slice_parameters = _mapping(sl.get("parameters"), "slices[0].parameters", source)
    entries = _entries(sl.get("sources"), "slices[0].sources",
                       ("model", "parameters", "layer_range"), source)
  if base is not None and all(e.model != base for e in entries):
    entries.append(ModelEntry(base, {}, "base_model"))
  seen = {}
  for e in entries:
    if e.model in seen:
      raise _fail(source, f"{e.where} repeats {seen[e.model]} ({e.model!r})")
    seen[e.model] = e.where

  n = len(entries)
  if method.base == "required" and base is None:
    raise _fail(source, f"merge_method {name} needs a base_model")
  if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
    want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else
            f"at least {method.min_inputs}")
    raise _fail(source, f"merge_method {name} takes {want} models (the base included), got {n}")

  parameters = _mapping(raw.get("parameters"), "parameters", source)
  notes = []
  for where, params in ([("parameters", parameters), ("slices[0].parameters", slice_parameters)]
                        + [(f"{e.where}.parameters", e.parameters) for e in entries]):
    for key, setting in params.items():
      spec = method.params.get(key)
      if spec is None:
        near = suggest_key(str(key), list(method.params))
        raise _fail(source, f"'{where}.{key}': merge_method {name} takes no parameter "
                    f"'{key}'" + (f"; did you mean '{near}'?" if near else
                                  f" (its parameters: {', '.join(method.params)})"))
      _check_setting(setting, spec, key, f"{where}.{key}", source)
      is_model = where.startswith(("models", "slices[0].sources", "base_model"))
      if is_model and spec.scope == "shared":
        notes.append(f"{where}.{key} is not used: '{key}' is a parameter of the whole merge "
                     "(put it under parameters:)")
      elif is_model and spec.scope == "non_base" and entries[_index(entries, where)].model == base:
        notes.append(f"{where}.{key} is not used: the base model takes no '{key}'")
  base_at = None if method.base == "ignored" else next(
      i for i, e in enumerate(entries) if e.model == base)
  for key, spec in method.params.items():
    if spec.default is not REQUIRED:
      continue
    if spec.scope == "shared":
      if key not in parameters and key not in slice_parameters:
        raise _fail(source, f"merge_method {name} needs parameters.{key}")
      continue
    for i, e in enumerate(entries):
      if (spec.scope == "input" or i != base_at) and not any(
          key in p for p in (e.parameters, slice_parameters, parameters)):
        raise _fail(source, f"'{e.where}' ({e.model}) has no '{key}': set "
                    f"{e.where}.parameters.{key} (or parameters.{key} for every model)")
  return MergeConfig(merge_method=name, models=tuple(entries), base_model=base,
                     parameters=parameters, slice_parameters=slice_parameters,
                     dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"), source=source,
                     raw=raw, notes=tuple(notes))


def _index(entries, where: str) -> int:
  return next(i for i, e in enumerate(entries) if where.startswith(e.where + "."))


def _entries(items, where: str, keys: tuple, source: str) -> list[ModelEntry]:
  if not isinstance(items, list) or not items:
    raise _fail(source, f"'{where}' must be a non-empty list of {{model: ..., parameters: ...}}")
  out = []
  for i, item in enumerate(items):
    here = f"{where}[{i}]"
    item = {"model": item} if isinstance(item, str) else _mapping(item, here, source)
    for key in item:
      if key not in keys:
        raise _fail(source, f"unknown key '{here}.{key}' (an entry has {', '.join(keys)})")
    layer_range = item.get("layer_range")
    if "layer_range" in keys:
      if not (isinstance(layer_range, list) and len(layer_range) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in layer_range)):
        raise _fail(source, f"'{here}.layer_range' must be [first, end], got {layer_range!r}")
      layer_range = tuple(layer_range)
    out.append(ModelEntry(_model_string(item.get("model"), f"{here}.model", source),
                          _mapping(item.get("parameters"), f"{here}.parameters", source), here,
                          layer_range))
  return out


def _check_setting(setting, spec: Param, name: str, where: str, source: str) -> None:
  """A scalar, a gradient list, or {filter, value} entries, of the parameter's type."""
  def scalar(v) -> bool:
    if spec.kind is bool:
      return isinstance(v, bool)
    return isinstance(v, (int, float)) and not isinstance(v, bool)

  def check_value(v, at):
    values = v if isinstance(v, list) else [v]
    if not values or not all(scalar(x) for x in values):
      kind = "true/false" if spec.kind is bool else "a number"
      raise _fail(source, f"'{at}' must be {kind} or a list of them (a gradient), got {v!r}")
    if name in _UNIT and not all(0 <= x <= 1 for x in values):
      raise _fail(source, f"'{at}' must be in [0, 1], got {v!r}")

  entries = setting if isinstance(setting, list) else [setting]
  if any(isinstance(e, dict) for e in entries):
    for i, entry in enumerate(entries):
      at = f"{where}[{i}]" if isinstance(setting, list) else where
      if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
        raise _fail(source, f"'{at}' must be {{filter: NAME_PART, value: ...}} (filter "
                    f"optional), got {entry!r}")
      if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise _fail(source, f"'{at}.filter' must be a string, got {entry['filter']!r}")
      check_value(entry["value"], f"{at}.value")
  else:
    check_value(setting, where)


# -- resolving -------------------------------------------------------------------------------


def evaluate(setting, tensor_name: str, t: float):
  """A setting's value for one tensor (mergekit's `evaluate_setting`): a scalar as is; a list
  of numbers interpolated at t (of bools: the entry at int(t (n - 1))); the first
  `{filter, value}` whose filter is None, "*" or in the name; None when none matches."""
  if isinstance(setting, dict):
    setting = [setting]
  if not isinstance(setting, list):
    return setting
  if not setting:
    return None
  if all(not isinstance(e, dict) for e in setting):
    if any(isinstance(e, bool) for e in setting):
      return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
  for cond in setting:
    f = cond.get("filter")
    if f is None or f == "*" or (tensor_name and f in tensor_name):
      return evaluate(cond["value"], tensor_name, t)
  return None


def _resolve(name: str, spec: Param, scopes, tensor_name: str, t: float, whose: str,
             source: str):
  for scope in scopes:
    if scope and name in scope:
      value = evaluate(scope[name], tensor_name, t)
      if value is not None:
        return float(value) if spec.kind is float else value
  if spec.default is REQUIRED:
    raise ConfigError(f"{source}: no '{name}' for {whose} at tensor {tensor_name!r} (set "
                      f"parameters.{name}, or a filter that matches it)")
  return spec.default


def tensor_parameters(cfg: MergeConfig, tensor_name: str, t: float) -> tuple[dict, list[dict]]:
  """(the merge's parameters, each input's) for one tensor at layer fraction t; the base's
  entry holds only the parameters every input takes."""
  method = cfg.method
  shared = {k: _resolve(k, p, (cfg.slice_parameters, cfg.parameters), tensor_name, t,
                        "the merge", cfg.source)
            for k, p in method.params.items() if p.scope == "shared"}
  base = cfg.base_index
  per_input = []
  for i, entry in enumerate(cfg.models):
    per_input.append({
        k: _resolve(k, p, (entry.parameters, cfg.slice_parameters, cfg.parameters),
                    tensor_name, t, f"{entry.where} ({entry.model})", cfg.source)
        for k, p in method.params.items()
        if p.scope == "input" or (p.scope == "non_base" and i != base)})
  return shared, per_input
