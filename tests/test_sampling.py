"""The compiled sampler: transformers' greedy output, training-forward log-probs, stop tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import forward, init_params
from jaxpost.sampling import Sampler, _generate, generate
from test_models import TINY

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 20], [40, 41, 42, 43, 44]]
N = 12


@pytest.fixture(scope="module")
def model():
  return TINY, init_params(TINY, jax.random.key(3))


@pytest.fixture(scope="module")
def greedy(model):
  config, params = model
  return generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0, prompt_bucket=16)


_forward = jax.jit(forward, static_argnums=0)


def _training_logprobs(config, params, prompt, new_tokens, width=32):
  """Log-probs of `new_tokens` after `prompt` from one right-padded training forward."""
  seq = np.asarray(list(prompt) + list(new_tokens))
  row, segments = np.zeros(width, np.int32), np.zeros(width, np.int32)
  row[:len(seq)], segments[:len(seq)] = seq, 1
  logits = _forward(config, params, jnp.asarray(row)[None],
                    segment_ids=jnp.asarray(segments)[None]).logits[0, :len(seq)]
  logp = jax.nn.log_softmax(logits, axis=-1)[len(prompt) - 1:-1]
  return np.asarray(logp[np.arange(len(new_tokens)), seq[len(prompt):]])


def test_logprobs_equal_training_forward(model, greedy):
  config, params = model
  for i, prompt in enumerate(PROMPTS):
    n = int(greedy.lengths[i])
    expect = _training_logprobs(config, params, prompt, np.asarray(greedy.tokens[i, :n]))
    np.testing.assert_allclose(np.asarray(greedy.logprobs[i, :n]), expect, atol=1e-5, rtol=0)


def test_sampled_logprobs_equal_training_forward(model):
  config, params = model
  out = generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.9, top_k=20,
                 top_p=0.95, seed=7, prompt_bucket=16)
  for i, prompt in enumerate(PROMPTS):
    expect = _training_logprobs(config, params, prompt, np.asarray(out.tokens[i]))
    np.testing.assert_allclose(np.asarray(out.logprobs[i]), expect, atol=1e-5, rtol=0)


def test_num_samples_shares_the_prefill(model, greedy):
  """G samples per prompt: prompt i's rows are i*G .. i*G + G - 1; greedy samples repeat the
  single greedy output, and sampled rows' tempered log-probs equal the training forward's
  log-softmax(logits / temperature)."""
  config, params = model
  G = 3
  rep = generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0, prompt_bucket=16,
                 num_samples=G)
  np.testing.assert_array_equal(np.asarray(rep.tokens),
                                np.repeat(np.asarray(greedy.tokens), G, axis=0))
  np.testing.assert_allclose(np.asarray(rep.logprobs),
                             np.repeat(np.asarray(greedy.logprobs), G, axis=0), atol=1e-6)
  t = 0.7
  out = generate(config, params, PROMPTS, max_new_tokens=N, temperature=t, seed=3,
                 prompt_bucket=16, num_samples=G)
  assert out.tokens.shape == (len(PROMPTS) * G, N)
  assert len({tuple(np.asarray(out.tokens[i])) for i in range(G)}) > 1  # different samples
  for row in range(len(PROMPTS) * G):
    prompt, n = PROMPTS[row // G], int(out.lengths[row])
    seq = np.asarray(list(prompt) + list(np.asarray(out.tokens[row, :n])))
    padded, segments = np.zeros(32, np.int32), np.zeros(32, np.int32)
    padded[:len(seq)], segments[:len(seq)] = seq, 1
    logits = _forward(config, params, jnp.asarray(padded)[None],
                      segment_ids=jnp.asarray(segments)[None]).logits[0, :len(seq)]
    logp = jax.nn.log_softmax(logits / t, axis=-1)[len(prompt) - 1:-1]
    expect = np.asarray(logp[np.arange(n), seq[len(prompt):]])
    np.testing.assert_allclose(np.asarray(out.sample_logprobs[row, :n]), expect, atol=1e-5)


def test_stop_tokens_end_rows_independently(model, greedy):
  config, params = model
  stop = int(greedy.tokens[0, 3])  # row 0 stops at step 3 at the latest
  out = generate(config, params, PROMPTS, max_new_tokens=N, temperature=0.0, stop_tokens=[stop],
                 pad_id=0, prompt_bucket=16)
  for i in range(len(PROMPTS)):
    row = list(np.asarray(greedy.tokens[i]))
    n = row.index(stop) + 1 if stop in row else N
    assert int(out.lengths[i]) == n
    np.testing.assert_array_equal(out.tokens[i, :n], greedy.tokens[i, :n])
    assert np.all(np.asarray(out.tokens[i, n:]) == 0) and np.all(np.asarray(out.logprobs[i, n:]) == 0)
  assert int(out.lengths[0]) <= 4


def test_same_seed_same_sample_and_no_recompile(model):
  config, params = model
  kwargs = dict(max_new_tokens=N, temperature=1.0, seed=11, prompt_bucket=16)
  a = generate(config, params, PROMPTS, **kwargs)
  size = _generate._cache_size()
  b = generate(config, params, [[1, 2], [3], [4, 5, 6, 7]], **kwargs)  # same bucket
  c = generate(config, params, PROMPTS, **kwargs)
  assert _generate._cache_size() == size
  np.testing.assert_array_equal(a.tokens, c.tokens)
  assert not np.array_equal(a.tokens, b.tokens)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda s: np.isfinite(np.asarray(s.filter_logits(logits)))[0]  # noqa: E731
  np.testing.assert_array_equal(kept(Sampler(1.0, top_k=2)), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(kept(Sampler(1.0, top_p=0.7)), [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(kept(Sampler(1.0, top_p=0.71)), [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(kept(Sampler(1.0, top_p=0.1)), [1, 0, 0, 0, 0])
  # sampling frequencies follow the renormalised distribution
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: Sampler(1.0, top_k=3).next_tokens(logits, k))(keys)[:, 0]
  freq = np.bincount(np.asarray(draws), minlength=5) / 4000
  np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)
  with pytest.raises(ValueError, match="top_p"):
    Sampler(1.0, top_p=1.5)


def test_greedy_matches_transformers_generate(tmp_path):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from hf_models import save_hf_model
  from jaxpost.models import load_hf

  for family in ("llama", "gemma3_text"):
    hf = save_hf_model(family, tmp_path / family)
    config, params = load_hf(tmp_path / family)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 20]]
    out = generate(config, params, prompts, max_new_tokens=24, temperature=0.0, prompt_bucket=8)
    for i, p in enumerate(prompts):
      with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False)[0, len(p):].numpy()
      np.testing.assert_array_equal(np.asarray(out.tokens[i]), ref)


def test_draws_follow_the_filtered_distribution():
  """Inverse-CDF draws match softmax(filtered logits / temperature): frequencies of 200k draws
  within 4 standard errors, and tokens outside top-k / top-p never drawn."""
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.0001, 0.25, 0.2, 0.0999]] * 200_000))
  for sampler in (Sampler(1.0), Sampler(0.7, top_k=3), Sampler(1.0, top_p=0.8)):
    tokens = np.asarray(jax.jit(sampler.next_tokens)(logits, jax.random.key(0)))
    probs = np.asarray(jax.nn.softmax(sampler.filter_logits(logits[:1]), axis=-1))[0]
    freq = np.bincount(tokens, minlength=6) / len(tokens)
    se = np.sqrt(probs * (1 - probs) / len(tokens)) + 1e-12
    assert np.all(np.abs(freq - probs) <= 4 * se), (freq, probs)
    assert np.all(freq[probs == 0] == 0)


def _sorted_filter(logits, temperature, top_k, top_p):
  """The filters by sorting (numpy float64): the reference `Sampler.filter_logits` must keep
  the same tokens as."""
  x = np.asarray(logits, np.float64) / temperature
  if top_k is not None:
    kth = np.sort(x, axis=-1)[:, ::-1][:, top_k - 1:top_k]
    x = np.where(x < kth, -np.inf, x)
  if top_p is not None:
    s = np.sort(x, axis=-1)[:, ::-1]
    probs = np.exp(s - s[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, axis=-1) - probs
    threshold = np.where(before < top_p, s, np.inf).min(-1, keepdims=True)
    x = np.where(x < threshold, -np.inf, x)
  return np.isfinite(x)


def test_filters_by_bisection_keep_what_sorting_keeps():
  """top-k / top-p thresholds found by bisection keep exactly the tokens a sort keeps, ties
  (logits rounded to a coarse grid) and negative / positive logits included."""
  rng = np.random.default_rng(0)
  fine = rng.normal(size=(6, 500)) * 3
  coarse = np.round(fine)  # many ties
  for logits in (fine, coarse):
    logits = jnp.asarray(logits, jnp.float32)
    for t, k, p in ((1.0, 7, None), (0.7, 40, None), (1.0, None, 0.5), (1.3, None, 0.93),
                    (0.9, 100, 0.8), (1.0, 1, None), (1.0, None, 1e-6)):
      got = np.isfinite(np.asarray(Sampler(t, top_k=k, top_p=p).filter_logits(logits)))
      np.testing.assert_array_equal(got, _sorted_filter(logits, t, k, p), err_msg=str((t, k, p)))


def test_token_stats_equal_log_softmax():
  """One pass of softmax statistics gives log_softmax's log-probs and entropy; greedy is the
  first maximum (ties to the lowest index, as argmax)."""
  from jaxpost.sampling import first_argmax, token_stats

  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(5, 300)) * 4, jnp.float32)
  tied = logits.at[:, 17].set(50.0).at[:, 200].set(50.0)
  np.testing.assert_array_equal(np.asarray(first_argmax(tied)), np.full(5, 17))
  np.testing.assert_array_equal(np.asarray(first_argmax(logits)), np.argmax(logits, -1))
  for sampler in (Sampler(0.0), Sampler(1.0), Sampler(0.6, top_k=30), Sampler(1.4, top_p=0.9)):
    token, logp, sample, entropy = token_stats(sampler, logits, jax.random.key(2))
    t = sampler.temperature or 1.0
    raw, tempered = jax.nn.log_softmax(logits, -1), jax.nn.log_softmax(logits / t, -1)
    rows = np.arange(5)
    np.testing.assert_allclose(logp, np.asarray(raw)[rows, token], atol=1e-5, rtol=0)
    np.testing.assert_allclose(sample, np.asarray(tempered)[rows, token], atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropy, -np.sum(np.exp(tempered) * tempered, -1), atol=1e-5,
                               rtol=0)
    if sampler.temperature == 0.0:
      np.testing.assert_array_equal(np.asarray(token), np.argmax(logits, -1))


def test_per_layer_cache_equals_stacked(model):
  """Unstacked layers over a tuple of per-layer caches (the decode loop's layout) give the
  stacked cache's logits and the same keys and values."""
  from jaxpost.models import start_cache, unstack_layers

  config, params = model
  tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], jnp.int32)
  cache = start_cache(config, params, 2, 8)
  stacked = _forward(config, params, tokens, cache=cache)
  split = cache.replace(k=tuple(cache.k), v=tuple(cache.v))
  per_layer = _forward(config, unstack_layers(params), tokens, cache=split)
  np.testing.assert_allclose(per_layer.logits, stacked.logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(jnp.stack(per_layer.cache.k), stacked.cache.k, atol=1e-6, rtol=0)
  step = jnp.asarray([[3], [4]], jnp.int32)
  a = _forward(config, params, step, cache=stacked.cache)
  b = _forward(config, unstack_layers(params), step, cache=per_layer.cache)
  np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=0)
  assert per_layer.cache.max_len == stacked.cache.max_len == 8
