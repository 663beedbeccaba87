"""Logit parity with transformers for every supported family, and HF checkpoints in and out."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import FAMILIES, hf_config, save_hf_model  # noqa: E402
from jaxpost.models import config_from_hf, forward, load_hf, save_hf  # noqa: E402

B, T = 2, 40  # longer than every sliding window (16) in the tiny configs
TOL = 1e-4


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_ckpt(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  model = save_hf_model(request.param, path)
  return request.param, path, model


def _tokens_positions(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 128, (B, T))
  positions = np.stack([1000 + np.arange(T), 1517 + np.arange(T)])  # past 1000: RoPE scaling acts
  return tokens, positions


def _hf_logits(model, tokens, positions, attention_mask=None):
  with torch.no_grad():
    kwargs = dict(input_ids=torch.tensor(tokens), position_ids=torch.tensor(positions))
    if attention_mask is not None:
      kwargs["attention_mask"] = torch.tensor(attention_mask)
    return model(**kwargs).logits.numpy()


def test_logits_match_transformers(family_ckpt):
  family, path, model = family_ckpt
  config, params = load_hf(path)
  tokens, positions = _tokens_positions()
  ref = _hf_logits(model, tokens, positions)
  got = np.asarray(forward(config, params, jnp.asarray(tokens), positions=jnp.asarray(positions)).logits)
  err = np.abs(got - ref).max()
  print(f"{family}: max |logits - transformers| = {err:.2e}")
  assert err < TOL


def test_config_features_are_exercised(family_ckpt):
  family, path, _ = family_ckpt
  config, _ = load_hf(path)
  expect = {
      "llama": lambda c: c.rope.rope_type == "llama3" and c.rope.theta == 500000 and not c.tie_embeddings,
      "mistral": lambda c: set(c.layer_types) == {"sliding"} and c.sliding_window == 16,
      "qwen2": lambda c: c.qkv_bias and c.tie_embeddings and c.layer_types == ("full", "sliding"),
      "qwen3": lambda c: c.qk_norm and c.head_dim == 32 and c.rope.rope_type == "yarn",
      "gemma2": lambda c: (c.attn_logit_softcap == 50 and c.final_logit_softcap == 30
                           and c.layer_types == ("sliding", "full") and c.sandwich_norm
                           and c.query_pre_attn_scalar == 24),
      "gemma3_text": lambda c: (c.rope.rope_type == "linear" and c.rope.theta == 1e6
                                and c.rope_for_sliding.theta == 10000 and c.qk_norm
                                and c.layer_types == ("sliding", "full")),
  }[family]
  assert expect(config), config


def test_padding_matches_transformers_attention_mask(family_ckpt):
  """Left padding as segment id 0 equals transformers' attention_mask on the real tokens."""
  _, path, model = family_ckpt
  config, params = load_hf(path)
  tokens, _ = _tokens_positions(1)
  mask = np.ones((B, T), np.int64)
  mask[1, :7] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ref = _hf_logits(model, tokens, positions, mask)
  got = np.asarray(forward(config, params, jnp.asarray(tokens), segment_ids=jnp.asarray(mask)).logits)
  assert np.abs(got - ref)[mask.astype(bool)].max() < TOL


def test_save_load_roundtrip_and_transformers_reads_it(family_ckpt, tmp_path):
  family, path, model = family_ckpt
  config, params = load_hf(path)
  save_hf(config, params, tmp_path / "out")
  config2, params2 = load_hf(tmp_path / "out")
  assert config2 == config
  chex.assert_trees_all_equal(params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                                attn_implementation="eager")
  tokens, positions = _tokens_positions(2)
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens, positions),
                                _hf_logits(model, tokens, positions))


def test_sharded_save_writes_index_and_reloads(tmp_path):
  path = tmp_path / "src"
  model = save_hf_model("llama", path)
  config, params = load_hf(path)
  save_hf(config, params, tmp_path / "sharded", max_shard_size="40KB")
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (tmp_path / "sharded" / "model.safetensors").exists()
  _, params2 = load_hf(tmp_path / "sharded")
  chex.assert_trees_all_equal(params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager")
  tokens, positions = _tokens_positions()
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens, positions),
                                _hf_logits(model, tokens, positions))


def test_bf16_checkpoint_loads_and_casts(tmp_path):
  path = tmp_path / "src"
  save_hf_model("qwen3", path)
  config, params = load_hf(path)
  save_hf(config, params, tmp_path / "bf16", dtype=jnp.bfloat16)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert hf.dtype == torch.bfloat16
  _, p16 = load_hf(tmp_path / "bf16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
  _, p32 = load_hf(tmp_path / "bf16", dtype=jnp.float32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p32))
  np.testing.assert_array_equal(np.asarray(p32["embed"]), np.asarray(p16["embed"], np.float32))
  # bf16 rounding of the weights is the only difference from the f32 original
  np.testing.assert_allclose(np.asarray(p32["embed"]), np.asarray(params["embed"]), rtol=1e-2,
                             atol=1e-3)


# Older config.json layout (what most Hub checkpoints carry) against transformers 5's layout.
LEGACY = {
    "llama": dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256)),
    "qwen3": dict(rope_theta=1_000_000.0, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=256)),
    "gemma3_text": dict(rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                        sliding_window_pattern=2, rope_scaling=dict(rope_type="linear", factor=8.0)),
}


@pytest.mark.parametrize("family", list(LEGACY))
def test_legacy_and_new_config_layouts_agree(family):
  new = hf_config(family).to_dict()
  assert "rope_parameters" in new
  legacy = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
  legacy.update(LEGACY[family])
  assert config_from_hf(legacy) == config_from_hf(new)
