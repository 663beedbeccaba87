"""Batched generation: prefill, then one compiled decode loop (`lax.while_loop`) on device.

    out = generate(config, params, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.0)
    out.tokens    [B, max_new_tokens] int32, `pad_id` after a row has ended
    out.logprobs  [B, max_new_tokens] float32: log p(token) under the model's own distribution
                  (raw logits, before temperature / top-k / top-p), 0 after a row has ended;
                  these equal the training forward's log-probs for the same sequences
    out.sample_logprobs  the same under the tempered distribution (logits / temperature, no
                  top-k / top-p filtering): what RL's importance ratios are taken against
    out.entropies [B, max_new_tokens] float32: the entropy of that tempered distribution at
                  each generated token, 0 after a row has ended (RL's entropy metric)
    out.lengths   [B] number of generated tokens, the stop token included

`num_samples=G` draws G completions of every prompt: each prompt is prefilled once and its
KV cache copied to its G rows (rows i*G .. i*G + G - 1 are prompt i's), so B * G outputs cost
B prompt forwards, not B * G.

Prompts of different lengths are left-padded (segment id 0) to a bucketed width, so a new
prompt length only recompiles when it crosses a bucket. A row ends at its first stop token;
the loop ends when every row has ended or `max_new_tokens` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpost.models import ModelConfig, forward, lm_head, start_cache, unstack_layers


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is drawn from logits. Hashable: it is a static argument of the loop.

  temperature 0 is greedy (argmax). top_k keeps the k most likely tokens; top_p keeps the
  smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019).
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def filter_logits(self, logits_BxV: jax.Array) -> jax.Array:
    """Tempered logits with tokens outside top-k / top-p set to -inf."""
    logits = logits_BxV / self.temperature
    if self.top_k is not None and self.top_k < logits.shape[-1]:
      kth_B1 = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
    if self.top_p is not None and self.top_p < 1.0:
      sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(sorted_BxV, axis=-1)
      before_BxV = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
      keep = before_BxV < self.top_p  # always keeps the first
      threshold_B1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
      logits = jnp.where(logits < threshold_B1, -jnp.inf, logits)
    return logits

  def next_tokens(self, logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
    """One token per row: argmax at temperature 0, else a draw from softmax(filtered logits)
    by inverting its cumulative distribution with one uniform number per row. That is the
    same distribution as `jax.random.categorical`, whose Gumbel trick draws a random number
    per vocabulary entry: at 16 rows x 32k entries on a CPU, 16 ms per decode step against
    3 ms here."""
    if self.temperature == 0.0:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    probs_BxV = jax.nn.softmax(self.filter_logits(logits_BxV).astype(jnp.float32), axis=-1)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    u_B1 = jax.random.uniform(rng, (logits_BxV.shape[0], 1), jnp.float32,
                              minval=jnp.finfo(jnp.float32).tiny) * cdf_BxV[:, -1:]
    # the first token whose cumulative probability reaches u (never a filtered one: its
    # probability is 0, so its cumulative value equals the previous one's)
    return jnp.sum(cdf_BxV < u_B1, axis=-1).astype(jnp.int32)


@struct.dataclass
class GenerationOutput:
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  sample_logprobs: jax.Array
  entropies: jax.Array


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int):
  """Left-pads prompts to a width rounded up to `bucket`: (tokens, segment_ids), [B, P]."""
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, and every prompt at least one token")
  longest = max(len(p) for p in prompts)
  width = -(-longest // bucket) * bucket
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = np.asarray(p, np.int32)
    segments[i, width - len(p):] = 1
  return tokens, segments


def generate(
    config: ModelConfig,
    params: dict,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | jax.Array = 0,
    pad_id: int = 0,
    compute_dtype=None,
    cache_dtype=None,
    prompt_bucket: int = 64,
    num_samples: int = 1,
) -> GenerationOutput:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists).

  `seed` is an int or a JAX key. `temperature=0` is greedy. See the module docstring for the
  outputs. Compiles once per (batch size, padded prompt width, max_new_tokens, sampler).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  sampler = Sampler(temperature, top_k, top_p)
  tokens, segments = pad_prompts(prompt_tokens, pad_id, prompt_bucket)
  rng = jax.random.key(seed) if isinstance(seed, int) else seed
  stops = jnp.asarray(sorted(set(int(t) for t in stop_tokens)) or [-1], jnp.int32)
  if cache_dtype is None:
    cache_dtype = compute_dtype or jnp.dtype(params["embed"].dtype)
  return _generate(config, sampler, max_new_tokens, num_samples, jnp.dtype(cache_dtype),
                   None if compute_dtype is None else jnp.dtype(compute_dtype),
                   params, jnp.asarray(tokens), jnp.asarray(segments), rng, stops,
                   jnp.int32(pad_id))


def _repeat_rows(cache, n: int):
  """A KV cache with each row repeated `n` times (rows i*n .. i*n + n - 1 are row i's)."""
  if n == 1:
    return cache
  return cache.replace(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                       segment_ids=jnp.repeat(cache.segment_ids, n, axis=0),
                       next_pos=jnp.repeat(cache.next_pos, n, axis=0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(config, sampler, max_new, num_samples, cache_dtype, compute_dtype, params,
              tokens_BxP, segments_BxP, rng, stops_S, pad_id):
  B, P = tokens_BxP.shape
  cache = start_cache(config, params, B, P + max_new, cache_dtype)
  out = forward(config, params, tokens_BxP, segment_ids=segments_BxP, cache=cache,
                compute_dtype=compute_dtype, compute_logits=False)
  logits_BxV = lm_head(config, params, out.final_hidden[:, -1:])[:, 0]
  # One prefill per prompt; its cache and last logits shared by the prompt's samples.
  logits_BxV = jnp.repeat(logits_BxV, num_samples, axis=0)
  out = out.replace(cache=_repeat_rows(out.cache, num_samples))
  B = B * num_samples
  tempered = sampler.temperature if sampler.temperature > 0 else 1.0

  def pick(logits_BxV, step):
    token_B = sampler.next_tokens(logits_BxV, jax.random.fold_in(rng, step))
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, axis=-1), token_B[:, None],
                                 axis=-1)[:, 0]
    tempered_BxV = jax.nn.log_softmax(logits_BxV / tempered, axis=-1)
    sample_B = jnp.take_along_axis(tempered_BxV, token_B[:, None], axis=-1)[:, 0]
    entropy_B = -jnp.sum(jnp.exp(tempered_BxV) * tempered_BxV, axis=-1)
    return token_B, logp_B, (sample_B, entropy_B)

  def is_stop(token_B):
    return jnp.any(token_B[:, None] == stops_S[None, :], axis=-1)

  token_B, logp_B, (sample_B, entropy_B) = pick(logits_BxV, 0)
  state = dict(
      step=jnp.int32(1),
      token=token_B,
      tokens=jnp.full((B, max_new), pad_id, jnp.int32).at[:, 0].set(token_B),
      logprobs=jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(logp_B),
      sample_logprobs=jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(sample_B),
      entropies=jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(entropy_B),
      lengths=jnp.ones((B,), jnp.int32),
      done=is_stop(token_B),
      cache=out.cache,
  )

  def cond(s):
    return (s["step"] < max_new) & ~jnp.all(s["done"])

  layers = unstack_layers(params)

  def body(s):
    step_out = forward(config, layers, s["token"][:, None], cache=s["cache"],
                       compute_dtype=compute_dtype, compute_logits=False)
    logits_BxV = lm_head(config, params, step_out.final_hidden)[:, 0]
    token_B, logp_B, (sample_B, entropy_B) = pick(logits_BxV, s["step"])
    token_B = jnp.where(s["done"], pad_id, token_B)
    logp_B = jnp.where(s["done"], 0.0, logp_B)
    sample_B = jnp.where(s["done"], 0.0, sample_B)
    entropy_B = jnp.where(s["done"], 0.0, entropy_B)
    return dict(
        step=s["step"] + 1,
        token=token_B,
        tokens=jax.lax.dynamic_update_slice(s["tokens"], token_B[:, None], (0, s["step"])),
        logprobs=jax.lax.dynamic_update_slice(s["logprobs"], logp_B[:, None], (0, s["step"])),
        sample_logprobs=jax.lax.dynamic_update_slice(s["sample_logprobs"], sample_B[:, None],
                                                     (0, s["step"])),
        entropies=jax.lax.dynamic_update_slice(s["entropies"], entropy_B[:, None],
                                               (0, s["step"])),
        lengths=s["lengths"] + (~s["done"]).astype(jnp.int32),
        done=s["done"] | is_stop(token_B),
        cache=step_out.cache,
    )

  s = jax.lax.while_loop(cond, body, state)
  return GenerationOutput(tokens=s["tokens"], logprobs=s["logprobs"], lengths=s["lengths"],
                          sample_logprobs=s["sample_logprobs"], entropies=s["entropies"])
