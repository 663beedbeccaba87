"""Batch losses for preference optimisation: the model's log-probs, then `preference_loss`.

    loss_fn = functools.partial(dpo_loss, config=config, loss_type="sigmoid", beta=0.1)
    loss, metrics = loss_fn(params, batch, rng, ref_params=ref)

Paired batches ([B, 2, T] arrays, index 0 chosen and 1 rejected, see
`jaxpost.data.preference`) go through the model in one forward of [2B, T] rows; shared-prompt
batches (`dpo.shared_prompt`: [B, T] rows `prompt, chosen, rejected` with `branch_ids`, see
`jaxpost.data.shared_prompt`) in one forward of B rows that score each prompt once. The reference
log-probs come from, in order: the batch (`ref_logps` [B, 2], precomputed once over the data),
or `ref_params` run in the same compiled step without gradient (the frozen reference; under
LoRA or prompt tuning, the base model with the adapters off), or nowhere (SimPO, ORPO).

KTO batches are [B, T] rows with `label` [B] and mismatched `kl_*` rows for the KL baseline;
the policy scores both in one forward of [2B, T] rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.data.shared_prompt import CHOSEN, REJECTED
from jaxpost.losses.preference import kto_loss as kto_objective
from jaxpost.losses.preference import preference_loss, weighted_mean
from jaxpost.losses.tokens import sequence_logprobs, target_logprobs
from jaxpost.models import ModelConfig, forward

_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def sequence_scores(config: ModelConfig, params: dict, rows: dict, *, compute_dtype=None,
                    remat: bool = False, attention: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Summed completion log-probs and completion token counts of [N, T] rows: ([N], [N])."""
  out = forward(config, params, rows["tokens"], positions=rows["positions"],
                segment_ids=rows["segment_ids"], compute_dtype=compute_dtype, remat=remat,
                attention=attention, compute_logits=False)
  logp_NxT = target_logprobs(config, params, out.final_hidden, rows["targets"])
  return sequence_logprobs(logp_NxT, rows["loss_mask"])


def _flat_pairs(batch: dict) -> dict:
  """[B, 2, T] -> [2B, T] with all chosen rows first, then all rejected rows."""
  return {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], axis=0) for k in _KEYS}


def side_masks(batch: dict) -> tuple[jax.Array, jax.Array]:
  """The trained-token masks of the chosen and the rejected side of a paired batch, either
  layout: [B, T] each (shared prompt, `jaxpost.data.shared_prompt`) or [B, T] slices of the
  [B, 2, T] pairs."""
  if "branch_ids" in batch:
    mask, branch = batch["loss_mask"], batch["branch_ids"]
    return mask & (branch == CHOSEN), mask & (branch == REJECTED)
  return batch["loss_mask"][:, 0], batch["loss_mask"][:, 1]


def shared_pair_logps(config: ModelConfig, params: dict, batch: dict, *, compute_dtype=None,
                      remat: bool = False, attention: str = "auto"):
  """`pair_logps` of a shared-prompt batch ([B, T] rows `prompt, chosen, rejected` with
  `branch_ids`, see `jaxpost.data.shared_prompt`): one forward of B rows, the prompt once."""
  out = forward(config, params, batch["tokens"], positions=batch["positions"],
                segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"],
                compute_dtype=compute_dtype, remat=remat, attention=attention, compute_logits=False)
  logp_BxT = target_logprobs(config, params, out.final_hidden, batch["targets"])
  chosen_mask, rejected_mask = side_masks(batch)
  chosen, n_chosen = sequence_logprobs(logp_BxT, chosen_mask)
  rejected, n_rejected = sequence_logprobs(logp_BxT, rejected_mask)
  return chosen, rejected, n_chosen, n_rejected


def pair_logps(config: ModelConfig, params: dict, batch: dict, **kw):
  """(chosen, rejected, chosen_lengths, rejected_lengths), each [B], in one forward: of the
  [2B, T] rows of [B, 2, T] pairs, or of the B shared-prompt rows when the batch has
  `branch_ids`."""
  if "branch_ids" in batch:
    return shared_pair_logps(config, params, batch, **kw)
  B = batch["tokens"].shape[0]
  logps, lengths = sequence_scores(config, params, _flat_pairs(batch), **kw)
  return logps[:B], logps[B:], lengths[:B], lengths[B:]


def reference_pair_logps(config: ModelConfig, ref_params: dict, batch: dict, **kw):
  """The reference's (chosen, rejected) log-probs, [B] each, without gradient."""
  chosen, rejected, _, _ = pair_logps(config, jax.lax.stop_gradient(ref_params), batch, **kw)
  return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def dpo_loss(params: dict, batch: dict, rng: jax.Array, *, config: ModelConfig,
             ref_params: dict | None = None, loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, gamma: float = 0.0, length_normalize: bool = False,
             sft_weight: float = 0.0, compute_dtype=None, remat: bool = False,
             attention: str = "auto"):
  """DPO-family loss of a paired batch (see `jaxpost.losses.preference.preference_loss`).

  `sft_weight` > 0 adds that times the chosen completion's per-token NLL (RPO, Pang et al.
  2024, arXiv:2404.19733; TRL's `rpo_alpha`), which keeps the chosen answers likely.

  Returns (mean loss over real pairs, metrics) with TRL's metric names and "weight" = the
  number of real pairs, so micro-batch accumulation equals one big batch.
  """
  del rng
  kw = dict(compute_dtype=compute_dtype, remat=remat, attention=attention)
  chosen, rejected, n_chosen, n_rejected = pair_logps(config, params, batch, **kw)
  ref_chosen = ref_rejected = None
  if loss_type not in ("simpo", "orpo"):
    if "ref_logps" in batch:
      ref_chosen, ref_rejected = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    elif ref_params is not None:
      ref_chosen, ref_rejected = reference_pair_logps(config, ref_params, batch, **kw)
    else:
      raise ValueError(f"loss_type={loss_type!r} needs a reference: pass ref_params or "
                       "batch['ref_logps']")
  chosen_mask, rejected_mask = side_masks(batch)
  weights_B = (jnp.any(chosen_mask, axis=-1) & jnp.any(rejected_mask, axis=-1)
               ).astype(jnp.float32)
  extra = {}
  if loss_type in ("cdpo", "robust") or (loss_type in ("sigmoid", "simpo") and label_smoothing):
    extra["label_smoothing"] = label_smoothing
  if loss_type == "simpo":
    extra["gamma"] = gamma
  losses_B, metrics = preference_loss(
      chosen, rejected, ref_chosen, ref_rejected, loss_type=loss_type, beta=beta,
      chosen_lengths=n_chosen, rejected_lengths=n_rejected, length_normalize=length_normalize,
      weights=weights_B, **extra)
  metrics = {**metrics, "logps/accuracies": weighted_mean(
      (jax.lax.stop_gradient(chosen - rejected) > 0).astype(jnp.float32), weights_B)}
  if sft_weight:
    nll_B = -chosen / jnp.maximum(n_chosen, 1.0)
    losses_B = losses_B + sft_weight * nll_B
    metrics = {**metrics, "nll/chosen": weighted_mean(jax.lax.stop_gradient(nll_B), weights_B)}
  return weighted_mean(losses_B, weights_B), {**metrics, "weight": jnp.sum(weights_B)}


def _kto_rows(batch: dict) -> dict:
  """[B, T] completions then [B, T] mismatched KL rows: [2B, T]."""
  return {k: jnp.concatenate([batch[k], batch["kl_" + k]], axis=0) for k in _KEYS}


def kto_loss(params: dict, batch: dict, rng: jax.Array, *, config: ModelConfig,
             ref_params: dict | None = None, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, compute_dtype=None, remat: bool = False,
             attention: str = "auto"):
  """KTO loss of an unpaired batch (see `jaxpost.losses.preference.kto_loss`)."""
  del rng
  kw = dict(compute_dtype=compute_dtype, remat=remat, attention=attention)
  B = batch["tokens"].shape[0]
  rows = _kto_rows(batch)
  logps, _ = sequence_scores(config, params, rows, **kw)
  if "ref_logps" in batch:
    ref = batch["ref_logps"]  # [B, 2]: completion, KL row
    ref_logps, kl_ref = ref[:, 0], ref[:, 1]
  elif ref_params is not None:
    ref_all, _ = sequence_scores(config, jax.lax.stop_gradient(ref_params), rows, **kw)
    ref_all = jax.lax.stop_gradient(ref_all)
    ref_logps, kl_ref = ref_all[:B], ref_all[B:]
  else:
    raise ValueError("KTO needs a reference: pass ref_params or batch['ref_logps']")
  weights_B = jnp.any(batch["loss_mask"], axis=-1).astype(jnp.float32)
  losses_B, metrics = kto_objective(logps[:B], ref_logps, logps[B:], kl_ref,
                                    batch["label"].astype(bool), beta=beta,
                                    desirable_weight=desirable_weight,
                                    undesirable_weight=undesirable_weight, weights=weights_B)
  return weighted_mean(losses_B, weights_B), {**metrics, "weight": jnp.sum(weights_B)}


def reference_logps(config: ModelConfig, params: dict, batch: dict, *, kind: str,
                    compute_dtype=None) -> jax.Array:
  """What `ref_logps` holds for a batch, [B, 2]: (chosen, rejected) for pairs, (completion,
  KL row) for KTO. Used to precompute the reference once over the data."""
  if kind == "kto":
    logps, _ = sequence_scores(config, params, _kto_rows(batch), compute_dtype=compute_dtype)
    B = batch["tokens"].shape[0]
    return jnp.stack([logps[:B], logps[B:]], axis=1)
  chosen, rejected, _, _ = pair_logps(config, params, batch, compute_dtype=compute_dtype)
  return jnp.stack([chosen, rejected], axis=1)
