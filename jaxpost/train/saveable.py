"""A train state as orbax saves it, and the check that a checkpoint fits the state it is
restored into.

Typed PRNG keys are saved as their `jax.random.key_data` (`to_saveable`) and wrapped again with
their implementation at restore (`rewrap_keys`), so the key comes back bitwise. The restore
target (`abstract_saveable`) has a sharding on every leaf, and `check_matches` refuses a
checkpoint whose paths, shapes or dtypes differ from it (orbax would silently cast a dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpost.train.checksums import path_str


def is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def to_saveable(state: Any) -> tuple[Any, dict[str, str]]:
  """Typed keys -> their uint32 key data; returns the tree and {path: PRNG impl name}."""
  impls: dict[str, str] = {}

  def leaf(path, x):
    if is_key(x):
      impls[path_str(path)] = str(jax.random.key_impl(x))
      return jax.random.key_data(x)
    return x

  return jax.tree_util.tree_map_with_path(leaf, state), impls


def abstract_saveable(abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """The restore target: every leaf a ShapeDtypeStruct with a sharding, typed keys replaced by
  their key data. Returns it and {path: typed key ShapeDtypeStruct}."""
  keys: dict[str, Any] = {}

  def leaf(path, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      return x
    name = path_str(path)
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      raise ValueError(f"abstract_state leaf {name!r} has no sharding: build it with "
                       "jax.eval_shape and the shardings the train step uses")
    sds = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if not is_key(x):
      return sds
    keys[name] = sds
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    try:  # NamedSharding / SingleDeviceSharding extend to the trailing key-data axis
      sharding.shard_shape(data.shape)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"typed key {name!r}: its sharding {sharding} cannot place the key "
                       f"data {data.shape}; use a NamedSharding") from e
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

  return jax.tree_util.tree_map_with_path(leaf, abstract_state), keys


def check_matches(saved_tree: Any, abstract: Any, step_dir: Path) -> None:
  """Raise ValueError unless the saved leaves have the paths, shapes and dtypes of `abstract`
  (orbax would otherwise silently cast a dtype)."""
  saved = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  problems = [f"missing in checkpoint: {p}" for p in wanted if p not in saved]
  problems += [f"not in abstract_state: {p}" for p in saved if p not in wanted]
  for p in wanted.keys() & saved.keys():
    a, s = wanted[p], saved[p]
    got = (getattr(s, "dtype", None), tuple(getattr(s, "shape", ())))
    if hasattr(a, "shape") and got != (np.dtype(a.dtype), tuple(a.shape)):
      problems.append(f"{p}: saved {got[0]}{list(got[1])}, abstract_state {a.dtype}{list(a.shape)}")
  if problems:
    shown = "; ".join(sorted(problems)[:8]) + ("; ..." if len(problems) > 8 else "")
    raise ValueError(f"checkpoint {step_dir} does not match abstract_state: {shown}")


def rewrap_keys(state: Any, key_impls: dict[str, str], key_structs: dict[str, Any]) -> Any:
  """Key data back to typed keys (`to_saveable`'s inverse), on the abstract state's shardings."""
  def leaf(path, x):
    name = path_str(path)
    if name not in key_structs:
      return x
    want = key_structs[name]
    key = jax.random.wrap_key_data(x, impl=key_impls[name])
    if key.dtype != want.dtype:
      raise ValueError(f"typed key {name!r} was saved as {key.dtype}, abstract_state "
                       f"wants {want.dtype}")
    return key if key.sharding == want.sharding else jax.device_put(key, want.sharding)

  return jax.tree_util.tree_map_with_path(leaf, state)
