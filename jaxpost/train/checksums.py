"""Checksums of a train state's arrays, computed on their devices (`checkpoint.Checkpointer`
saves them with each step and verifies them at restore).

`checksums(tree)` gives {leaf path: 16 hex digits}: for each of two 32-bit lanes, the sum mod
2^32 over the leaf's words of MurmurHash3's finaliser of (position, word), one jitted program
over all leaves. Integer arithmetic only, so the value is the same on any backend and sharding;
any single changed word changes it. Not a cryptographic hash.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUM_ALGORITHM = "fmix32-sum-2x32/v1"


def path_str(path: tuple) -> str:
  """`opt_state.0.mu.w`: the same string for a dict key, an attribute or a sequence index, so
  the abstract state and orbax's metadata tree (plain dicts and lists) line up."""
  return ".".join(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))
                  for k in path)


_SEEDS = (0x243F6A88, 0x85A308D3)  # one per 32-bit lane (hex digits of pi)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 in which every input bit flips each output
  bit with probability about 1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bytes as uint32 words: one per element of 1, 2 or 4 bytes (zero-extended), two
  per 8-byte element (a trailing axis)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[np.dtype(x.dtype).itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32[2]: for each lane `s`, the sum mod 2^32 over words `w_i` at flat position `i` of
  `fmix32(fmix32(i + s) ^ w_i)`. Each term is a bijection of its word, so any single changed
  word changes the sum, and a moved or otherwise damaged stretch goes unnoticed with a
  probability of about 2^-64. Integer arithmetic only: the same value on any backend and any
  sharding (the sum is associative). Not a cryptographic hash."""
  w = _words(x)
  pos, stride = jnp.zeros(w.shape, jnp.uint32), 1
  for axis in reversed(range(w.ndim)):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  return jnp.stack([jnp.sum(_fmix32(_fmix32(pos + jnp.uint32(seed)) ^ w), dtype=jnp.uint32)
                    for seed in _SEEDS])


_checksum_leaves = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _checksummable_dtype(dtype: np.dtype) -> bool:
  try:
    jax.eval_shape(_words, jax.ShapeDtypeStruct((1,), dtype))
  except Exception:  # noqa: BLE001 - complex, 4-bit and other dtypes without a word view
    return False
  return True


def _to_device(x: jax.Array) -> jax.Array:
  """A `pinned_host` array (`optim.offload`) copied to device memory, where jitted arithmetic
  runs."""
  return jax.device_put(x, x.sharding.with_memory_kind("device"))


def checksums(tree: Any) -> dict[str, str]:
  """{leaf path: 16 hex digits} of `_leaf_checksum` for every array leaf, computed by one jitted
  program on the leaves' devices (one pass over memory, no copy to the host; only the 8 bytes
  per leaf come back). Leaves that are not fully addressable from this process (arrays spanning
  hosts) and dtypes without a word view get none."""
  named = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if isinstance(x, (jax.Array, np.ndarray))
           and getattr(x, "is_fully_addressable", True)
           and _checksummable_dtype(np.dtype(x.dtype))]
  if not named:
    return {}
  arrays = [x for _, x in named]
  on_host = [getattr(getattr(x, "sharding", None), "memory_kind", None) == "pinned_host"
             for x in arrays]
  if any(on_host):  # offloaded optimizer state: hashed on the device one leaf at a time, so
    # the transient copy is one leaf, never the whole state the offload keeps out of HBM
    sums = [jax.device_get(_checksum_leaves([_to_device(x) if h else x]))[0]
            for x, h in zip(arrays, on_host)]
  else:
    try:
      sums = jax.device_get(_checksum_leaves(arrays))
    except ValueError:  # leaves committed to different devices cannot share one program
      sums = [jax.device_get(_checksum_leaves([x]))[0] for x in arrays]
  return {name: f"{int(s[0]):08x}{int(s[1]):08x}" for (name, _), s in zip(named, sums)}
