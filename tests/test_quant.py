"""QLoRA base-weight quantisation: codes match a numpy reference, errors, memory, autodiff."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import init_params
from jaxpost.peft.quant import (NF4_TABLE, QuantizedWeight, dequantize, dequantize_params,
                                is_quantized, qeinsum, quantize, quantize_params)
from test_step import CONFIG

# bitsandbytes' published NF4 table, written out again so a typo in the module is caught.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236816, 1.0], np.float32)
INT8_LEVELS = np.arange(-127, 128, dtype=np.float32) / np.float32(127)


def normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_quantize(w, kind, block=64):
  """Plain numpy block quantiser: nearest code by brute force over the whole code book."""
  x_BxK = w.reshape(-1, block)
  absmax_B = np.abs(x_BxK).max(axis=1)
  x_BxK = x_BxK / np.where(absmax_B == 0, np.float32(1), absmax_B)[:, None]
  levels = NF4 if kind == "nf4" else INT8_LEVELS
  idx = np.abs(x_BxK[..., None] - levels).argmin(axis=-1).reshape(-1)
  if kind == "nf4":
    return (idx[0::2] * 16 + idx[1::2]).astype(np.uint8), absmax_B
  return (idx - 127).astype(np.int8), absmax_B


def reference_double_quant(absmax_B, block=256):
  """Mean-centred scales in symmetric int8 blocks: (codes, steps, offset)."""
  offset = absmax_B.mean(dtype=np.float32)
  centred = absmax_B - offset
  nsb = -(-centred.size // block)
  padded_JxC = np.zeros(nsb * block, np.float32)
  padded_JxC[:centred.size] = centred
  padded_JxC = padded_JxC.reshape(nsb, block)
  step_J = np.abs(padded_JxC).max(axis=1) / np.float32(127)
  codes = np.round(padded_JxC / step_J[:, None]).astype(np.int8).reshape(-1)[:centred.size]
  return codes, step_J, offset


def errors(approx, exact):
  e = np.asarray(approx, np.float64) - exact
  return np.abs(e).mean(), np.sqrt((e ** 2).mean())


def test_nf4_table_is_bitsandbytes():
  np.testing.assert_array_equal(NF4_TABLE, NF4)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_codes_match_numpy_reference(kind):
  w = normal((96, 64))
  q = quantize(jnp.asarray(w), kind, double_quant=False)
  codes, absmax = reference_quantize(w, kind)
  np.testing.assert_array_equal(q.codes, codes)
  np.testing.assert_array_equal(q.scale_codes, absmax)
  levels = NF4 if kind == "nf4" else INT8_LEVELS
  idx = (np.stack([codes >> 4, codes & 15], -1).reshape(-1) if kind == "nf4"
         else codes.astype(np.int64) + 127)
  expect = (levels[idx].reshape(-1, 64) * absmax[:, None]).reshape(w.shape)
  np.testing.assert_allclose(dequantize(q, jnp.float32), expect, rtol=1e-6, atol=0)


def test_nf4_error_on_standard_normal_is_in_the_published_range():
  w = normal((96, 64))
  mae, rmse = errors(dequantize(quantize(jnp.asarray(w), "nf4", double_quant=False)), w)
  # Measured 0.0729 / 0.0924; QLoRA/bitsandbytes NF4 at blocksize 64: ~0.07-0.1 mean-abs.
  assert 0.07 < mae < 0.1
  assert mae < rmse < 0.1


def test_int8_error_is_uniform_rounding_error():
  w = normal((96, 64))
  q = quantize(jnp.asarray(w), "int8", double_quant=False)
  mae, rmse = errors(dequantize(q), w)
  # Rounding to a grid of step a/127 errs uniformly in +-step/2: mean |e| = step/4 and
  # rms = step/sqrt(12), except the block's absmax itself which is exact (1 value in 64).
  step_B = np.asarray(q.scale_codes) / 127
  exact_share = 63 / 64
  np.testing.assert_allclose(mae, exact_share * np.mean(step_B / 4), rtol=0.05)
  np.testing.assert_allclose(rmse, np.sqrt(exact_share * np.mean(step_B ** 2 / 12)), rtol=0.05)
  assert mae < 0.006  # measured 0.0049 (rms 0.0058)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_double_quant_matches_reference_and_adds_little_error(kind):
  w = normal((96, 256))  # 384 absmax scales: two scale blocks, the second one padded
  single = quantize(jnp.asarray(w), kind, double_quant=False)
  double = quantize(jnp.asarray(w), kind)
  np.testing.assert_array_equal(double.codes, single.codes)
  codes, step, offset = reference_double_quant(np.asarray(single.scale_codes))
  np.testing.assert_array_equal(double.scale_codes, codes)
  np.testing.assert_allclose(double.scale_scales, step, rtol=1e-6)
  np.testing.assert_allclose(double.offset, offset, rtol=1e-6)
  assert double.scale_codes.shape == (384,) and double.scale_scales.shape == (2,)

  w1, w2 = np.asarray(dequantize(single)), np.asarray(dequantize(double))
  # A scale errs by at most half its step and a code's magnitude is at most 1 (nf4) or 127/127.
  step_B = np.repeat(step, 256)[:384]
  bound = (step_B / 2 * (1 + 1e-5))[:, None]
  assert np.all(np.abs(w2 - w1).reshape(-1, 64) <= bound)
  (mae1, rmse1), (mae2, rmse2) = errors(w1, w), errors(w2, w)
  # Measured: nf4 mean-abs 0.07277 -> 0.07282, int8 0.00503 -> 0.00517.
  assert abs(mae2 - mae1) < 3e-4 and abs(rmse2 - rmse1) < 3e-4


def test_zero_blocks_stay_exactly_zero():
  w = normal((96, 256))
  w[3, :64] = 0.0
  for kind in ("nf4", "int8"):
    out = np.asarray(dequantize(quantize(jnp.asarray(w), kind)))
    np.testing.assert_array_equal(out[3, :64], 0.0)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(dequantize(quantize(jnp.zeros_like(w), kind)), 0.0)


def test_bits_per_parameter():
  w = jnp.asarray(normal((96, 256)))  # 24576 values: 384 scales in 2 scale blocks
  n = w.size
  nf4 = quantize(w, "nf4")
  # 4-bit codes, 8-bit scales, a float32 step per 256 scales (the last block partly padding)
  # and one float32 offset: 4 + 8/64 + 32/(64*256) = 4.127 bits for large tensors.
  assert nf4.bits_per_param == pytest.approx(4 + 8 / 64 + (2 * 32 + 32) / n, abs=1e-9)
  assert nf4.bits_per_param == pytest.approx(4.127, abs=2e-3)
  assert quantize(w, "nf4", double_quant=False).bits_per_param == 4.5
  assert quantize(w, "int8").bits_per_param == pytest.approx(8.127, abs=2e-3)
  assert quantize(w, "int8", double_quant=False).bits_per_param == 8.5
  assert nf4.nbytes == n // 2 + n // 64 + 2 * 4 + 4


@pytest.fixture(scope="module")
def params():
  return init_params(CONFIG, jax.random.key(0))


def test_quantize_params_replaces_only_targets_and_saves_memory(params):
  qparams = quantize_params(params)
  targets = {("attn", t) for t in "qkvo"} | {("mlp", t) for t in ("gate", "up", "down")}
  for group, name in targets:
    node, w = qparams["layers"][group][name], params["layers"][group][name]
    assert is_quantized(node) and node.kind == "nf4" and node.double_quant
    assert node.shape == w.shape[1:] and node.leading_shape == w.shape[:1]
    assert not is_quantized(w)  # the input tree is left as it was
  flat_q = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]
  for path, leaf in flat_q:
    if not is_quantized(leaf):
      original = functools.reduce(lambda t, k: t[k.key], path, params)
      assert leaf is original, path  # norms, embeddings, LM head untouched

  quantized = [x for x in jax.tree.leaves(qparams, is_leaf=is_quantized) if is_quantized(x)]
  assert len(quantized) == 7
  bf16_bytes = sum(2 * x.size for x in quantized)
  q_bytes = sum(x.nbytes for x in quantized)
  assert bf16_bytes / q_bytes > 3.5  # measured 3.87 on this tiny model (3.88 asymptotically)

  back = dequantize_params(qparams, jnp.float32)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for group, name in targets:
    w, w2 = params["layers"][group][name], back["layers"][group][name]
    assert w2.shape == w.shape and w2.dtype == jnp.float32
    mae, _ = errors(w2, np.asarray(w))
    assert 0.07 < mae / float(jnp.std(w)) < 0.1  # the NF4 error of N(0, std) weights

  only_mlp = quantize_params(params, targets=("gate", "up", "down"), kind="int8")
  assert not is_quantized(only_mlp["layers"]["attn"]["q"])
  assert only_mlp["layers"]["mlp"]["down"].kind == "int8"
  with pytest.raises(ValueError, match="'qkv'"):
    quantize_params(params, targets=("qkv",))


@pytest.mark.parametrize("kind,double_quant", [("nf4", True), ("nf4", False), ("int8", True)])
def test_shapes_dtypes_and_slicing(kind, double_quant):
  L, D, H, Dh = 3, 64, 4, 16
  n, nb = D * H * Dh, D * H * Dh // 64
  w_LxDxHxDh = jnp.asarray(normal((L, D, H, Dh)))
  q = quantize(w_LxDxHxDh, kind, leading=1, double_quant=double_quant)
  assert q.shape == (D, H, Dh) and q.leading_shape == (L,)
  if kind == "nf4":
    assert q.codes.shape == (L, n // 2) and q.codes.dtype == jnp.uint8
  else:
    assert q.codes.shape == (L, n) and q.codes.dtype == jnp.int8
  if double_quant:
    assert q.scale_codes.shape == (L, nb) and q.scale_codes.dtype == jnp.int8
    assert q.scale_scales.shape == (L, 1) and q.scale_scales.dtype == jnp.float32
    assert q.offset.shape == (L,) and q.offset.dtype == jnp.float32
  else:
    assert q.scale_codes.shape == (L, nb) and q.scale_codes.dtype == jnp.float32
    assert q.scale_scales.shape == (L, 0) and q.offset.shape == (L, 0)
  full = dequantize(q, jnp.float32)
  assert full.shape == (L, D, H, Dh) and full.dtype == jnp.float32

  for i in range(L):
    layer = jax.tree.map(lambda a: a[i], q)  # what lax.scan hands the layer body
    assert isinstance(layer, QuantizedWeight) and layer.leading_shape == ()
    np.testing.assert_array_equal(dequantize(layer, jnp.float32), full[i])
    alone = quantize(w_LxDxHxDh[i], kind, double_quant=double_quant)  # slices are independent
    chex.assert_trees_all_equal(alone, layer)

  two = quantize(w_LxDxHxDh.reshape(1, L, D, H * Dh), kind, leading=2, double_quant=double_quant)
  assert two.leading_shape == (1, L) and two.shape == (D, H * Dh)
  np.testing.assert_array_equal(dequantize(two, jnp.float32).reshape(L, D, H, Dh), full)


def test_size_not_divisible_by_block_size_is_a_clear_error():
  with pytest.raises(ValueError, match=r"\(10, 7\)"):
    quantize(jnp.zeros((3, 10, 7)), "nf4", leading=1)
  with pytest.raises(ValueError, match="kind"):
    quantize(jnp.zeros((64,)), "nf3")  # type: ignore[arg-type]


def _avals(jaxpr):
  """Output avals of every equation, sub-jaxprs (jit, checkpoint, scan) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _avals(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _avals(sub)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantise_computes_in_the_requested_dtype(kind):
  w = jnp.asarray(normal((2, 64, 128)))
  q = quantize(w, kind, leading=1)
  out = dequantize(q, jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 and out.shape == w.shape
  # Three bf16 roundings (code value, scale, product), each within 2^-8 relative.
  np.testing.assert_allclose(np.asarray(out, np.float32), dequantize(q, jnp.float32),
                             rtol=3 * 2 ** -8, atol=0)
  jaxpr = jax.make_jaxpr(lambda q: dequantize(q, jnp.bfloat16))(q).jaxpr
  big = [a for a in _avals(jaxpr) if hasattr(a, "shape") and math.prod(a.shape) >= w.size // 2]
  assert big and all(a.dtype != jnp.float32 for a in big), big  # no full-size float32 pass


def test_works_under_jit():
  w = jnp.asarray(normal((2, 64, 128)))
  q = jax.jit(functools.partial(quantize, kind="nf4", leading=1))(w)
  eager = quantize(w, "nf4", leading=1)
  chex.assert_trees_all_equal(q, eager)
  f = jax.jit(dequantize, static_argnums=1)
  np.testing.assert_array_equal(f(q, jnp.bfloat16), dequantize(q, jnp.bfloat16))


def test_gradients_flow_to_inputs_and_scan_keeps_only_codes():
  L, B, D, F = 3, 4, 64, 128
  w_LxDxF = jnp.asarray(normal((L, D, F))) / 8
  q = quantize(w_LxDxF, "nf4", leading=1)
  x_BxD = jnp.asarray(normal((B, D), seed=1))

  def loss(x_BxD, q, matmul):
    def layer(h_BxD, q_layer):
      y_BxF = matmul(h_BxD, q_layer)
      return jnp.tanh(y_BxF[:, :D] + y_BxF[:, D:]), None
    return jnp.sum(jax.lax.scan(layer, x_BxD, q)[0] ** 2)

  quantized = lambda h, ql: qeinsum("bd,df->bf", h, ql)  # noqa: E731
  dense = lambda h, ql: h @ dequantize(ql, h.dtype)  # noqa: E731
  g = jax.jit(jax.grad(loss), static_argnums=2)(x_BxD, q, quantized)
  g_dense = jax.grad(loss)(x_BxD, dequantize(q, jnp.float32), lambda h, w: h @ w)
  assert g.shape == x_BxD.shape and float(jnp.abs(g).max()) > 0
  np.testing.assert_allclose(g, g_dense, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(loss)(x_BxD, q, dense), g, rtol=1e-5, atol=1e-6)

  def residuals(matmul):
    _, vjp_fn = jax.vjp(lambda x: loss(x, q, matmul), x_BxD)
    return [(r.shape, r.dtype) for r in jax.tree.leaves(vjp_fn)]

  weight = ((L, D, F), jnp.dtype(jnp.float32))
  # A plain dequantise is saved for the backward pass, in full precision for every layer ...
  assert weight in residuals(dense)
  # ... while qeinsum keeps the codes and recomputes each layer's weight in the backward.
  saved = residuals(quantized)
  assert weight not in saved and ((L, D * F // 2), jnp.dtype(jnp.uint8)) in saved
