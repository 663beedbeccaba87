"""Representation drift: how far the trained model's internal activations move from the
reference model's on the same tokens, as a metric and as a penalty any loss can add.

    drift = representation_drift(config, params, ref_params, rows, site="resid_post",
                                 layers=(4, 8))
    loss = with_drift_penalty(loss, config, weight=1.0, site="resid_post", layers=(4, 8))

The drift of a batch is the relative squared distance, summed over its real tokens and the
chosen layers:

    drift = sum_{l, t} ||h_l(t) - h_ref_l(t)||^2  /  sum_{l, t} ||h_ref_l(t)||^2

0 at the start of a run; 1 when the activations moved as far as their own size. The
reference's activations carry no gradient. As a penalty it is a drift guard for DPO or RL:
the policy may change its outputs but must keep its intermediate representations near the
reference model's (a representation-space analogue of the KL term; cf. Zou et al. 2024,
"Improving alignment and robustness with circuit breakers", whose retain loss is this
distance on retain data).

Cost: one more forward of the policy (with gradient) and one of the reference on the batch's
rows, capturing only the chosen site and layers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig, forward
from jaxpost.models.sites import Capture

_ROW_KEYS = ("tokens", "segment_ids", "positions")


def batch_rows(batch: dict) -> dict:
  """The token rows of any training batch as [N, T]: SFT / RL rows [B, T], preference pairs
  [B, 2, T] (chosen and rejected rows), KTO rows and their mismatched `kl_*` rows are not
  used (they are the same texts paired differently)."""
  rows = {}
  for key in _ROW_KEYS:
    if key in batch:
      x = batch[key]
      rows[key] = x.reshape((-1, x.shape[-1]))
  if "segment_ids" not in rows:
    rows["segment_ids"] = jnp.ones_like(rows["tokens"], jnp.int32)
  return rows


def representation_drift(config: ModelConfig, params: dict, ref_params: dict, rows: dict, *,
                         site: str = "resid_post", layers: tuple[int, ...] | None = None,
                         **model_kwargs) -> jax.Array:
  """The relative squared distance (module docstring) of `params`' activations at `site` /
  `layers` from `ref_params`' on `rows` ([N, T] tokens, segment_ids, optional positions).
  `model_kwargs` go to `forward` (compute_dtype, remat, attention)."""
  kw = dict(positions=rows.get("positions"), segment_ids=rows["segment_ids"],
            compute_logits=False, capture=[Capture(site, layers)], **model_kwargs)
  h = forward(config, params, rows["tokens"], **kw).captured[site].astype(jnp.float32)
  ref = forward(config, jax.lax.stop_gradient(ref_params), rows["tokens"], **kw).captured[site]
  ref = jax.lax.stop_gradient(ref.astype(jnp.float32))
  # Sites are [L, N, T, ...]: sum the feature axes, weight by real tokens.
  real_NxT = (rows["segment_ids"] != 0).astype(jnp.float32)
  feature_axes = tuple(range(3, h.ndim))
  dist_LxNxT = jnp.sum(jnp.square(h - ref), axis=feature_axes)
  norm_LxNxT = jnp.sum(jnp.square(ref), axis=feature_axes)
  return jnp.sum(dist_LxNxT * real_NxT[None]) / jnp.maximum(
      jnp.sum(norm_LxNxT * real_NxT[None]), 1e-12)


def with_drift_penalty(loss: Callable, config: ModelConfig, *, weight: float,
                       site: str = "resid_post", layers: tuple[int, ...] | None = None,
                       model_kwargs: dict[str, Any] | None = None) -> Callable:
  """`loss(params, batch, rng, frozen) -> (value, metrics)` plus weight x drift from
  `frozen.reference` (which must be set: the run keeps a reference when `drift` is on),
  reporting `drift` (and `drift_penalty` when weight > 0). weight 0 measures only: the value
  is unchanged and `drift` is computed without a gradient path.

  The drift is a ratio over the micro-batch, not a mean over its examples: with micro-batch
  accumulation the penalty is the average of the micro-batches' ratios.
  """
  model_kwargs = model_kwargs or {}

  def penalised(params, batch, rng, frozen):
    value, metrics = loss(params, batch, rng, frozen)
    if frozen.reference is None:
      raise ValueError("drift: the loss got no reference model (frozen.reference is None)")
    rows = batch_rows(batch)
    p = params if weight else jax.lax.stop_gradient(params)
    drift = representation_drift(config, p, frozen.reference, rows, site=site, layers=layers,
                                 **model_kwargs)
    metrics = {**metrics, "drift": jax.lax.stop_gradient(drift)}
    if not weight:
      return value, metrics
    penalty = weight * drift
    return value + penalty, {**metrics, "drift_penalty": jax.lax.stop_gradient(penalty)}

  return penalised
