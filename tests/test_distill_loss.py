"""Distillation losses against a float64 NumPy transcription of TRL's
`GKDTrainer.generalized_jsd_loss`, the chunked batch loss against the dense one (value and
gradient), and the compiled memory of the chunked loss (never [B, T, V] float32 logits). The
top-K (cached teacher) divergence against a float64 transcription of its K + 1 buckets, and
at K = V against the full one and the live-teacher batch loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import (distill_batch_loss, distill_loss, distill_topk_batch_loss,
                            token_divergence, topk_divergence, topk_support)
from jaxpost.models import ModelConfig, forward, init_params


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_div(inp, target):
  """torch.nn.functional.kl_div(input, target, reduction="none", log_target=True)."""
  return np.exp(target) * (target - inp)


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta=0.5, temperature=1.0):
  """TRL's generalized_jsd_loss (reduction="batchmean"), line by line, in float64 NumPy."""
  s = _log_softmax(student_logits.astype(np.float64) / temperature)
  t = _log_softmax(teacher_logits.astype(np.float64) / temperature)
  if beta == 0:
    jsd = _kl_div(s, t)
  elif beta == 1:
    jsd = _kl_div(t, s)
  else:
    mixture = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
    jsd = beta * _kl_div(mixture, t) + (1 - beta) * _kl_div(mixture, s)
  mask = labels != -100
  return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_jsd_equals_trls_generalized_jsd(beta, temperature):
  rng = np.random.default_rng(int(beta * 10 + temperature * 100))
  s, t = rng.normal(0, 2, (3, 7, 11)), rng.normal(0, 2, (3, 7, 11))
  labels = rng.integers(0, 11, (3, 7))
  labels[rng.random((3, 7)) < 0.3] = -100
  want = trl_generalized_jsd(s, t, labels, beta, temperature)
  got = distill_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), labels != -100,
                     kind="jsd", beta=beta, temperature=temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_kinds_are_the_two_kls_and_their_limits():
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 2, (2, 5, 9)), rng.normal(0, 2, (2, 5, 9))
  labels = np.zeros((2, 5), np.int64)
  fwd = trl_generalized_jsd(s, t, labels, beta=0.0)   # KL(teacher || student)
  rev = trl_generalized_jsd(s, t, labels, beta=1.0)   # KL(student || teacher)
  m = np.ones((2, 5), bool)
  args = (jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), m)
  np.testing.assert_allclose(float(distill_loss(*args, kind="forward_kl")), fwd, rtol=1e-5)
  np.testing.assert_allclose(float(distill_loss(*args, kind="reverse_kl")), rev, rtol=1e-5)
  ps, pt = np.exp(_log_softmax(s)), np.exp(_log_softmax(t))
  by_hand = (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
  np.testing.assert_allclose(fwd, by_hand, rtol=1e-12)
  assert float(distill_loss(args[0], args[0], m, kind="jsd")) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="kind must be one of"):
    token_divergence(args[0], args[1], kind="kl")
  with pytest.raises(ValueError, match="beta must be in"):
    token_divergence(args[0], args[1], kind="jsd", beta=1.5)


STUDENT = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64)
TEACHER = ModelConfig(model_type="llama", vocab_size=97, hidden_size=48, num_layers=3,
                      num_heads=3, num_kv_heads=1, head_dim=16, intermediate_size=96)


def _rows(B=3, T=20, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 97, (B, T)).astype(np.int32)
  seg = np.ones((B, T), np.int32)
  seg[0, 12:] = 2  # packed: two segments in row 0
  seg[2, 15:] = 0  # padding
  pos = np.concatenate([np.arange(12), np.arange(8)])[None].repeat(B, 0).astype(np.int32)
  mask = (rng.random((B, T)) < 0.7) & (seg > 0)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
          "segment_ids": seg, "positions": pos}


# The batch-loss tests compile a student and a teacher and their gradients (seconds each): they
# run JSD at beta 0.3, which holds both KLs; each kind's formula is checked on logits above.
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_chunked_batch_loss_equals_dense_logits(kind, beta):
  """A teacher of another size, packed rows: value and student gradient of the chunked loss
  equal `distill_loss` on the full logits; with sft_weight the cross-entropy is added."""
  params = init_params(STUDENT, jax.random.key(0))
  teacher = init_params(TEACHER, jax.random.key(1))
  batch = _rows()

  def dense(p):
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    s = forward(STUDENT, p, batch["tokens"], **kw).logits
    t = forward(TEACHER, teacher, batch["tokens"], **kw).logits
    return distill_loss(s, t, batch["loss_mask"], kind=kind, beta=beta, temperature=0.8)

  chunked = functools.partial(distill_batch_loss, config=STUDENT, teacher_config=TEACHER,
                              kind=kind, beta=beta, temperature=0.8, chunk=8)
  (loss, metrics), grad = jax.value_and_grad(
      lambda p: chunked(p, batch, None, teacher), has_aux=True)(params)
  want, want_grad = jax.value_and_grad(dense)(params)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert float(metrics["weight"]) == batch["loss_mask"].sum()
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)
  with_ce, m = chunked(params, batch, None, teacher, sft_weight=0.5)
  logp = jax.nn.log_softmax(forward(STUDENT, params, batch["tokens"],
                                    positions=batch["positions"],
                                    segment_ids=batch["segment_ids"]).logits, -1)
  nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
  nll = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  np.testing.assert_allclose(float(m["nll"]), nll, rtol=1e-5)
  np.testing.assert_allclose(float(with_ce), float(want) + 0.5 * nll, rtol=1e-5)


def test_chunked_loss_never_holds_full_float32_logits():
  """Compiled memory analysis of the gradient: the chunked loss's temporaries stay below one
  [B, T, V] float32 array (it would need two, student and teacher, dense)."""
  cfg = ModelConfig(model_type="llama", vocab_size=16384, hidden_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                    tie_embeddings=True)
  B, T = 2, 512
  params, teacher = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": np.ones((B, T), bool), "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}

  def temp_bytes(fn):
    grad = jax.jit(jax.grad(lambda p: fn(p)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  def dense(p):
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    return distill_loss(forward(cfg, p, tokens, **kw).logits,
                        forward(cfg, teacher, tokens, **kw).logits, batch["loss_mask"])

  chunked = temp_bytes(lambda p: distill_batch_loss(p, batch, None, teacher, config=cfg,
                                                    teacher_config=cfg, chunk=64)[0])
  naive = temp_bytes(dense)
  full = B * T * cfg.vocab_size * 4
  print(f"temp: chunked {chunked / 2**20:.1f} MiB, dense {naive / 2**20:.1f} MiB, one [B, T, V] "
        f"f32 {full / 2**20:.1f} MiB")
  assert naive >= 2 * full  # the check can fail: the dense loss holds both models' logits
  assert chunked < full


def _np_divergence(s, t, kind, beta):
  """The divergence `kind` between log-prob vectors s (student) and t (teacher), float64."""
  if kind == "forward_kl" or (kind == "jsd" and beta == 0):
    return _kl_div(s, t).sum(-1)
  if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
    return _kl_div(t, s).sum(-1)
  mixture = np.logaddexp(s + np.log(1 - beta), t + np.log(beta))
  return (beta * _kl_div(mixture, t) + (1 - beta) * _kl_div(mixture, s)).sum(-1)


def np_topk_divergence(student_logits, teacher_logits, k, kind, beta, temperature=1.0):
  """The K + 1-bucket divergence of `topk_divergence`, by hand in float64: the teacher's
  top-k ids, each side's log-probs there and log(1 - their mass) for the rest."""
  s = _log_softmax(student_logits.astype(np.float64) / temperature)
  t = _log_softmax(teacher_logits.astype(np.float64) / temperature)
  ids = np.argsort(-t, axis=-1)[..., :k]

  def buckets(logp):
    picked = np.take_along_axis(logp, ids, -1)
    return np.concatenate([picked, np.log1p(-np.exp(picked).sum(-1, keepdims=True))], -1)

  return _np_divergence(buckets(s), buckets(t), kind, beta)


def _buckets(logits, ids, temperature=1.0):
  return topk_support(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, -1),
                      ids)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3),
                                       ("jsd", 0.0), ("jsd", 1.0)])
def test_topk_divergence_is_the_k_plus_one_bucket_divergence(kind, beta):
  """K < V: equals the float64 transcription; K = V: equals the full `token_divergence`;
  >= 0, and 0 when the student is the teacher."""
  rng = np.random.default_rng(3)
  s, t = rng.normal(0, 2, (4, 6, 13)), rng.normal(0, 2, (4, 6, 13))
  for k in (1, 4, 12):
    _, ids = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(t, jnp.float32) / 0.8, -1), k)
    got = topk_divergence(*_buckets(s, ids, 0.8), *_buckets(t, ids, 0.8), kind=kind, beta=beta)
    want = np_topk_divergence(s, t, k, kind, beta, temperature=0.8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got) >= 0).all()
    same = topk_divergence(*_buckets(t, ids), *_buckets(t, ids), kind=kind, beta=beta)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
  _, ids = jax.lax.top_k(jnp.asarray(t, jnp.float32), 13)  # K = V: the rest is empty
  s_logp, s_rest = _buckets(s, ids)
  assert np.isneginf(np.asarray(s_rest)).all()
  full = token_divergence(jax.nn.log_softmax(jnp.asarray(s, jnp.float32), -1),
                          jax.nn.log_softmax(jnp.asarray(t, jnp.float32), -1), kind=kind,
                          beta=beta)
  got = topk_divergence(s_logp, s_rest, *_buckets(t, ids), kind=kind, beta=beta)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-5, atol=1e-6)


def _with_teacher_topk(batch, teacher, k, temperature):
  from jaxpost.algorithms.distill_cache import teacher_topk
  ids, logp, rest = teacher_topk(TEACHER, teacher, batch, k=k, temperature=temperature, chunk=8)
  return {**batch, "teacher_ids": ids, "teacher_logp": logp, "teacher_rest": rest}


@pytest.mark.parametrize("kind,beta", [("jsd", 0.3)])
def test_topk_batch_loss_full_support_equals_the_live_teacher(kind, beta):
  """K = V: the cached-teacher batch loss (value and gradient) equals `distill_batch_loss`
  with the teacher in the step; chunks of 8 over T = 20 include a padded chunk."""
  params = init_params(STUDENT, jax.random.key(0))
  teacher = init_params(TEACHER, jax.random.key(1))
  batch = _rows()
  cached = _with_teacher_topk(batch, teacher, 97, 0.8)
  kw = dict(config=STUDENT, kind=kind, beta=beta, temperature=0.8, chunk=8, sft_weight=0.5)
  (loss, m), grad = jax.jit(jax.value_and_grad(
      lambda p: distill_topk_batch_loss(p, cached, None, **kw), has_aux=True))(params)
  (want, wm), want_grad = jax.jit(jax.value_and_grad(
      lambda p: distill_batch_loss(p, batch, None, teacher, teacher_config=TEACHER, **kw),
      has_aux=True))(params)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(m["divergence"]), float(wm["divergence"]), rtol=1e-5)
  assert float(m["weight"]) == batch["loss_mask"].sum() and "nll" in m
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("kind,beta", [("jsd", 0.3)])
def test_topk_batch_loss_equals_the_bucket_divergence_of_dense_logits(kind, beta):
  """K < V: the token mean of `np_topk_divergence` over the mask of both models' dense
  logits; finite gradient. (Temperature 0.25: randomly initialised models are near uniform,
  and a divergence near 0 would measure float32 rounding, not the loss.)"""
  params = init_params(STUDENT, jax.random.key(0))
  teacher = init_params(TEACHER, jax.random.key(1))
  batch = _rows()
  kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
  s = np.asarray(forward(STUDENT, params, batch["tokens"], **kw).logits)
  t = np.asarray(forward(TEACHER, teacher, batch["tokens"], **kw).logits)
  d = np_topk_divergence(s, t, 5, kind, beta, temperature=0.25)
  want = (d * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  cached = _with_teacher_topk(batch, teacher, 5, 0.25)
  loss_fn = lambda p: distill_topk_batch_loss(p, cached, None, config=STUDENT, kind=kind,  # noqa: E731
                                              beta=beta, temperature=0.25, chunk=8)
  (loss, _), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))


def test_topk_batch_loss_never_holds_full_float32_logits():
  """Compiled memory of the gradient of the top-K loss: below one [B, T, V] float32 array."""
  cfg = ModelConfig(model_type="llama", vocab_size=16384, hidden_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                    tie_embeddings=True)
  B, T, K = 2, 512, 32
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
           "loss_mask": np.ones((B, T), bool), "segment_ids": np.ones((B, T), np.int32),
           "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
           "teacher_ids": np.tile(np.arange(K, dtype=np.int32), (B, T, 1)),
           "teacher_logp": np.full((B, T, K), -np.log(K + 1), np.float32),
           "teacher_rest": np.full((B, T), -np.log(K + 1), np.float32)}
  grad = jax.jit(jax.grad(lambda p: distill_topk_batch_loss(p, batch, None, config=cfg,
                                                            chunk=64)[0]))
  temp = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  full = B * T * cfg.vocab_size * 4
  print(f"temp: top-K {temp / 2**20:.1f} MiB, one [B, T, V] f32 {full / 2**20:.1f} MiB")
  assert temp < full
