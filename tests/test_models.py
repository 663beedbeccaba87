"""The decoder without torch: structure, masking, white-box outputs, checkpoint errors, golden."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import (CheckpointError, ConfigError, ModelConfig, forward, init_cache,
                            init_params, load_hf, logical_axes, num_params, param_shapes,
                            save_hf, unstack_layers)
from jaxpost.models.safetensors_io import SafetensorsFile, save_file

GOLDEN = Path(__file__).parent / "golden" / "llama"

TINY = ModelConfig(model_type="gemma2", vocab_size=96, hidden_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                   layer_types=("sliding", "full"), sliding_window=8, qk_norm=False,
                   norm_plus_one=True, sandwich_norm=True, scale_embeddings=True,
                   activation="gelu_tanh", query_pre_attn_scalar=16, attn_logit_softcap=50.0,
                   final_logit_softcap=30.0, tie_embeddings=True)
LLAMA = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny():
  return TINY, init_params(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def fwd():
  return jax.jit(forward, static_argnums=0,
                 static_argnames=("return_hidden_states", "remat", "compute_dtype"))


def test_params_carry_logical_axes_matching_their_shapes(tiny):
  config, params = tiny
  axes = logical_axes(config)
  shapes = param_shapes(config)
  leaves = jax.tree.leaves(params)
  axis_leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(leaves) == len(axis_leaves) == len(jax.tree.leaves(shapes))
  for p, a in zip(leaves, axis_leaves):
    assert len(a) == p.ndim
  assert axes["layers"]["attn"]["q"] == ("layers", "embed", "heads", "head_dim")
  assert num_params(config) == sum(p.size for p in leaves)


def test_packed_rows_never_attend_across_examples(tiny, fwd):
  """Two examples packed in one row give the same logits as each alone."""
  config, params = tiny
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 96, 13), rng.integers(0, 96, 11)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None])
  segments = jnp.asarray(np.array([1] * 13 + [2] * 11 + [0, 0])[None])
  got = fwd(config, params, packed, segment_ids=segments).logits[0]
  alone_a = fwd(config, params, jnp.asarray(a[None])).logits[0]
  alone_b = fwd(config, params, jnp.asarray(b[None])).logits[0]
  np.testing.assert_allclose(got[:13], alone_a, atol=1e-5)
  np.testing.assert_allclose(got[13:24], alone_b, atol=1e-5)


def test_causal_and_sliding_window_by_gradients():
  """d logits[t] / d embedding[s] is zero for s > t; a sliding layer alone sees s > t - window."""
  config = TINY.replace(tie_embeddings=False)  # tied, the LM head would touch every embedding
  params = init_params(config, jax.random.key(0))
  T = 20
  tokens = jnp.arange(T)[None] % 96

  def out_at(t, c):
    def f(embed):
      return forward(c, dict(params, embed=embed), tokens).logits[0, t].sum()
    g = jax.jit(jax.grad(f))(params["embed"])
    return np.abs(np.asarray(g[np.asarray(tokens[0])])).sum(-1)  # per position

  g = out_at(10, config)
  assert np.all(g[11:] == 0) and np.all(g[:11] > 0)
  sliding_only = config.replace(layer_types=("sliding", "sliding"))
  g = out_at(19, sliding_only)
  # two stacked sliding layers of window 8 reach back 2 * (8 - 1) positions
  assert np.all(g[:19 - 14] == 0) and np.all(g[19 - 14:] > 0)


def test_hidden_states_and_remat(tiny, fwd):
  config, params = tiny
  tokens = jnp.arange(12)[None]
  out = fwd(config, params, tokens, return_hidden_states=True)
  assert out.hidden_states.shape == (config.num_layers + 1, 1, 12, config.hidden_size)
  assert out.final_hidden.shape == (1, 12, config.hidden_size)
  loss = lambda p, remat: forward(config, p, tokens, remat=remat).logits.mean()  # noqa: E731
  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
  g2 = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
  chex.assert_trees_all_close(g1, g2, atol=1e-7, rtol=0)


def test_wrong_input_shapes_are_named_at_trace_time(tiny, fwd):
  config, params = tiny
  tokens = jnp.zeros((2, 6), jnp.int32)
  with pytest.raises(AssertionError, match=r"forward: tokens must be \[B, T\]"):
    fwd(config, params, tokens[0])
  with pytest.raises(AssertionError, match=r"forward: positions must be \[B, T\]"):
    fwd(config, params, tokens, positions=jnp.arange(6))  # [T] would broadcast silently
  with pytest.raises(AssertionError, match=r"forward: segment_ids must be \[B, T\]"):
    fwd(config, params, tokens, segment_ids=jnp.ones((2, 5), jnp.int32))
  with pytest.raises(AssertionError, match=r"forward: embeddings must be \[B, T, hidden_size\]"):
    forward(config, params, None, embeddings=jnp.zeros((2, 6, 3)))


def test_unstacked_layers_give_the_same_outputs(tiny, fwd):
  """`unstack_layers` (a tuple of per-layer trees, run unrolled) equals the scanned stack, for
  mixed sliding/full layers, hidden states and a cache."""
  config, params = tiny
  flat = unstack_layers(params)
  assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == config.num_layers
  tokens = jnp.arange(12)[None]
  a = fwd(config, params, tokens, return_hidden_states=True)
  b = fwd(config, flat, tokens, return_hidden_states=True)
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
  np.testing.assert_allclose(a.hidden_states, b.hidden_states, atol=1e-6)
  cache = init_cache(config, 1, 16)
  a = jax.jit(forward, static_argnums=0)(config, params, tokens, cache=cache)
  b = jax.jit(forward, static_argnums=0)(config, flat, tokens, cache=cache)
  np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
  np.testing.assert_allclose(a.cache.k, b.cache.k, atol=1e-6)


def test_bf16_compute_is_close_to_f32(tiny, fwd):
  config, params = tiny
  tokens = jnp.arange(16)[None]
  f32 = fwd(config, params, tokens).logits
  bf16 = fwd(config, params, tokens, compute_dtype=jnp.bfloat16).logits
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(f32 - bf16).max()) < 0.05


def test_golden_llama_without_torch():
  """Stored tensors and transformers' logits (tests/golden/make_golden.py); needs no torch."""
  config, params = load_hf(GOLDEN)
  ref = SafetensorsFile(GOLDEN.parent / "llama_expected.safetensors")
  logits = forward(config, params, jnp.asarray(ref.get("tokens")),
                   positions=jnp.asarray(ref.get("positions"))).logits
  assert float(np.abs(np.asarray(logits) - ref.get("logits")).max()) < 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  save_hf(LLAMA, init_params(LLAMA, jax.random.key(1)), path)
  return path


def _copy(saved, tmp_path):
  out = tmp_path / "m"
  out.mkdir()
  for f in saved.iterdir():
    (out / f.name).write_bytes(f.read_bytes())
  return out


def _rewrite_tensors(path, edit):
  f = SafetensorsFile(path / "model.safetensors")
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  del f
  edit(tensors)
  save_file(tensors, path / "model.safetensors")


def test_error_unknown_model_type(saved, tmp_path):
  path = _copy(saved, tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match="unknown model_type 'gpt2'.*config.json|config.json.*gpt2"):
    load_hf(path)


def test_error_missing_tensor_is_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
    load_hf(path)


def test_error_extra_tensor_is_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_tensors(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
    load_hf(path)


def test_error_shape_mismatch_is_named(saved, tmp_path):
  path = _copy(saved, tmp_path)
  _rewrite_tensors(path, lambda t: t.update(
      {"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \[16, 64\].*\[32, 64\]"):
    load_hf(path)


def test_pickle_files_are_refused_never_opened(saved, tmp_path):
  path = tmp_path / "pickled"
  path.mkdir()
  (path / "config.json").write_bytes((saved / "config.json").read_bytes())
  (path / "pytorch_model.bin").write_bytes(b"this would be a pickle")
  with pytest.raises(CheckpointError, match="pytorch_model.bin.*never loads pickle"):
    load_hf(path)


def test_wrong_folder_and_corrupt_file(saved, tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf(tmp_path)
  path = _copy(saved, tmp_path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
    load_hf(path)


def test_init_save_load_is_exact_and_dtype_cast(saved):
  config, params = load_hf(saved)
  assert config == LLAMA
  ref = init_params(LLAMA, jax.random.key(1))
  chex.assert_trees_all_equal(ref, params)
  _, p16 = load_hf(saved, dtype=jnp.bfloat16)
  assert p16["layers"]["attn"]["q"].dtype == jnp.bfloat16


def test_replace_num_layers_keeps_uniform_layer_types():
  deeper = LLAMA.replace(num_layers=5)
  assert deeper.layer_types == ("full",) * 5
  with pytest.raises(ValueError, match="pass the new layer_types"):
    TINY.replace(num_layers=4)
  assert TINY.replace(num_layers=4, layer_types=("sliding", "full") * 2).num_layers == 4
