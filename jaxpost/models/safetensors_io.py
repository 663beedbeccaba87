"""A minimal, lazy safetensors reader and a streaming writer (numpy, with bfloat16).

Reading memory-maps the file, so a tensor (or a slice of one) is only read when used: loading a
sharded model never needs a second full copy of it in host memory. Writing streams one tensor
at a time. Format: https://github.com/huggingface/safetensors (8-byte little-endian header
length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
  pass


class SafetensorsFile:
  """Lazy access to the tensors of one .safetensors file."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
      (n,) = struct.unpack("<Q", raw)
      if n > min(size - 8, _MAX_HEADER):
        raise SafetensorsError(f"{self.path}: corrupt header length {n}")
      try:
        header = json.loads(f.read(n))
      except json.JSONDecodeError as e:
        raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    self._data_start = 8 + n
    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 8 + n else None
    for name, e in header.items():
      if e.get("dtype") not in _DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
      start, end = e["data_offsets"]
      expected = int(np.prod(e["shape"], dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
      if end - start != expected or self._data_start + end > size:
        raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated or corrupt")

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._entries[name]["dtype"]]

  def get(self, name: str) -> np.ndarray:
    """A read-only, memory-mapped view of the tensor (no copy until used)."""
    e = self._entries[name]
    start, end = e["data_offsets"]
    dtype = _DTYPES[e["dtype"]]
    if end == start:
      return np.zeros(e["shape"], dtype)
    buf = self._mmap[self._data_start + start:self._data_start + end]
    return buf.view(dtype).reshape(e["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` to `path` atomically (a temporary file renamed into place)."""
  path = Path(path)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = {}
  for name, arr in tensors.items():
    arr = np.asarray(arr)
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
    arrays[name] = arr
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(np.ascontiguousarray(arr).tobytes())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
