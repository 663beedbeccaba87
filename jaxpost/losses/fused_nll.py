"""Weighted token NLL through the LM head, with its gradient computed in the forward pass.

    token_nll(config, params, hidden_BxTxD, targets_BxT, weights_BxT)
        = sum_t weights_t * -log softmax(hidden_t @ W)[targets_t]

The plain route (`target_logprobs` under `jax.grad`) runs four [tokens, D] x [D, V] matmuls:
the forward logits, their recomputation in the backward (logits are never stored whole), and
the two gradient matmuls. When the per-token weights do not depend on the parameters (SFT:
the loss mask), the loss is linear in them and its gradient is known up to the one scalar
cotangent as soon as the forward has the softmax in hand. So, as Liger's fused linear
cross-entropy does, the differentiated forward computes per chunk of positions

    p = softmax(logits);  dlogits = weights * (p - onehot(targets))
    dh = dlogits @ W^T;   dW += h^T @ dlogits

and the backward only scales dh and dW: three matmuls instead of four, one softmax instead of
two, still never the full [B, T, V] logits. Undifferentiated calls (evaluation) run the loss
alone, and a frozen head (LoRA's base) gets no dW accumulation. Costs: dh ([B, T, D]) and dW (the head's size, float32) live from the loss to the end
of the backward pass, and `weights` get no gradient. Gemma 2's final soft-cap is handled;
a head that is a weight object (a LoRA adapter on `lm_head`) takes the plain route.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost.losses.tokens import chunked, target_logprobs
from jaxpost.models import ModelConfig
from jaxpost.models.weights import base_of, is_weight_object


def token_nll(config: ModelConfig, params: dict, hidden_BxTxD: jax.Array, targets_BxT: jax.Array,
              weights_BxT: jax.Array, *, chunk: int = 512) -> jax.Array:
  """sum_t weights_t * -log p(targets_t): a float32 scalar (weights are not differentiated)."""
  weights_BxT = jax.lax.stop_gradient(weights_BxT.astype(jnp.float32))
  head = base_of(params["embed"]) if config.tie_embeddings else params["lm_head"]
  if is_weight_object(head):
    logp_BxT = target_logprobs(config, params, hidden_BxTxD, targets_BxT, chunk=chunk)
    return -jnp.sum(logp_BxT * weights_BxT)
  head = head.astype(hidden_BxTxD.dtype)
  return _nll(min(chunk, hidden_BxTxD.shape[1]), config.tie_embeddings,
              config.final_logit_softcap, hidden_BxTxD, head, targets_BxT, weights_BxT)


def _logits(tied, softcap, h_BxCxD, head):
  """float32 logits and the soft-cap's tanh (None without a cap)."""
  eqn = "bcd,vd->bcv" if tied else "bcd,dv->bcv"
  z = jnp.einsum(eqn, h_BxCxD, head, preferred_element_type=jnp.float32)
  if not softcap:
    return z, None
  s = jnp.tanh(z / softcap)
  return s * softcap, s


def _chunk_nll(tied, softcap, head, h_BxCxD, t_BxC, w_BxC):
  """One chunk's weighted NLL, with the logits, log-normaliser [B, C, 1] and soft-cap tanh
  the gradient reuses."""
  logits, s = _logits(tied, softcap, h_BxCxD, head)
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  picked = jnp.take_along_axis(logits, t_BxC[..., None], axis=-1)[..., 0]
  return jnp.sum(w_BxC * (lse[..., 0] - picked)), (logits, lse, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _nll(chunk, tied, softcap, hidden_BxTxD, head, targets_BxT, weights_BxT):
  def body(total, xs):
    return total + _chunk_nll(tied, softcap, head, *xs)[0], None

  xs = chunked(chunk, hidden_BxTxD, targets_BxT, weights_BxT)
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _nll_fwd(chunk, tied, softcap, hidden, head, targets, weights):
  # Arguments arrive as CustomVJPPrimal (symbolic_zeros): a frozen head (LoRA, prompt tuning)
  # gets no dW accumulation at all, a frozen input no dh.
  want_dh, want_dhead = hidden.perturbed, head.perturbed
  hidden_BxTxD, head = hidden.value, head.value
  B, T, D = hidden_BxTxD.shape

  def body(carry, xs):
    total, dhead = carry
    h_BxCxD, t_BxC, w_BxC = xs
    nll, (logits, lse, s) = _chunk_nll(tied, softcap, head, h_BxCxD, t_BxC, w_BxC)
    total = total + nll
    onehot = jnp.arange(logits.shape[-1], dtype=t_BxC.dtype)[None, None, :] == t_BxC[..., None]
    dlogits = (jnp.exp(logits - lse) - onehot) * w_BxC[..., None]
    if softcap:
      dlogits = dlogits * (1.0 - s * s)
    dh = None
    if want_dh:
      dh = jnp.einsum("bcv,vd->bcd" if tied else "bcv,dv->bcd", dlogits, head,
                      preferred_element_type=jnp.float32).astype(h_BxCxD.dtype)
    if want_dhead:  # [D, V] (the narrow operand h is the one transposed), also when tied
      dhead = dhead + jnp.einsum("bcd,bcv->dv", h_BxCxD, dlogits,
                                 preferred_element_type=jnp.float32)
    return (total, dhead), dh

  V = head.shape[0] if tied else head.shape[1]
  init = (jnp.zeros((), jnp.float32), jnp.zeros((D, V), jnp.float32) if want_dhead else None)
  (total, dhead_DxV), dh = jax.lax.scan(
      body, init, chunked(chunk, hidden_BxTxD, targets.value, weights.value))
  dh_BxTxD = dh.swapaxes(0, 1).reshape(B, -1, D)[:, :T] if want_dh else None
  head_like = jnp.zeros((0,), head.dtype)
  return total, (dh_BxTxD, dhead_DxV, head_like)


def _nll_bwd(chunk, tied, softcap, residuals, g):
  del chunk, softcap
  dh_BxTxD, dhead_DxV, head_like = residuals
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  dh = None if dh_BxTxD is None else dh_BxTxD * g.astype(dh_BxTxD.dtype)
  dhead = None
  if dhead_DxV is not None:
    dhead = ((dhead_DxV.T if tied else dhead_DxV) * g).astype(head_like.dtype)
  return dh, dhead, None, None


_nll.defvjp(_nll_fwd, _nll_bwd, symbolic_zeros=True)
