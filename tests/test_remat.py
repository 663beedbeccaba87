"""Rematerialisation policies (`forward(..., remat=...)`, `model.remat`) change what the
backward pass keeps, never what it computes: every policy gives no-remat's loss and gradients,
and keeping less ("full") compiles to less temporary memory than keeping everything ("none")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import sft_loss
from jaxpost.models import ModelConfig, init_params
from jaxpost.models.transformer import REMAT_POLICIES

CONFIG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     qkv_bias=True, qk_norm=True)


def _batch(B, T, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[0, T // 2:] = 2
  seg[1, T - 3:] = 0
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": seg != 0,
          "segment_ids": seg, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def _value_and_grad(policy, attention="dense"):
  loss = functools.partial(sft_loss, config=CONFIG, remat=policy, attention=attention)
  return jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)[0]))


# blockwise attention's custom_vjp under the policies that recompute it or name its inputs
@pytest.mark.parametrize("attention,policies", [
    ("dense", tuple(p for p in REMAT_POLICIES if p != "none")),
    ("blockwise", ("full", "qkv_attn_out"))])
def test_every_policy_equals_no_remat(attention, policies):
  params = init_params(CONFIG, jax.random.key(0))
  batch = _batch(2, 24)
  loss0, grads0 = _value_and_grad("none", attention)(params, batch)
  for policy in policies:
    loss, grads = _value_and_grad(policy, attention)(params, batch)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads),
                                                            jax.tree.leaves(grads0)))
    print(f"{attention} remat={policy}: loss diff {abs(float(loss - loss0)):.1e}, "
          f"grad diff {err:.1e}")
    assert abs(float(loss - loss0)) < 1e-6 and err < 1e-6


def test_full_remat_keeps_less_memory():
  params = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(4, 512))
  temp = {p: _value_and_grad(p).lower(params, batch).compile().memory_analysis()
          .temp_size_in_bytes for p in ("none", "full")}
  print({p: f"{b / 2**20:.2f} MiB" for p, b in temp.items()})
  assert temp["full"] < temp["none"]
