"""The streaming merge of model folders: `jaxpost merge MERGE.yaml`.

    cfg = load_merge_config("configs/merge_slerp.yaml", ["parameters.t=0.3"])
    report = merge_folders(cfg, "runs/merge_slerp")     # an HF folder transformers loads

Every input is opened lazily (`inputs.open_source`) and checked before anything is merged:
one architecture (config.json's shape keys), the same tensor names and shapes, one tokenizer.
Then, for each tensor name of the base (or the first model) in order, each model's tensor is
read (plain file reads, nothing stays mapped), merged by `methods` on the device, and appended
to the output file by `SafetensorsWriter`; peak memory is a few tensors, not a model (the
merge reports it). The output folder gets the base's config.json and tokenizer files, and the
config as `mergekit_config.yml`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxpost.config import ConfigError
from jaxpost.merge import methods
from jaxpost.merge.config import MergeConfig, tensor_parameters
from jaxpost.merge.inputs import open_source
from jaxpost.models.hf_io import parse_size
from jaxpost.models.safetensors_io import SafetensorsWriter


class MergeError(ValueError):
  """Models that cannot be merged (another architecture, tensor, shape or tokenizer) or a
  merge whose weights cannot be used; the message names the model and the tensor."""


# config.json keys that fix the tensors' shapes: models that differ here cannot be merged.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                     "tie_word_embeddings")
# What mergekit copies from the tokenizer's donor.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tokenizer_fingerprint(folder: Path) -> str | None:
  """A hash of what fixes a folder's token ids (tokenizer.json's model and added tokens, or
  tokenizer.model, or vocab.json + merges.txt); None when the folder has no tokenizer."""
  folder = Path(folder)
  if (folder / "tokenizer.json").is_file():
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []]
    blob = json.dumps({"model": data.get("model"), "added": added}, sort_keys=True).encode()
  elif (folder / "tokenizer.model").is_file():
    blob = (folder / "tokenizer.model").read_bytes()
  elif (folder / "vocab.json").is_file():
    merges = folder / "merges.txt"
    blob = (folder / "vocab.json").read_bytes() + (merges.read_bytes() if merges.is_file() else b"")
  else:
    return None
  return hashlib.sha256(blob).hexdigest()


def check_compatible(cfg: MergeConfig, sources: list) -> None:
  """Architecture, tensor names and shapes, slice layer ranges and tokenizers of every input
  against the reference input (the base, else the first); raises `MergeError` / `ConfigError`
  naming the model and the key or tensor."""
  ref = sources[_reference(cfg)]
  for s in sources:
    for key in ARCHITECTURE_KEYS:
      if s.config.get(key) != ref.config.get(key):
        raise MergeError(f"{s.label} and {ref.label} are different architectures: config.json "
                         f"'{key}' is {s.config.get(key)!r} vs {ref.config.get(key)!r}")
  layers = ref.config.get("num_hidden_layers")
  for entry in cfg.models:
    if entry.layer_range is not None and list(entry.layer_range) != [0, layers]:
      raise ConfigError(f"{cfg.source}: '{entry.where}.layer_range' is {list(entry.layer_range)}"
                        f" but the model has {layers} layers: only slices over every layer "
                        f"([0, {layers}]) are supported (no frankenmerges)")
  names = ref.names()
  for s in sources:
    theirs = set(s.names())
    missing = [n for n in names if n not in theirs]
    if missing:
      raise MergeError(f"tensor {missing[0]!r} of {ref.label} is missing from {s.label}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(theirs - set(names))
    if extra:
      raise MergeError(f"{s.label} has tensor {extra[0]!r}, which {ref.label} does not")
    for n in names:
      if s.shape(n) != ref.shape(n):
        raise MergeError(f"tensor {n!r} has shape {list(s.shape(n))} in {s.label} but "
                         f"{list(ref.shape(n))} in {ref.label}")
  prints = [(s, tokenizer_fingerprint(s.folder)) for s in sources]
  known = [(s, f) for s, f in prints if f is not None]
  for s, f in known[1:]:
    if f != known[0][1]:
      raise MergeError(f"{s.label} and {known[0][0].label} have different tokenizers: the merged "
                       "embeddings would mix token ids (mergekit's tokenizer_source: union is not "
                       "supported)")


def _reference(cfg: MergeConfig) -> int:
  return cfg.base_index if cfg.base_index is not None else (
      next((i for i, m in enumerate(cfg.models) if m.model == cfg.base_model), 0))


def layer_fraction(name: str, num_layers: int) -> float:
  """mergekit's t of a tensor for gradients: i / (L - 1) in layer i (1 for one layer), 0 for
  tensors outside the layers (embeddings, final norm, LM head)."""
  m = _LAYER.search(name)
  if m is None:
    return 0.0
  return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def resolved_parameters(cfg: MergeConfig, name: str, num_layers: int) -> tuple[dict, list]:
  """`tensor_parameters` of one tensor, checked: weights that `linear` must normalise do not
  sum to ~0; densities lie in [0, 1]. Run for every tensor before anything is written."""
  shared, per_input = tensor_parameters(cfg, name, layer_fraction(name, num_layers))
  m = cfg.merge_method
  if m == "linear" and shared["normalize"]:
    total = sum(p["weight"] for p in per_input)
    if abs(total) < 1e-8:
      raise MergeError(f"linear: the weights of tensor {name!r} sum to {total:g}, so they "
                       "cannot be normalised; change them or set parameters.normalize=false")
  for p in per_input:
    if "density" in p and not 0 <= p["density"] <= 1:
      raise MergeError(f"{m}: density {p['density']:g} for tensor {name!r} is outside [0, 1]")
  return shared, per_input


def merge_tensor(cfg: MergeConfig, arrays: list, shared: dict, per_input: list, key) -> jax.Array:
  """One tensor of the merge: `arrays` in input order, parameters from `resolved_parameters`."""
  m, b = cfg.merge_method, cfg.base_index
  if m == "linear":
    return methods.linear(arrays, [p["weight"] for p in per_input],
                          normalize=shared["normalize"], stacked=None)
  base, others = arrays[b], [a for i, a in enumerate(arrays) if i != b]
  if m == "slerp":
    return methods.slerp(base, others[0], shared["t"], stacked=None)
  if m == "model_stock":
    return methods.model_stock(base, others, filter_wise=shared["filter_wise"], stacked=None)
  weights = [p["weight"] for i, p in enumerate(per_input) if i != b]
  densities = [p["density"] for i, p in enumerate(per_input) if i != b]
  kwargs = dict(normalize=shared["normalize"], lambda_=shared["lambda"], stacked=None)
  if m == "task_arithmetic":
    return methods.task_arithmetic(base, others, weights, **kwargs)
  if m == "ties":
    return methods.ties(base, others, weights, density=densities, rescale=shared["rescale"],
                        **kwargs)
  fn = methods.dare_ties if m == "dare_ties" else methods.dare_linear
  return fn(base, others, weights, density=densities, key=key, rescale=shared["rescale"],
            **kwargs)


def _out_dtype(name: str | None, dtypes: list) -> np.dtype:
  """The merged tensor's dtype: `out_dtype` / `dtype` for floating tensors, else the inputs'
  promoted dtype; an integer buffer keeps the reference's (`dtypes[0]`)."""
  if not jnp.issubdtype(dtypes[0], jnp.floating):
    return np.dtype(dtypes[0])
  if name:
    return np.dtype(jnp.dtype(name))
  return np.dtype(functools.reduce(jnp.promote_types, dtypes))


def _cast(x: np.ndarray, dtype) -> np.ndarray:
  return x if dtype is None else x.astype(dtype, copy=False)


def _release_free_memory() -> None:
  """Hands memory freed by the last tensor back to the OS (glibc's `malloc_trim`), so resident
  memory is what the merge holds, not what the allocator kept from earlier tensors."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _load_libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
  except (OSError, AttributeError):  # not glibc: nothing to trim
    return None


_LIBC = _load_libc()


def _rss_mib() -> float:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _shard_plan(names, nbytes: dict, limit: int) -> list[list[str]]:
  plan, size = [[]], 0
  for n in names:
    if plan[-1] and size + nbytes[n] > limit:
      plan.append([])
      size = 0
    plan[-1].append(n)
    size += nbytes[n]
  return plan


def merge_folders(cfg: MergeConfig, out: str | os.PathLike, *, seed: int = 0,
                  max_shard_size: int | str = "5GB",
                  log: Callable[[str], None] = print) -> dict:
  """Merges the models of `cfg` into the HF folder `out`, one tensor at a time (module doc).

  Returns {out, tensors, seconds, input_mib (all inputs), output_mib, largest_tensor_mib,
  start_rss_mib, peak_rss_mib (the process's peak resident memory)}."""
  t0 = time.perf_counter()
  start_rss = _rss_mib()
  out = Path(out)
  for note in cfg.notes:
    log(f"merge: note: {note}")
  with tempfile.TemporaryDirectory(prefix="jaxpost-merge-") as tmp:
    sources = [open_source(e.model, e.where, Path(tmp), log) for e in cfg.models]
    for s in sources:
      if out.resolve() == s.folder.resolve():
        raise ConfigError(f"{cfg.source}: the output folder {out} is the input {s.label}; "
                          "choose another --out")
    check_compatible(cfg, sources)
    ref = sources[_reference(cfg)]
    names = ref.names()
    num_layers = int(ref.config.get("num_hidden_layers") or 1)
    in_dtype = None if cfg.dtype is None else jnp.dtype(cfg.dtype)
    out_name = cfg.out_dtype or cfg.dtype
    out_dtypes = {n: _out_dtype(out_name, [ref.dtype(n)] + [s.dtype(n) for s in sources])
                  for n in names}
    nbytes = {n: int(np.prod(ref.shape(n))) * out_dtypes[n].itemsize for n in names}
    params = {n: resolved_parameters(cfg, n, num_layers) for n in names
              if jnp.issubdtype(ref.dtype(n), jnp.floating)}
    plan = _shard_plan(names, nbytes, parse_size(max_shard_size))
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{k:05d}-of-{len(plan):05d}.safetensors" for k in range(1, len(plan) + 1)])
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
      stale.unlink(missing_ok=True)
    root = jax.random.key(seed)
    for shard, file in zip(plan, files):
      entries = [(n, out_dtypes[n], ref.shape(n)) for n in shard]
      with SafetensorsWriter(out / file, entries, {"format": "pt"}) as writer:
        for n in shard:
          if not jnp.issubdtype(ref.dtype(n), jnp.floating):  # integer buffers: the reference's
            writer.write(n, ref.read(n))
            continue
          # each tensor goes to the device as it is read, so its host copy is freed at once;
          # flat (a free view here) unless its rows matter, as the methods would flatten it
          flat = ref.shape(n) if params[n][0].get("filter_wise") else (-1,)
          arrays = [jnp.asarray(_cast(s.read(n), in_dtype).reshape(flat)) for s in sources]
          key = jax.random.fold_in(root, zlib.crc32(n.encode()))
          y = merge_tensor(cfg, arrays, *params[n], key)
          del arrays
          y_host = np.asarray(jax.device_get(y)).reshape(ref.shape(n))
          del y
          writer.write(n, y_host.astype(out_dtypes[n], copy=False))
          del y_host
          _release_free_memory()
    if len(plan) > 1:
      index = {"metadata": {"total_size": sum(nbytes.values())},
               "weight_map": {n: f for shard, f in zip(plan, files) for n in shard}}
      (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(ref.config)
    if out_name:  # transformers 5 writes `dtype`, older versions `torch_dtype`
      config["dtype" if "dtype" in config else "torch_dtype"] = out_name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = [f for f in TOKENIZER_FILES if (ref.folder / f).is_file()]
    for f in copied:
      shutil.copyfile(ref.folder / f, out / f)
    if not any(f.startswith("tokenizer") for f in copied):
      log(f"merge: note: {ref.label} has no tokenizer files; the merged folder has none")
    (out / "mergekit_config.yml").write_text(yaml.safe_dump(cfg.raw, sort_keys=False))
    input_mib = sum(s.nbytes() for s in sources) / 2**20
  return {"out": str(out), "tensors": len(names), "seconds": time.perf_counter() - t0,
          "input_mib": input_mib, "output_mib": sum(nbytes.values()) / 2**20,
          "largest_tensor_mib": max(nbytes.values()) / 2**20, "start_rss_mib": start_rss,
          "peak_rss_mib": _peak_rss_mib()}
