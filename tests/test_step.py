"""The shared update step: one compilation, exact accumulation, NaN guard, dtype stability."""

from __future__ import annotations

import functools
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from devices import run_on_8_cpu_devices
from jaxpost.losses import sft_loss
from jaxpost.models import ModelConfig, init_params
from jaxpost.train.step import init_state, make_train_step

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)


def random_batch(seed: int, batch: int = 8, seq: int = 16) -> dict:
  """SFT batches with uneven masked-token counts per row (so token means matter)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
  mask = np.zeros((batch, seq), bool)
  for i in range(batch):
    start = rng.integers(1, seq - 1)
    mask[i, start:rng.integers(start + 1, seq + 1)] = True
  return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


LOSS = functools.partial(sft_loss, config=CONFIG)


def fresh(params, opt):
  return init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))


def test_ten_steps_compile_once(params):
  opt = optax.adamw(1e-3)
  step = make_train_step(LOSS, opt)
  state = fresh(params, opt)
  losses = []
  for i in range(10):
    state, m = step(state, random_batch(i % 3), {})
    losses.append(float(m["loss"]))
  assert step._cache_size() == 1
  assert int(state.step) == 10
  assert losses[-1] < losses[0]


def test_four_micro_batches_equal_one_big_batch(params):
  opt = optax.sgd(0.5)
  batch = random_batch(7)
  one = make_train_step(LOSS, opt, micro_batches=1)
  four = make_train_step(LOSS, opt, micro_batches=4)
  s1, m1 = one(fresh(params, opt), batch, {})
  s4, m4 = four(fresh(params, opt), batch, {})
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6, rtol=0)
  # a plain mean of per-micro-batch means would differ: the rows have uneven token counts
  masks = np.asarray(batch["loss_mask"]).reshape(2, 4, -1).swapaxes(0, 1).reshape(4, -1)
  assert len(set(masks.sum(-1))) > 1


def test_non_finite_step_is_skipped_and_counted(params):
  def loss(p, batch, rng):
    value, metrics = LOSS(p, batch, rng)
    return value * batch["scale"][0], metrics

  opt = optax.adamw(1e-2)
  step = make_train_step(loss, opt)
  state = fresh(params, opt)
  good = dict(random_batch(0), scale=np.ones(8, np.float32))
  bad = dict(good, scale=np.full(8, np.nan, np.float32))
  state, _ = step(state, good, {})
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  for i in range(2):
    state, m = step(state, bad, {})
    assert float(m["skipped"]) == 1.0 and int(state.bad_steps) == i + 1
  chex.assert_trees_all_equal(before, (state.params, state.opt_state))
  state, m = step(state, good, {})
  assert float(m["skipped"]) == 0.0 and int(state.bad_steps) == 0 and int(state.step) == 4


def test_bf16_params_stay_bf16(params):
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  opt = optax.adamw(1e-3)
  step = make_train_step(LOSS, opt)
  state, m = step(init_state(p16, opt, jax.random.key(0)), random_batch(0), {})
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
  assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))


SHARDED = textwrap.dedent("""
    import functools, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    sys.path.insert(0, sys.argv[1])
    from test_step import CONFIG, random_batch
    from jaxpost.losses import sft_loss
    from jaxpost.models import init_params, param_specs
    from jaxpost.sharding import make_mesh, param_shardings
    from jaxpost.train.step import (batch_sharding, init_state, make_train_step,
                                    state_shardings)

    def run(mesh):
      opt = optax.adamw(1e-2)
      loss = functools.partial(sft_loss, config=CONFIG)
      params = init_params(CONFIG, jax.random.key(0))
      if mesh is None:
        step, state = make_train_step(loss, opt), init_state(params, opt, jax.random.key(1))
      else:
        pshard = param_shardings(param_specs(CONFIG), mesh)
        sshard = state_shardings(pshard, params, opt, mesh)
        state = jax.jit(lambda p: init_state(p, opt, jax.random.key(1)),
                        out_shardings=sshard)(params)
        step = make_train_step(loss, opt, state_sharding=sshard,
                               batch_sharding=batch_sharding(mesh), micro_batches=2)
        assert state.params["layers"]["mlp"]["up"].sharding.spec[1:] == ("fsdp", "tensor")
      losses = []
      for i in range(5):
        state, m = step(state, random_batch(i), {})
        losses.append(float(m["loss"]))
      return np.array(losses)

    one = run(None)
    eight = run(make_mesh(data=2, fsdp=2, tensor=2))
    err = np.abs(one - eight).max()
    print("losses", one, eight, "max diff", err)
    assert err < 1e-5, err
    print("OK")
""")


def test_sharded_8_devices_match_one_device():
  run_on_8_cpu_devices(SHARDED)
