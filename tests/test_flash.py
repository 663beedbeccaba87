"""Blockwise (flash-style) attention equals dense attention, and its memory grows linearly.

Values and gradients (q, k, v) are compared with `attend(config, q, k, v, attention_mask(...))`
on real tokens within 1e-5; padding rows (segment 0) come out as 0 from the blockwise path
(dense gives them the mean of the values), so the cotangent is zero there, as a loss's mask
makes it. Memory: XLA's memory analysis of the compiled SFT loss gradient (no timing).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import sft_loss
from jaxpost.models import ModelConfig, Prefix, forward, init_params
from jaxpost.models.attention import PREFIX_SEGMENT, attend, attention_mask
from jaxpost.models.flash import (AUTO_BLOCKWISE_MIN, blockwise_attend, choose_attention,
                                  cudnn_attend)
from jaxpost.models.sites import Capture

TOL = 1e-5


def _config(num_heads=4, num_kv_heads=2, softcap=None, window=None):
  return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=1,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8,
                     intermediate_size=32, attn_logit_softcap=softcap,
                     layer_types=("sliding",) if window else (), sliding_window=window)


def _qkv(config, B, T, S, seed=0):
  rng = np.random.default_rng(seed)
  H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
  q = jnp.asarray(2 * rng.normal(size=(B, T, H, Dh)), jnp.float32)
  k = jnp.asarray(2 * rng.normal(size=(B, K, S, Dh)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(B, K, S, Dh)), jnp.float32)
  return q, k, v, jnp.asarray(rng.normal(size=q.shape), jnp.float32)


def _packed_segments(B, T):
  """Row 0: three packed examples then padding; row 1: one example after left padding."""
  seg = np.ones((B, T), np.int32)
  seg[0, T // 3:2 * T // 3] = 2
  seg[0, 2 * T // 3:] = 3
  seg[0, T - 4:] = 0
  seg[1, :5] = 0
  return jnp.asarray(seg)


def _compare(config, q, k, v, ct, q_slots, k_slots, q_seg, k_seg, window=None, branches=(),
             jit_window=False, **blocks):
  """Max abs differences (values, dq, dk, dv) of blockwise against dense on real rows."""
  real = (q_seg != 0)[:, :, None, None]
  ct = jnp.where(real, ct, 0.0)

  def dense(q, k, v, w):
    return attend(config, q, k, v, attention_mask(q_slots, k_slots, q_seg, k_seg, w, *branches))

  def blockwise(q, k, v, w):
    return blockwise_attend(config, q, k, v, q_slots, k_slots, q_seg, k_seg, w, *branches,
                            **blocks)

  errors = []
  outs = []
  for fn in (dense, blockwise):
    def loss(q, k, v, w, fn=fn):
      return jnp.sum(fn(q, k, v, w) * ct)
    if jit_window:  # the window a traced scalar, as in Gemma's mixed-layer scan
      run = jax.jit(lambda q, k, v, w, fn=fn: (fn(q, k, v, w),
                                               jax.grad(loss, (0, 1, 2))(q, k, v, w, fn)))
    else:
      run = jax.jit(lambda q, k, v, fn=fn: (fn(q, k, v, window),
                                            jax.grad(loss, (0, 1, 2))(q, k, v, window, fn)))
    outs.append(run(q, k, v, jnp.int32(window)) if jit_window else run(q, k, v))
  (o_d, g_d), (o_b, g_b) = outs
  errors.append(float(jnp.max(jnp.abs(jnp.where(real, o_d - o_b, 0.0)))))
  errors += [float(jnp.max(jnp.abs(a - b))) for a, b in zip(g_d, g_b)]
  assert all(np.isfinite(errors))
  return errors


CASES = {
    # name: (config kwargs, window, traced window, branches, T, block sizes)
    "segments_gqa": (dict(), None, False, False, 37, dict(block_q=8, block_k=16)),
    "mha_one_block": (dict(num_kv_heads=4), None, False, False, 20, {}),
    "mqa_window": (dict(num_kv_heads=1), 7, False, False, 45, dict(block_q=16, block_k=8)),
    "traced_window_softcap": (dict(softcap=5.0), 5, True, False, 41, dict(block_q=8, block_k=8)),
    "branches_window": (dict(), 9, False, True, 33, dict(block_q=16, block_k=16)),
    "softcap_branches": (dict(softcap=3.0, num_kv_heads=1), None, False, True, 50,
                         dict(block_q=32, block_k=8)),
}


@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_dense(case):
  kw, window, traced, branched, T, blocks = CASES[case]
  config = _config(**kw)
  B = 2
  q, k, v, ct = _qkv(config, B, T, T)
  seg = _packed_segments(B, T)
  slots = jnp.arange(T, dtype=jnp.int32)
  branches = ()
  if branched:  # trunk 0, then branches 1 and 2 alternating in runs of 5
    br = jnp.asarray(np.where(np.arange(T) < T // 3, 0, 1 + (np.arange(T) // 5) % 2),
                     jnp.int32)
    branches = (jnp.broadcast_to(br, (B, T)),) * 2
  errors = _compare(config, q, k, v, ct, slots, slots, seg, seg, window, branches,
                    jit_window=traced, **blocks)
  print(case, "max abs diff value, dq, dk, dv:", errors)
  assert max(errors) < TOL


def test_blockwise_with_prefix_slots():
  """Queries after a shared prefix (prompt/prefix tuning): q slots P.., keys 0..P+T."""
  config, B, P, T = _config(), 2, 6, 29
  q, k, v, ct = _qkv(config, B, T, P + T, seed=1)
  seg = _packed_segments(B, T)
  k_seg = jnp.concatenate([jnp.full((B, P), PREFIX_SEGMENT, jnp.int32), seg], axis=1)
  errors = _compare(config, q, k, v, ct, P + jnp.arange(T, dtype=jnp.int32),
                    jnp.arange(P + T, dtype=jnp.int32), seg, k_seg, block_q=8, block_k=8)
  assert max(errors) < TOL


def test_padding_rows_are_zero():
  config, B, T = _config(), 2, 24
  q, k, v, _ = _qkv(config, B, T, T)
  seg = _packed_segments(B, T)
  slots = jnp.arange(T, dtype=jnp.int32)
  out = blockwise_attend(config, q, k, v, slots, slots, seg, seg, block_q=8, block_k=8)
  assert out.shape == q.shape
  assert float(jnp.max(jnp.abs(jnp.where((seg == 0)[:, :, None, None], out, 0.0)))) == 0.0
  assert float(jnp.min(jnp.abs(out[0, 0]))) > 0.0


GEMMA = ModelConfig(model_type="gemma2", vocab_size=64, hidden_size=32, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                    layer_types=("sliding", "full"), sliding_window=6, norm_plus_one=True,
                    sandwich_norm=True, scale_embeddings=True, activation="gelu_tanh",
                    attn_logit_softcap=20.0, final_logit_softcap=30.0, tie_embeddings=True)


@pytest.mark.parametrize("remat", [False, "dots"])
def test_forward_blockwise_equals_dense(remat):
  """Gemma 2 shape: sliding and full layers in one scan (traced window), soft-capping, GQA,
  packed rows with padding; logits and parameter gradients on real tokens."""
  params = init_params(GEMMA, jax.random.key(0))
  B, T = 2, 40
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
  seg = _packed_segments(B, T)
  real = (seg != 0).astype(jnp.float32)

  def loss(p, attention):
    logits = forward(GEMMA, p, tokens, segment_ids=seg, remat=remat, attention=attention).logits
    # a token mean, as the losses take (a sum over 70 tokens scales gradients to ~100)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * real) / jnp.sum(real), logits

  run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (l_d, logits_d), g_d = run(params, "dense")
  (l_b, logits_b), g_b = run(params, "blockwise")
  diff = float(jnp.max(jnp.abs((logits_d - logits_b) * real[..., None])))
  gdiff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_d),
                                                             jax.tree.leaves(g_b)))
  print(f"forward remat={remat}: logits {diff:.2e}, grads {gdiff:.2e}")
  assert diff < TOL and gdiff < TOL and abs(float(l_d - l_b)) < TOL


def test_forward_with_prefix_blockwise_equals_dense():
  """Prompt/prefix tuning: every row starts from a `Prefix`'s keys (in the internal cache)."""
  params = dict(init_params(GEMMA, jax.random.key(0)))
  rng = np.random.default_rng(0)
  shape = (GEMMA.num_layers, GEMMA.num_kv_heads, 5, GEMMA.head_dim)
  params["prefix"] = Prefix(k=jnp.asarray(rng.normal(size=shape), jnp.float32),
                            v=jnp.asarray(rng.normal(size=shape), jnp.float32),
                            next_pos=jnp.int32(0))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 30)), jnp.int32)
  seg = _packed_segments(2, 30)
  dense, blockwise = (forward(GEMMA, params, tokens, segment_ids=seg, attention=a).logits
                      for a in ("dense", "blockwise"))
  assert float(jnp.max(jnp.abs(jnp.where((seg != 0)[..., None], dense - blockwise, 0.0)))) < TOL


def test_choose_attention():
  c = _config()
  pick = functools.partial(choose_attention, config=c, dtype=jnp.float32, wants_probs=False,
                           cached=False)
  assert pick("auto", T=1023, S=1024) == "dense"
  assert pick("auto", T=1024, S=1024) == "blockwise"
  assert AUTO_BLOCKWISE_MIN == 1024 * 1024
  assert pick("blockwise", T=8, S=8) == "blockwise"
  assert pick("dense", T=8192, S=8192) == "dense"
  assert pick("blockwise", T=1, S=8192, cached=True) == "dense"  # decode with a KV cache
  assert pick("auto", T=4096, S=4096, wants_probs=True) == "dense"
  with pytest.raises(ValueError, match="attn_probs"):
    pick("blockwise", T=8, S=8, wants_probs=True)
  with pytest.raises(ValueError, match="unknown 'flash'"):
    pick("flash", T=8, S=8)
  if jax.default_backend() == "cpu":
    with pytest.warns(UserWarning, match="no GPU.*blockwise"):
      assert pick("cudnn", T=8, S=8) == "blockwise"


def test_forward_selection_and_cudnn_fallback():
  config = _config(window=5)
  params = init_params(config, jax.random.key(1))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 24)), jnp.int32)
  seg = _packed_segments(2, 24)
  real = (seg != 0)[..., None]
  outs = {}
  for attention in ("dense", "blockwise", "cudnn", "auto"):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      outs[attention] = forward(config, params, tokens, segment_ids=seg,
                                attention=attention).logits
    assert outs[attention].shape == (2, 24, 64)
    fell_back = any("using the blockwise JAX attention" in str(w.message) for w in caught)
    assert fell_back == (attention == "cudnn" and jax.default_backend() != "gpu")
  for attention in ("blockwise", "cudnn", "auto"):
    assert float(jnp.max(jnp.abs(jnp.where(real, outs[attention] - outs["dense"], 0.0)))) < TOL
  with pytest.raises(ValueError, match="attn_probs"):
    forward(config, params, tokens, attention="blockwise", capture=[Capture("attn_probs")])
  # the attn_probs site under "auto" stays dense and is captured
  out = forward(config, params, tokens, capture=["attn_probs"])
  assert out.captured["attn_probs"].shape == (1, 2, 4, 24, 24)


@pytest.mark.parametrize("window,traced,branched", [(None, False, False), (5, False, True),
                                                    (5, True, False)])
def test_cudnn_call_mapping(window, traced, branched):
  """The arguments `cudnn_attend` gives `jax.nn.dot_product_attention` (causal, left window,
  segment/branch mask) mean the same as dense attention, run through its XLA implementation."""
  config, B, T = _config(), 2, 30
  q, k, v, _ = _qkv(config, B, T, T, seed=3)
  seg = _packed_segments(B, T)
  slots = jnp.arange(T, dtype=jnp.int32)
  branches = ()
  if branched:
    br = jnp.asarray(np.where(np.arange(T) < 8, 0, 1 + np.arange(T) % 2), jnp.int32)
    branches = (jnp.broadcast_to(br, (B, T)),) * 2
  dense = attend(config, q, k, v, attention_mask(slots, slots, seg, seg, window, *branches))
  run = jax.jit(lambda w: cudnn_attend(config, q, k, v, slots, seg, w, *branches,
                                       implementation="xla"))
  out = run(jnp.int32(window)) if traced else cudnn_attend(
      config, q, k, v, slots, seg, window, *branches, implementation="xla")
  assert out.shape == q.shape
  assert float(jnp.max(jnp.abs(jnp.where((seg != 0)[:, :, None, None], out - dense, 0.0)))) < TOL


MEM = ModelConfig(model_type="llama", vocab_size=256, hidden_size=32, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                  tie_embeddings=True)


def _sft_temp_bytes(T: int, attention: str) -> int:
  params = jax.eval_shape(lambda: init_params(MEM, jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((1, T), jnp.int32) for k in
           ("tokens", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct((1, T), jnp.bool_)
  loss = functools.partial(sft_loss, config=MEM, attention=attention)
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)[0]))
  return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly():
  temp = {(a, T): _sft_temp_bytes(T, a) for a in ("dense", "blockwise") for T in (1024, 4096)}
  print("SFT loss+grad temp MiB:",
        {f"{a}@{T}": round(b / 2**20, 2) for (a, T), b in temp.items()})
  assert temp["blockwise", 4096] <= 4 * temp["blockwise", 1024]
  # the check can fail: dense attention's [T, S] buffers grow quadratically
  assert temp["dense", 4096] > 8 * temp["dense", 1024]
  assert temp["blockwise", 4096] < temp["dense", 4096] / 4
