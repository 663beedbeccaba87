"""The model under evaluation: scoring continuations and sampling completions, batched by
length bucket through compiled functions that are made once per model shape.

    model = EvalModel(config, params, tokenizer, batch_size=32)
    scored = model.score(contexts, continuations)   # summed log-probs, greedy flags, lengths
    outs = model.generate(prompts, k=4, temperature=1.0, max_new_tokens=32)
    kl = model.kl_to(reference, sequences, masks)   # exact per-token KL(model || reference)

Every call pads its rows to `batch_size` and its length to a bucket (powers of two from 32),
so evaluating a second checkpoint, a second suite or a second batch of the same bucket reuses
the compiled program: `compilations()` counts them (the eval tests pin it). Scoring runs the
training forward with the LM head in sequence chunks (`jaxpost.losses.tokens.chunked`), so
the full [B, T, V] logits never exist at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.data import pad_id_of
from jaxpost.losses.tokens import chunked
from jaxpost.models import ModelConfig, forward, lm_head
from jaxpost.multihost import host_tree
from jaxpost.sampling import generate
from jaxpost.tokenizer import Tokenizer

_COMPILES = {"count": 0}
_MIN_BUCKET = 32


def compilations() -> int:
  """How many evaluation programs (scoring, KL) have been traced in this process."""
  return _COMPILES["count"]


def bucket(n: int, minimum: int = _MIN_BUCKET) -> int:
  """The padded length of an `n`-token row: the next power of two >= `minimum`."""
  width = minimum
  while width < n:
    width *= 2
  return width


@dataclasses.dataclass
class Scored:
  """Per row: summed log-prob of the continuation, whether every continuation token is the
  model's argmax (lm-eval's `is_greedy`), its number of tokens, and (with `per_token`) its
  token log-probs."""
  logprob: np.ndarray
  greedy: np.ndarray
  length: np.ndarray
  tokens: list | None = None


@dataclasses.dataclass
class Sample:
  """One generated completion: its token ids (stop token removed), its text, and the
  sampler's per-token entropies."""
  ids: list[int]
  text: str
  entropies: np.ndarray


def _chunk_stats(config, params, h_BxCxD, t_BxC):
  logits_BxCxV = lm_head(config, params, h_BxCxD).astype(jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  picked_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  greedy_BxC = picked_BxC >= jnp.max(logits_BxCxV, axis=-1)
  return picked_BxC - lse_BxC, greedy_BxC


@functools.lru_cache(maxsize=None)
def _score_fn(config: ModelConfig, compute_dtype, chunk: int):
  def score(params, tokens_BxT, targets_BxT, segments_BxT, mask_BxT):
    _COMPILES["count"] += 1  # runs once per trace
    out = forward(config, params, tokens_BxT, segment_ids=segments_BxT,
                  compute_dtype=compute_dtype, compute_logits=False)
    h, t = chunked(chunk, out.final_hidden, targets_BxT)
    logp, greedy = jax.lax.map(lambda a: _chunk_stats(config, params, *a), (h, t))
    T = tokens_BxT.shape[1]
    logp_BxT = logp.swapaxes(0, 1).reshape(tokens_BxT.shape[0], -1)[:, :T]
    greedy_BxT = greedy.swapaxes(0, 1).reshape(tokens_BxT.shape[0], -1)[:, :T]
    m = mask_BxT.astype(jnp.float32)
    return (jnp.sum(logp_BxT * m, -1), jnp.all(greedy_BxT | (m == 0), -1), jnp.sum(m, -1),
            logp_BxT * m)

  return jax.jit(score)


@functools.lru_cache(maxsize=None)
def _kl_fn(config: ModelConfig, compute_dtype, chunk: int):
  def kl(params, ref_params, tokens_BxT, segments_BxT, mask_BxT):
    _COMPILES["count"] += 1
    hp = forward(config, params, tokens_BxT, segment_ids=segments_BxT,
                 compute_dtype=compute_dtype, compute_logits=False).final_hidden
    hq = forward(config, ref_params, tokens_BxT, segment_ids=segments_BxT,
                 compute_dtype=compute_dtype, compute_logits=False).final_hidden
    hp_c, hq_c = chunked(chunk, hp, hq)

    def one(a):
      lp = jax.nn.log_softmax(lm_head(config, params, a[0]).astype(jnp.float32), -1)
      lq = jax.nn.log_softmax(lm_head(config, ref_params, a[1]).astype(jnp.float32), -1)
      return jnp.sum(jnp.exp(lp) * (lp - lq), -1)

    kl_NxBxC = jax.lax.map(one, (hp_c, hq_c))
    T = tokens_BxT.shape[1]
    kl_BxT = kl_NxBxC.swapaxes(0, 1).reshape(tokens_BxT.shape[0], -1)[:, :T]
    m = mask_BxT.astype(jnp.float32)
    return jnp.sum(kl_BxT * m, -1), jnp.sum(m, -1)

  return jax.jit(kl)


def pack_rows(contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
              rows: int, max_length: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded [rows, bucket] arrays of `context + continuation`: tokens, next-token
  targets, segment ids (1 on real tokens), and a mask on the positions that predict a
  continuation token. A row longer than `max_length` loses tokens from the left of its
  context (lm-eval's convention); missing rows are all padding."""
  seqs = []
  for ctx, cont in zip(contexts, continuations):
    seq = list(ctx) + list(cont)
    cut = max(0, len(seq) - max_length) if max_length else 0
    if len(ctx) - cut < 1:
      raise ValueError(f"a continuation of {len(cont)} tokens leaves no context within "
                       f"max_length={max_length} (and every row needs >= 1 context token)")
    seqs.append((seq[cut:], len(ctx) - cut, len(cont)))
  T = bucket(max(len(s) for s, _, _ in seqs))
  out = {k: np.zeros((rows, T), np.int32) for k in ("tokens", "targets", "segment_ids")}
  out["tokens"][:] = pad_id
  out["mask"] = np.zeros((rows, T), bool)
  for i, (seq, n_ctx, n_cont) in enumerate(seqs):
    out["tokens"][i, :len(seq)] = seq
    out["targets"][i, :len(seq) - 1] = seq[1:]
    out["segment_ids"][i, :len(seq)] = 1
    out["mask"][i, n_ctx - 1:len(seq) - 1] = True
  return out


@dataclasses.dataclass
class EvalModel:
  """A model to evaluate: `params` are the full model's (adapters or a learned prompt
  attached). `batch_size` rows go through each compiled call; `max_length` cuts long rows
  from the left; `label` names the model in reports."""

  config: ModelConfig
  params: Any
  tokenizer: Tokenizer
  batch_size: int = 32
  max_length: int | None = None
  compute_dtype: Any = None
  chunk: int = 256
  label: str = "model"
  seed: int = 0

  @property
  def pad_id(self) -> int:
    return pad_id_of(self.tokenizer)

  def _batches(self, n: int):
    for start in range(0, n, self.batch_size):
      yield start, min(start + self.batch_size, n)

  def score(self, contexts: Sequence[Sequence[int]],
            continuations: Sequence[Sequence[int]], *, per_token: bool = False) -> Scored:
    """log p(continuation | context) summed over its tokens, for each pair; `per_token`
    also returns each row's list of token log-probs (as `Scored.tokens`)."""
    if len(contexts) != len(continuations):
      raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations):
      raise ValueError("every continuation needs at least one token")
    fn = _score_fn(self.config, self.compute_dtype, self.chunk)
    order = np.argsort([len(c) + len(d) for c, d in zip(contexts, continuations)], kind="stable")
    logprob, greedy, length = (np.zeros(len(order)), np.zeros(len(order), bool),
                               np.zeros(len(order), np.int32))
    tokens: list = [None] * len(order)
    for start, stop in self._batches(len(order)):
      idx = order[start:stop]
      rows = pack_rows([contexts[i] for i in idx], [continuations[i] for i in idx],
                       rows=self.batch_size, max_length=self.max_length, pad_id=self.pad_id)
      lp, gr, ln, per = host_tree(fn(self.params, rows["tokens"], rows["targets"],
                                     rows["segment_ids"], rows["mask"]))
      n = len(idx)
      logprob[idx], greedy[idx], length[idx] = lp[:n], gr[:n], ln[:n]
      if per_token:
        for j, i in enumerate(idx):
          tokens[i] = per[j][rows["mask"][j]]
    return Scored(logprob, greedy, length, tokens if per_token else None)

  def kl_to(self, reference: EvalModel, contexts: Sequence[Sequence[int]],
            continuations: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the summed exact KL(self || reference) over the continuation's positions
    (the full next-token distributions, not a one-sample estimate) and the token count."""
    fn = _kl_fn(self.config, self.compute_dtype, self.chunk)
    total, count = np.zeros(len(contexts)), np.zeros(len(contexts))
    for start, stop in self._batches(len(contexts)):
      rows = pack_rows(contexts[start:stop], continuations[start:stop], rows=self.batch_size,
                       max_length=self.max_length, pad_id=self.pad_id)
      kl, n = host_tree(fn(self.params, reference.params, rows["tokens"],
                           rows["segment_ids"], rows["mask"]))
      total[start:stop], count[start:stop] = kl[:stop - start], n[:stop - start]
    return total, count

  def generate(self, prompts: Sequence[Sequence[int]], *, k: int = 1, temperature: float = 0.0,
               max_new_tokens: int = 64, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None) -> list[list[Sample]]:
    """`k` completions of each prompt (greedy when temperature is 0), ending at the
    tokenizer's stop tokens: a list per prompt of `Sample`s."""
    stops = self.tokenizer.eos_ids
    stop_set = set(stops)
    result: list[list[Sample]] = []
    rows = max(1, self.batch_size // k)
    for start, stop in ((s, min(s + rows, len(prompts))) for s in range(0, len(prompts), rows)):
      chunk = list(prompts[start:stop])
      chunk += [chunk[-1]] * (rows - len(chunk))  # one compiled shape per bucket
      key = jax.random.fold_in(jax.random.key(self.seed if seed is None else seed), start)
      out = generate(self.config, self.params, chunk, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, stop_tokens=stops,
                     seed=key, pad_id=self.pad_id, compute_dtype=self.compute_dtype,
                     num_samples=k)
      toks, lens, ents = host_tree((out.tokens, out.lengths, out.entropies))
      for i in range(stop - start):
        samples = []
        for j in range(i * k, i * k + k):
          ids = [int(t) for t in toks[j, :lens[j]]]
          if ids and ids[-1] in stop_set:
            ids = ids[:-1]
          samples.append(Sample(ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                ents[j, :lens[j]]))
        result.append(samples)
    return result
