"""Hugging Face checkpoints in and out: `load_hf` and `save_hf`.

Loading reads safetensors lazily (memory-mapped) and builds every parameter with
`jax.make_array_from_callback`, so each device receives only its own shard, read one layer's
tensor at a time: there is never a second full copy of the model in host memory. Pickle-based
files (`.bin`, `.pt`, `.pth`, `.ckpt`) are refused, never opened; no remote code is run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from jaxpost import sharding as sharding_lib
from jaxpost.models.config import ModelConfig
from jaxpost.models.hf_config import config_from_hf, config_to_hf, json_type
from jaxpost.models.params import param_specs
from jaxpost.models.safetensors_io import SafetensorsFile, save_file
from jaxpost.models.weights import is_weight_object, materialize

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Buffers some exporters write that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint folder jaxpost cannot load; the message names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One parameter: its HF name (with {i} for the layer) and the layout change both ways."""

  hf: str
  path: tuple[str, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  per_layer: bool


def tensor_maps(c: ModelConfig) -> list[TensorMap]:
  D, H, K, Dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  ident = lambda w: w  # noqa: E731
  T = lambda w: w.T  # noqa: E731

  def proj_in(n):  # HF [n*Dh, D] <-> ours [D, n, Dh]
    return (lambda w: w.T.reshape(D, n, Dh)), (lambda w: w.reshape(D, n * Dh).T)

  def bias(n):  # [n*Dh] <-> [n, Dh]
    return (lambda b: b.reshape(n, Dh)), (lambda b: b.reshape(n * Dh))

  specs = param_specs(c)
  layer_specs = specs["layers"]
  pre = "model.layers.{i}."
  maps = [TensorMap("model.embed_tokens.weight", ("embed",), ident, ident, False),
          TensorMap("model.norm.weight", ("final_norm",), ident, ident, False)]
  if "lm_head" in specs:
    maps.append(TensorMap("lm_head.weight", ("lm_head",), T, T, False))
  norm_names = {"attn_pre_norm": "input_layernorm"}
  if c.sandwich_norm:
    norm_names.update(attn_post_norm="post_attention_layernorm",
                      mlp_pre_norm="pre_feedforward_layernorm",
                      mlp_post_norm="post_feedforward_layernorm")
  else:
    norm_names["mlp_pre_norm"] = "post_attention_layernorm"
  for ours, theirs in norm_names.items():
    maps.append(TensorMap(pre + theirs + ".weight", ("layers", ours), ident, ident, True))
  heads = {"q": H, "k": K, "v": K}
  for name in layer_specs["attn"]:
    a = pre + "self_attn."
    if name in heads:
      fwd, back = proj_in(heads[name])
      maps.append(TensorMap(a + f"{name}_proj.weight", ("layers", "attn", name), fwd, back, True))
    elif name == "o":
      maps.append(TensorMap(a + "o_proj.weight", ("layers", "attn", "o"),
                       lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T, True))
    elif name in ("q_bias", "k_bias", "v_bias"):
      fwd, back = bias(heads[name[0]])
      maps.append(TensorMap(a + f"{name[0]}_proj.bias", ("layers", "attn", name), fwd, back, True))
    elif name == "o_bias":
      maps.append(TensorMap(a + "o_proj.bias", ("layers", "attn", name), ident, ident, True))
    elif name in ("q_norm", "k_norm"):
      maps.append(TensorMap(a + f"{name}.weight", ("layers", "attn", name), ident, ident, True))
    else:
      raise AssertionError(name)
  for name in layer_specs["mlp"]:
    proj, kind = name.split("_")[0], "bias" if name.endswith("_bias") else "weight"
    fn = ident if kind == "bias" else T
    maps.append(TensorMap(pre + f"mlp.{proj}_proj.{kind}", ("layers", "mlp", name), fn, fn, True))
  return maps


def _get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set_path(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def weight_files(path: Path) -> list[Path]:
  """The safetensors files of an HF model folder (the index's shards, or every *.safetensors).

  Raises:
    CheckpointError: not a folder, no config.json, a bad index or a missing shard, or no
      safetensors (pickle-only weights are refused, never opened); the message names the file.
  """
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a folder (expected a Hugging Face model folder with "
                          "config.json and *.safetensors)")
  if not (path / "config.json").is_file():
    raise CheckpointError(f"{path}: no config.json here; is this a Hugging Face model folder?")
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
      raise CheckpointError(
          f"{index}: 'weight_map' should be an object of tensor name -> shard file name in this "
          f"folder, got {_short(weight_map)}; write the index again, or take it from the "
          "original model")
    files = sorted({path / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise CheckpointError(f"{index}: lists shard {missing[0]} which is not in {path}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if files:
    return files
  pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  if pickles:
    raise CheckpointError(
        f"{path}: only pickle-based weights ({', '.join(pickles)}); jaxpost never loads pickle "
        "files (they can run arbitrary code). Convert them to safetensors first, e.g. with "
        "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
        "safe_serialization=True), in an environment you trust.")
  raise CheckpointError(f"{path}: no *.safetensors weights found (expected model.safetensors, or "
                        "shards listed in model.safetensors.index.json); download or export the "
                        "weights into this folder")


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def read_json_object(path: Path) -> dict:
  """A JSON file of a model folder that must hold an object (config.json, an index).

  Raises:
    CheckpointError: the file is not UTF-8, not valid JSON, or not an object; the message
      names the file (and the line).
  """
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise CheckpointError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
                          "the file must be UTF-8 JSON: download or export it again") from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                          f"{e.colno}); fix it, or download or export it again") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} must hold a JSON object, got a {json_type(value)}; fix it, "
                          "or download or export it again")
  return value


def read_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` of an HF model folder (no weights are read).

  Raises:
    CheckpointError: no config.json, or one that is not a JSON object (not UTF-8, invalid JSON,
      a list, ...); the message names the file.
    ConfigError: a config.json jaxpost cannot represent (a missing or mistyped key, an
      unsupported model type); the message names the file and the key.
  """
  cfg_path = Path(path) / "config.json"
  if not cfg_path.is_file():
    raise CheckpointError(f"{path}: no config.json here; is this a Hugging Face model folder?")
  return config_from_hf(read_json_object(cfg_path), source=str(cfg_path))


def load_hf(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None,
            rules=sharding_lib.DEFAULT_RULES) -> tuple[ModelConfig, dict]:
  """Loads an HF model folder as (config, params).

  Args:
    path: a local folder with config.json and model.safetensors (or shards plus
      model.safetensors.index.json).
    dtype: parameter dtype (e.g. jnp.bfloat16); default: the checkpoint's own.
    mesh: place every parameter straight onto its sharding on this mesh (by `rules`);
      default: the first device.
  """
  return load_tensors(
      path, maps_of=tensor_maps, specs_of=param_specs, dtype=dtype, mesh=mesh, rules=rules,
      unused=lambda name, config: name == "lm_head.weight" and config.tie_embeddings)


def load_tensors(path: str | os.PathLike, *, maps_of: Callable, specs_of: Callable, dtype,
                 mesh: Mesh | None, rules, unused: Callable[[str, ModelConfig], bool],
                 what: str = "model", check: Callable | None = None,
                 shape_hint: Callable[[str, tuple, tuple], str] = lambda name, got, want: ""
                 ) -> tuple[ModelConfig, dict]:
  """The loader behind `load_hf` (and reward models): folder checks, every tensor's name and
  shape against `maps_of(config)` / `specs_of(config)` before anything is read, then each
  parameter built shard by shard with `make_array_from_callback`.

  `unused(name, config)` names tensors that may be present and are ignored; `check(path,
  where)` runs first for layout-specific errors; `shape_hint` adds to a shape error."""
  path = Path(path)
  files = weight_files(path)
  config = read_config(path)
  readers = [SafetensorsFile(f) for f in files]
  where: dict[str, SafetensorsFile] = {}
  for r in readers:
    for k in r.keys():
      where[k] = r
  if check is not None:
    check(path, where)

  maps = maps_of(config)
  expected = {m.hf.format(i=i): m for m in maps
              for i in (range(config.num_layers) if m.per_layer else [None])}
  missing = [k for k in expected if k not in where]
  if missing:
    raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing from the checkpoint"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  extra = [k for k in where if k not in expected and not k.endswith(_IGNORED_SUFFIXES)
           and not unused(k, config)]
  if extra:
    raise CheckpointError(
        f"{path}: unexpected tensor {extra[0]!r} in {where[extra[0]].path.name} for a "
        f"{config.model_type} {what}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

  specs = specs_of(config)
  if dtype is None:
    dtype = where["model.embed_tokens.weight"].dtype("model.embed_tokens.weight")
  dtype = np.dtype(jnp.dtype(dtype))
  shard_tree = sharding_lib.param_shardings(specs, mesh, rules) if mesh is not None else None
  device = SingleDeviceSharding(jax.devices()[0])

  # Every tensor's shape against the config, before anything is read.
  for m in maps:
    spec = _get_path(specs, m.path)
    want = m.to_hf(np.zeros(spec.shape[1:] if m.per_layer else spec.shape, np.int8)).shape
    for i in (range(config.num_layers) if m.per_layer else [None]):
      name = m.hf.format(i=i)
      got = where[name].shape(name)
      if got != want:
        raise CheckpointError(
            f"{where[name].path}: tensor {name!r} has shape {list(got)}, but config.json "
            f"implies {list(want)}{shape_hint(name, tuple(got), tuple(want))}")

  params: dict = {}
  for m in maps:
    spec = _get_path(specs, m.path)

    def read(i, m=m):
      name = m.hf.format(i=i)
      return m.to_ours(where[name].get(name))

    def callback(index, m=m, read=read, spec=spec):
      if not m.per_layer:
        return _cast(read(None)[index], dtype)
      layers = range(spec.shape[0])[index[0]]
      return np.stack([_cast(read(i)[index[1:]], dtype) for i in layers])

    target = _get_path(shard_tree, m.path) if shard_tree is not None else device
    _set_path(params, m.path, jax.make_array_from_callback(spec.shape, target, callback))
  return config, params


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if x.dtype == dtype:
    return np.array(x)
  if x.dtype == ml_dtypes.bfloat16 or dtype == ml_dtypes.bfloat16:
    return x.astype(np.float32).astype(dtype)
  return x.astype(dtype)


def parse_size(s: int | str) -> int:
  """Bytes of a size given as an int or a string like "5GB", "500MB", "2GiB"."""
  if isinstance(s, int):
    return s
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  s = s.strip().upper()
  for u, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
    if s.endswith(u):
      return int(float(s[:-len(u)]) * mult)
  return int(s)


def save_hf(config: ModelConfig, params: dict, path: str | os.PathLike, *, dtype=None,
            max_shard_size: int | str = "5GB") -> None:
  """Writes an HF folder (config.json + safetensors) that `AutoModelForCausalLM` loads.

  Tensors are written in `dtype` (default: the parameters' own) under HF names; a model larger
  than `max_shard_size` is split into `model-0000k-of-0000n.safetensors` with an index file.
  Each file is written to a temporary name and renamed, so a crash never leaves a half file.
  """
  write_tensors(path, params, tensor_maps(config), param_specs(config), config.num_layers,
                dtype=dtype, max_shard_size=max_shard_size,
                config_json=lambda hf_dtype: config_to_hf(config, hf_dtype))


def write_tensors(path: str | os.PathLike, params: dict, maps: list, specs: dict,
                  num_layers: int, *, dtype, max_shard_size: int | str,
                  config_json: Callable[[str], dict]) -> None:
  """The writer behind `save_hf` (and reward models): the tensors of `maps` under their HF
  names, in `dtype` (default: the embedding's), sharded by `max_shard_size` with an index,
  then `config_json(hf_dtype)` as config.json. Weight objects (adapters, quantised weights)
  are written as their effective weights."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  limit = parse_size(max_shard_size)
  dtype = np.dtype(jnp.dtype(dtype if dtype is not None else params["embed"].dtype))

  # Plan the shards from shapes alone, then materialise and write one shard at a time, so
  # host memory holds at most one shard.
  plan: list[list[tuple[str, TensorMap, int | None]]] = [[]]
  size = 0
  for m in maps:
    spec = _get_path(specs, m.path)
    nbytes = int(np.prod(spec.shape[1:] if m.per_layer else spec.shape)) * dtype.itemsize
    for i in (range(num_layers) if m.per_layer else [None]):
      if size and size + nbytes > limit:
        plan.append([])
        size = 0
      plan[-1].append((m.hf.format(i=i), m, i))
      size += nbytes

  def host(leaf, i):
    if i is not None:  # one layer of a stacked weight (array or weight object)
      leaf = jax.tree.map(lambda x: x[i], leaf)
    if is_weight_object(leaf):
      leaf = materialize(leaf)
    return np.asarray(jax.device_get(leaf))

  def materialise(entries):
    return {name: np.ascontiguousarray(_cast(m.to_hf(host(_get_path(params, m.path), i)), dtype))
            for name, m, i in entries}

  for stale in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
    stale.unlink(missing_ok=True)
  if len(plan) == 1:
    save_file(materialise(plan[0]), path / "model.safetensors")
  else:
    weight_map, total, n = {}, 0, len(plan)
    for k, entries in enumerate(plan, 1):
      name = f"model-{k:05d}-of-{n:05d}.safetensors"
      shard = materialise(entries)
      save_file(shard, path / name)
      weight_map.update({t: name for t in shard})
      total += sum(t.nbytes for t in shard.values())
      del shard
    _write_json(path / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  hf_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
              np.dtype(ml_dtypes.bfloat16): "bfloat16"}.get(dtype, "float32")
  _write_json(path / "config.json", config_json(hf_dtype))


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)
