"""Checkpointer: exact round trips, retention, async saves, atomicity and corruption handling."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.path import atomicity

from jaxpost.train.checkpoint import Checkpointer, CheckpointCorruptError, _KeepLastAndBest
from jaxpost.train.step import TrainState, init_state

# A failed orbax restore (the corruption tests) used to leave tensorstore reads pending on a
# closed event loop, reported much later as unraisable "Event loop is closed" errors; the
# Checkpointer now drains those loops, and any such report fails the test that sees it.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

_OPT = optax.adamw(1e-2)


def _state(seed: int = 0) -> TrainState:
  """A TrainState after one AdamW update: non-trivial moments, f32 + bf16 + int32 + a key."""
  return _jit_state(jnp.int32(seed))


@jax.jit
def _jit_state(seed: jax.Array) -> TrainState:
  k = jax.random.key(seed)
  params = {"w": jax.random.normal(k, (64, 64), jnp.float32),
            "b": jax.random.normal(jax.random.fold_in(k, 1), (64,)).astype(jnp.bfloat16)}
  state = init_state(params, _OPT, jax.random.key(seed + 100))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, opt_state = _OPT.update(grads, state.opt_state, params)
  return state.replace(params=optax.apply_updates(params, updates), opt_state=opt_state,
                       step=seed + 1, bad_steps=seed % 3)


def _bits(tree) -> list[tuple[str, bytes]]:
  """(dtype, raw bytes) of every leaf; typed keys by their key data."""
  out = []
  for x in jax.tree.leaves(tree):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      out.append((str(x.dtype), np.asarray(jax.random.key_data(x)).tobytes()))
    else:
      out.append((str(x.dtype), np.asarray(x).tobytes()))
  return out


def _abstract(state, sharding=None):
  """What the trainer passes: eval_shape + the shardings the train step uses."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding or x.sharding), state)


def _ckpt(path: Path, **kwargs) -> Checkpointer:
  kwargs.setdefault("save_every", 1)
  return Checkpointer(path, **kwargs)


def test_round_trip_is_bitwise_with_adamw_state_and_typed_key(tmp_path):
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(1, state, data_state={"epoch": 0, "offset": 17, "order": [3, 1]},
                     metrics={"eval/loss": jnp.float32(1.25), "loss": 2.0})
    restored, data_state, metrics, step = ckpt.restore(_abstract(state))
  assert step == 1
  assert data_state == {"epoch": 0, "offset": 17, "order": [3, 1]}
  assert metrics == {"eval/loss": 1.25, "loss": 2.0}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert _bits(restored) == _bits(state)
  assert restored.params["b"].dtype == jnp.bfloat16 and restored.step.dtype == jnp.int32
  assert restored.rng.dtype == state.rng.dtype  # a typed key again, not raw uint32
  np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(restored.rng, 5)),
                                jax.random.key_data(jax.random.fold_in(state.rng, 5)))


def test_restore_places_every_leaf_on_its_named_sharding(tmp_path):
  state = _state(1)
  mesh = jax.make_mesh((1,), ("fsdp",))
  row = NamedSharding(mesh, PartitionSpec("fsdp"))
  rep = NamedSharding(mesh, PartitionSpec())
  abstract = _abstract(state, rep).replace(params={
      "w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=row),
      "b": jax.ShapeDtypeStruct((64,), jnp.bfloat16, sharding=rep)})
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(4, state, data_state={})
    restored, _, metrics, _ = ckpt.restore(abstract)
  assert metrics is None
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert got.sharding == want.sharding
  assert _bits(restored) == _bits(state)


def test_save_every_force_and_no_overwrite(tmp_path):
  state = _state()
  with _ckpt(tmp_path, save_every=5, async_save=False) as ckpt:
    assert not ckpt.save(3, state, data_state={})
    assert ckpt.save(5, state, data_state={})
    assert ckpt.save(7, state, data_state={}, force=True)
    assert not ckpt.save(7, state, data_state={}, force=True)  # final save at a saved step
    assert ckpt.all_steps() == [5, 7]
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(10, state, data_state={"x": object()})


def test_keep_last_prunes_oldest(tmp_path):
  state = _state()
  with _ckpt(tmp_path, keep_last=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, state, data_state={"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


@pytest.mark.parametrize("mode,losses,kept", [
    ("min", [3.0, 1.0, 2.0, 4.0], [2, 4]),
    ("max", [3.0, 9.0, 2.0, 4.0], [2, 4]),
])
def test_keep_best_survives_keep_last_and_restarts(tmp_path, mode, losses, kept):
  state = _state()
  with _ckpt(tmp_path, keep_last=1, keep_best=1, best_mode=mode) as ckpt:
    for step, loss in enumerate(losses, start=1):
      ckpt.save(step, state, data_state={}, metrics={"eval/loss": loss})
    ckpt.wait()
    assert ckpt.all_steps() == kept
  # A new run reads the metrics back from disk: the best is still protected, and a step
  # without the metric is kept only while it is the latest.
  with _ckpt(tmp_path, keep_last=1, keep_best=1, best_mode=mode) as ckpt:
    ckpt.save(5, state, data_state={}, metrics={"loss": 0.0})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5]


def test_retention_policy_is_a_union_of_last_and_best():
  info = lambda step, metrics: SimpleNamespace(step=step, metrics=metrics)  # noqa: E731
  checkpoints = [info(1, {"eval/loss": 0.5}), info(2, {"eval/loss": 0.5}),
                 info(3, {"eval/loss": 0.1}), info(4, {"eval/loss": math.nan}), info(5, None),
                 info(6, {"eval/loss": 0.7}), info(7, {}), info(8, {"eval/loss": 0.9})]
  # Step 3 is a folder that is not a finalised checkpoint: never best, never deleted. Step 8
  # is being written: it counts although its folder is not finalised yet.
  policy = _KeepLastAndBest(2, 2, "eval/loss", "min", is_finalised=lambda s: s not in (3, 8),
                            in_flight=8)
  keep = policy.should_preserve(checkpoints, context=None)
  assert [c.step for c, k in zip(checkpoints, keep) if k] == [1, 2, 3, 7, 8]
  policy = _KeepLastAndBest(1, 1, "eval/loss", "max", is_finalised=lambda s: True)
  keep = policy.should_preserve(checkpoints, context=None)
  assert [c.step for c, k in zip(checkpoints, keep) if k] == [8]


def _gate_commit(monkeypatch, *, fail: bool = False) -> threading.Event:
  """Hold (or fail) orbax's final atomic rename of a step until the returned event is set."""
  release = threading.Event()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if ".orbax-checkpoint-tmp" in self.get().name and self.get().name[0].isdigit():
      await asyncio.to_thread(release.wait, 30)
      if fail:
        raise OSError("simulated crash before the atomic rename")
    return await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  return release


def test_async_save_returns_before_commit_and_state_can_be_donated(tmp_path, monkeypatch):
  state = _state()
  expected = _bits(state)
  release = _gate_commit(monkeypatch)
  with _ckpt(tmp_path) as ckpt:
    assert ckpt.save(2, state, data_state={"pos": 2})
    # The write is still in flight: only finalised checkpoints count.
    assert ckpt.latest_step() is None
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()
    # The training loop goes on and donates the state's buffers.
    bump = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p * 2, s.params)),
                   donate_argnums=0)
    jax.block_until_ready(bump(state))
    release.set()
    ckpt.wait()
    assert ckpt.latest_step() == 2
    restored, data_state, _, _ = ckpt.restore(_abstract(_state()))
  assert data_state == {"pos": 2}
  assert _bits(restored) == expected


def test_half_written_checkpoints_are_ignored(tmp_path):
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    ckpt.save(5, state, data_state={"pos": 5})
    # What a crash leaves: orbax's temporary folder, and step folders without the commit
    # marker or without an item.
    tmp = tmp_path / "9.orbax-checkpoint-tmp" / "state"
    tmp.mkdir(parents=True)
    (tmp / "_METADATA").write_text("{}")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "_CHECKPOINT_METADATA").write_text("{}")
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "commit_success.txt").write_text("ok")
    (tmp_path / "7" / "state").mkdir()
    assert ckpt.latest_step() == 5
    assert ckpt.all_steps() == [5]
    _, data_state, _, step = ckpt.restore(_abstract(state))
    assert (step, data_state) == (5, {"pos": 5})
  # A new run resumes from step 5 and removes orbax's temporary folders (in the background,
  # finished before its first save). The unfinalised folders 7 and 8 neither count towards
  # keep_last (step 5 survives) nor get deleted.
  with _ckpt(tmp_path, keep_last=2) as ckpt:
    assert ckpt.latest_step() == 5
    ckpt.save(10, state, data_state={})
    ckpt.wait()
    assert ckpt.all_steps() == [5, 10]
  assert not (tmp_path / "9.orbax-checkpoint-tmp").exists()
  assert (tmp_path / "7").is_dir() and (tmp_path / "8").is_dir()


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  state = _state()
  with _ckpt(tmp_path, keep_last=1) as ckpt:
    ckpt.save(1, state, data_state={"pos": 1})
    ckpt.wait()
    _gate_commit(monkeypatch, fail=True).set()
    ckpt.save(2, _state(1), data_state={"pos": 2})
    with pytest.raises(OSError, match="simulated crash"):
      ckpt.wait()
    # keep_last=1 must not have pruned step 1: pruning follows a successful commit only.
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()
    restored, data_state, _, step = ckpt.restore(_abstract(state))
  assert (step, data_state) == (1, {"pos": 1})
  assert _bits(restored) == _bits(state)


def _largest_file(folder: Path) -> Path:
  """The biggest data file of an item (not orbax's commit marker)."""
  files = [p for p in folder.rglob("*") if p.is_file() and p.name != "commit_success.txt"]
  return max(files, key=lambda p: p.stat().st_size)


_CORRUPTIONS = {
    "truncated_data": lambda d: _largest_file(d / "state").write_bytes(b""),
    "deleted_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "garbage_array_metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "unreadable_step_metadata": lambda d: (d / "_CHECKPOINT_METADATA").write_bytes(b"\x00"),
    "truncated_extras": lambda d: _largest_file(d / "extras").write_bytes(b"{"),
}


@pytest.mark.parametrize("corruption", sorted(_CORRUPTIONS))
def test_corrupt_latest_raises_then_falls_back(tmp_path, corruption, caplog):
  old, new = _state(0), _state(1)
  with _ckpt(tmp_path, keep_last=3) as ckpt:
    ckpt.save(1, old, data_state={"pos": 1})
    ckpt.save(2, new, data_state={"pos": 2})
    ckpt.wait()
    _CORRUPTIONS[corruption](tmp_path / "2")
    assert ckpt.latest_step() == 2  # still finalised: only reading reveals the damage
    with pytest.raises(CheckpointCorruptError, match="fallback_on_corrupt=true") as err:
      ckpt.restore(_abstract(old))
    assert err.value.step == 2 and str(tmp_path / "2") in str(err.value)
    with caplog.at_level(logging.WARNING, logger="jaxpost.train.checkpoint"):
      restored, data_state, _, step = ckpt.restore(_abstract(old), fallback=True)
    assert (step, data_state) == (1, {"pos": 1})
    assert _bits(restored) == _bits(old)
    assert "checkpoint step 2" in caplog.text
    # The corrupt folder is set aside, so the resumed run can save step 2 again.
    assert (tmp_path / "2.corrupt").is_dir() and ckpt.latest_step() == 1
    assert ckpt.save(2, new, data_state={"pos": 2})
    ckpt.wait()
    assert ckpt.restore(_abstract(old))[3] == 2


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, data_state={})
    ckpt.save(2, state, data_state={})
    for step in (1, 2):
      (tmp_path / str(step) / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointCorruptError, match="no readable checkpoint"):
      ckpt.restore(_abstract(state), fallback=True)
    assert ckpt.all_steps() == [1, 2]  # nothing is moved when nothing could be restored


def test_mismatched_abstract_state_is_not_reported_as_corruption(tmp_path):
  state = _state()
  with _ckpt(tmp_path, async_save=False) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError):
      ckpt.restore(_abstract(state))
    ckpt.save(1, state, data_state={})
    wrong_dtype = _abstract(state).replace(params={
        "w": jax.ShapeDtypeStruct((64, 64), jnp.bfloat16, sharding=state.params["w"].sharding),
        "b": _abstract(state).params["b"]})
    with pytest.raises(ValueError, match=r"params\.w: saved float32\[64, 64\]") as err:
      ckpt.restore(wrong_dtype)
    assert not isinstance(err.value, CheckpointCorruptError)
    extra = _abstract(state).replace(params={**_abstract(state).params, "c": _abstract(state).step})
    with pytest.raises(ValueError, match="missing in checkpoint: params.c"):
      ckpt.restore(extra)
