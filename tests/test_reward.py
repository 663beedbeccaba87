"""Bradley–Terry reward models: the reward at the last token, the loss against numpy, training on
a separable toy set, scoring, and HF `*ForSequenceClassification` checkpoints out and back."""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tokenizer_fixtures
from jaxpost.data.formats import Example
from jaxpost.data.preference import Pair, pair_batch, to_pair
from jaxpost.models import ModelConfig, forward, init_params, load_hf
from jaxpost.reward import (load_reward_model_hf, reward_input_ids, reward_loss,
                            reward_param_specs, rewards, save_reward_model_hf, score, score_ids,
                            with_score_head)
from jaxpost.tiny import make_tokenizer, tiny_config
from jaxpost.tokenizer import load_tokenizer
from jaxpost.train import init_state, make_train_step

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                     pad_token_id=0, eos_token_id=1)
TOL = 1e-4  # against transformers (float32, different kernels)
REWARDS = jax.jit(rewards, static_argnums=0)


@pytest.fixture(scope="module")
def params():
  lm = init_params(CONFIG, jax.random.key(0))
  return with_score_head(CONFIG, lm, jax.random.key(1), std=0.2)


def right_padded(seqs, T, pad_id=0):
  tokens = np.full((len(seqs), T), pad_id, np.int32)
  segment_ids = np.zeros((len(seqs), T), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
    segment_ids[b, :len(s)] = 1
  return tokens, segment_ids


def random_pairs(rng, n, *, lo=3, hi=12):
  """Pairs with a shared random prompt and different random completions of uneven lengths."""
  pairs = []
  for _ in range(n):
    prompt = rng.integers(2, CONFIG.vocab_size, rng.integers(1, 5))
    sides = [rng.integers(2, CONFIG.vocab_size, rng.integers(lo, hi)) for _ in range(2)]
    pairs.append(Pair(*(Example(np.concatenate([prompt, s]),
                                np.arange(len(prompt) + len(s)) >= len(prompt)) for s in sides),
                      len(prompt)))
  return pairs


# -- the reward --------------------------------------------------------------------------------


def test_reward_is_read_at_the_last_real_token(params):
  rng = np.random.default_rng(0)
  T = 12
  seqs = [rng.integers(2, 64, n) for n in (5, 9, T)]
  tokens, seg = right_padded(seqs + [[]], T)  # the last row is padding only
  r = np.asarray(REWARDS(CONFIG, params, tokens, seg))
  assert r.shape == (4,) and r.dtype == np.float32 and np.isfinite(r).all()

  h = jax.jit(forward, static_argnums=0, static_argnames="compute_logits")(
      CONFIG, params, jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
      compute_logits=False).final_hidden
  expect = [np.asarray(h[b, len(s) - 1]) @ np.asarray(params["score"]) for b, s in enumerate(seqs)]
  np.testing.assert_allclose(r[:3], expect, rtol=1e-5, atol=1e-6)

  other_padding = np.where(seg == 0, rng.integers(2, 64, tokens.shape), tokens).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(REWARDS(CONFIG, params, other_padding, seg))[:3],
                                r[:3])

  changed = tokens.copy()
  changed[0, 4] = 7 if tokens[0, 4] != 7 else 8  # the last token of row 0
  r2 = np.asarray(REWARDS(CONFIG, params, changed, seg))
  assert abs(r2[0] - r[0]) > 1e-4
  np.testing.assert_array_equal(r2[1:3], r[1:3])

  # left padding reads the same token (positions restart after the padding)
  shifts = [T - len(s) for s in seqs] + [0]
  left_tokens = np.stack([np.roll(t, k) for t, k in zip(tokens, shifts)])
  left_seg = np.stack([np.roll(t, k) for t, k in zip(seg, shifts)])
  np.testing.assert_allclose(np.asarray(REWARDS(CONFIG, params, left_tokens, left_seg))[:3],
                             r[:3], rtol=1e-5, atol=1e-6)


def test_with_score_head_layout(params):
  assert "lm_head" not in params and params["score"].shape == (CONFIG.hidden_size,)
  specs = reward_param_specs(CONFIG)
  assert set(specs) == set(params)
  shapes = jax.tree.map(lambda s: s.shape, specs, is_leaf=lambda x: hasattr(x, "axes"))
  assert jax.tree.map(lambda p: p.shape, params) == shapes


# -- the loss ----------------------------------------------------------------------------------


def _numpy_loss(r_w, r_l, w, m, c):
  real = w != 0
  bt = np.logaddexp(0.0, -(r_w - r_l - m))
  return np.sum((w * (bt + c * (r_w + r_l) ** 2))[real]) / np.sum(w)


def test_loss_and_metrics_match_numpy(params):
  rng = np.random.default_rng(1)
  B, T = 5, 20
  batch = pair_batch(random_pairs(rng, B - 1) + [None], T)  # the last pair is padding
  r = np.asarray(REWARDS(CONFIG, params, batch["tokens"].reshape(2 * B, T),
                         batch["segment_ids"].reshape(2 * B, T),
                         batch["positions"].reshape(2 * B, T))).reshape(B, 2)
  r_w, r_l = r[:, 0], r[:, 1]
  w = np.array([1, 1, 1, 1, 0], np.float64)
  real = slice(0, B - 1)
  loss_fn = jax.jit(functools.partial(reward_loss, config=CONFIG))

  loss, metrics = loss_fn(params, batch, None)
  np.testing.assert_allclose(loss, _numpy_loss(r_w, r_l, w, 0.0, 0.0), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(r_w[real] > r_l[real]), rtol=1e-6)
  np.testing.assert_allclose(metrics["margin"], np.mean(r_w[real] - r_l[real]), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/chosen"], np.mean(r_w[real]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/rejected"], np.mean(r_l[real]), rtol=1e-5,
                             atol=1e-6)
  assert float(metrics["weight"]) == B - 1
  assert 0 < float(metrics["accuracy"]) < 1  # both outcomes occur: the test sees the comparison

  # constant margin, and centering
  loss, _ = jax.jit(lambda p, b, m, c: reward_loss(p, b, None, config=CONFIG, margin=m,
                                                   center_coefficient=c))(params, batch, 0.5, 0.1)
  np.testing.assert_allclose(loss, _numpy_loss(r_w, r_l, w, 0.5, 0.1), rtol=1e-5)
  # per-pair margins from the batch
  m = np.array([0.0, 1.0, -2.0, 3.0, 100.0], np.float32)
  loss, _ = loss_fn(params, dict(batch, margin=m), None)
  np.testing.assert_allclose(loss, _numpy_loss(r_w, r_l, w, m, 0.0), rtol=1e-5)
  with pytest.raises(ValueError, match="not both"):
    reward_loss(params, dict(batch, margin=m), None, config=CONFIG, margin=1.0)

  # the padding pair counts nowhere (the numpy loss above skips it): its tokens change nothing
  filled = dict(batch, tokens=np.where(batch["segment_ids"] == 0, 9, batch["tokens"]))
  loss2, metrics2 = loss_fn(params, filled, None)
  loss, metrics = loss_fn(params, batch, None)
  np.testing.assert_array_equal(loss2, loss)
  np.testing.assert_array_equal(metrics2["accuracy"], metrics["accuracy"])


def test_micro_batches_equal_one_batch_and_both_head_and_decoder_train(params):
  """`weight` = real pairs: 2 micro-batches with 3 and 1 real pairs equal one batch of 4."""
  pairs = random_pairs(np.random.default_rng(3), 4)
  batch = pair_batch([pairs[0], pairs[1], pairs[2], None, pairs[3], None], 16)
  opt = optax.sgd(0.1)
  loss = functools.partial(reward_loss, config=CONFIG, center_coefficient=0.05)
  out = []
  for n in (1, 2):
    state = init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))
    out.append(make_train_step(loss, opt, micro_batches=n)(state, batch, {}))
  (s1, m1), (s2, m2) = out
  for key in ("loss", "accuracy", "margin", "rewards/chosen"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1.params, s2.params, atol=1e-6, rtol=0)
  # one SGD step moved the head and every decoder weight (the gradient reaches them all)
  assert np.isfinite(m1["grad_norm"]) and float(m1["skipped"]) == 0
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), s1.params,
                       params)
  assert all(jax.tree.leaves(moved)), moved


def test_training_separates_a_toy_preference_set():
  """Chosen responses end with token 7, rejected with 8: a few AdamW steps learn it."""
  def toy(seed, n):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
      prompt = rng.integers(10, 64, rng.integers(2, 6))
      sides = [np.concatenate([prompt, rng.integers(10, 64, rng.integers(1, 6)), [end]])
               for end in (7, 8)]
      pairs.append(Pair(*(Example(s, np.arange(len(s)) >= len(prompt)) for s in sides),
                        len(prompt)))
    return pair_batch(pairs, 16)

  params = with_score_head(CONFIG, init_params(CONFIG, jax.random.key(0)), jax.random.key(1),
                           std=0.0)
  opt = optax.adamw(3e-3)
  step = make_train_step(functools.partial(reward_loss, config=CONFIG), opt)
  state = init_state(params, opt, jax.random.key(0))
  held_out = toy(99, 32)
  evaluate = jax.jit(functools.partial(reward_loss, config=CONFIG))
  _, before = evaluate(state.params, held_out, None)
  assert float(before["accuracy"]) == 0.0  # a zero head ties every pair
  for i in range(12):
    state, metrics = step(state, toy(i, 16), {})
  _, after = evaluate(state.params, held_out, None)
  assert float(after["accuracy"]) == 1.0, after
  assert float(metrics["loss"]) < 0.3, metrics


# -- scoring -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny sentencepiece tokenizer (ChatML; pad 0, EOS 1, <|im_end|> 5) and a reward model."""
  tok = load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok"),
                                      tokenizer_fixtures.corpus(300)))
  config = tiny_config(tok.vocab_size)
  params = with_score_head(config, init_params(config, jax.random.key(3)), jax.random.key(4),
                           std=0.2)
  return tok, config, params


def _texts():
  user = lambda text: {"role": "user", "content": text}  # noqa: E731
  assistant = lambda text: {"role": "assistant", "content": text}  # noqa: E731
  return [
      "the quick brown fox",
      [user("what is two plus three"), assistant("five")],
      "hello world " * 7,
      [{"role": "system", "content": "you are helpful"}, user("hello"), assistant("how"),
       user("what is two plus three"), assistant("the answer is"), assistant("five")],
      [user("how are you"), assistant("fine thanks")],
  ]


def test_reward_input_ids_are_the_pair_sides(tiny):
  tok, _, _ = tiny
  conversation = _texts()[1]
  pair = to_pair({"prompt": conversation[:-1], "chosen": conversation[-1:],
                  "rejected": [{"role": "assistant", "content": "six"}]}, tok)
  ids = reward_input_ids(tok, conversation)
  assert ids == pair.chosen.tokens.tolist()
  assert ids[-1] == tok.token_to_id("<|im_end|>")
  text_ids = reward_input_ids(tok, "the quick brown fox")
  assert text_ids == tok.encode("the quick brown fox", add_eos=True) and text_ids[-1] == tok.eos_id
  with pytest.raises(ValueError, match="end with an assistant"):
    reward_input_ids(tok, conversation[:-1])


def test_score_equals_rewards(tiny):
  tok, config, params = tiny
  texts = _texts()
  got = score(config, params, tok, texts, batch_size=2)  # 3 batches, the last one padded
  ids = [reward_input_ids(tok, t) for t in texts]
  # one batch, padded to another length than score's buckets
  tokens, seg = right_padded(ids, max(map(len, ids)) + 3)
  np.testing.assert_allclose(got, REWARDS(config, params, tokens, seg), rtol=1e-5, atol=1e-5)
  # truncation keeps the first tokens
  cut = score_ids(config, params, ids, max_length=6, batch_size=8)
  tokens, seg = right_padded([s[:6] for s in ids], 6)
  np.testing.assert_allclose(cut, REWARDS(config, params, tokens, seg), rtol=1e-5, atol=1e-5)


# -- Hugging Face checkpoints ------------------------------------------------------------------


def _hf_rewards(path, tokens, seg):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(seg, dtype=torch.long)).logits.numpy()
  assert logits.shape == (len(tokens), 1)
  return type(model).__name__, logits[:, 0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_export_matches_transformers_and_loads_back(family, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from hf_models import save_hf_model  # pylint: disable=import-outside-toplevel

  save_hf_model(family, tmp_path / "lm")
  config, lm = load_hf(tmp_path / "lm")
  params = with_score_head(config, lm, jax.random.key(0), std=0.2)
  save_reward_model_hf(config, params, tmp_path / "rm", pad_token_id=0)

  written = json.loads((tmp_path / "rm" / "config.json").read_text())
  assert written["id2label"] == {"0": "LABEL_0"} and written["pad_token_id"] == 0
  rng = np.random.default_rng(0)
  T = 24  # past the sliding window (16) of qwen2's second layer
  seqs = [rng.integers(1, 128, n) for n in (T, 11, 5, 17)]
  tokens, seg = right_padded(seqs, T)
  name, ref = _hf_rewards(tmp_path / "rm", tokens, seg)
  assert name == {"llama": "LlamaForSequenceClassification",
                  "qwen2": "Qwen2ForSequenceClassification"}[family]
  assert written["architectures"] == [name]
  got = np.asarray(REWARDS(config, params, tokens, seg))
  err = np.abs(got - ref).max()
  print(f"{family}: max |reward - transformers| = {err:.2e} (rewards ~{np.abs(ref).mean():.2f})")
  assert err < TOL

  config2, params2 = load_reward_model_hf(tmp_path / "rm")
  assert config2 == config.replace(pad_token_id=0)
  chex.assert_trees_all_equal(params, params2)  # same structure, same values


def test_sharded_export_and_score_match_transformers(tiny, tmp_path):
  """A jaxpost-made reward model, sharded: transformers fed `reward_input_ids` gives `score`."""
  tok, config, params = tiny
  save_reward_model_hf(config, params, tmp_path / "rm", max_shard_size="60KB")
  index = json.loads((tmp_path / "rm" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2 and "score.weight" in index["weight_map"]
  assert not (tmp_path / "rm" / "model.safetensors").exists()

  texts = _texts()
  ids = [reward_input_ids(tok, t) for t in texts]
  tokens, seg = right_padded(ids, max(map(len, ids)), pad_id=tok.pad_id)
  _, ref = _hf_rewards(tmp_path / "rm", tokens, seg)
  got = score(config, params, tok, texts, batch_size=2)
  err = np.abs(got - ref).max()
  print(f"tiny llama (tied): max |score - transformers| = {err:.2e}")
  assert err < TOL

  _, params2 = load_reward_model_hf(tmp_path / "rm")
  chex.assert_trees_all_equal(params, params2)


def test_export_refuses_an_unusable_pad_id_and_load_refuses_a_causal_lm(params, tmp_path):
  with pytest.raises(ValueError, match="EOS id"):
    save_reward_model_hf(CONFIG, params, tmp_path / "a", pad_token_id=1)
  with pytest.raises(ValueError, match="needs a pad_token_id"):
    save_reward_model_hf(CONFIG.replace(pad_token_id=None), params, tmp_path / "b")
  from jaxpost.models import CheckpointError, save_hf  # pylint: disable=import-outside-toplevel
  save_hf(CONFIG, init_params(CONFIG, jax.random.key(0)), tmp_path / "lm")
  with pytest.raises(CheckpointError, match="with_score_head"):
    load_reward_model_hf(tmp_path / "lm")
