"""RL losses (`jaxpost.losses.rl`) against float64 numpy transcriptions of the papers' formulas
(plain loops), finite-difference gradients, KL edge cases, exact micro-batch accumulation through
the update step, and 8 devices against one."""

from __future__ import annotations

import functools
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from devices import run_on_8_cpu_devices

from jaxpost.losses import (
  AGGREGATIONS,
  KL_KINDS,
  gae,
  group_advantages,
  kl_penalty,
  masked_whiten,
  policy_loss,
  reinforce_pp_advantages,
  rloo_advantages,
  value_loss,
)
from jaxpost.train.step import init_state, make_train_step

jax.config.update("jax_numpy_rank_promotion", "raise")

# ----------------------------------------------------------------------------------------------
# Literal numpy references (float64, loops), written from the papers' formulas.


def np_group_advantages(r, G, scale="group", eps=1e-6):
  """GRPO (2402.03300, sec. 4.1.2): (r_i - mean(group)) / (std(group) + eps), std unbiased;
  "batch": std over all rewards (TRL); "none": Dr. GRPO (2503.20783), no division."""
  B = len(r)
  mean_all = sum(r) / B
  std_all = math.sqrt(sum((x - mean_all) ** 2 for x in r) / (B - 1))
  out = np.zeros(B)
  for start in range(0, B, G):
    group = r[start:start + G]
    mean = sum(group) / G
    std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1))
    for k in range(G):
      a = group[k] - mean
      if scale == "group":
        a = a / (std + eps)
      elif scale == "batch":
        a = a / (std_all + eps)
      out[start + k] = a
  return out


def np_rloo(r, G):
  """RLOO (2402.14740): r_i minus the mean of the other G - 1 rewards of the group."""
  out = np.zeros(len(r))
  for start in range(0, len(r), G):
    for i in range(G):
      others = [r[start + j] for j in range(G) if j != i]
      out[start + i] = r[start + i] - sum(others) / (G - 1)
  return out


def np_whiten(x, mask, eps=1e-8, shift_mean=True):
  """(x - mean) / sqrt(var + eps) over the masked entries, var unbiased; 0 elsewhere."""
  vals = [x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
  out = np.zeros(x.shape)
  for i in range(x.shape[0]):
    for t in range(x.shape[1]):
      if mask[i, t]:
        out[i, t] = (x[i, t] - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
  return out


def np_discounted_returns(r, mask, gamma):
  """REINFORCE++ (2501.03262): G_t = sum_{s >= t} gamma^(s - t) r_s over a row's contiguous
  completion tokens (the paper's return; rows here have no interior gaps)."""
  out = np.zeros(r.shape)
  for i in range(r.shape[0]):
    toks = [t for t in range(r.shape[1]) if mask[i, t]]
    for k, t in enumerate(toks):
      out[i, t] = sum(gamma ** (s - t) * r[i, s] for s in toks[k:])
  return out


def np_verl_returns(r, mask, gamma):
  """verl's compute_reinforce_plus_plus_outcome_advantage loop, transcribed (interior gaps)."""
  out = np.zeros(r.shape)
  running = np.zeros(r.shape[0])
  for t in reversed(range(r.shape[1])):
    running = r[:, t] + gamma * running
    out[:, t] = running
    running = running * mask[:, t]
  return out


def np_gae(r, v, mask, gamma, lam):
  """GAE (1506.02438, eq. 16) over each row's masked positions only (verl skips the others):
  delta_k = r_k + gamma V_{k+1} - V_k, A_k = delta_k + gamma lam A_{k+1}, zero after the end."""
  adv, ret = np.zeros(r.shape), np.zeros(r.shape)
  for i in range(r.shape[0]):
    toks = [t for t in range(r.shape[1]) if mask[i, t]]
    next_v, next_a = 0.0, 0.0
    for t in reversed(toks):
      delta = r[i, t] + gamma * next_v - v[i, t]
      next_a = delta + gamma * lam * next_a
      next_v = v[i, t]
      adv[i, t], ret[i, t] = next_a, next_a + v[i, t]
  return adv, ret


def np_kl(logp, ref, kind):
  """Schulman's estimators with d = log(ref / pi); verl's low_var_kl clamps; "+" kinds have the
  value of their base kind (their gradient is k2's)."""
  d = ref - logp
  if kind == "k1":
    return logp - ref
  if kind == "k2":
    return 0.5 * (logp - ref) ** 2
  if kind in ("k3", "k3+"):
    return math.exp(d) - d - 1
  d = min(max(d, -20.0), 20.0)
  return min(max(math.exp(d) - d - 1, -10.0), 10.0)


def np_ppo_token(a, ratio, clip_low, clip_high, dual_clip):
  """PPO (1707.06347, eq. 7) as a loss, with clip-higher (DAPO 2503.14476) and the dual
  clip (Ye et al. 2020) for negative advantages."""
  clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
  loss = max(-a * ratio, -a * clipped)
  if dual_clip is not None and a < 0:
    loss = min(loss, -a * dual_clip)
  return loss


def np_policy_loss(logp, old, adv, mask, *, ref=None, beta=0.0, kl="k3", clip_low=0.2,
                   clip_high=None, dual_clip=None, importance_level="token", aggregation="dapo",
                   max_completion_length=None, importance_weights=None, log_ratio_clamp=20.0,
                   count_empty_rows=False, metrics=False):
  """Loss (and metrics) of one batch, token by token. GSPO (2507.18071): the ratio
  of every token of row i is s_i = exp(mean_t log(pi / pi_old))."""
  B, T = mask.shape
  clip_high = clip_low if clip_high is None else clip_high

  def rho(i, t):
    x = logp[i, t] - old[i, t]
    return x if log_ratio_clamp is None else min(max(x, -log_ratio_clamp), log_ratio_clamp)

  losses, lengths = np.zeros((B, T)), [int(sum(mask[i])) for i in range(B)]
  stats = {"low": [], "high": [], "ratio": [], "approx": [], "kl": [], "dual": []}
  for i in range(B):
    toks = [t for t in range(T) if mask[i, t]]
    if importance_level == "sequence" and toks:
      s_i = math.exp(sum(rho(i, t) for t in toks) / len(toks))
    for t in toks:
      a = adv[i] if adv.ndim == 1 else adv[i, t]
      ratio = s_i if importance_level == "sequence" else math.exp(rho(i, t))
      loss = np_ppo_token(a, ratio, clip_low, clip_high, dual_clip)
      stats["dual"].append(dual_clip is not None and a < 0
                           and np_ppo_token(a, ratio, clip_low, clip_high, None) > -a * dual_clip)
      if importance_weights is not None:
        loss *= importance_weights[i, t]
      if ref is not None:
        stats["kl"].append(np_kl(logp[i, t], ref[i, t], kl))
        loss += beta * stats["kl"][-1]
      losses[i, t] = loss
      stats["low"].append(ratio < 1 - clip_low and a < 0)
      stats["high"].append(ratio > 1 + clip_high and a > 0)
      stats["ratio"].append(ratio)
      stats["approx"].append(0.5 * rho(i, t) ** 2)

  rows = [i for i in range(B) if lengths[i] > 0]
  n_rows = B if count_empty_rows else len(rows)
  n_tokens = sum(lengths)
  if aggregation == "grpo":  # GRPO eq. 3: 1/G sum_i 1/|o_i| sum_t
    total, weight = sum(losses[i].sum() / lengths[i] for i in rows) / max(n_rows, 1), n_rows
  elif aggregation == "seq_mean_token_sum":
    total, weight = sum(losses[i].sum() for i in rows) / max(n_rows, 1), n_rows
  elif aggregation == "dr_grpo":  # Dr. GRPO: a constant normaliser
    total, weight = losses.sum() / (B * max_completion_length), B
  else:  # DAPO: 1 / sum_i |o_i| sum_i sum_t
    total, weight = losses.sum() / max(n_tokens, 1), n_tokens
  if not metrics:
    return total

  def mean(xs):
    return sum(float(x) for x in xs) / max(len(xs), 1)

  out = {"weight": weight, "clip_ratio/low_mean": mean(stats["low"]),
         "clip_ratio/high_mean": mean(stats["high"]),
         "clip_ratio/region_mean": mean([lo or hi for lo, hi in zip(stats["low"],
                                                                    stats["high"])]),
         "ratio/mean": mean(stats["ratio"]), "approx_kl": mean(stats["approx"])}
  if dual_clip is not None:
    out["clip_ratio/dual_mean"] = mean(stats["dual"])
  if ref is not None:
    out["kl"] = mean(stats["kl"])
  return total, out


def np_value_loss(v, old, ret, mask, clip):
  """PPO's clipped value loss: 1/2 mean over tokens of max((V - R)^2, (V_clip - R)^2)."""
  terms, clipped, preds = [], [], []
  for i in range(v.shape[0]):
    for t in range(v.shape[1]):
      if mask[i, t]:
        vclip = old[i, t] + min(max(v[i, t] - old[i, t], -clip), clip)
        l1, l2 = (v[i, t] - ret[i, t]) ** 2, (vclip - ret[i, t]) ** 2
        terms.append(max(l1, l2))
        clipped.append(float(l2 > l1))
        preds.append(v[i, t])
  n = len(terms)
  return 0.5 * sum(terms) / n, {"weight": n, "vf_clipfrac": sum(clipped) / n,
                                "vpred": sum(preds) / n}


def central_differences(f, x, h=1e-6):
  """d f / d x by central differences in float64."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g


# ----------------------------------------------------------------------------------------------
# Data

LENGTHS = (7, 3, 0, 5, 1, 6)  # rows of different lengths and an empty row
T = 8


def make_mask(lengths=LENGTHS, T=T, offset_row=3):
  """Prefix masks of `lengths`; row `offset_row` starts at position 2 (a row after a prompt)."""
  mask = np.zeros((len(lengths), T), bool)
  for i, n in enumerate(lengths):
    start = 2 if i == offset_row else 0
    mask[i, start:start + n] = True
  return mask


def rl_batch(seed=0, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  mask = make_mask(lengths)
  B = len(lengths)
  logp = rng.uniform(-3.0, -0.1, (B, T))
  old = logp + rng.normal(0.0, 0.4, (B, T))
  ref = logp + rng.normal(0.0, 0.4, (B, T))
  logp, old, ref = (np.where(mask, x, 7.0) for x in (logp, old, ref))  # garbage on padding
  signs_B = np.resize([1.0, -1.0], B)  # both signs, so every clip can bind
  return {"logp": logp, "old": old, "ref": ref, "mask": mask,
          "adv_B": signs_B * rng.uniform(0.2, 1.5, B), "adv_BxT": rng.normal(0.0, 1.0, (B, T)),
          "w": rng.uniform(0.5, 1.5, (B, T))}


# (name, options): every aggregation, clip-higher, dual clip, GSPO, the KL kinds, TIS weights.
POLICY_CASES = [
    ("grpo", {"aggregation": "grpo"}),
    ("grpo-count-empty", {"aggregation": "grpo", "count_empty_rows": True}),
    ("dr_grpo", {"aggregation": "dr_grpo", "max_completion_length": 10}),
    ("dapo-clip-higher", {"aggregation": "dapo", "clip_high": 0.28}),
    ("bnpo", {"aggregation": "bnpo"}),
    ("token_mean", {"aggregation": "token_mean", "clip_low": 0.1}),
    ("seq_mean_token_sum", {"aggregation": "seq_mean_token_sum"}),
    ("dual-clip", {"aggregation": "dapo", "dual_clip": 1.2}),
    ("per-token-advantages", {"aggregation": "grpo", "per_token": True}),
    ("gspo", {"aggregation": "grpo", "importance_level": "sequence", "clip_low": 0.05}),
    ("gspo-dapo", {"aggregation": "dapo", "importance_level": "sequence", "clip_low": 0.05,
                   "clip_high": 0.1}),
    ("tis-weights", {"aggregation": "dapo", "weights": True}),
    ("clamp", {"aggregation": "dapo", "log_ratio_clamp": 0.3}),
    ("no-clamp", {"aggregation": "dapo", "log_ratio_clamp": None}),
    *[(f"kl-{k}", {"aggregation": "grpo", "beta": 0.1, "kl": k}) for k in KL_KINDS],
    ("kl-metric-only", {"aggregation": "dapo", "ref": True}),
]
GRAD_KL = {"k3+": "k2", "low_var_kl+": "k2"}  # straight-through kinds: k2's gradient


def _split_case(b, opts):
  opts = dict(opts)
  adv = b["adv_BxT"] if opts.pop("per_token", False) else b["adv_B"]
  if opts.pop("weights", False):
    opts["importance_weights"] = b["w"]
  if opts.pop("ref", False) or opts.get("beta", 0) > 0:
    opts["ref"] = b["ref"]
  return adv, opts


def _jax_policy(b, adv, opts, dtype):
  kw = {k: v for k, v in opts.items() if k != "ref"}
  if "importance_weights" in kw:
    kw["importance_weights"] = jnp.asarray(kw["importance_weights"], dtype)
  ref = None if "ref" not in opts else jnp.asarray(opts["ref"], dtype)

  def f(logp):
    return policy_loss(logp, jnp.asarray(b["old"], dtype), jnp.asarray(adv, dtype),
                       jnp.asarray(b["mask"]), ref_logps=ref, **kw)
  return f


# ----------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_group_advantages_match_grpo_and_dr_grpo(scale, eps):
  r = np.random.default_rng(0).normal(0.0, 1.0, 12)
  r[8:12] = 0.5  # a group with equal rewards: advantage 0
  with jax.enable_x64(True):
    got = group_advantages(jnp.asarray(r), 4, scale=scale, eps=eps)
    assert got.dtype == jnp.float64 and got.shape == (12,)
    np.testing.assert_allclose(got, np_group_advantages(r, 4, scale, eps), rtol=1e-12,
                               atol=1e-12)
  got32 = group_advantages(jnp.asarray(r, jnp.float32), 4, scale=scale, eps=eps)
  assert got32.dtype == jnp.float32
  np.testing.assert_allclose(got32, np_group_advantages(r, 4, scale, eps), atol=1e-5)
  np.testing.assert_array_equal(got32[8:], 0.0)


def test_group_of_one_raises_and_points_to_reinforce_pp():
  for fn in (group_advantages, rloo_advantages):
    with pytest.raises(ValueError, match="reinforce_pp_advantages"):
      fn(jnp.ones(4), 1)
  with pytest.raises(ValueError, match="whole groups"):
    group_advantages(jnp.ones(6), 4)
  with pytest.raises(ValueError, match="group, batch, none"):
    group_advantages(jnp.ones(4), 2, scale="std")


def test_integer_rewards_give_float32():
  assert group_advantages(jnp.array([1, 0, 1, 1]), 2).dtype == jnp.float32


def test_rloo_matches_leave_one_out():
  r = np.random.default_rng(1).normal(0.0, 1.0, 12)
  with jax.enable_x64(True):
    for G in (2, 3, 4):
      np.testing.assert_allclose(rloo_advantages(jnp.asarray(r), G), np_rloo(r, G),
                                 rtol=1e-12, atol=1e-12)


def test_masked_whiten_is_verl_unbiased():
  b = rl_batch(2)
  x = np.random.default_rng(2).normal(3.0, 2.0, b["mask"].shape)
  with jax.enable_x64(True):
    for shift in (True, False):
      got = masked_whiten(jnp.asarray(x), jnp.asarray(b["mask"]), shift_mean=shift)
      np.testing.assert_allclose(got, np_whiten(x, b["mask"], shift_mean=shift), rtol=1e-12,
                                 atol=1e-12)
  one = masked_whiten(jnp.ones((2, 3)), jnp.zeros((2, 3)).at[0, 1].set(1))  # n = 1: no NaN
  np.testing.assert_array_equal(one, 0.0)
  np.testing.assert_array_equal(masked_whiten(jnp.ones((2, 3)), jnp.zeros((2, 3))), 0.0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_token_rewards(gamma):
  b = rl_batch(3)
  mask = b["mask"]
  r = np.where(mask, np.random.default_rng(3).normal(0.0, 1.0, mask.shape), 0.0)
  with jax.enable_x64(True):
    got = reinforce_pp_advantages(jnp.asarray(r), jnp.asarray(mask), gamma=gamma)
  want = np_whiten(np_discounted_returns(r, mask, gamma), mask)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(want, np_whiten(np_verl_returns(r, mask, gamma), mask), atol=1e-12)


def test_reinforce_pp_sequence_reward_at_last_token():
  b = rl_batch(4)
  mask = b["mask"]
  r_B = np.random.default_rng(4).normal(0.0, 1.0, len(LENGTHS))
  r_BxT = np.zeros(mask.shape)
  for i in range(len(LENGTHS)):
    toks = np.flatnonzero(mask[i])
    if toks.size:
      r_BxT[i, toks[-1]] = r_B[i]
  with jax.enable_x64(True):
    got = reinforce_pp_advantages(jnp.asarray(r_B), jnp.asarray(mask), gamma=0.8)
  np.testing.assert_allclose(got, np_whiten(np_discounted_returns(r_BxT, mask, 0.8), mask),
                             rtol=1e-10, atol=1e-10)


def test_reinforce_pp_interior_masked_span_is_verls_reset():
  mask = np.array([[1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]], bool)
  r = np.where(mask, np.random.default_rng(5).normal(0.0, 1.0, mask.shape), 0.0)
  r[0, 3] = 5.0  # a reward on a masked-out position reaches no token
  with jax.enable_x64(True):
    got = reinforce_pp_advantages(jnp.asarray(r), jnp.asarray(mask), gamma=0.9)
  np.testing.assert_allclose(got, np_whiten(np_verl_returns(r, mask, 0.9), mask), rtol=1e-10,
                             atol=1e-10)


def test_reinforce_pp_baseline_subtracts_the_group_mean():
  mask = make_mask((4, 2, 3, 5, 1, 6), offset_row=None)
  r_B = np.random.default_rng(6).normal(0.0, 1.0, 6)
  scores = [r_B[i] - sum(r_B[3 * (i // 3):3 * (i // 3) + 3]) / 3 for i in range(6)]
  want = np_whiten(np.where(mask, np.array(scores)[:, None], 0.0), mask)
  with jax.enable_x64(True):
    got = reinforce_pp_advantages(jnp.asarray(r_B), jnp.asarray(mask), group_size=3)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    r_BxT = np.zeros(mask.shape)  # the same scores as per-token rewards spread over the row
    for i in range(6):
      r_BxT[i, mask[i]] = r_B[i] / mask[i].sum()
    np.testing.assert_allclose(
        reinforce_pp_advantages(jnp.asarray(r_BxT), jnp.asarray(mask), group_size=3), want,
        rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match="gamma"):
    reinforce_pp_advantages(jnp.asarray(r_B), jnp.asarray(mask), group_size=3, gamma=0.9)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_the_recursion(gamma, lam):
  mask = make_mask()
  mask[0, 3:5] = False  # an interior span (tool observation): skipped
  rng = np.random.default_rng(7)
  r = rng.normal(0.0, 1.0, mask.shape)
  v = rng.normal(0.0, 1.0, mask.shape)
  with jax.enable_x64(True):
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma=gamma, lam=lam)
  want_adv, want_ret = np_gae(r, v, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_is_jittable_with_traced_gamma():
  mask = make_mask()
  r, v = jnp.ones(mask.shape), jnp.zeros(mask.shape)
  adv, _ = jax.jit(lambda g, lam: gae(r, v, jnp.asarray(mask), gamma=g, lam=lam))(1.0, 1.0)
  np.testing.assert_allclose(adv[0, :7], np.arange(7, 0, -1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# KL


def test_kl_kinds_match_numpy():
  b = rl_batch(8)
  lp, ref = b["logp"][b["mask"]], b["ref"][b["mask"]]
  with jax.enable_x64(True):
    for kind in KL_KINDS:
      got = kl_penalty(jnp.asarray(lp), jnp.asarray(ref), kind=kind)
      want = [np_kl(x, y, kind) for x, y in zip(lp, ref)]
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_k3_never_negative_where_the_naive_form_is():
  d = np.concatenate([s * np.logspace(-12, 0, 400) for s in (1.0, -1.0)]).astype(np.float32)
  logp = np.zeros_like(d)
  ref = d  # d = ref - logp exactly
  naive = np.exp(d) - d - np.float32(1)
  assert naive.dtype == np.float32 and (naive < 0).any()
  got = kl_penalty(jnp.asarray(logp), jnp.asarray(ref), kind="k3")
  assert got.dtype == jnp.float32 and bool(jnp.all(got >= 0))
  assert np.all(np.asarray(got)[naive < 0] >= 0)
  with jax.enable_x64(True):  # and it stays close to the float64 value
    exact = kl_penalty(jnp.asarray(logp, jnp.float64), jnp.asarray(ref, jnp.float64), kind="k3")
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-7)


def test_low_var_kl_clamps():
  logp = jnp.array([0.0, 0.0, 0.0, 0.0])
  ref = jnp.array([30.0, -30.0, 5.0, -5.0])
  got = kl_penalty(logp, ref, kind="low_var_kl")
  np.testing.assert_allclose(got, [10.0, 10.0, 10.0, math.exp(-5) + 4], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(kl_penalty(x, ref, kind="low_var_kl")))(logp)
  np.testing.assert_allclose(grad[:3], 0.0)  # clamped: no gradient
  np.testing.assert_allclose(grad[3], 1 - math.exp(-5), rtol=1e-6)  # d/dlogp (e^d - d - 1)


@pytest.mark.parametrize("kind,base", [("k3+", "k3"), ("low_var_kl+", "low_var_kl")])
def test_straight_through_kl_has_k2_gradient(kind, base):
  b = rl_batch(9)
  lp, ref = jnp.asarray(b["logp"][b["mask"]]), jnp.asarray(b["ref"][b["mask"]])

  def total(k):
    return lambda x: jnp.sum(kl_penalty(x, ref, kind=k))

  np.testing.assert_array_equal(kl_penalty(lp, ref, kind=kind), kl_penalty(lp, ref, kind=base))
  np.testing.assert_allclose(jax.grad(total(kind))(lp), jax.grad(total("k2"))(lp), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(total(kind))(lp), lp - ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.grad(total(base))(lp), lp - ref, atol=1e-3)


def test_unknown_kl_kind_lists_the_kinds():
  with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl, k3\\+"):
    kl_penalty(jnp.zeros(2), jnp.zeros(2), kind="kl")


# ----------------------------------------------------------------------------------------------
# Policy loss: values, metrics and gradients against the numpy reference


@pytest.mark.parametrize("name,opts", POLICY_CASES, ids=[n for n, _ in POLICY_CASES])
def test_policy_loss_matches_numpy_value_metrics_and_gradient(name, opts):
  b = rl_batch(10)
  adv, opts = _split_case(b, opts)
  with jax.enable_x64(True):
    f = _jax_policy(b, adv, opts, jnp.float64)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(b["logp"]))
    assert loss.dtype == jnp.float64
  want, want_metrics = np_policy_loss(b["logp"], b["old"], adv, b["mask"], metrics=True, **opts)
  np.testing.assert_allclose(loss, want, rtol=1e-10, atol=1e-12)
  assert set(metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-10, atol=1e-12, err_msg=k)

  grad_opts = dict(opts, kl=GRAD_KL.get(opts.get("kl"), opts.get("kl", "k3")))
  want_grad = central_differences(
      lambda x: np_policy_loss(x, b["old"], adv, b["mask"], **grad_opts), b["logp"])
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-8)
  assert not np.any(np.asarray(grad)[~b["mask"]])  # padding gets no gradient


@pytest.mark.parametrize("name,opts", POLICY_CASES[:12], ids=[n for n, _ in POLICY_CASES[:12]])
def test_policy_loss_float32_close_to_float64_reference(name, opts):
  b = rl_batch(11)
  adv, opts = _split_case(b, opts)
  f = _jax_policy(b, adv, opts, jnp.float32)
  loss, metrics = f(jnp.asarray(b["logp"], jnp.float32))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
  np.testing.assert_allclose(loss, np_policy_loss(b["logp"], b["old"], adv, b["mask"], **opts),
                             rtol=1e-5, atol=1e-5)


def test_clipping_and_the_dual_clip_are_exercised():
  """The reference cases above are only meaningful if clipping happens in them."""
  b = rl_batch(10)
  _, m = np_policy_loss(b["logp"], b["old"], b["adv_B"], b["mask"], dual_clip=1.2,
                        metrics=True)
  assert 0 < m["clip_ratio/low_mean"] < 1 and 0 < m["clip_ratio/high_mean"] < 1
  assert 0 < m["clip_ratio/dual_mean"] < 1
  _, m = np_policy_loss(b["logp"], b["old"], b["adv_B"], b["mask"], importance_level="sequence",
                        clip_low=0.05, metrics=True)
  assert 0 < m["clip_ratio/region_mean"] < 1


def test_dapo_bnpo_token_mean_are_one_aggregation():
  b = rl_batch(12)
  f = functools.partial(policy_loss, jnp.asarray(b["logp"]), jnp.asarray(b["old"]),
                        jnp.asarray(b["adv_B"]), jnp.asarray(b["mask"]))
  base, _ = f(aggregation="dapo")
  for agg in ("bnpo", "token_mean"):
    assert float(f(aggregation=agg)[0]) == float(base)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_is_exactly_one_on_policy(level):
  b = rl_batch(13)
  lp = jnp.asarray(b["logp"], jnp.float32)
  loss, m = policy_loss(lp, lp, jnp.asarray(b["adv_B"], jnp.float32), jnp.asarray(b["mask"]),
                        importance_level=level, dual_clip=2.0, clip_low=0.0001)
  assert float(m["ratio/mean"]) == 1.0 and float(m["approx_kl"]) == 0.0
  for k in ("low", "high", "region", "dual"):
    assert float(m[f"clip_ratio/{k}_mean"]) == 0.0
  adv_tokens = np.broadcast_to(b["adv_B"][:, None], b["mask"].shape)[b["mask"]]
  np.testing.assert_allclose(loss, -adv_tokens.mean(), rtol=1e-6)


def test_gspo_gradient_is_the_sequence_objectives():
  """GSPO-token with per-row advantages: the gradient of the sequence objective,
  s_i A_i grad (1/|y_i|) sum_t log pi(y_t), by hand."""
  b = rl_batch(14)
  with jax.enable_x64(True):
    lp = jnp.asarray(b["logp"])
    grad = jax.grad(lambda x: policy_loss(x, jnp.asarray(b["old"]), jnp.asarray(b["adv_B"]),
                                          jnp.asarray(b["mask"]), importance_level="sequence",
                                          aggregation="grpo", clip_low=0.9)[0])(lp)
  rows = [i for i in range(len(LENGTHS)) if LENGTHS[i]]
  want = np.zeros(b["mask"].shape)
  for i in rows:
    toks = np.flatnonzero(b["mask"][i])
    s = math.exp(sum(b["logp"][i, t] - b["old"][i, t] for t in toks) / len(toks))
    want[i, toks] = -b["adv_B"][i] * s / len(toks) / len(rows)
  np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_padding_nan_and_empty_batches_stay_finite():
  b = rl_batch(15)
  mask = jnp.asarray(b["mask"])

  def nan_pad(x):
    return jnp.where(mask, jnp.asarray(x, jnp.float32), jnp.nan)

  def loss(logp, agg, level, empty=False):
    m = jnp.zeros_like(mask) if empty else mask
    return policy_loss(logp, nan_pad(b["old"]), nan_pad(b["adv_BxT"]), m,
                       ref_logps=nan_pad(b["ref"]), beta=0.1, importance_level=level,
                       aggregation=agg, max_completion_length=8,
                       importance_weights=nan_pad(b["w"]))

  grad = jax.value_and_grad(loss, has_aux=True)
  for agg in AGGREGATIONS:
    for level in ("token", "sequence"):
      (value, m), g = grad(nan_pad(b["logp"]), agg, level)
      assert np.isfinite(float(value)) and np.all(np.isfinite(g)), (agg, level)
      assert all(np.isfinite(float(v)) for v in m.values())
      (value, m), g = grad(nan_pad(b["logp"]), agg, level, empty=True)
      assert float(value) == 0.0 and not np.any(g), (agg, level)
      assert all(np.isfinite(float(v)) for v in m.values())
      if agg != "dr_grpo":
        assert float(m["weight"]) == 0.0


def test_argument_errors():
  x, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="ref_logps"):
    policy_loss(x, x, jnp.ones(2), mask, beta=0.1)
  with pytest.raises(ValueError, match="max_completion_length"):
    policy_loss(x, x, jnp.ones(2), mask, aggregation="dr_grpo")
  with pytest.raises(ValueError, match="dual_clip"):
    policy_loss(x, x, jnp.ones(2), mask, dual_clip=1.0)
  with pytest.raises(ValueError, match="grpo, dr_grpo, dapo"):
    policy_loss(x, x, jnp.ones(2), mask, aggregation="mean")
  with pytest.raises(ValueError, match="token, sequence"):
    policy_loss(x, x, jnp.ones(2), mask, importance_level="seq")
  with pytest.raises(ValueError, match="k1, k2, k3"):
    policy_loss(x, x, jnp.ones(2), mask, ref_logps=x, beta=0.1, kl="kl")
  with pytest.raises(AssertionError):
    policy_loss(x, x, jnp.ones(3), mask)


def test_jit_with_traced_beta():
  b = rl_batch(16)
  args = [jnp.asarray(b[k], jnp.float32) for k in ("logp", "old", "adv_B")]
  f = jax.jit(lambda beta: policy_loss(*args, jnp.asarray(b["mask"]),
                                       ref_logps=jnp.asarray(b["ref"], jnp.float32),
                                       beta=beta)[0])
  np.testing.assert_allclose(
      f(0.1), np_policy_loss(b["logp"], b["old"], b["adv_B"], b["mask"], ref=b["ref"], beta=0.1),
      rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Value loss


def test_value_loss_matches_ppo_and_finite_differences():
  b = rl_batch(17)
  rng = np.random.default_rng(17)
  v = rng.normal(0.0, 1.0, b["mask"].shape)
  old = v + rng.normal(0.0, 0.3, v.shape)
  ret = v + rng.normal(0.0, 0.5, v.shape)
  with jax.enable_x64(True):
    (loss, m), grad = jax.value_and_grad(
        lambda x: value_loss(x, jnp.asarray(old), jnp.asarray(ret), jnp.asarray(b["mask"]),
                             clip=0.2), has_aux=True)(jnp.asarray(v))
  want, want_m = np_value_loss(v, old, ret, b["mask"], 0.2)
  np.testing.assert_allclose(loss, want, rtol=1e-12)
  assert 0 < want_m["vf_clipfrac"] < 1
  for k, x in want_m.items():
    np.testing.assert_allclose(m[k], x, rtol=1e-12, err_msg=k)
  want_grad = central_differences(lambda x: np_value_loss(x, old, ret, b["mask"], 0.2)[0], v)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Exact accumulation through the update step

F, V, ROWS = 5, 11, 16
TOY_LENGTHS = (8, 3, 5, 0, 1, 6, 8, 2, 7, 4, 8, 5, 3, 6, 1, 7)  # row 3 is empty
EMPTY_MICRO_LENGTHS = (8, 3, 5, 0, 1, 6, 8, 0, 7, 4, 8, 0, 3, 6, 1, 0)  # rows 3 mod 4: all empty
ACCUMULATION_CASES = [
    ("grpo", {"aggregation": "grpo"}),
    ("dr_grpo", {"aggregation": "dr_grpo", "max_completion_length": 8}),
    ("dapo", {"aggregation": "dapo", "clip_high": 0.28, "beta": 0.05, "kl": "k3"}),
    ("seq_mean_token_sum", {"aggregation": "seq_mean_token_sum", "beta": 0.05,
                            "kl": "low_var_kl"}),
    ("gspo", {"aggregation": "grpo", "importance_level": "sequence", "clip_low": 0.05,
              "beta": 0.05, "kl": "k3+"}),
    ("grpo-count-empty", {"aggregation": "grpo", "count_empty_rows": True, "dual_clip": 1.5}),
]
CASE_NAMES = [n for n, _ in ACCUMULATION_CASES]
METRIC_KEYS = ("weight", "clip_ratio/region_mean", "ratio/mean", "approx_kl", "kl")


def toy_params(seed=0):
  return {"w": jnp.asarray(np.random.default_rng(seed).normal(0.0, 0.5, (F, V)), jnp.float32)}


def toy_logps(params, batch):
  """A differentiable toy policy: log_softmax(x @ w)[target] per position."""
  logits_BxTxV = jnp.einsum("btf,fv->btv", batch["x"], params["w"])
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]


def toy_batch(case, seed=0, lengths=TOY_LENGTHS):
  """16 rows of varied lengths; old and reference log-probs near the initial policy's; `case`
  (an index into ACCUMULATION_CASES, one copy per row so that it splits like the rows)."""
  rng = np.random.default_rng(seed)
  mask = make_mask(lengths, offset_row=None)
  batch = {"x": rng.normal(0.0, 1.0, (ROWS, T, F)).astype(np.float32),
           "targets": rng.integers(0, V, (ROWS, T)).astype(np.int32), "mask": mask,
           "advantages": rng.normal(0.0, 1.0, ROWS).astype(np.float32),
           "case": np.full(ROWS, case, np.int32)}
  logp = np.asarray(toy_logps(toy_params(), batch))
  batch["old_logps"] = (logp + rng.normal(0.0, 0.2, logp.shape)).astype(np.float32)
  batch["ref_logps"] = (logp + rng.normal(0.0, 0.2, logp.shape)).astype(np.float32)
  return batch


def toy_loss(params, batch, rng):
  """policy_loss of the toy policy under the options of ACCUMULATION_CASES[batch["case"][0]]:
  every case in one function, so that each update step below compiles once, not per case."""
  del rng

  def branch(opts):
    def one(logp_BxT):
      ref = batch["ref_logps"] if opts.get("beta", 0) else None
      loss, metrics = policy_loss(logp_BxT, batch["old_logps"], batch["advantages"],
                                  batch["mask"], ref_logps=ref, **opts)
      return loss, {k: metrics.get(k, jnp.float32(0)) for k in METRIC_KEYS}
    return one

  branches = [branch(opts) for _, opts in ACCUMULATION_CASES]
  return jax.lax.switch(batch["case"][0], branches, toy_logps(params, batch))


def toy_step(micro_batches, **kw):
  """`(batch, state=None) -> (updated w, metrics)`: one SGD step from `toy_params()`."""
  opt = optax.sgd(0.1)
  step = make_train_step(toy_loss, opt, micro_batches=micro_batches, **kw)

  def run(batch, state=None):
    state = init_state(toy_params(), opt, jax.random.key(0)) if state is None else state
    state, metrics = step(state, batch, {})
    return state.params["w"], metrics
  return run


@pytest.fixture(scope="module")
def toy_steps():
  return toy_step(1), toy_step(4)


@pytest.mark.parametrize("case", range(len(ACCUMULATION_CASES)), ids=CASE_NAMES)
def test_micro_batches_equal_one_batch(case, toy_steps):
  one, four = toy_steps
  for lengths in (TOY_LENGTHS, EMPTY_MICRO_LENGTHS):  # one empty row; one empty micro-batch
    batch = toy_batch(case, 1, lengths)
    w1, m1 = one(batch)
    w4, m4 = four(batch)
    assert float(m1["skipped"]) == 0.0 and float(m4["skipped"]) == 0.0
    np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(w4, w1, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(w1 - toy_params()["w"]))) > 1e-3  # the step did move
    if ACCUMULATION_CASES[case][1]["aggregation"] == "dapo":  # token weights: exact token means
      for k in METRIC_KEYS[1:]:
        np.testing.assert_allclose(m4[k], m1[k], atol=1e-6, rtol=0, err_msg=k)


SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    sys.path.insert(0, sys.argv[1])
    from test_rl_losses import CASE_NAMES, toy_batch, toy_params, toy_step
    from jaxpost.sharding import make_mesh
    from jaxpost.train.step import batch_sharding, init_state, state_shardings

    assert jax.device_count() == 8
    mesh = make_mesh(data=8)
    opt = optax.sgd(0.1)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sshard = state_shardings({"w": replicated}, toy_params(), opt, mesh)
    one = toy_step(1)
    # 8 devices x 2 micro-batches: each device holds one row of each micro-batch
    eight = toy_step(2, state_sharding=sshard, batch_sharding=batch_sharding(mesh))
    worst = 0.0
    for case, name in enumerate(CASE_NAMES):
      batch = toy_batch(case, 2)
      w1, m1 = one(batch)
      sharded = jax.device_put(batch, batch_sharding(mesh))
      assert len(sharded["x"].sharding.device_set) == 8
      state = jax.device_put(init_state(toy_params(), opt, jax.random.key(0)), sshard)
      w8, m8 = eight(sharded, state)
      err = max(abs(float(m8["loss"]) - float(m1["loss"])), float(jnp.max(jnp.abs(w8 - w1))))
      print(name, err)
      assert err < 1e-6, (name, err)
      worst = max(worst, err)
    print("worst", worst)
    print("OK")
""")


def test_8_devices_equal_one_device():
  run_on_8_cpu_devices(SHARDED)
