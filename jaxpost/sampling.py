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
from jaxpost.sharding import constrain_batch


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
    """Tempered logits with tokens outside top-k / top-p set to -inf.

    top-k keeps every token at least as large as the k-th largest logit; top-p keeps every
    token at least as large as the smallest one of the shortest most-likely-first prefix
    whose mass reaches p. Both thresholds are found by bisection (`_threshold`) rather than
    by sorting the vocabulary: on a CPU, `lax.top_k` or a sort of 16 x 32k logits takes
    ~100 ms, the bisection a few.
    """
    logits = logits_BxV / self.temperature
    if self.top_k is not None and self.top_k < logits.shape[-1]:
      kth_B1 = _threshold(logits, jnp.ones_like(logits), self.top_k)
      logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
    if self.top_p is not None and self.top_p < 1.0:
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      threshold_B1 = _threshold(logits, probs, self.top_p)
      logits = jnp.where(logits < threshold_B1, -jnp.inf, logits)
    return logits

  def next_tokens(self, logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
    """One token per row: argmax at temperature 0, else a draw from softmax(filtered logits)
    (`draw`)."""
    if self.temperature == 0.0:
      return first_argmax(logits_BxV)
    filtered_BxV = self.filter_logits(logits_BxV).astype(jnp.float32)
    return draw(jnp.exp(filtered_BxV - jnp.max(filtered_BxV, axis=-1, keepdims=True)), rng)

  @property
  def filters(self) -> bool:
    """Whether top-k or top-p removes tokens (else a draw is from the tempered softmax)."""
    return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)


def _order_key(x):
  """int32 keys ordered as the float32 values `x` are (for bisection over the values)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _threshold(x_BxV: jax.Array, weights_BxV: jax.Array, target: float) -> jax.Array:
  """Per row, the largest value v of x such that the weights of the entries >= v sum to at
  least `target` ([B, 1], in x's dtype): with unit weights and target k the k-th largest
  value, with probabilities and target p the top-p cut-off. Exact: a bisection over the 2^32
  float32 bit patterns (32 masked sums), whose result is always one of the row's values."""
  key_BxV = _order_key(x_BxV)
  weights_BxV = weights_BxV.astype(jnp.float32)

  def halve(_, bounds):
    lo_B1, hi_B1 = bounds  # invariant: the answer's key is in [lo, hi]
    mid_B1 = lo_B1 // 2 + hi_B1 // 2 + (lo_B1 % 2 + hi_B1 % 2 + 1) // 2  # no int32 overflow
    enough = jnp.sum(jnp.where(key_BxV >= mid_B1, weights_BxV, 0.0), axis=-1,
                     keepdims=True) >= target
    return jnp.where(enough, mid_B1, lo_B1), jnp.where(enough, hi_B1, mid_B1 - 1)

  bounds = (jnp.min(key_BxV, axis=-1, keepdims=True), jnp.max(key_BxV, axis=-1, keepdims=True))
  lo_B1, _ = jax.lax.fori_loop(0, 32, halve, bounds)
  # the smallest value whose key is >= the answer: the value itself
  return jnp.min(jnp.where(key_BxV >= lo_B1, x_BxV, jnp.inf), axis=-1, keepdims=True)


def first_argmax(x_BxV: jax.Array, max_B1: jax.Array | None = None) -> jax.Array:
  """`jnp.argmax(x, -1)` (the first index of the maximum) as a max and a min over indices:
  two vectorised reductions, where XLA:CPU's one (value, index) reduction took ~2 ms per
  decode step at 16 x 32k. `max_B1`: the rows' maxima when already known."""
  V = x_BxV.shape[-1]
  if max_B1 is None:
    max_B1 = jnp.max(x_BxV, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
  first = jnp.min(jnp.where(x_BxV == max_B1, iota, V), axis=-1)
  return jnp.minimum(first, V - 1)  # NaN rows: no index equals the max


_CHUNK = 256  # tokens per block of the two-level inverse CDF


def draw(weights_BxV: jax.Array, rng: jax.Array) -> jax.Array:
  """One index per row drawn with probability proportional to `weights_BxV` (>= 0, f32).

  Inverts the cumulative distribution with one uniform number u per row: the first token
  whose cumulative weight reaches u (never a zero-weight one: its cumulative value equals the
  previous one's). The same distribution as `jax.random.categorical`, whose Gumbel trick
  draws a random number per vocabulary entry (16 ms per decode step at 16 x 32k on a CPU).
  The cumulative sum is taken in two levels, over blocks of `_CHUNK` tokens and then within
  the chosen block, instead of one scan over the whole vocabulary.
  """
  B, V = weights_BxV.shape
  C = -(-V // _CHUNK)
  w_BxCxW = jnp.pad(weights_BxV, ((0, 0), (0, C * _CHUNK - V))).reshape(B, C, _CHUNK)
  block_BxC = jnp.sum(w_BxCxW, axis=-1)
  block_cdf_BxC = jnp.cumsum(block_BxC, axis=-1)
  u_B1 = jax.random.uniform(rng, (B, 1), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
  u_B1 = u_B1 * block_cdf_BxC[:, -1:]
  block_B = jnp.minimum(jnp.sum(block_cdf_BxC < u_B1, axis=-1), C - 1)
  chosen = lambda a: jnp.take_along_axis(a, block_B.reshape((B,) + (1,) * (a.ndim - 1)), axis=1)
  before_B1 = chosen(block_cdf_BxC - block_BxC)  # the weight of the blocks before it
  cdf_BxW = jnp.cumsum(chosen(w_BxCxW)[:, 0], axis=-1)
  # u within the block, kept inside (0, block total] against rounding between the levels
  rest_B1 = jnp.clip(u_B1 - before_B1, jnp.finfo(jnp.float32).tiny, cdf_BxW[:, -1:])
  return (block_B * _CHUNK + jnp.sum(cdf_BxW < rest_B1, axis=-1)).astype(jnp.int32)


def token_stats(sampler: Sampler, logits_BxV: jax.Array, rng: jax.Array):
  """The next token of each row and, from one pass of softmax statistics over the logits,
  its log-prob (raw logits), its log-prob under the tempered distribution and that
  distribution's entropy: (token_B, logp_B, sample_logp_B, entropy_B).

  With z = logits - max: log p(t) = z_t - log sum exp z, and the entropy of p is
  log sum exp z - sum p z. Greedy rows take the first token where z = 0; sampled rows draw
  from exp(z / temperature) (after top-k / top-p when they are set).
  """
  z_BxV = logits_BxV - jnp.max(logits_BxV, axis=-1, keepdims=True)
  t = sampler.temperature if sampler.temperature > 0 else 1.0
  zt_BxV = z_BxV if t == 1.0 else z_BxV / t
  et_BxV = jnp.exp(zt_BxV)
  if sampler.temperature == 0.0:
    token_B = first_argmax(z_BxV, jnp.zeros_like(z_BxV[:, :1]))  # z's maximum is 0
  elif sampler.filters:
    token_B = sampler.next_tokens(logits_BxV, rng)
  else:
    token_B = draw(et_BxV, rng)
  sum_t_B = jnp.sum(et_BxV, axis=-1)
  lse_t_B = jnp.log(sum_t_B)
  pick = lambda a_BxV: jnp.take_along_axis(a_BxV, token_B[:, None], axis=-1)[:, 0]
  sample_B = pick(zt_BxV) - lse_t_B
  entropy_B = lse_t_B - jnp.sum(et_BxV * zt_BxV, axis=-1) / sum_t_B
  logp_B = sample_B if t == 1.0 else pick(z_BxV) - jnp.log(jnp.sum(jnp.exp(z_BxV), axis=-1))
  return token_B, logp_B, sample_B, entropy_B


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
    interventions=None,
) -> GenerationOutput:
  """Generates up to `max_new_tokens` for each prompt (a list of token-id lists).

  `seed` is an int or a JAX key. `temperature=0` is greedy. See the module docstring for the
  outputs. Compiles once per (batch size, padded prompt width, max_new_tokens, sampler).

  `interventions` (see `jaxpost.models.sites`) apply in the prefill and at every decode step;
  their arrays are traced arguments, so new values (another steering coefficient) reuse the
  compiled loop. In the decode steps T = 1 and `context.slots` is the token's cache slot
  (the padded prompt width P onward). Per-row arrays must have the B * num_samples rows of
  the decode batch, or broadcast. The prefill attends over the P prompt slots (`attn_probs`
  [B, H, P, P]), each decode step over all P + max_new_tokens slots.
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
                   jnp.int32(pad_id), tuple(interventions or ()))


def _repeat_rows(cache, n: int):
  """A KV cache with each row repeated `n` times (rows i*n .. i*n + n - 1 are row i's)."""
  if n == 1:
    return cache
  return cache.replace(k=jnp.repeat(cache.k, n, axis=1), v=jnp.repeat(cache.v, n, axis=1),
                       segment_ids=jnp.repeat(cache.segment_ids, n, axis=0),
                       next_pos=jnp.repeat(cache.next_pos, n, axis=0))


def _decode_cache(cache, extra: int):
  """The prefill's stacked cache as a tuple of per-layer buffers with `extra` empty slots
  (segment 0) after the prompt's."""
  pad = ((0, 0), (0, 0), (0, extra), (0, 0))
  return cache.replace(k=tuple(jnp.pad(k, pad) for k in cache.k),
                       v=tuple(jnp.pad(v, pad) for v in cache.v),
                       segment_ids=jnp.pad(cache.segment_ids, ((0, 0), (0, extra))))


def _cache_follows_the_batch(cache):
  """The KV cache split over the batch axes when traced under a mesh
  (`sharding.constrain_batch`): keys and values on their batch axis, the fourth from the end
  ([L, B, K, S, Dh] stacked, [B, K, S, Dh] per layer), slot segments and positions on their
  rows. On a pod each chip then holds 1 / (data x fsdp) of the rollout's cache, not all of
  it. Unchanged without a mesh."""
  def kv(x):
    return constrain_batch(x, x.ndim - 4)
  return cache.replace(k=jax.tree.map(kv, cache.k), v=jax.tree.map(kv, cache.v),
                       segment_ids=constrain_batch(cache.segment_ids),
                       next_pos=constrain_batch(cache.next_pos))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _generate(config, sampler, max_new, num_samples, cache_dtype, compute_dtype, params,
              tokens_BxP, segments_BxP, rng, stops_S, pad_id, interventions):
  B, P = tokens_BxP.shape
  # The prefill's cache holds the prompt only, so its attention spans P slots, not P + max_new;
  # `_decode_cache` then gives each layer its own buffer with room for the new tokens.
  cache = _cache_follows_the_batch(start_cache(config, params, B, P, cache_dtype))
  out = forward(config, params, tokens_BxP, segment_ids=segments_BxP, cache=cache,
                compute_dtype=compute_dtype, compute_logits=False,
                interventions=interventions or None)
  logits_BxV = lm_head(config, params, out.final_hidden[:, -1:])[:, 0]
  # One prefill per prompt; its cache and last logits shared by the prompt's samples.
  logits_BxV = jnp.repeat(logits_BxV, num_samples, axis=0)
  out = out.replace(cache=_repeat_rows(out.cache, num_samples))
  B = B * num_samples

  def pick(logits_BxV, step):
    token_B, logp_B, sample_B, entropy_B = token_stats(sampler, logits_BxV,
                                                       jax.random.fold_in(rng, step))
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
      # one buffer per layer: each decode step writes and reads a layer's keys and values in
      # place (a stacked cache would copy every layer's slice out of the stack per step)
      cache=_cache_follows_the_batch(_decode_cache(out.cache, max_new)),
  )
  # The decode state's rows follow the batch too (its [B] and [B, max_new] arrays).
  state.update({k: constrain_batch(v) for k, v in state.items() if k not in ("step", "cache")})

  def cond(s):
    return (s["step"] < max_new) & ~jnp.all(s["done"])

  layers = unstack_layers(params)

  def body(s):
    step_out = forward(config, layers, s["token"][:, None], cache=s["cache"],
                       compute_dtype=compute_dtype, compute_logits=False,
                       interventions=interventions or None)
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
