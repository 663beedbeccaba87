"""Hand-written backward passes equal JAX's own autodiff.

* `weights.dense`: every projection's einsum with a matmul-shaped VJP.
* `fused_nll.token_nll`: the LM head's gradient taken in the forward pass (three head matmuls
  instead of four), against differentiating `target_logprobs`.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.losses import sft_loss, target_logprobs
from jaxpost.losses.fused_nll import token_nll
from jaxpost.models import ModelConfig, forward, init_params
from jaxpost.models.weights import dense
from jaxpost.peft import LoraConfig, attach_lora, init_lora


@pytest.mark.parametrize("eqn,x_shape,w_shape", [
    ("btd,df->btf", (2, 3, 4), (4, 5)),
    ("btd,dhk->bthk", (2, 3, 4), (4, 2, 3)),
    ("bthk,hkd->btd", (2, 3, 2, 3), (2, 3, 4)),
    ("tbd,df->btf", (3, 2, 4), (4, 5)),  # x not in (kept, inputs) order
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preferred", [None, "float32"])
def test_dense_gradients_equal_einsum_autodiff(eqn, x_shape, w_shape, dtype, preferred):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  w = jnp.asarray(rng.standard_normal(w_shape), dtype)

  def loss(project, x, w):
    return jnp.sum(jnp.sin(project(x, w).astype(jnp.float32)))

  ref = functools.partial(jnp.einsum, eqn, preferred_element_type=preferred)
  ours = lambda x, w: dense(eqn, x, w, preferred and jnp.dtype(preferred))  # noqa: E731
  y_ref, y = ref(x, w), ours(x, w)
  chex.assert_trees_all_equal(y, y_ref, strict=True)  # strict: the dtypes too
  g_ref = jax.grad(functools.partial(loss, ref), argnums=(0, 1))(x, w)
  g = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(x, w)
  chex.assert_trees_all_equal(g, g_ref, strict=True)


def _config(tied: bool, softcap) -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     tie_embeddings=tied, final_logit_softcap=softcap)


def _batch(B=3, T=13, V=97, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
          "loss_mask": rng.random((B, T)) > 0.3, "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


@pytest.mark.parametrize("tied,softcap,chunk,dtype", [
    (True, None, 5, "bfloat16"),  # three chunks, the last one padded
    (False, 30.0, 512, None),  # one chunk, Gemma 2's final soft-cap
])
def test_fused_sft_loss_and_gradients_equal_plain_autodiff(tied, softcap, chunk, dtype):
  config = _config(tied, softcap)
  params = init_params(config, jax.random.key(0))
  batch = _batch()

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def loss_and_grad(params, fused, dtype):
    return jax.value_and_grad(lambda p: sft_loss(p, batch, None, config=config, chunk=chunk,
                                                 fused=fused, compute_dtype=dtype)[0])(params)

  l_plain, g_plain = loss_and_grad(params, False, None)
  l_fused, g_fused = loss_and_grad(params, True, None)
  assert abs(float(l_fused - l_plain)) < 2e-6
  chex.assert_trees_all_close(g_fused, g_plain, atol=2e-7, rtol=0)
  # undifferentiated (evaluation) calls take the loss-only path
  evaluate = jax.jit(lambda p: sft_loss(p, batch, None, config=config, chunk=chunk)[0])
  assert abs(float(evaluate(params) - l_plain)) < 2e-6
  if dtype:  # same up to the rounding of low-precision gradients
    chex.assert_trees_all_close(loss_and_grad(params, True, dtype)[1],
                                loss_and_grad(params, False, dtype)[1], atol=5e-3, rtol=0)


def test_token_nll_with_a_lora_head_takes_the_plain_route_and_agrees():
  config = _config(False, None)
  params = init_params(config, jax.random.key(0))
  lora = LoraConfig(rank=2, alpha=4.0, targets=("q", "lm_head"))
  adapters = init_lora(config, lora, jax.random.key(1))
  adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # nonzero B: the head adapter matters
  batch = _batch()
  hidden = forward(config, params, batch["tokens"], compute_logits=False).final_hidden
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)

  def nll(adapters, fused):
    p = attach_lora(params, adapters, lora)
    if fused:
      return token_nll(config, p, hidden, batch["targets"], mask)
    return -jnp.sum(target_logprobs(config, p, hidden, batch["targets"]) * mask)

  grad = jax.jit(jax.grad(nll), static_argnums=1)
  chex.assert_trees_all_close(grad(adapters, True), grad(adapters, False), atol=1e-7, rtol=0)


def _dots(fn, *args) -> list[list[tuple]]:
  """The shapes (operands, then result) of every dot_general in `fn`'s traced program."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append([tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars)])
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _head_matmuls(fn, *args, vocab: int) -> int:
  """How many dot_generals in `fn`'s program have the vocabulary as a dimension."""
  return sum(any(vocab in shape for shape in shapes) for shapes in _dots(fn, *args))


def test_fused_gradient_runs_three_head_matmuls_instead_of_four():
  config = _config(True, None)
  params = init_params(config, jax.random.key(0))
  batch = _batch()
  grads = {fused: jax.grad(lambda p, f=fused: sft_loss(p, batch, None, config=config,
                                                       fused=f)[0])
           for fused in (False, True)}
  counts = {f: _head_matmuls(g, params, vocab=config.vocab_size) for f, g in grads.items()}
  assert counts == {False: 4, True: 3}, counts
  assert math.isfinite(float(grads[True](params)["embed"].sum()))


def test_frozen_weights_get_no_gradient_matmuls_in_the_traced_program():
  """Under LoRA the base is frozen: the head runs its forward and dh only (no dW), and each
  projection of the base its forward and dx only."""
  config = _config(True, None)
  params = init_params(config, jax.random.key(0))
  lora = LoraConfig(rank=2, alpha=4.0, targets=("gate",))
  adapters = init_lora(config, lora, jax.random.key(1))
  batch = _batch()
  grad = jax.grad(lambda a: sft_loss(attach_lora(params, a, lora), batch, None,
                                     config=config)[0])
  assert _head_matmuls(grad, adapters, vocab=config.vocab_size) == 2
  # the frozen MLP's [hidden, intermediate] weights: forward and dx, no [32, 64] dW
  results = [shapes[-1] for shapes in _dots(grad, adapters)]
  D, F = config.hidden_size, config.intermediate_size
  assert (D, F) not in results and (F, D) not in results, results
