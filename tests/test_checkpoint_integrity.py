"""Checkpointer robustness: array checksums, crash-safe pruning and start-up clean-up, clean
shutdown after a failed restore, and one clear error for a failed background save."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from jaxpost.train import checkpoint as checkpoint_lib
from jaxpost.train import checksums as checksums_lib
from jaxpost.train import saveable as saveable_lib
from jaxpost.train.checkpoint import CheckpointCorruptError, CheckpointSaveError
from devices import run_on_8_cpu_devices
from test_checkpoint import _abstract, _bits, _ckpt, _largest_file, _state

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def _extras(step_dir: Path) -> dict:
  return json.loads((step_dir / "extras" / "metadata").read_text())


# ---- checksums ----------------------------------------------------------------------------------

def _reference_checksum(x: np.ndarray) -> str:
  """`_leaf_checksum` in numpy, from its docstring: per lane, the sum mod 2^32 over words w_i
  at flat position i of fmix32(fmix32(i + seed) ^ w_i)."""
  def fmix32(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))

  x = np.asarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32)
  else:
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint32)
  words = words.reshape(-1)
  pos = np.arange(words.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    lanes = [int(fmix32(fmix32(pos + np.uint32(seed)) ^ words).sum(dtype=np.uint32))
             for seed in checksums_lib._SEEDS]
  return "".join(f"{lane:08x}" for lane in lanes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.int8, jnp.uint16,
                                   jnp.bool_])
def test_checksum_matches_reference_and_sees_any_changed_word(dtype):
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.standard_normal((5, 7)) * 50)
  x = np.asarray(values > 0 if dtype == jnp.bool_ else values.astype(dtype))
  tree = {"x": jnp.asarray(x), "scalar": jnp.asarray(x[1, 2])}
  sums = checksums_lib.checksums(tree)
  assert sums == {"x": _reference_checksum(x), "scalar": _reference_checksum(x[1, 2])}
  # One changed bit anywhere, or two elements swapped, changes the checksum.
  raw = x.view(np.uint8).copy() if x.dtype != np.bool_ else x.astype(np.uint8)
  for byte in (0, raw.size // 2, raw.size - 1):
    flipped = raw.copy().reshape(-1)
    flipped[byte] ^= 1
    y = flipped.view(x.dtype).reshape(x.shape) if x.dtype != np.bool_ \
        else flipped.astype(bool).reshape(x.shape)
    assert checksums_lib.checksums({"x": jnp.asarray(y)})["x"] != sums["x"]
  swapped = x.copy().reshape(-1)
  i, j = np.flatnonzero(swapped != swapped[0])[0], 0
  swapped[[i, j]] = swapped[[j, i]]
  assert checksums_lib.checksums({"x": jnp.asarray(swapped.reshape(x.shape))})["x"] != sums["x"]


SHARDED_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from test_checkpoint_integrity import _reference_checksum
    from jaxpost.train.checkpoint import Checkpointer
    from jaxpost.train.checksums import checksums

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    x = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)
    rows = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    cols = jax.device_put(x, NamedSharding(mesh, P("data", "fsdp")))
    # The same checksum however the array is laid out over the devices.
    assert checksums({"x": rows}) == checksums({"x": cols}) == {"x": _reference_checksum(x)}
    with Checkpointer(tempfile.mkdtemp(), save_every=1) as ckpt:
      ckpt.save(1, {"x": rows}, data_state={})
      ckpt.wait()
      abstract = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cols.sharding)}
      restored, _, _, _ = ckpt.restore(abstract)  # verified on the new layout
    assert restored["x"].sharding == cols.sharding
    np.testing.assert_array_equal(np.asarray(restored["x"]), x)
    print("OK")
    """)


def test_checksums_do_not_depend_on_the_sharding():
  run_on_8_cpu_devices(SHARDED_SCRIPT)


def test_checksums_are_saved_in_extras_and_verified_on_restore(tmp_path, caplog):
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, data_state={"pos": 1})
    saved = _extras(tmp_path / "1")["checksums"]
    assert saved["algorithm"] == checksums_lib.CHECKSUM_ALGORITHM
    # Every array of the state, typed keys by their key data, each as 16 hex digits.
    saveable, _ = saveable_lib.to_saveable(state)
    assert saved["leaves"] == checksums_lib.checksums(saveable)
    assert {"params.w", "params.b", "opt_state.0.mu.w", "rng", "step"} <= set(saved["leaves"])
    assert all(len(v) == 16 for v in saved["leaves"].values())
    with caplog.at_level(logging.INFO, logger="jaxpost.train.checkpoint"):
      restored, _, _, _ = ckpt.restore(_abstract(state))
  assert _bits(restored) == _bits(state)
  assert "unverified" not in caplog.text


def test_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  """The extras written before checksums existed: format 1 without the "checksums" key."""
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, data_state={"pos": 1})
    extras = _extras(tmp_path / "1")
    del extras["checksums"]
    (tmp_path / "1" / "extras" / "metadata").write_text(json.dumps(extras))
    with caplog.at_level(logging.INFO, logger="jaxpost.train.checkpoint"):
      restored, data_state, _, step = ckpt.restore(_abstract(state))
  assert (step, data_state) == (1, {"pos": 1})
  assert _bits(restored) == _bits(state)
  assert "no checksums" in caplog.text and "unverified" in caplog.text


def _random_bits_state(seed: int) -> dict:
  """Arrays of random bits: zstd cannot compress them, so orbax stores their bytes verbatim."""
  bits = np.random.default_rng(seed).integers(0, 2**32, size=(64, 64), dtype=np.uint32)
  return {"w": jnp.asarray(bits.view(np.float32)), "step": jnp.int32(seed)}


def test_flipped_bytes_that_orbax_reads_without_error_are_caught_by_the_checksum(tmp_path,
                                                                                 caplog):
  old, new = _random_bits_state(1), _random_bits_state(2)
  abstract = _abstract(old)
  with _ckpt(tmp_path, keep_last=3) as ckpt:
    ckpt.save(1, old, data_state={"pos": 1})
    ckpt.save(2, new, data_state={"pos": 2})
    ckpt.wait()
    # Flip one byte inside the raw float data of `w` in step 2's data file.
    raw = np.asarray(new["w"]).tobytes()
    data_file = _largest_file(tmp_path / "2" / "state")
    data = bytearray(data_file.read_bytes())
    at = data.find(raw[len(raw) // 2:len(raw) // 2 + 64])
    assert at >= 0, "the array's bytes are not stored verbatim; this test needs that"
    data[at + 5] ^= 0xFF
    data_file.write_bytes(bytes(data))
    # Orbax alone reads the damaged array without any error: only the checksum can tell.
    with ocp.StandardCheckpointer() as reader:
      unchecked = reader.restore(tmp_path / "2" / "state", abstract)
    assert _bits(unchecked) != _bits(new)

    with pytest.raises(CheckpointCorruptError, match="checksum mismatch at leaf w") as err:
      ckpt.restore(abstract)
    assert err.value.step == 2 and str(tmp_path / "2") in str(err.value)
    assert "fallback_on_corrupt=true" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="jaxpost.train.checkpoint"):
      restored, data_state, _, step = ckpt.restore(abstract, fallback=True)
    assert (step, data_state) == (1, {"pos": 1})
    assert _bits(restored) == _bits(old)
    assert "checkpoint step 2" in caplog.text and "checksum mismatch" in caplog.text
    assert (tmp_path / "2.corrupt").is_dir() and ckpt.all_steps() == [1]


def test_bytes_flipped_in_the_middle_of_the_largest_file_are_corruption(tmp_path):
  old, new = _state(0), _state(1)
  with _ckpt(tmp_path, keep_last=3) as ckpt:
    ckpt.save(1, old, data_state={"pos": 1})
    ckpt.save(2, new, data_state={"pos": 2})
    ckpt.wait()
    data_file = _largest_file(tmp_path / "2" / "state")
    data = bytearray(data_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError) as err:  # a decoding error or the checksum
      ckpt.restore(_abstract(old))
    assert err.value.step == 2 and str(tmp_path / "2") in str(err.value)
    restored, _, _, step = ckpt.restore(_abstract(old), fallback=True)
    assert step == 1 and _bits(restored) == _bits(old)
    assert (tmp_path / "2.corrupt").is_dir()


# ---- pruning and start-up clean-up ----------------------------------------------------------

def test_pruning_moves_a_step_out_of_the_step_names_before_removing_it(tmp_path, monkeypatch,
                                                                       caplog):
  state = _state()
  # A kill while removing pruned folders: each loses a file, then the process "dies".
  def killed_mid_removal(paths):
    for path in paths:
      next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()

  monkeypatch.setattr(checkpoint_lib, "remove_pruned", killed_mid_removal)
  with _ckpt(tmp_path, keep_last=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state, data_state={"pos": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3]
  # Nothing half-deleted is left under a step's name: the pruned folders were renamed first.
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["3"]
  assert sorted(p.name for p in (tmp_path / ".deleting").iterdir()) == ["1", "2"]
  monkeypatch.undo()
  with caplog.at_level(logging.WARNING, logger="jaxpost.train.checkpoint"):
    ckpt = _ckpt(tmp_path, keep_last=1)
  assert not (tmp_path / ".deleting").exists()
  assert caplog.text.count("whose deletion was interrupted") == 2
  with ckpt:
    _, data_state, _, step = ckpt.restore(_abstract(state))
  assert (step, data_state) == (3, {"pos": 3})


@pytest.mark.parametrize("async_save", [True, False])
def test_pruned_folders_are_removed_once_the_save_is_committed(tmp_path, async_save):
  with _ckpt(tmp_path, keep_last=1, async_save=async_save) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(), data_state={})
    # No wait: the removal follows orbax's commit of step 3 in the background.
    deadline = time.monotonic() + 30
    while {p.name for p in tmp_path.iterdir()} != {"3", ".deleting"} \
        or list((tmp_path / ".deleting").iterdir()):
      assert time.monotonic() < deadline, sorted(p.name for p in tmp_path.rglob("*"))
      time.sleep(0.01)
    ckpt.wait()
    assert ckpt.all_steps() == [3]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3"]


def test_start_up_removes_what_a_killed_run_left(tmp_path, caplog):
  state = _state()
  with _ckpt(tmp_path, keep_last=5, async_save=False) as ckpt:
    for step in (2, 4, 6):
      ckpt.save(step, state, data_state={"pos": step})
  # A finalised step, half deleted after its rename out of the step names.
  (tmp_path / ".deleting").mkdir()
  (tmp_path / "2" / "state" / "manifest.ocdbt").unlink()
  (tmp_path / "2").rename(tmp_path / ".deleting" / "2")
  (tmp_path / "4" / "commit_success.txt").unlink()
  (tmp_path / "4").rename(tmp_path / "4.deleting")
  # A step folder that was never finalised, older than the newest finalised step 6 ...
  shutil.copytree(tmp_path / "6", tmp_path / "3")
  (tmp_path / "3" / "commit_success.txt").unlink()
  # ... an orbax temporary folder older than step 6, and newer ones of both kinds.
  (tmp_path / "5.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  (tmp_path / "9").mkdir()
  (tmp_path / "9" / "_CHECKPOINT_METADATA").write_text("{}")
  (tmp_path / "1.corrupt").mkdir()  # set aside by a fallback: kept for inspection
  with caplog.at_level(logging.WARNING, logger="jaxpost.train.checkpoint"):
    ckpt = _ckpt(tmp_path)
  with ckpt:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.corrupt", "6", "9"]
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")]
    assert len(removed) == 4 and all("\n" not in m for m in removed)
    for name in (".deleting/2", "4.deleting", "3", "5.orbax-checkpoint-tmp"):
      assert any(m.startswith(f"removed {tmp_path / name}:") for m in removed), name
    _, data_state, _, step = ckpt.restore(_abstract(state))
  assert (step, data_state) == (6, {"pos": 6})


# ---- failures: a failed restore, a failed save ----------------------------------------------

def test_close_after_a_failed_restore_is_clean(tmp_path, capfd, monkeypatch):
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  ckpt = _ckpt(tmp_path)
  ckpt.save(1, _state(0), data_state={})
  ckpt.save(2, _state(1), data_state={})
  ckpt.wait()
  _largest_file(tmp_path / "2" / "state").write_bytes(b"")
  try:  # not pytest.raises: it keeps the traceback, and so orbax's abandoned reads, alive
    ckpt.restore(_abstract(_state()))
  except CheckpointCorruptError as e:
    assert e.step == 2
  else:
    pytest.fail("restoring a truncated checkpoint did not raise")
  capfd.readouterr()
  ckpt.close()
  ckpt.close()
  gc.collect()  # orbax's abandoned reads used to end here, on a closed event loop
  err = capfd.readouterr().err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  assert not unraisable, [u.exc_value for u in unraisable]


def _disk_full(monkeypatch) -> list[str]:
  """Make every file orbax writes with Python I/O inside a step being saved fail as on a full
  disk (OSError ENOSPC), as orbax's commit threads write the step's metadata and JSON items.
  Returns the paths that failed."""
  failed: list[str] = []
  path_type = type(epath.Path("/"))
  for name in ("write_text", "write_bytes"):
    def write(self, *args, _original=getattr(path_type, name), **kwargs):
      if ".orbax-checkpoint-tmp" in str(self):
        failed.append(str(self))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
      return _original(self, *args, **kwargs)
    monkeypatch.setattr(path_type, name, write)
  return failed


@pytest.mark.parametrize("surfaced_by", ["wait", "next_save", "close", "sync_save"])
def test_a_failed_save_is_one_clear_error(tmp_path, monkeypatch, caplog, capfd, surfaced_by):
  state = _state()
  ckpt = _ckpt(tmp_path, async_save=surfaced_by != "sync_save")
  ckpt.save(1, state, data_state={"pos": 1})
  ckpt.wait()
  failed = _disk_full(monkeypatch)
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    with pytest.raises(CheckpointSaveError) as err:
      if surfaced_by == "sync_save":
        ckpt.save(2, state, data_state={"pos": 2})
      else:
        assert ckpt.save(2, state, data_state={"pos": 2})  # returns: the write is async
        {"wait": ckpt.wait, "close": ckpt.close,
         "next_save": lambda: ckpt.save(3, state, data_state={})}[surfaced_by]()
    ckpt.wait()  # raised once: not again
  assert len(failed) >= (1 if surfaced_by == "sync_save" else 2)  # orbax's writers failed ...
  message = str(err.value)  # ... and this is the one error
  assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
  assert err.value.step == 2 and str(tmp_path / "2") in message
  assert "No space left on device" in message and "free disk space" in message
  assert "[1] are intact" in message
  orbax_errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(orbax_errors) <= 1 and not any(r.exc_info for r in orbax_errors)
  assert "Traceback" not in capfd.readouterr().err
  monkeypatch.undo()
  if surfaced_by == "next_save":  # the caller may go on: the next save is a new attempt
    assert ckpt.save(3, state, data_state={"pos": 3})
  ckpt.close()
  ckpt.close()
  assert "Traceback" not in capfd.readouterr().err
  with _ckpt(tmp_path) as ckpt:
    _, data_state, _, step = ckpt.restore(_abstract(state))
  expected = 3 if surfaced_by == "next_save" else 1
  assert (step, data_state) == (expected, {"pos": expected})
  assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*"))
