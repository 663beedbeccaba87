"""Preference losses over per-sequence log-probabilities: DPO and its variants, SimPO, ORPO, KTO.

The inputs are, per row, the log-probability of a completion summed over its tokens and that
completion's token count, each [B] (`jaxpost.losses.tokens.sequence_logprobs` gives both). The
functions are pure and jit-able; `loss_type` and the other Python-valued options are static under
`jax.jit` (bind them with `functools.partial`), the arrays and `beta` may be traced. Inputs are
computed in float32 (bfloat16 is upcast, float64 kept).

Reduction. Both losses return `(losses_B, metrics)`:

* `losses_B` [B] is per row and unreduced, so the caller picks the weighting; the batch loss is
  `weighted_mean(losses_B, weights_B)`.
* `metrics` are scalars: means over the rows, weighted by `weights` (a [B] mask, 1 for real rows
  and 0 for padding; None = all rows), under TRL's names. Metrics carry no gradient.

A loss function for the update step (`jaxpost.train.step`) therefore reads

    losses_B, metrics = preference_loss(..., weights=w_B)
    return weighted_mean(losses_B, w_B), {**metrics, "weight": jnp.sum(w_B)}

and accumulation over micro-batches, which averages losses and metrics weighted by
`metrics["weight"]`, equals one big batch for every row-mean. Group means (KTO's rewards of
desirable rows) are exact within the batch given; `count/*` lets a caller recombine them.

Padding rows (zero tokens, log-prob 0) give finite losses and gradients for every loss type:
length normalisation divides by max(length, 1). Give them weight 0 so that they count in no mean.
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "cdpo", "robust", "simpo", "orpo")
_REFERENCE_FREE = ("simpo", "orpo")
_LENGTH_NORMALISED = ("ipo", "simpo", "orpo")
_SMOOTHED = ("sigmoid", "cdpo", "robust", "simpo")

# ORPO takes log(1 - p) of the mean token probability p = exp(mean logp), which is -inf at p = 1
# (e.g. a padding row, whose mean log-prob is 0). The mean log-prob is capped here inside
# log(1 - p) only: log(1 - p) >= log(1e-6) ~ -13.8. A real completion whose tokens all have
# probability above 1 - 1e-6 is the only other case it touches.
_MAX_MEAN_LOGP = -1e-6


def _float(x) -> jax.Array:
  """`x` as an array of at least float32 (bfloat16 and integers to float32, float64 kept)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _static_nonzero(x) -> bool:
  """True for a Python number other than 0; False for 0 and for arrays (possibly traced)."""
  return isinstance(x, numbers.Number) and x != 0


def weighted_mean(x_B: jax.Array, weights_B: jax.Array | None = None) -> jax.Array:
  """sum_i w_i x_i / sum_i w_i over [B]; 0 when every weight is 0; the plain mean when None.

  Rows of weight 0 are dropped before the sum, so even a non-finite value there is ignored.
  """
  x_B = _float(x_B)
  if weights_B is None:
    return jnp.mean(x_B)
  w_B = _float(weights_B)
  total = jnp.sum(w_B)
  return jnp.sum(jnp.where(w_B != 0, w_B * x_B, 0.0)) / jnp.where(total > 0, total, 1.0)


def _check_rows(fn: str, **rows) -> None:
  """At trace time: every array given is a [B] vector (one value per row, e.g. per-sequence
  log-probs, not [B, T] per-token ones), all of the same B."""
  given = {name: jnp.asarray(x) for name, x in rows.items() if x is not None}
  for name, x in given.items():
    chex.assert_rank(x, 1, custom_message=f"{fn}: {name} must be [B], one value per row")
  chex.assert_equal_shape(list(given.values()),
                          custom_message=f"{fn}: {', '.join(given)} must all be [B], one B")


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
  log(1 - exp(-|a|))"): log(-expm1(x)) for x > -log 2, log1p(-exp(x)) below."""
  return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _smoothed_logistic(h: jax.Array, eps) -> jax.Array:
  """-(1 - eps) log sigma(h) - eps log sigma(-h): the logistic loss with labels smoothed by eps."""
  return -(1.0 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)


def preference_loss(chosen_logps: jax.Array, rejected_logps: jax.Array,
                    ref_chosen_logps: jax.Array | None = None,
                    ref_rejected_logps: jax.Array | None = None, *,
                    loss_type: str = "sigmoid", beta: float | jax.Array = 0.1,
                    label_smoothing: float = 0.0, gamma: float = 0.0,
                    chosen_lengths: jax.Array | None = None,
                    rejected_lengths: jax.Array | None = None, length_normalize: bool = False,
                    chosen_nll: jax.Array | None = None,
                    weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Per-row pairwise preference losses (chosen y_w preferred to rejected y_l), with metrics.

  With pi, ref the summed log-probs of a completion under the policy and the reference model,
  the log-ratios and the margin ("logits" in TRL) are

      rho_w = pi(y_w) - ref(y_w),   rho_l = pi(y_l) - ref(y_l),   h = rho_w - rho_l,

  and with eps = label_smoothing, `loss_type` selects:

  * "sigmoid": DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with
    optional label smoothing: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
  * "cdpo": conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): the same
    formula, the labels being flipped with probability eps. TRL has no "cdpo" type and writes it
    as "sigmoid" with `label_smoothing`; both names are kept here and give identical losses.
  * "robust": robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 9), unbiased under
    label noise eps < 1/2:
    (-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps).
  * "hinge": SLiC-HF (Zhao et al. 2023), the hinge loss on the margin: max(0, 1 - beta h).
  * "ipo": IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", eq. 17): (h - 1 / (2 beta))^2, beta being the paper's tau. As in the
    IPO authors' note and TRL, the log-probs are averaged over tokens first.
  * "simpo": SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6), no reference and per-token mean log-probs pi-bar:
    -log sigma(beta (pi-bar(y_w) - pi-bar(y_l)) - gamma), with label smoothing as in TRL's CPO.
    `gamma` is the paper's target reward margin gamma itself, i.e. TRL's `CPOConfig.simpo_gamma`
    (TRL subtracts simpo_gamma / beta inside beta * (...)); the SimPO repository configures
    `gamma_beta_ratio`, which is gamma / beta.
  * "orpo": ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 4-7), no reference. With p = exp(pi-bar(y)) the geometric-mean token
    probability and odds(y) = p / (1 - p),

        log_odds = log odds(y_w) - log odds(y_l)
                 = (pi-bar(y_w) - pi-bar(y_l)) - (log(1 - p_w) - log(1 - p_l)),
        loss = nll + beta * -log sigma(log_odds),

    `beta` being the paper's lambda (as in TRL). nll is `chosen_nll` when given, else
    -pi-bar(y_w), the chosen completion's mean per-token NLL. TRL averages the NLL over all chosen
    tokens of the batch instead (longer rows weigh more): pass that scalar broadcast to [B] as
    `chosen_nll` to match it. log(1 - p) caps pi-bar at -1e-6 (see `_MAX_MEAN_LOGP`).

  Length normalisation: "ipo", "simpo" and "orpo" always, and every type when `length_normalize`,
  replace each summed log-prob (policy and reference) by its mean per token,
  logp / max(length, 1); a zero-length (padding) row gets log-prob 0 rather than NaN.

  Args:
    chosen_logps, rejected_logps: [B] summed log-probs of the completions under the policy.
    ref_chosen_logps, ref_rejected_logps: [B] the same under the reference model; required for
      every type but "simpo" and "orpo", which take none.
    loss_type: one of `LOSS_TYPES`.
    beta: the inverse temperature (DPO, cDPO, robust, hinge, SimPO), the regulariser tau (IPO)
      or the odds-ratio weight lambda (ORPO).
    label_smoothing: eps in [0, 0.5], for "sigmoid", "cdpo", "robust" (< 0.5) and "simpo".
    gamma: SimPO's target reward margin.
    chosen_lengths, rejected_lengths: [B] completion token counts; needed when normalising.
    length_normalize: normalise the log-probs by length for every loss type.
    chosen_nll: [B] NLL of the chosen completion, ORPO only (default: its mean per-token NLL).
    weights: [B] row weights for the metrics (0 for padding rows); None = all rows equal.

  Returns:
    (losses_B, metrics): the unreduced per-row losses [B] and scalar weighted means
    (stop-gradient) of, per row, with r_w = beta rho_w and r_l = beta rho_l (for "simpo" and
    "orpo", which have no reference, r = beta pi, as TRL's CPO and ORPO trainers log them):
    "rewards/chosen" r_w, "rewards/rejected" r_l, "rewards/accuracies" [r_w > r_l],
    "rewards/margins" r_w - r_l, "logps/chosen" and "logps/rejected" (the log-probs the loss
    used, i.e. per token where normalised); for "orpo" also "nll_loss" (nll),
    "log_odds_ratio" (log sigma(log_odds)) and "log_odds_chosen" (log_odds), TRL's names.

  Raises:
    ValueError: an unknown `loss_type`, missing or superfluous reference log-probs, missing
      lengths, or an option that the loss type does not use.
    AssertionError: (chex, at trace time) an array argument that is not [B], or arrays of
      different lengths.

  Example:
    >>> c, r = jnp.array([-10.0]), jnp.array([-12.0])
    >>> losses, m = preference_loss(c, r, jnp.array([-11.0]), jnp.array([-11.0]), beta=0.5)
    >>> round(float(losses[0]), 4), float(m["rewards/margins"])  # -log sigma(0.5 * 2)
    (0.3133, 1.0)
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
  reference_free = loss_type in _REFERENCE_FREE
  refs = (ref_chosen_logps, ref_rejected_logps)
  if reference_free and any(x is not None for x in refs):
    raise ValueError(f"loss_type {loss_type!r} uses no reference model: pass no ref_*_logps")
  if not reference_free and any(x is None for x in refs):
    raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
  if _static_nonzero(label_smoothing) and loss_type not in _SMOOTHED:
    raise ValueError(f"label_smoothing applies to {', '.join(_SMOOTHED)}, not {loss_type!r}")
  if isinstance(label_smoothing, numbers.Number) and not (
      0 <= label_smoothing < 0.5 if loss_type == "robust" else 0 <= label_smoothing <= 0.5):
    raise ValueError(f"label_smoothing={label_smoothing} out of range for {loss_type!r} "
                     "(robust: [0, 0.5), else [0, 0.5])")
  if _static_nonzero(gamma) and loss_type != "simpo":
    raise ValueError(f"gamma is SimPO's target margin; loss_type {loss_type!r} does not use it")
  if chosen_nll is not None and loss_type != "orpo":
    raise ValueError(f"chosen_nll is for ORPO; loss_type {loss_type!r} does not use it")
  normalise = length_normalize or loss_type in _LENGTH_NORMALISED
  if normalise and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f"loss_type {loss_type!r} with length normalisation needs chosen_lengths "
                     "and rejected_lengths")
  _check_rows("preference_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
              ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
              chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
              chosen_nll=chosen_nll, weights=weights)

  c_B, r_B = _float(chosen_logps), _float(rejected_logps)
  if normalise:
    nc_B = jnp.maximum(_float(chosen_lengths), 1.0)
    nr_B = jnp.maximum(_float(rejected_lengths), 1.0)
    c_B, r_B = c_B / nc_B, r_B / nr_B
  if reference_free:
    rho_c_B, rho_r_B = c_B, r_B
  else:
    rc_B, rr_B = _float(ref_chosen_logps), _float(ref_rejected_logps)
    if normalise:
      rc_B, rr_B = rc_B / nc_B, rr_B / nr_B
    rho_c_B, rho_r_B = c_B - rc_B, r_B - rr_B
  h_B = rho_c_B - rho_r_B
  eps = label_smoothing
  extra = {}

  if loss_type in ("sigmoid", "cdpo"):
    losses_B = _smoothed_logistic(beta * h_B, eps)
  elif loss_type == "robust":
    losses_B = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h_B)
                + eps * jax.nn.log_sigmoid(-beta * h_B)) / (1.0 - 2.0 * eps)
  elif loss_type == "hinge":
    losses_B = jax.nn.relu(1.0 - beta * h_B)
  elif loss_type == "ipo":
    losses_B = (h_B - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "simpo":
    losses_B = _smoothed_logistic(beta * h_B - gamma, eps)
  else:  # orpo
    log1m_c_B = _log1mexp(jnp.minimum(c_B, _MAX_MEAN_LOGP))
    log1m_r_B = _log1mexp(jnp.minimum(r_B, _MAX_MEAN_LOGP))
    log_odds_B = h_B - (log1m_c_B - log1m_r_B)
    nll_B = -c_B if chosen_nll is None else _float(chosen_nll)
    losses_B = nll_B - beta * jax.nn.log_sigmoid(log_odds_B)
    extra = {"nll_loss": nll_B, "log_odds_ratio": jax.nn.log_sigmoid(log_odds_B),
             "log_odds_chosen": log_odds_B}

  reward_c_B, reward_r_B = beta * rho_c_B, beta * rho_r_B
  per_row = {
      "rewards/chosen": reward_c_B,
      "rewards/rejected": reward_r_B,
      "rewards/accuracies": (reward_c_B > reward_r_B).astype(c_B.dtype),
      "rewards/margins": reward_c_B - reward_r_B,
      "logps/chosen": c_B,
      "logps/rejected": r_B,
      **extra,
  }
  metrics = {k: weighted_mean(jax.lax.stop_gradient(v), weights) for k, v in per_row.items()}
  return losses_B, metrics


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, kl_policy_logps: jax.Array,
             kl_ref_logps: jax.Array, labels: jax.Array, *, beta: float | jax.Array = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""Per-row KTO losses for unpaired completions labelled desirable or undesirable, with metrics.

  KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7),
  as TRL's `KTOTrainer.kto_loss`. With rho = pi(y|x) - ref(y|x) the summed log-ratio of a row and
  the reference point

      z0 = max(0, mean_i [pi(y'_i|x_i) - ref(y'_i|x_i)]),   no gradient,

  an estimate of KL(pi || ref) from mismatched pairs (x_i, y'_i) (TRL pairs each prompt with
  another row's completion), the losses are

      desirable:   lambda_D (1 - sigma(beta (rho - z0))),
      undesirable: lambda_U (1 - sigma(beta (z0 - rho))),

  computed as lambda sigma(-...), which equals 1 - sigma(...) without its rounding near 1.

  z0 is the weighted mean over the rows given here: under `jax.jit` over a data-parallel sharded
  batch that is the global batch (TRL also averages it over processes); with micro-batches in the
  update step it is each micro-batch's own, so KTO's loss depends on the micro-batch size.

  Args:
    policy_logps, ref_logps: [B] summed log-probs of each row's completion under the policy and
      the reference model.
    kl_policy_logps, kl_ref_logps: [B] the same for the mismatched (KL) completions.
    labels: [B] bool, True for desirable (chosen) rows.
    beta: inverse temperature.
    desirable_weight, undesirable_weight: lambda_D and lambda_U.
    weights: [B] row weights (0 for padding rows), applied to the KL rows, too, and to the
      metrics; None = all rows equal.

  Returns:
    (losses_B, metrics): the unreduced per-row losses [B] (batch loss:
    `weighted_mean(losses_B, weights)`, as TRL's mean over all rows) and scalar stop-gradient
    metrics: "kl" (z0); "rewards/chosen", "logps/chosen" and "rewards/rejected",
    "logps/rejected": means of beta rho and pi over the desirable, undesirable rows (0 for a
    group without rows); "rewards/margins" their difference; "count/chosen",
    "count/rejected": each group's total weight (its row count), to recombine group means.
  """
  _check_rows("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps,
              kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps, labels=labels,
              weights=weights)
  logratio_B = _float(policy_logps) - _float(ref_logps)
  kl = jnp.maximum(weighted_mean(_float(kl_policy_logps) - _float(kl_ref_logps), weights), 0.0)
  kl = jax.lax.stop_gradient(kl)
  desirable_B = jnp.asarray(labels, bool)
  losses_B = jnp.where(desirable_B,
                       desirable_weight * jax.nn.sigmoid(-beta * (logratio_B - kl)),
                       undesirable_weight * jax.nn.sigmoid(-beta * (kl - logratio_B)))

  w_B = jnp.ones_like(logratio_B) if weights is None else _float(weights)
  w_chosen_B = jnp.where(desirable_B, w_B, 0.0)
  w_rejected_B = jnp.where(desirable_B, 0.0, w_B)
  rewards_B = jax.lax.stop_gradient(beta * logratio_B)
  logps_B = jax.lax.stop_gradient(_float(policy_logps))
  chosen = weighted_mean(rewards_B, w_chosen_B)
  rejected = weighted_mean(rewards_B, w_rejected_B)
  metrics = {
      "kl": kl,
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margins": chosen - rejected,
      "logps/chosen": weighted_mean(logps_B, w_chosen_B),
      "logps/rejected": weighted_mean(logps_B, w_rejected_B),
      "count/chosen": jnp.sum(w_chosen_B),
      "count/rejected": jnp.sum(w_rejected_B),
  }
  return losses_B, metrics
