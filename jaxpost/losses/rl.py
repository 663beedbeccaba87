"""Reinforcement-learning losses over per-token log-probabilities: advantages, KL, PPO family.

Pure, jit-able functions of [B, T] arrays (rows = completions, T = completion positions, a 0/1
`mask_BxT` marking the completion tokens that count) and [B] per-row values. Python-valued
options (`scale`, `kind`, `aggregation`, `importance_level`, group sizes, clip ranges) are static
under `jax.jit` (bind them with `functools.partial`); arrays, `beta`, `gamma` and `lam` may be
traced. Inputs are computed in float32 (bfloat16 and integers upcast, float64 kept).

* Advantages (no gradient is needed through them; compute them once per rollout batch):
  `group_advantages` (GRPO, Dr. GRPO), `rloo_advantages` (RLOO), `reinforce_pp_advantages`
  (REINFORCE++, REINFORCE++-baseline), `gae` (PPO with a critic) and `masked_whiten`.
  Groups are prompt-major: rows i*G .. i*G + G - 1 are the G samples of prompt i.
* `kl_penalty`: per-token estimators of KL(pi || ref) (Schulman 2020, "Approximating KL
  divergence").
* `policy_loss`: the clipped surrogate of PPO / GRPO / DAPO / GSPO with an optional KL term, and
  `value_loss`, PPO's clipped value loss. Both return `(loss, metrics)` with
  `metrics["weight"]`, the quantity the update step (`jaxpost.train.step`) weights micro-batches
  by, chosen so that accumulation over any number of micro-batches and devices gives exactly the
  loss and gradient of the whole batch of one optimizer step.

TRL (`GRPOTrainer`, `PPOTrainer`) and verl (`verl.trainer.ppo.core_algos`) differ in several
conventions; each function's docstring says which one it follows and which option gives the
other. In short: std epsilon (eps=1e-6 verl, 1e-4 TRL), groups of one (an error here and in TRL,
mean 0 / std 1 in verl), Dr. GRPO's normaliser, whether empty rows count in sequence means
(`count_empty_rows`), the log-ratio clamp (`log_ratio_clamp`), and verl's "k3" and "k3+", which
are clamped (our "low_var_kl" and "low_var_kl+").
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl", "k3+", "low_var_kl+")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo", "bnpo", "token_mean", "seq_mean_token_sum")
IMPORTANCE_LEVELS = ("token", "sequence")

_sg = jax.lax.stop_gradient


def _float(x) -> jax.Array:
  """`x` as an array of at least float32 (bfloat16 and integers to float32, float64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask(mask_BxT, like: jax.Array) -> jax.Array:
  """The 0/1 mask as floats of `like`'s dtype."""
  return (jnp.asarray(mask_BxT) != 0).astype(like.dtype)


def _masked(x_BxT: jax.Array, m_BxT: jax.Array) -> jax.Array:
  """x where the mask is 1, else 0 (a NaN or inf on padding neither leaks into sums nor into
  gradients)."""
  return jnp.where(m_BxT > 0, x_BxT, 0.0)


def _masked_mean(x_BxT: jax.Array, m_BxT: jax.Array) -> jax.Array:
  """Mean of x over the masked tokens; 0 when there are none."""
  return jnp.sum(_masked(x_BxT, m_BxT)) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def _check_group(fn: str, rewards_B: jax.Array, group_size) -> int:
  chex.assert_rank(rewards_B, 1, custom_message=f"{fn}: rewards must be [B], one per row")
  if not isinstance(group_size, numbers.Integral) or group_size < 2:
    raise ValueError(
        f"{fn}: group_size must be an integer >= 2, got {group_size!r}: a group of one sample "
        "has no baseline (for one sample per prompt use reinforce_pp_advantages, whose "
        "baseline is the batch)")
  if rewards_B.shape[0] % group_size:
    raise ValueError(f"{fn}: {rewards_B.shape[0]} rows are not whole groups of {group_size}")
  return int(group_size)


# ----------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards_B: jax.Array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-6) -> jax.Array:
  r"""Group-relative advantages of GRPO and Dr. GRPO: one value per row, [B].

  GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, sec. 4.1.2, outcome supervision):
  with r_1..r_G the rewards of one prompt's G samples,

      A_i = (r_i - mean_j r_j) / (std_j r_j + eps),

  std being the unbiased (ddof=1) standard deviation, as `torch.std` in TRL and verl. `scale`:

  * "group": the std of the sample's own group (GRPO; TRL's scale_rewards="group", verl's
    norm_adv_by_std_in_grpo=True).
  * "batch": the std of all B rewards, the mean staying the group's (TRL's
    scale_rewards="batch"; verl has no such option).
  * "none": no division, A_i = r_i - mean_j r_j (Dr. GRPO: Liu et al. 2025, "Understanding
    R1-Zero-Like Training", arXiv 2503.20783, which removes the std as a difficulty bias).

  `eps` defaults to verl's 1e-6; TRL adds 1e-4: pass eps=1e-4 for TRL's advantages. A group
  whose rewards are all equal gets advantage 0 either way.

  Groups of one: group_size < 2 raises, as TRL (which requires num_generations >= 2). verl instead
  gives a singleton group mean 0 and std 1, i.e. A = r / (1 + eps), the raw reward: pass the
  rewards themselves as advantages for that, or use `reinforce_pp_advantages`, whose baseline is
  the batch.

  Args:
    rewards_B: [B] one scalar reward per row, prompt-major groups of `group_size` rows.
    group_size: G >= 2 (Python int), dividing B.
    scale: one of `SCALES`.
    eps: added to the std.

  Returns:
    [B] advantages (float32, or float64 for float64 rewards).

  Example:
    >>> group_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), 2, scale="none")
    Array([ 0.5, -0.5,  0. ,  0. ], dtype=float32)
  """
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")
  r_B = _float(rewards_B)
  G = _check_group("group_advantages", r_B, group_size)
  r_NxG = r_B.reshape(-1, G)
  a_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
  if scale == "group":
    a_NxG = a_NxG / (jnp.std(r_NxG, axis=1, ddof=1, keepdims=True) + eps)
  elif scale == "batch":
    a_NxG = a_NxG / (jnp.std(r_B, ddof=1) + eps)
  return a_NxG.reshape(-1)


def rloo_advantages(rewards_B: jax.Array, group_size: int) -> jax.Array:
  r"""REINFORCE leave-one-out advantages, [B] (Ahmadian et al. 2024, "Back to Basics: Revisiting
  REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740;
  Kool et al. 2019):

      A_i = r_i - 1/(G - 1) sum_{j != i} r_j = (G r_i - sum_j r_j) / (G - 1),

  within each prompt-major group of G samples. This is verl's `rloo` and TRL's RLOO trainer.
  group_size < 2 raises (no other sample to form a baseline; verl returns the raw reward then).
  """
  r_B = _float(rewards_B)
  G = _check_group("rloo_advantages", r_B, group_size)
  r_NxG = r_B.reshape(-1, G)
  return ((G * r_NxG - jnp.sum(r_NxG, axis=1, keepdims=True)) / (G - 1)).reshape(-1)


def masked_whiten(x_BxT: jax.Array, mask_BxT: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
  r"""(x - mu) / sqrt(var + eps) with mu and the unbiased var over the masked tokens of the whole
  batch, as verl's `verl_F.masked_whiten`:

      mu = sum_t m_t x_t / n,   var = sum_t m_t (x_t - mu)^2 / (n - 1),   n = sum_t m_t.

  With `shift_mean=False`, mu is added back (only the scale changes). Padding positions come back
  0 (verl leaves whitened garbage there, which every verl caller then multiplies by the mask);
  verl's masked mean divides by n + 1e-8, here by n. verl raises for n <= 1, which traced code
  cannot: here n - 1 is taken as at least 1, so one masked token whitens to 0 (or to itself
  with shift_mean=False), and no token at all gives zeros.
  """
  x_BxT = _float(x_BxT)
  m_BxT = _mask(mask_BxT, x_BxT)
  n = jnp.sum(m_BxT)
  mu = jnp.sum(_masked(x_BxT, m_BxT)) / jnp.maximum(n, 1.0)
  var = jnp.sum(_masked((x_BxT - mu) ** 2, m_BxT)) / jnp.maximum(n - 1.0, 1.0)
  out_BxT = (x_BxT - mu) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out_BxT = out_BxT + mu
  return _masked(out_BxT, m_BxT)


def _last_token_rewards(rewards_B: jax.Array, m_BxT: jax.Array) -> jax.Array:
  """[B] sequence rewards placed at each row's last masked token ([B, T]; rows without a masked
  token drop theirs)."""
  T = m_BxT.shape[1]
  has_B = jnp.any(m_BxT > 0, axis=1)
  last_B = T - 1 - jnp.argmax(m_BxT[:, ::-1] > 0, axis=1)
  at_BxT = (jnp.arange(T)[None, :] == last_B[:, None]) & has_B[:, None]
  return jnp.where(at_BxT, rewards_B[:, None], 0.0)


def reinforce_pp_advantages(rewards: jax.Array, mask_BxT: jax.Array, *, gamma: float = 1.0,
                            group_size: int | None = None, eps: float = 1e-8) -> jax.Array:
  r"""REINFORCE++ advantages, [B, T] (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
  Aligning Large Language Models", arXiv 2501.03262), as verl.

  Without `group_size` (verl's `reinforce_plus_plus`): the discounted return of every token,

      G_t = sum_{s >= t} gamma^(s - t) r_s,

  computed backwards exactly as verl does: g = r_t + gamma g; G_t = g; g = g m_t. A masked-out
  position's reward therefore reaches no masked token, and the return restarts there (verl's
  "reset after EOS"): trailing padding changes nothing, but an interior masked span (a tool
  observation in a multi-turn row) cuts the return of the tokens before it off from the rewards
  after it (unlike `gae`, which skips such spans). The returns are then whitened over all
  masked tokens of the batch (`masked_whiten`, the batch being the baseline).

  With `group_size` (REINFORCE++-baseline, verl's `reinforce_plus_plus_baseline`): each row's
  sequence score minus its prompt-major group's mean score, broadcast over the row's tokens,
  then whitened over the batch's masked tokens. `gamma` must stay 1 then (no discounting, as
  in verl); a group size of 1 makes the group mean the score itself, so use None for one sample
  per prompt (verl uses mean 0 for singleton groups, which is the None case without
  discounting).

  Args:
    rewards: [B, T] per-token rewards, or [B] sequence rewards, placed at each row's last masked
      token (the sequence score of the baseline variant is then the reward itself; for [B, T]
      it is the sum of the masked tokens' rewards).
    mask_BxT: [B, T] 0/1 completion mask.
    gamma: discount.
    group_size: None, or the G of prompt-major groups for the baseline variant.
    eps: added to the variance in the whitening.

  Returns:
    [B, T] advantages, 0 on padding.
  """
  r = _float(rewards)
  m_BxT = _mask(mask_BxT, r)
  chex.assert_rank(m_BxT, 2)
  if r.ndim == 1:
    chex.assert_equal_shape_prefix([r, m_BxT], 1)
  else:
    chex.assert_equal_shape([r, m_BxT])
  if group_size is not None:
    if not (isinstance(gamma, numbers.Number) and gamma == 1):
      raise ValueError("reinforce_pp_advantages: gamma applies without group_size only "
                       "(REINFORCE++-baseline does not discount)")
    score_B = r if r.ndim == 1 else jnp.sum(_masked(r, m_BxT), axis=1)
    G = _check_group("reinforce_pp_advantages", score_B, group_size)
    s_NxG = score_B.reshape(-1, G)
    centred_B = (s_NxG - jnp.mean(s_NxG, axis=1, keepdims=True)).reshape(-1)
    returns_BxT = jnp.broadcast_to(centred_B[:, None], m_BxT.shape)
  else:
    r_BxT = _last_token_rewards(r, m_BxT) if r.ndim == 1 else r

    def back(g_B, xs):
      r_B, m_B = xs
      g_B = r_B + gamma * g_B
      return g_B * m_B, g_B

    _, returns_TxB = jax.lax.scan(back, jnp.zeros(r_BxT.shape[:1], r_BxT.dtype),
                                  (r_BxT.T, m_BxT.T), reverse=True)
    returns_BxT = returns_TxB.T
  return masked_whiten(returns_BxT, m_BxT, eps=eps)


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, *,
        gamma: float | jax.Array, lam: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
  Using Generalized Advantage Estimation", arXiv 1506.02438, eq. 16), as verl's
  `compute_gae_advantage_return`:

      delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},

  with V and A after the last token 0, and masked-out positions skipped: t+1 is the next masked
  position (verl: nextvalues = V_t m_t + (1 - m_t) nextvalues, and likewise for A), so tokens
  that are not the policy's (tool observations in a multi-turn row) neither break nor enter the
  recursion. Returns are A_t + V_t, the value targets.

  The advantages are not whitened (verl whitens inside; call `masked_whiten(advantages, mask)`
  for that, as the PPO recipe does). Both outputs are 0 on padding (verl leaves the carried
  values there) and carry no gradient.

  Returns:
    (advantages_BxT, returns_BxT).
  """
  r_BxT, v_BxT = _float(rewards_BxT), _float(values_BxT)
  chex.assert_equal_shape([r_BxT, v_BxT, jnp.asarray(mask_BxT)])
  chex.assert_rank(r_BxT, 2)
  m_BxT = _mask(mask_BxT, r_BxT)
  r_BxT, v_BxT = _sg(_masked(r_BxT, m_BxT)), _sg(_masked(v_BxT, m_BxT))

  def back(carry, xs):
    next_v_B, last_a_B = carry
    r_B, v_B, m_B = xs
    delta_B = r_B + gamma * next_v_B - v_B
    a_B = delta_B + gamma * lam * last_a_B
    next_v_B = v_B * m_B + (1.0 - m_B) * next_v_B
    last_a_B = a_B * m_B + (1.0 - m_B) * last_a_B
    return (next_v_B, last_a_B), last_a_B

  zeros_B = jnp.zeros(r_BxT.shape[:1], r_BxT.dtype)
  _, adv_TxB = jax.lax.scan(back, (zeros_B, zeros_B), (r_BxT.T, v_BxT.T, m_BxT.T), reverse=True)
  adv_BxT = _masked(adv_TxB.T, m_BxT)
  return adv_BxT, _masked(adv_BxT + v_BxT, m_BxT)


# ----------------------------------------------------------------------------------------------
# KL penalty


def kl_penalty(logps_BxT: jax.Array, ref_logps_BxT: jax.Array, *, kind: str) -> jax.Array:
  r"""Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs (Schulman 2020,
  "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). With
  d = ref - logp (so that ref / pi = exp(d)), `kind` selects:

  * "k1": logp - ref = -d (unbiased, high variance, can be negative).
  * "k2": d^2 / 2 (biased, low variance; its gradient is the gradient of the KL, verl#2953).
  * "k3": exp(d) - d - 1, computed as expm1(d) - d, which is >= 0 in floating point too (the
    naive form cancels to negative values for |d| ~ 1e-8 in float32, tunix#2315). TRL's GRPO KL.
  * "low_var_kl": verl's "low_var_kl", which is also verl's "k3": d clamped to [-20, 20], then
    k3, then the result clamped to [-10, 10].
  * "k3+": the value of k3 with the gradient of k2, k2 - sg(k2) + sg(k3) (verl's straight-through
    "k3+": unbiased value and unbiased gradient, verl#2953). verl's "k3+" uses its clamped k3,
    i.e. our "low_var_kl+": the same with the value of "low_var_kl".

  Returns:
    [B, T] (any shape: elementwise) penalties.
  """
  if kind not in KL_KINDS:
    raise ValueError(f"unknown KL kind {kind!r}: choose one of {', '.join(KL_KINDS)}")
  logp, ref = _float(logps_BxT), _float(ref_logps_BxT)
  chex.assert_equal_shape([logp, ref])
  if kind == "k1":
    return logp - ref
  k2 = 0.5 * (logp - ref) ** 2
  if kind == "k2":
    return k2
  d = ref - logp
  if kind in ("low_var_kl", "low_var_kl+"):
    d = jnp.clip(d, -20.0, 20.0)
  k3 = jnp.expm1(d) - d
  if kind in ("low_var_kl", "low_var_kl+"):
    k3 = jnp.clip(k3, -10.0, 10.0)
  if kind in ("k3", "low_var_kl"):
    return k3
  return k2 - _sg(k2) + _sg(k3)


# ----------------------------------------------------------------------------------------------
# Policy and value losses


def policy_loss(logps_BxT: jax.Array, old_logps_BxT: jax.Array, advantages: jax.Array,
                mask_BxT: jax.Array, *, ref_logps: jax.Array | None = None,
                beta: float | jax.Array = 0.0, kl: str = "k3", clip_low: float = 0.2,
                clip_high: float | None = None, dual_clip: float | None = None,
                importance_level: str = "token", aggregation: str = "dapo",
                max_completion_length: int | None = None,
                importance_weights: jax.Array | None = None,
                log_ratio_clamp: float | None = 20.0, count_empty_rows: bool = False,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The clipped policy-gradient loss of PPO, GRPO, Dr. GRPO, DAPO and GSPO, with a KL term.

  Per token t of row i, with A the advantage (a row's [B] value broadcast over its tokens, or
  [B, T] per token), rho = logp - old_logp (clamped to [-log_ratio_clamp, log_ratio_clamp]) and
  eps_l, eps_h = clip_low, clip_high:

      ratio = exp(rho_t)                                     importance_level="token"
      l_t = max(-A ratio, -A clip(ratio, 1 - eps_l, 1 + eps_h))
      l_t = min(l_t, -A c)  where A < 0                      dual_clip=c
      l_t = w_t l_t + beta KL_t                              importance_weights w, ref_logps

  * PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    arXiv 1707.06347, eq. 7), written as a loss. clip_high=None means clip_high = clip_low;
    a larger clip_high is DAPO's clip-higher (Yu et al. 2025, "DAPO", arXiv 2503.14476).
  * Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", arXiv
    1912.09729; verl's clip_ratio_c, > 1): bounds the loss of a negative-advantage token whose
    ratio has grown large. TRL has no dual clip; its `delta` (two-sided clipping) is another
    rule, not offered here.
  * importance_level="sequence" is GSPO (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv 2507.18071), in its "GSPO-token" form: with
    s_i = exp(mean_t m_t rho_t) the length-normalised sequence ratio,
    ratio_t = sg(s_i) pi(y_t) / sg(pi(y_t)): every token's ratio has the value s_i (so the
    clipping is per sequence) and the gradient s_i grad log pi(y_t). With per-row advantages and
    "grpo" aggregation this is exactly GSPO's sequence objective and gradient; TRL's
    and verl's GSPO compute the same gradient. verl clamps GSPO's log s_i at 10 on top.
  * `importance_weights` (stop-gradient) multiply the surrogate only, not the KL term, as TRL's
    vLLM importance-sampling correction and verl's rollout_is_weights: truncated importance
    sampling weights old / sampler, computed and capped by the caller.
  * KL: beta * kl_penalty(logp, ref, kind=kl) added per token before aggregation (GRPO's
    eq. 3; TRL's beta, verl's use_kl_loss with kl_loss_coef and kl_loss_type). beta != 0 needs
    `ref_logps`.
  * `log_ratio_clamp` is verl's clamp of rho to [-20, 20] before exp (no gradient beyond it);
    TRL does not clamp: pass None.

  Aggregation over the rows of one optimizer step (`aggregation`), with m the mask,
  n_i = sum_t m_it and R the number of non-empty rows (n_i > 0):

  * "grpo": (1/R) sum_i (1/n_i) sum_t m_it l_it, the token mean per row, then the mean over
    rows (GRPO's eq. 3; verl's seq-mean-token-mean). weight = R.
  * "dr_grpo": sum_it m_it l_it / (B L), L = `max_completion_length` (Dr. GRPO's constant
    normaliser; TRL's loss_type="dr_grpo", which is the same over accumulated micro-batches).
    weight = B. verl's seq-mean-token-sum-norm divides each micro-batch's token sum by L only
    (not by its rows) and averages the micro-batches, so its scale grows with the micro-batch
    size: max_completion_length = L / (rows per verl micro-batch) reproduces it.
  * "dapo" = "bnpo" = "token_mean": sum_it m_it l_it / sum_it m_it, the mean over every token
    of the step (DAPO's token-level loss; verl's token-mean). TRL's "bnpo" normalises per
    micro-batch and its "dapo" over the whole accumulated batch; here accumulation is exact, so
    they coincide. weight = sum_it m_it.
  * "seq_mean_token_sum": (1/R) sum_i sum_t m_it l_it (verl's seq-mean-token-sum). weight = R.

  Empty rows (mask all 0) are left out of R as in verl (counting them would make the loss
  depend on how many padding rows a batch has). TRL's "grpo" counts them (its mean is over all
  B rows): `count_empty_rows=True` gives that, R = B, for "grpo" and "seq_mean_token_sum".
  A micro-batch of weight 0 has loss 0 and zero gradients; NaN or inf on padding positions of
  any input reaches neither the loss nor the gradients.

  Args:
    logps_BxT: [B, T] log-probs of the sampled tokens under the policy being trained.
    old_logps_BxT: [B, T] the same under the policy that sampled (pi_old), no gradient.
    advantages: [B] (per row) or [B, T] (per token), no gradient.
    mask_BxT: [B, T] 0/1, the completion tokens that count.
    ref_logps: [B, T] log-probs under the reference model, for the KL term and metric.
    beta: KL coefficient.
    kl: the `kl_penalty` kind (TRL's GRPO: "k3"; verl's default "low_var_kl").
    clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high].
    dual_clip: c > 1, or None.
    importance_level: "token" or "sequence" (GSPO).
    aggregation: one of `AGGREGATIONS`.
    max_completion_length: L of "dr_grpo" (required there, unused otherwise).
    importance_weights: [B, T] per-token weights of the surrogate, or None.
    log_ratio_clamp: the bound on |logp - old_logp|, or None for no clamp.
    count_empty_rows: count rows without tokens in the row means ("grpo", "seq_mean_token_sum").

  Returns:
    (loss, metrics), scalars; metrics carry no gradient:

    * "weight": the accumulation weight above.
    * "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean": fractions of
      tokens with ratio < 1 - clip_low and A < 0, ratio > 1 + clip_high and A > 0, either (TRL's
      definitions; for GSPO TRL averages them per sequence, here per token).
    * "clip_ratio/dual_mean" (with dual_clip): tokens where the dual clip bounds the loss
      (verl's pg_clipfrac_lower).
    * "ratio/mean": mean ratio; "approx_kl": mean rho^2 / 2 (TRL's / PPO's approxkl; verl's
      ppo_kl is mean -rho).
    * "kl" (with ref_logps): mean kl_penalty of kind `kl`.

    They are means over the masked tokens of the batch given. The update step averages metrics
    over micro-batches by "weight", so they are exact under "dapo" (token-count weights) and
    weight-averaged approximations of the token means otherwise.

  Raises:
    ValueError: an unknown option, beta without ref_logps, "dr_grpo" without
      max_completion_length, dual_clip <= 1, a clip range outside [0, 1) / [0, inf).

  Example:
    >>> lp = jnp.log(jnp.array([[0.5, 0.5]]))
    >>> loss, m = policy_loss(lp, lp, jnp.array([1.0]), jnp.ones((1, 2)))
    >>> float(loss), float(m["ratio/mean"]), float(m["weight"])
    (-1.0, 1.0, 2.0)
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {aggregation!r}: choose one of "
                     f"{', '.join(AGGREGATIONS)}")
  if importance_level not in IMPORTANCE_LEVELS:
    raise ValueError(f"unknown importance_level {importance_level!r}: choose one of "
                     f"{', '.join(IMPORTANCE_LEVELS)}")
  if kl not in KL_KINDS:
    raise ValueError(f"unknown KL kind {kl!r}: choose one of {', '.join(KL_KINDS)}")
  if ref_logps is None and not (isinstance(beta, numbers.Number) and beta == 0):
    raise ValueError(f"beta={beta} adds a KL penalty to the reference model: pass ref_logps")
  if aggregation == "dr_grpo" and max_completion_length is None:
    raise ValueError("aggregation 'dr_grpo' divides by B * max_completion_length: pass "
                     "max_completion_length")
  clip_high = clip_low if clip_high is None else clip_high
  if not 0 <= clip_low < 1 or clip_high < 0:
    raise ValueError(f"clip_low must be in [0, 1) and clip_high >= 0, got {clip_low}, "
                     f"{clip_high}")
  if dual_clip is not None and not dual_clip > 1:
    raise ValueError(f"dual_clip must be > 1 (verl's clip_ratio_c), got {dual_clip}")

  logp_BxT = _float(logps_BxT)
  chex.assert_rank(logp_BxT, 2, custom_message="policy_loss: logps must be [B, T]")
  arrays = [logp_BxT, jnp.asarray(old_logps_BxT), jnp.asarray(mask_BxT)]
  arrays += [jnp.asarray(x) for x in (ref_logps, importance_weights) if x is not None]
  chex.assert_equal_shape(arrays, custom_message="policy_loss: [B, T] inputs of one shape")
  B = logp_BxT.shape[0]
  m_BxT = _mask(mask_BxT, logp_BxT)
  logp_BxT = _masked(logp_BxT, m_BxT)
  old_BxT = _sg(_masked(_float(old_logps_BxT), m_BxT))
  adv = _sg(_float(advantages))
  if adv.ndim == 1:
    chex.assert_shape(adv, (B,), custom_message="policy_loss: advantages must be [B] or [B, T]")
    adv_BxT = jnp.broadcast_to(adv[:, None], m_BxT.shape)
  else:
    chex.assert_equal_shape([adv, m_BxT],
                            custom_message="policy_loss: advantages must be [B] or [B, T]")
    adv_BxT = adv
  adv_BxT = _masked(adv_BxT, m_BxT)

  rho_BxT = logp_BxT - old_BxT
  if log_ratio_clamp is not None:
    rho_BxT = jnp.clip(rho_BxT, -log_ratio_clamp, log_ratio_clamp)
  n_B = jnp.sum(m_BxT, axis=1)
  if importance_level == "token":
    ratio_BxT = jnp.exp(rho_BxT)
  else:
    log_s_B = jnp.sum(rho_BxT * m_BxT, axis=1) / jnp.maximum(n_B, 1.0)
    ratio_BxT = jnp.exp(_sg(log_s_B)[:, None] + logp_BxT - _sg(logp_BxT))

  l1_BxT = -adv_BxT * ratio_BxT
  l2_BxT = -adv_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
  l_BxT = jnp.maximum(l1_BxT, l2_BxT)
  if dual_clip is not None:
    l3_BxT = -adv_BxT * dual_clip
    dual_BxT = (adv_BxT < 0) & (l_BxT > l3_BxT)
    l_BxT = jnp.where(adv_BxT < 0, jnp.minimum(l_BxT, l3_BxT), l_BxT)
  if importance_weights is not None:
    l_BxT = l_BxT * _sg(_masked(_float(importance_weights), m_BxT))
  if ref_logps is not None:
    ref_BxT = _sg(_masked(_float(ref_logps), m_BxT))
    kl_BxT = kl_penalty(logp_BxT, ref_BxT, kind=kl)
    if not (isinstance(beta, numbers.Number) and beta == 0):  # beta 0: the metric only
      l_BxT = l_BxT + beta * kl_BxT

  sum_B = jnp.sum(_masked(l_BxT, m_BxT), axis=1)
  rows = jnp.float32(B) if count_empty_rows else jnp.sum((n_B > 0).astype(jnp.float32))
  if aggregation == "grpo":
    weight = rows
    loss = jnp.sum(sum_B / jnp.maximum(n_B, 1.0)) / jnp.maximum(weight, 1.0)
  elif aggregation == "seq_mean_token_sum":
    weight = rows
    loss = jnp.sum(sum_B) / jnp.maximum(weight, 1.0)
  elif aggregation == "dr_grpo":
    weight = jnp.float32(B)
    loss = jnp.sum(sum_B) / (B * max_completion_length)
  else:  # dapo, bnpo, token_mean
    weight = jnp.sum(n_B)
    loss = jnp.sum(sum_B) / jnp.maximum(weight, 1.0)

  ratio_BxT, rho_BxT = _sg(ratio_BxT), _sg(rho_BxT)
  low_BxT = (ratio_BxT < 1.0 - clip_low) & (adv_BxT < 0)
  high_BxT = (ratio_BxT > 1.0 + clip_high) & (adv_BxT > 0)

  def mean(x_BxT):
    return _masked_mean(x_BxT.astype(m_BxT.dtype), m_BxT)

  metrics = {
      "weight": weight.astype(jnp.float32),
      "clip_ratio/low_mean": mean(low_BxT),
      "clip_ratio/high_mean": mean(high_BxT),
      "clip_ratio/region_mean": mean(low_BxT | high_BxT),
      "ratio/mean": mean(ratio_BxT),
      "approx_kl": mean(0.5 * rho_BxT ** 2),
  }
  if dual_clip is not None:
    metrics["clip_ratio/dual_mean"] = mean(_sg(dual_BxT))
  if ref_logps is not None:
    metrics["kl"] = mean(_sg(kl_BxT))
  return loss, metrics


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
               mask_BxT: jax.Array, *, clip: float | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""PPO's clipped value loss (Schulman et al. 2017, arXiv 1707.06347, sec. 5; the clipping of
  the OpenAI baselines' ppo2), as verl's `compute_value_loss` with token-mean aggregation:

      V^clip_t = V^old_t + clip(V_t - V^old_t, -clip, clip),
      loss = 1/2 * mean over masked tokens of max((V_t - R_t)^2, (V^clip_t - R_t)^2),

  R being `returns_BxT` (e.g. from `gae`). clip=None drops the clipped term.

  Returns:
    (loss, metrics): "weight" (the token count: accumulation is exact), "vf_clipfrac" (the
    fraction of tokens where the clipped term is the larger) and "vpred" (the mean value).
  """
  v_BxT = _float(values_BxT)
  chex.assert_rank(v_BxT, 2)
  chex.assert_equal_shape([v_BxT, jnp.asarray(old_values_BxT), jnp.asarray(returns_BxT),
                           jnp.asarray(mask_BxT)])
  m_BxT = _mask(mask_BxT, v_BxT)
  v_BxT = _masked(v_BxT, m_BxT)
  old_BxT = _sg(_masked(_float(old_values_BxT), m_BxT))
  ret_BxT = _sg(_masked(_float(returns_BxT), m_BxT))
  l1_BxT = (v_BxT - ret_BxT) ** 2
  if clip is None:
    l_BxT, clipped_BxT = l1_BxT, jnp.zeros_like(l1_BxT)
  else:
    vclip_BxT = old_BxT + jnp.clip(v_BxT - old_BxT, -clip, clip)
    l2_BxT = (vclip_BxT - ret_BxT) ** 2
    l_BxT, clipped_BxT = jnp.maximum(l1_BxT, l2_BxT), (l2_BxT > l1_BxT).astype(m_BxT.dtype)
  n = jnp.sum(m_BxT)
  loss = 0.5 * jnp.sum(_masked(l_BxT, m_BxT)) / jnp.maximum(n, 1.0)
  metrics = {"weight": n.astype(jnp.float32), "vf_clipfrac": _masked_mean(_sg(clipped_BxT), m_BxT),
             "vpred": _masked_mean(_sg(v_BxT), m_BxT)}
  return loss, metrics
