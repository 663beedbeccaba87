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
