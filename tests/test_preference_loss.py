"""Preference losses (DPO family, SimPO, ORPO, KTO) against literal numpy formulas, hand-computed
values, finite differences, padding rows and jit."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses.preference import (
  LOSS_TYPES,
  kto_loss,
  preference_loss,
  weighted_mean,
)

REFERENCE_FREE = ("simpo", "orpo")

# (loss_type, options): every loss type once, plus label smoothing and length normalisation.
CASES = [
    ("sigmoid", {"beta": 0.5}),
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}),
    ("sigmoid", {"beta": 0.5, "length_normalize": True}),
    ("cdpo", {"beta": 0.5, "label_smoothing": 0.2}),
    ("robust", {"beta": 0.5, "label_smoothing": 0.2}),
    ("hinge", {"beta": 0.5}),
    ("hinge", {"beta": 2.0, "length_normalize": True}),
    ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "gamma": 0.5}),
    ("simpo", {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1}),
    ("orpo", {"beta": 0.1}),
]
CASE_IDS = [f"{t}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for t, kw in CASES]


# ----------------------------------------------------------------------------------------------
# Literal numpy references (float64), written from the papers' and TRL's formulas.

def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_preference_losses(loss_type, c, r, rc, rr, lc, lr, *, beta, label_smoothing=0.0,
                         gamma=0.0, length_normalize=False, chosen_nll=None):
  """Per-row losses; c, r (rc, rr) the summed policy (reference) log-probs, lc, lr the lengths."""
  eps = label_smoothing
  if loss_type == "simpo":  # Meng et al. eq. 6: beta / |y| log pi(y|x), margin gamma
    x = beta / lc * c - beta / lr * r - gamma
    return -(1 - eps) * np.log(_sig(x)) - eps * np.log(_sig(-x))
  if loss_type == "orpo":  # Hong et al. eqs. 4-7 with P = exp(mean token log-prob)
    p_w, p_l = np.exp(c / lc), np.exp(r / lr)
    odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
    nll = -c / lc if chosen_nll is None else chosen_nll
    return nll + beta * -np.log(_sig(np.log(odds_w / odds_l)))
  if loss_type == "ipo" or length_normalize:  # TRL: all_logps / loss_mask.sum(-1)
    c, r, rc, rr = c / lc, r / lr, rc / lc, rr / lr
  logits = (c - r) - (rc - rr)  # TRL's dpo_loss
  if loss_type == "sigmoid":
    return (-np.log(_sig(beta * logits)) * (1 - eps) - np.log(_sig(-beta * logits)) * eps)
  if loss_type == "cdpo":  # Mitchell's note: labels flipped with probability eps
    p = _sig(beta * ((c - rc) - (r - rr)))
    return -(1 - eps) * np.log(p) - eps * np.log(1 - p)
  if loss_type == "robust":  # Chowdhury et al. eq. 9
    return ((-(1 - eps) * np.log(_sig(beta * logits)) + eps * np.log(_sig(-beta * logits)))
            / (1 - 2 * eps))
  if loss_type == "hinge":
    return np.maximum(0.0, 1 - beta * logits)
  if loss_type == "ipo":  # Azar et al. eq. 17, tau = beta
    return (logits - 1 / (2 * beta)) ** 2
  raise AssertionError(loss_type)


def np_preference_metrics(loss_type, c, r, rc, rr, lc, lr, *, beta, length_normalize=False,
                          **_):
  if loss_type in ("ipo", "simpo", "orpo") or length_normalize:
    c, r = c / lc, r / lr
    if rc is not None:
      rc, rr = rc / lc, rr / lr
  if loss_type in REFERENCE_FREE:  # TRL's CPO / ORPO: beta * policy log-probs
    reward_c, reward_r = beta * c, beta * r
  else:
    reward_c, reward_r = beta * (c - rc), beta * (r - rr)
  out = {"rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
         "rewards/accuracies": (reward_c > reward_r).mean(),
         "rewards/margins": (reward_c - reward_r).mean(),
         "logps/chosen": c.mean(), "logps/rejected": r.mean()}
  if loss_type == "orpo":  # TRL's odds_ratio_loss
    log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
    out.update({"nll_loss": (-c).mean(), "log_odds_ratio": np.log(_sig(log_odds)).mean(),
                "log_odds_chosen": log_odds.mean()})
  return out


def np_kto_losses(p, rf, klp, klr, labels, *, beta, desirable_weight=1.0,
                  undesirable_weight=1.0):
  """TRL's kto_loss: z0 = clamp(mean(KL log-ratios), min=0), then eq. 7 of the KTO paper."""
  z0 = max(np.mean(klp - klr), 0.0)
  out = []
  for i, desirable in enumerate(labels):
    logratio = p[i] - rf[i]
    if desirable:
      out.append(desirable_weight * (1 - _sig(beta * (logratio - z0))))
    else:
      out.append(undesirable_weight * (1 - _sig(beta * (z0 - logratio))))
  return np.array(out)


# ----------------------------------------------------------------------------------------------
# Helpers

def _batch(seed=0, B=8):
  """Random summed log-probs: lengths 1..19, mean token log-probs in (-3, -0.05)."""
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 20, B).astype(np.float64)
  lr = rng.integers(1, 20, B).astype(np.float64)
  c = rng.uniform(-3, -0.05, B) * lc
  r = rng.uniform(-3, -0.05, B) * lr
  rc = c + rng.normal(0, 1.5, B)
  rr = r + rng.normal(0, 1.5, B)
  return {"c": c, "r": r, "rc": rc, "rr": rr, "lc": lc, "lr": lr}


def _loss(loss_type, b, dtype=jnp.float32, **kw):
  """preference_loss on batch `b` (numpy float64) cast to `dtype`."""
  a = {k: jnp.asarray(v, dtype) for k, v in b.items()}
  refs = () if loss_type in REFERENCE_FREE else (a["rc"], a["rr"])
  return preference_loss(a["c"], a["r"], *refs, loss_type=loss_type, chosen_lengths=a["lc"],
                         rejected_lengths=a["lr"], **kw)


def _np_args(loss_type, b):
  rc, rr = (None, None) if loss_type in REFERENCE_FREE else (b["rc"], b["rr"])
  return (b["c"], b["r"], rc, rr, b["lc"], b["lr"])


def _central_differences(f, xs, h=1e-6):
  """d f / d xs[k][i] by central differences, f: tuple of float64 arrays -> float."""
  grads = []
  for k, x in enumerate(xs):
    g = np.zeros_like(x)
    for i in range(x.size):
      up = [np.array(a) for a in xs]
      down = [np.array(a) for a in xs]
      up[k][i] += h
      down[k][i] -= h
      g[i] = (float(f(*up)) - float(f(*down))) / (2 * h)
    grads.append(g)
  return grads


# ----------------------------------------------------------------------------------------------
# Parity with the numpy references

@pytest.mark.parametrize("loss_type,kw", CASES, ids=CASE_IDS)
def test_matches_numpy_reference_float64(loss_type, kw):
  b = _batch(seed=1)
  with jax.enable_x64(True):
    losses, metrics = _loss(loss_type, b, jnp.float64, **kw)
    assert losses.dtype == jnp.float64 and losses.shape == (8,)
    np.testing.assert_allclose(losses, np_preference_losses(loss_type, *_np_args(loss_type, b),
                                                            **kw), rtol=1e-12, atol=1e-12)
    expected = np_preference_metrics(loss_type, *_np_args(loss_type, b), **kw)
    chex.assert_trees_all_close(metrics, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type,kw", CASES, ids=CASE_IDS)
def test_float32_close_to_float64_reference(loss_type, kw):
  b = _batch(seed=2)
  losses, metrics = _loss(loss_type, b, **kw)
  assert losses.dtype == jnp.float32
  assert all(m.dtype == jnp.float32 and m.shape == () for m in metrics.values())
  np.testing.assert_allclose(losses, np_preference_losses(loss_type, *_np_args(loss_type, b),
                                                          **kw), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_computed_in_float32():
  b = _batch(seed=3)
  losses, metrics = _loss("sigmoid", b, jnp.bfloat16, beta=0.5)
  assert losses.dtype == jnp.float32 and metrics["rewards/chosen"].dtype == jnp.float32


def test_orpo_chosen_nll_replaces_the_default():
  b = _batch(seed=4)
  nll = np.random.default_rng(0).uniform(0.5, 2.0, 8)
  with jax.enable_x64(True):
    losses, metrics = _loss("orpo", b, jnp.float64, beta=0.2, chosen_nll=jnp.asarray(nll))
    np.testing.assert_allclose(
        losses, np_preference_losses("orpo", *_np_args("orpo", b), beta=0.2, chosen_nll=nll),
        rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(metrics["nll_loss"], nll.mean(), rtol=1e-12)


def test_cdpo_is_sigmoid_with_label_smoothing():
  b = _batch(seed=5)
  cdpo, _ = _loss("cdpo", b, beta=0.3, label_smoothing=0.15)
  sigmoid, _ = _loss("sigmoid", b, beta=0.3, label_smoothing=0.15)
  np.testing.assert_array_equal(cdpo, sigmoid)


def test_kto_matches_numpy_reference():
  rng = np.random.default_rng(6)
  p, rf = rng.uniform(-40, -5, 10), rng.uniform(-40, -5, 10)
  labels = rng.random(10) < 0.6
  for shift in (+2.0, -2.0):  # mean KL log-ratio positive, and negative (clamped to 0)
    klp = rng.uniform(-40, -5, 10)
    klr = klp - shift + rng.normal(0, 0.5, 10)
    kw = {"beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7}
    with jax.enable_x64(True):
      losses, metrics = kto_loss(*(jnp.asarray(x) for x in (p, rf, klp, klr)), labels, **kw)
      np.testing.assert_allclose(losses, np_kto_losses(p, rf, klp, klr, labels, **kw),
                                 rtol=1e-12, atol=1e-12)
      rewards = 0.3 * (p - rf)
      expected = {"kl": max(np.mean(klp - klr), 0.0),
                  "rewards/chosen": rewards[labels].mean(),
                  "rewards/rejected": rewards[~labels].mean(),
                  "rewards/margins": rewards[labels].mean() - rewards[~labels].mean(),
                  "logps/chosen": p[labels].mean(), "logps/rejected": p[~labels].mean(),
                  "count/chosen": labels.sum(), "count/rejected": (~labels).sum()}
      chex.assert_trees_all_close(metrics, expected, rtol=1e-12, atol=1e-12)
  assert shift < 0 and float(metrics["kl"]) == 0.0


# ----------------------------------------------------------------------------------------------
# Hand-computed values

def _one(x):
  return jnp.array([x], jnp.float32)


def test_dpo_of_equal_logps_is_log_2():
  zeros = jnp.zeros(4)
  for beta in (0.1, 1.0):
    losses, metrics = preference_loss(zeros, zeros, zeros, zeros, beta=beta)
    np.testing.assert_allclose(losses, np.full(4, math.log(2)), rtol=1e-7)
    assert float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0  # a tie is not a win


def test_hand_computed_values():
  # DPO: h = (-10 + 11) - (-12 + 11) = 2, beta h = 1: -log sigma(1) = log(1 + e^-1) = 0.3132617;
  # rewards 0.5 * 1 and 0.5 * -1.
  losses, m = preference_loss(_one(-10.0), _one(-12.0), _one(-11.0), _one(-11.0), beta=0.5)
  np.testing.assert_allclose(losses, [0.31326168751822286], rtol=1e-6)
  assert (float(m["rewards/chosen"]), float(m["rewards/rejected"])) == (0.5, -0.5)
  assert (float(m["rewards/margins"]), float(m["rewards/accuracies"])) == (1.0, 1.0)

  # Hinge: same h = 2, beta = 0.25: max(0, 1 - 0.5) = 0.5.
  losses, _ = preference_loss(_one(-10.0), _one(-12.0), _one(-11.0), _one(-11.0),
                              loss_type="hinge", beta=0.25)
  np.testing.assert_allclose(losses, [0.5], rtol=1e-7)

  # With beta h = log 3: sigma = 3/4 and 1/4. eps = 1/4:
  # cDPO: -(3/4) log(3/4) - (1/4) log(1/4) = log 4 - (3/4) log 3 = 0.5623351;
  # robust: (-(3/4) log(3/4) + (1/4) log(1/4)) / (1/2) = log 4 - (3/2) log 3 = -0.2616240.
  args = (_one(math.log(3)), _one(0.0), _one(0.0), _one(0.0))
  losses, _ = preference_loss(*args, loss_type="cdpo", beta=1.0, label_smoothing=0.25)
  np.testing.assert_allclose(losses, [math.log(4) - 0.75 * math.log(3)], rtol=1e-6)
  losses, _ = preference_loss(*args, loss_type="robust", beta=1.0, label_smoothing=0.25)
  np.testing.assert_allclose(losses, [math.log(4) - 1.5 * math.log(3)], rtol=1e-6)

  # IPO: per-token means c = -10/2 = -5, r = -12/4 = -3, ref c = -11/2 = -5.5, ref r = -11/4:
  # h = 0.5 - (-0.25) = 0.75; beta = 0.5 so 1 / (2 beta) = 1: (0.75 - 1)^2 = 0.0625.
  losses, m = preference_loss(_one(-10.0), _one(-12.0), _one(-11.0), _one(-11.0),
                              loss_type="ipo", beta=0.5, chosen_lengths=_one(2.0),
                              rejected_lengths=_one(4.0))
  np.testing.assert_allclose(losses, [0.0625], rtol=1e-6)
  assert (float(m["logps/chosen"]), float(m["logps/rejected"])) == (-5.0, -3.0)

  # SimPO: means -4/4 = -1 and -10/5 = -2; beta = 2, gamma = 1: -log sigma(2 * 1 - 1) = 0.3132617;
  # rewards are beta * mean log-prob: -2 and -4.
  losses, m = preference_loss(_one(-4.0), _one(-10.0), loss_type="simpo", beta=2.0, gamma=1.0,
                              chosen_lengths=_one(4.0), rejected_lengths=_one(5.0))
  np.testing.assert_allclose(losses, [0.31326168751822286], rtol=1e-6)
  assert (float(m["rewards/chosen"]), float(m["rewards/rejected"])) == (-2.0, -4.0)

  # ORPO: mean token probabilities 1/2 (two tokens of log 1/2) and 1/4 (three of log 1/4): odds
  # 1 and 1/3, log odds ratio log 3, -log sigma(log 3) = log(4/3); nll = log 2:
  # loss = log 2 + 0.1 log(4/3) = 0.7219153.
  losses, m = preference_loss(_one(2 * math.log(0.5)), _one(3 * math.log(0.25)), loss_type="orpo",
                              beta=0.1, chosen_lengths=_one(2.0), rejected_lengths=_one(3.0))
  np.testing.assert_allclose(losses, [math.log(2) + 0.1 * math.log(4 / 3)], rtol=1e-6)
  np.testing.assert_allclose(m["log_odds_chosen"], math.log(3), rtol=1e-6)
  np.testing.assert_allclose(m["log_odds_ratio"], math.log(3 / 4), rtol=1e-5)
  np.testing.assert_allclose(m["nll_loss"], math.log(2), rtol=1e-6)


def test_kto_hand_computed():
  # z0 = mean(-4 - (-5)) = 1. Desirable row: rho = -1 - (-2) = 1, 1 - sigma(0.5 (1 - 1)) = 1/2.
  # Undesirable row: rho = -3 - (-2) = -1, 2 * (1 - sigma(0.5 (1 + 1))) = 2 sigma(-1) = 0.5378828.
  losses, m = kto_loss(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0]), jnp.array([-4.0, -4.0]),
                       jnp.array([-5.0, -5.0]), jnp.array([True, False]), beta=0.5,
                       undesirable_weight=2.0)
  np.testing.assert_allclose(losses, [0.5, 2 / (1 + math.e)], rtol=1e-6)
  assert float(m["kl"]) == 1.0
  assert (float(m["rewards/chosen"]), float(m["rewards/rejected"])) == (0.5, -0.5)
  assert float(m["rewards/margins"]) == 1.0


# ----------------------------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("loss_type,kw", CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences(loss_type, kw):
  b = _batch(seed=7)
  v = np.random.default_rng(8).normal(size=8)
  if loss_type == "hinge":  # keep away from the kink at beta h = 1
    norm = (b["lc"], b["lr"]) if kw.get("length_normalize") else (1.0, 1.0)
    h = (b["c"] - b["rc"]) / norm[0] - (b["r"] - b["rr"]) / norm[1]
    assert np.all(np.abs(1 - kw["beta"] * h) > 1e-2) and np.any(1 - kw["beta"] * h > 0)
  names = ("c", "r") if loss_type in REFERENCE_FREE else ("c", "r", "rc", "rr")

  with jax.enable_x64(True):
    @jax.jit
    def f(*xs):
      batch = dict(b, **dict(zip(names, xs)))
      losses, _ = _loss(loss_type, batch, jnp.float64, **kw)
      return jnp.sum(jnp.asarray(v) * losses)

    xs = tuple(b[n] for n in names)
    grads = [np.asarray(g) for g in jax.grad(f, argnums=tuple(range(len(xs))))(*xs)]
    expected = _central_differences(f, xs)
  for name, g, e in zip(names, grads, expected):
    assert np.any(g != 0), name
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8, err_msg=name)


def test_orpo_gradient_through_chosen_nll():
  b = _batch(seed=9)
  nll = np.random.default_rng(10).uniform(0.5, 2.0, 8)
  v = np.random.default_rng(11).normal(size=8)
  with jax.enable_x64(True):
    @jax.jit
    def f(c, r, chosen_nll):
      losses, _ = _loss("orpo", dict(b, c=c, r=r), jnp.float64, beta=0.3, chosen_nll=chosen_nll)
      return jnp.sum(jnp.asarray(v) * losses)

    xs = (b["c"], b["r"], nll)
    grads = [np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(*xs)]
    expected = _central_differences(f, xs)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads[2], v, rtol=1e-12)  # d loss / d nll = 1


def _kto_inputs(seed=12, B=8):
  rng = np.random.default_rng(seed)
  p, rf = rng.uniform(-30, -5, B), rng.uniform(-30, -5, B)
  klp = rng.uniform(-30, -5, B)
  klr = klp - 1.5 + rng.normal(0, 0.5, B)  # mean KL log-ratio ~1.5 > 0: z0 is not clamped
  labels = np.arange(B) % 3 != 0
  return p, rf, klp, klr, labels


def test_kto_gradient_matches_finite_differences():
  p, rf, klp, klr, labels = _kto_inputs()
  v = np.random.default_rng(13).normal(size=8)
  with jax.enable_x64(True):
    @jax.jit
    def f(p, rf):
      losses, _ = kto_loss(p, rf, klp, klr, labels, beta=0.2, desirable_weight=1.3,
                           undesirable_weight=0.8)
      return jnp.sum(jnp.asarray(v) * losses)

    grads = [np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(p, rf)]
    expected = _central_differences(f, (p, rf))
  for g, e in zip(grads, expected):
    assert np.all(g != 0)
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-10)


def test_kto_kl_baseline_gets_no_gradient():
  p, rf, klp, klr, labels = _kto_inputs()
  with jax.enable_x64(True):
    def f(klp, klr):
      losses, _ = kto_loss(p, rf, klp, klr, labels, beta=0.2)
      return jnp.mean(losses)

    g_klp, g_klr = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(klp, klr))
    # the baseline does change the loss's value: it is only its gradient that is stopped
    (d_klp,) = _central_differences(lambda klp: f(klp, klr), (klp,))
  assert np.all(g_klp == 0) and np.all(g_klr == 0)
  assert np.all(np.abs(d_klp) > 1e-4)


# ----------------------------------------------------------------------------------------------
# Padding rows, weights, empty groups

def _with_padding_row(b, at=2):
  """`b` with a padding row (no tokens: log-probs 0, length 0) inserted at `at`."""
  return {k: np.insert(v, at, 0.0) for k, v in b.items()}


@pytest.mark.parametrize("loss_type,kw", CASES, ids=CASE_IDS)
def test_zero_length_rows_are_finite_and_weight_zero_ignores_them(loss_type, kw):
  b = _batch(seed=14, B=4)
  padded = _with_padding_row(b)
  weights = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
  losses, metrics = _loss(loss_type, padded, weights=weights, **kw)
  assert np.all(np.isfinite(losses)) and all(np.isfinite(m) for m in metrics.values())

  def total(c, r):
    out, _ = _loss(loss_type, dict(padded, c=c, r=r), weights=weights, **kw)
    return weighted_mean(out, weights)

  gc, gr = jax.grad(total, argnums=(0, 1))(jnp.asarray(padded["c"], jnp.float32),
                                           jnp.asarray(padded["r"], jnp.float32))
  assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
  assert gc[2] == 0 and gr[2] == 0

  plain_losses, plain_metrics = _loss(loss_type, b, **kw)
  np.testing.assert_allclose(np.delete(np.asarray(losses), 2), plain_losses, rtol=1e-6)
  chex.assert_trees_all_close(metrics, plain_metrics, rtol=1e-6, atol=1e-7)


def test_weighted_mean():
  x = jnp.array([1.0, 2.0, jnp.nan, 4.0])
  assert float(weighted_mean(x, jnp.array([1.0, 1.0, 0.0, 2.0]))) == 11.0 / 4.0
  assert float(weighted_mean(x, jnp.zeros(4))) == 0.0
  assert float(weighted_mean(jnp.array([1.0, 3.0]))) == 2.0


def test_metric_means_accumulate_like_one_batch():
  """Micro-batch means weighted by their total weight (what the update step does with
  metrics["weight"]) equal the full batch's means."""
  b = _with_padding_row(_batch(seed=15, B=7), at=5)
  w = np.ones(8)
  w[5] = 0.0
  losses, full = _loss("sigmoid", b, beta=0.5, weights=jnp.asarray(w))
  parts = [([k for k in range(8) if k % 2 == i]) for i in (0, 1)]
  acc = {k: 0.0 for k in full}
  loss_acc = 0.0
  for rows in parts:
    sub = {k: v[rows] for k, v in b.items()}
    sub_losses, m = _loss("sigmoid", sub, beta=0.5, weights=jnp.asarray(w[rows]))
    n = w[rows].sum()
    loss_acc += n * float(weighted_mean(sub_losses, jnp.asarray(w[rows])))
    for k in full:
      acc[k] += n * float(m[k])
  np.testing.assert_allclose(loss_acc / w.sum(), weighted_mean(losses, jnp.asarray(w)),
                             rtol=1e-6)
  for k in full:
    np.testing.assert_allclose(acc[k] / w.sum(), full[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_kto_padding_rows_and_empty_groups():
  p, rf, klp, klr, labels = _kto_inputs(B=6)
  losses, m = kto_loss(p, rf, klp, klr, labels, beta=0.2)
  # a padding row (all log-probs 0) of weight 0 changes neither the KL baseline nor the metrics
  def pad(x):
    return np.insert(x, 3, 0)

  w = jnp.asarray(pad(np.ones(6)))
  p_losses, p_m = kto_loss(pad(p), pad(rf), pad(klp), pad(klr), pad(labels), beta=0.2,
                           weights=w)
  np.testing.assert_allclose(np.delete(np.asarray(p_losses), 3), losses, rtol=1e-6)
  chex.assert_trees_all_close(p_m, m, rtol=1e-6)

  for group in (True, False):  # every row desirable, then every row undesirable
    losses, m = kto_loss(p, rf, klp, klr, np.full(6, group), beta=0.2)
    assert np.all(np.isfinite(losses)) and all(np.isfinite(v) for v in m.values())
    empty = "rejected" if group else "chosen"
    assert float(m[f"count/{empty}"]) == 0.0 and float(m[f"rewards/{empty}"]) == 0.0
    assert float(m[f"logps/{empty}"]) == 0.0

  losses, m = kto_loss(p, rf, klp, klr, labels, weights=jnp.zeros(6))
  assert all(np.isfinite(v) for v in m.values()) and float(m["kl"]) == 0.0


# ----------------------------------------------------------------------------------------------
# jit and argument checks

@pytest.mark.parametrize("loss_type,kw", CASES, ids=CASE_IDS)
def test_jit(loss_type, kw):
  b = {k: jnp.asarray(v, jnp.float32) for k, v in _batch(seed=16).items()}
  refs = () if loss_type in REFERENCE_FREE else (b["rc"], b["rr"])
  fn = functools.partial(preference_loss, loss_type=loss_type, **kw)
  jitted = jax.jit(fn)
  args = (b["c"], b["r"], *refs)
  lengths = {"chosen_lengths": b["lc"], "rejected_lengths": b["lr"]}
  eager_losses, eager_metrics = fn(*args, **lengths)
  losses, metrics = jitted(*args, **lengths)
  chex.assert_trees_all_close((losses, metrics), (eager_losses, eager_metrics), rtol=1e-6,
                              atol=1e-7)
  jitted(*(x + 1.0 for x in args), **lengths)
  assert jitted._cache_size() == 1  # pylint: disable=protected-access


def test_jit_with_traced_beta_and_kto():
  b = {k: jnp.asarray(v, jnp.float32) for k, v in _batch(seed=17).items()}
  f = jax.jit(lambda beta: preference_loss(b["c"], b["r"], b["rc"], b["rr"], beta=beta)[0])
  np.testing.assert_allclose(f(0.3), preference_loss(b["c"], b["r"], b["rc"], b["rr"],
                                                     beta=0.3)[0], rtol=1e-6)
  p, rf, klp, klr, labels = _kto_inputs()
  kto = jax.jit(functools.partial(kto_loss, beta=0.1))
  losses, m = kto(p, rf, klp, klr, labels)
  np.testing.assert_allclose(losses, kto_loss(p, rf, klp, klr, labels, beta=0.1)[0], rtol=1e-6)
  assert losses.dtype == jnp.float32 and m["kl"].dtype == jnp.float32


def test_argument_errors():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="choose one of sigmoid, hinge, ipo, cdpo, robust"):
    preference_loss(x, x, x, x, loss_type="dpo")
  assert set(LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "cdpo", "robust", "simpo", "orpo"}
  with pytest.raises(ValueError, match="needs ref_chosen_logps and ref_rejected_logps"):
    preference_loss(x, x, x)
  with pytest.raises(ValueError, match="uses no reference model"):
    preference_loss(x, x, x, x, loss_type="simpo", chosen_lengths=x, rejected_lengths=x)
  with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
    preference_loss(x, x, loss_type="orpo")
  with pytest.raises(ValueError, match="needs chosen_lengths"):
    preference_loss(x, x, x, x, length_normalize=True)
  with pytest.raises(ValueError, match="label_smoothing"):
    preference_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match="out of range"):
    preference_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="gamma"):
    preference_loss(x, x, x, x, gamma=0.5)
  with pytest.raises(ValueError, match="chosen_nll"):
    preference_loss(x, x, x, x, chosen_nll=x)


def test_shape_errors_name_the_argument():
  """Per-token [B, T] log-probs (not summed per sequence) would otherwise run, elementwise."""
  x, tok_BxT = jnp.zeros(3), jnp.zeros((3, 5))
  with pytest.raises(AssertionError, match=r"preference_loss: chosen_logps must be \[B\]"):
    preference_loss(tok_BxT, tok_BxT, tok_BxT, tok_BxT)
  with pytest.raises(AssertionError, match=r"weights must all be \[B\], one B"):
    preference_loss(x, x, x, x, weights=jnp.ones(4))
  with pytest.raises(AssertionError, match=r"kto_loss: labels must be \[B\]"):
    kto_loss(x, x, x, x, jnp.ones((3, 1), bool))
