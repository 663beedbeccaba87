"""A minimal, lazy safetensors reader and a streaming writer (numpy, with bfloat16).

Reading memory-maps the file, so a tensor (or a slice of one) is only read when used: loading a
sharded model never needs a second full copy of it in host memory; `read` copies one tensor
out with plain file reads (what a streaming merge uses). Writing streams one tensor at a time
(`SafetensorsWriter`: the header first, then each tensor as it is made). Format:
https://github.com/huggingface/safetensors (8-byte little-endian header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the raw bytes).
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
  """A file that is not a valid safetensors file; the message names it and says what to do."""


_AGAIN = "download or export it again"


def _not_safetensors(path: Path, head: bytes, size: int, n: int) -> SafetensorsError:
  """The error of a file whose first 8 bytes are not a plausible header length."""
  if head.startswith(b"version https://git-lfs"):
    return SafetensorsError(f"{path} is a Git LFS pointer, not the weights: fetch them (`git lfs "
                            "pull` in the model's repository) or download the file again")
  if head.lstrip().startswith(b"<"):
    return SafetensorsError(f"{path} is not a safetensors file (it looks like an HTML or XML "
                            f"page, e.g. a failed download); {_AGAIN}")
  return SafetensorsError(f"{path} is not a safetensors file, or a truncated one: its first 8 "
                          f"bytes give a header of {n} bytes, but the file has {size} bytes; "
                          f"{_AGAIN}")


class SafetensorsFile:
  """Lazy access to the tensors of one .safetensors file.

  Raises (on opening):
    SafetensorsError: the file is too short, not safetensors (a Git LFS pointer, an HTML page),
      has a header that is not a JSON object of valid tensor entries, or is truncated (a
      tensor's bytes lie beyond its end); the message names the file and the tensor.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{self.path} is too short to be a safetensors file ({size} "
                               f"bytes); {_AGAIN}")
      (n,) = struct.unpack("<Q", raw)
      if n < 2 or n > min(size - 8, _MAX_HEADER):
        raise _not_safetensors(self.path, raw + f.read(64), size, n)
      try:
        header = json.loads(f.read(n).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{self.path}: its header is not valid JSON ({e}); the file is "
                               f"not safetensors, or corrupt; {_AGAIN}") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: its header should be a JSON object, got "
                             f"{type(header).__name__}; the file is corrupt; {_AGAIN}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
      raise SafetensorsError(f"{self.path}: its __metadata__ should be an object, got "
                             f"{type(metadata).__name__}; {_AGAIN}")
    self.metadata = metadata
    self._entries = header
    self._data_start = 8 + n
    self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size > 8 + n else None
    for name, e in header.items():
      self._check_entry(name, e, size)

  def _check_entry(self, name: str, e, size: int) -> None:
    """Checks one header entry: dtype, shape, offsets, and that its bytes are in the file."""
    where = f"{self.path}: tensor {name!r}"
    if not isinstance(e, dict):
      raise SafetensorsError(f"{where} has a header entry that is not an object; {_AGAIN}")
    if e.get("dtype") not in _DTYPES:
      raise SafetensorsError(f"{where} has unsupported dtype {e.get('dtype')!r} (supported: "
                             f"{', '.join(_DTYPES)})")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not (isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise SafetensorsError(f"{where} has an invalid shape {shape!r}; the file is corrupt; "
                             f"{_AGAIN}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
        isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
      raise SafetensorsError(f"{where} has invalid data_offsets {offsets!r}; the file is "
                             f"corrupt; {_AGAIN}")
    start, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
    if self._data_start + end > size:
      raise SafetensorsError(f"{where} ends at byte {self._data_start + end}, but the file has "
                             f"only {size} bytes: the file is truncated or corrupt (an interrupted "
                             f"download or copy?); {_AGAIN}")
    if end - start != expected:
      raise SafetensorsError(f"{where} has {end - start} bytes of data, but its shape {shape} "
                             f"and dtype {e['dtype']} need {expected}: the file is truncated or "
                             f"corrupt; {_AGAIN}")

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

  def read(self, name: str) -> np.ndarray:
    """A fresh, writable copy of the tensor, read with plain file reads (not through the
    memory map): its pages are the caller's alone and freed with the array, so reading tensor
    after tensor holds one tensor in memory, not every page mapped so far."""
    e = self._entries[name]
    start, end = e["data_offsets"]
    out = np.empty(e["shape"], _DTYPES[e["dtype"]])
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb") as f:
      f.seek(self._data_start + start)
      done = 0
      while done < end - start:
        n = f.readinto(view[done:])
        if not n:
          raise SafetensorsError(f"{self.path}: tensor {name!r} is cut short (the file changed "
                                 f"while it was read?); {_AGAIN}")
        done += n
    return out


class SafetensorsWriter:
  """Writes one .safetensors file a tensor at a time, so a file larger than memory can be
  written from tensors made one by one.

  The header (every name, dtype and shape, in order) is written first, then each tensor's
  bytes as `write(name, array)` is called in that order. The file is written under a
  temporary name and renamed into place by `close()` once every tensor is in, so a crash
  never leaves a half file; leaving the `with` block by an exception removes it.

      with SafetensorsWriter(path, [("a", np.float32, (2, 3))]) as w:
        w.write("a", np.ones((2, 3), np.float32))
  """

  def __init__(self, path: str | os.PathLike, entries, metadata: dict[str, str] | None = None):
    self.path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    self._order: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    for name, dtype, shape in entries:
      dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
      if dtype not in _NAMES:
        raise SafetensorsError(f"cannot write tensor {name!r} of dtype {dtype}")
      nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      self._order.append((name, dtype, shape))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._tmp = self.path.with_name(self.path.name + ".tmp")
    self._file = open(self._tmp, "wb")  # pylint: disable=consider-using-with
    self._file.write(struct.pack("<Q", len(blob)))
    self._file.write(blob)
    self._next = 0

  def write(self, name: str, array: np.ndarray) -> None:
    """Appends the next tensor; its name, dtype and shape must be the header's next entry."""
    if self._next >= len(self._order):
      raise SafetensorsError(f"{self.path}: tensor {name!r} is not in the header")
    want, dtype, shape = self._order[self._next]
    array = np.asarray(array)
    if name != want or array.dtype != dtype or array.shape != shape:
      raise SafetensorsError(f"{self.path}: expected tensor {want!r} {dtype} {list(shape)} next, "
                             f"got {name!r} {array.dtype} {list(array.shape)}")
    self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    self._next += 1

  def close(self) -> None:
    """Checks every tensor was written, syncs, and renames the file into place."""
    if self._next != len(self._order):
      self.abort()
      raise SafetensorsError(f"{self.path}: closed after {self._next} of {len(self._order)} "
                             f"tensors (next: {self._order[self._next][0]!r})")
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    """Closes and removes the temporary file (nothing appears under `path`)."""
    self._file.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` to `path` atomically (a temporary file renamed into place)."""
  arrays = {name: np.asarray(arr) for name, arr in tensors.items()}
  with SafetensorsWriter(path, [(n, a.dtype, a.shape) for n, a in arrays.items()],
                         metadata) as writer:
    for name, arr in arrays.items():
      writer.write(name, arr)
