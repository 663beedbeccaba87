"""The one compiled update step that every algorithm shares.

An algorithm is a pure loss `loss_fn(params, batch, rng, **frozen) -> (loss, metrics)` plus
what produces its batches. `make_train_step` turns it, an optax optimizer and shardings into a
single `jax.jit` function with explicit input/output shardings and a donated state:

    state, metrics = step(state, batch, frozen)

* Gradient accumulation: the batch is split into `micro_batches` inside the step (`lax.scan`).
  Each micro-batch's loss is weighted by `metrics["weight"]` (default 1): the step
  differentiates sum_i w_i * loss_i and divides by sum_i w_i, so token-mean losses over 4
  micro-batches give exactly the gradient of one big batch.
* NaN/Inf guard: when the loss, a gradient or an update is not finite, nothing is applied (params
  and optimizer state are kept), `bad_steps` counts consecutive bad steps and the loop decides
  when to stop.
* RNG: the per-step key is `fold_in(state.rng, state.step)`, so a resumed run draws the same
  randomness as an uninterrupted one.
* `frozen` carries what is not trained (a reference model, a frozen base under LoRA): it gets
  no gradient and no optimizer state. A dict is passed to the loss as keywords
  (`loss_fn(params, batch, rng, **frozen)`, the function-level API: `lora_loss`, `dpo_loss`'s
  `ref_params`); any other pytree, such as the algorithms' `Frozen`, as the fourth argument
  (`loss_fn(params, batch, rng, frozen)`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpost.sharding import on_mesh

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of steps taken (applied or skipped)
  params: Any
  opt_state: Any
  rng: jax.Array  # typed root key; step keys are fold_in(rng, step)
  bad_steps: jax.Array  # int32 scalar: consecutive non-finite steps


def init_state(params, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), rng=rng,
                    bad_steps=jnp.zeros((), jnp.int32))


def state_shardings(param_shardings, params_shape, optimizer: optax.GradientTransformation,
                    mesh: Mesh, *, offload: bool = False) -> TrainState:
  """Shardings of a `TrainState`: optimizer moments follow their parameters, the rest is
  replicated. Needs only shapes (no allocation). `offload` puts the whole optimizer state in
  host memory (memory kind `pinned_host`); the step brings it to the device for the update
  and writes it back (`make_train_step`)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shape = jax.eval_shape(optimizer.init, params_shape)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_shape, param_shardings,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  if offload:
    opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt,
                       is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=param_shardings, opt_state=opt, rng=replicated,
                    bad_steps=replicated)


def batch_sharding(mesh: Mesh, batch_axes=("data", "fsdp")) -> NamedSharding:
  """Rows of every batch array split over the data-parallel mesh axes."""
  axes = tuple(a for a in batch_axes if a in mesh.shape and mesh.shape[a] > 1)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def _split_micro(x: jax.Array, n: int) -> jax.Array:
  """[B, ...] -> [n, B / n, ...], micro-batch i taking rows i, i + n, ...: each device keeps its
  own rows in every micro-batch, so the split needs no communication."""
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def call_loss(loss_fn: LossFn, params, batch, rng, frozen):
  """`loss_fn(params, batch, rng, **frozen)` for a dict of frozen inputs, else
  `loss_fn(params, batch, rng, frozen)` (see the module docstring)."""
  if frozen is None or isinstance(frozen, dict):
    return loss_fn(params, batch, rng, **(frozen or {}))
  return loss_fn(params, batch, rng, frozen)


def _grads(loss_fn: LossFn, params, batch, rng, frozen, micro_batches: int):
  """Weighted-mean loss, gradients and metrics over the micro-batches of `batch`."""

  def weighted(p, mb, key):
    loss, metrics = call_loss(loss_fn, p, mb, key, frozen)
    metrics = dict(metrics)
    w = jnp.asarray(metrics.pop("weight", 1.0), jnp.float32)
    return loss * w, (loss, w, metrics)

  if micro_batches == 1:
    def plain(p):
      loss, metrics = call_loss(loss_fn, p, batch, rng, frozen)
      return loss, {k: v for k, v in metrics.items() if k != "weight"}
    (loss, metrics), g = jax.value_and_grad(plain, has_aux=True)(params)
    return loss, g, metrics

  grad_fn = jax.grad(weighted, has_aux=True)

  mbs = jax.tree.map(lambda x: _split_micro(x, micro_batches), batch)
  keys = jax.random.split(rng, micro_batches)
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], mbs), keys[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
  g0, (_, _, m0) = zeros

  def body(carry, xs):
    g_acc, lw, w_acc, m_acc = carry
    mb, key = xs
    g, (loss, w, metrics) = grad_fn(params, mb, key)
    g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
    m_acc = jax.tree.map(lambda a, b: a + w * b, m_acc, metrics)
    return (g_acc, lw + w * loss, w_acc + w, m_acc), None

  init = (g0, jnp.float32(0), jnp.float32(0), m0)
  (g, lw, w, m), _ = jax.lax.scan(body, init, (mbs, keys))
  safe_w = jnp.maximum(w, 1e-12)
  # grads were of sum_i w_i loss_i; dividing by sum_i w_i gives the gradient of the mean
  g = jax.tree.map(lambda a, p: (a / safe_w).astype(p.dtype), g, params)
  return lw / safe_w, g, jax.tree.map(lambda a: a / safe_w, m)


def _train_step(state: TrainState, batch, frozen, *, loss_fn: LossFn,
                optimizer: optax.GradientTransformation, micro_batches: int,
                lr_schedule: Callable | None, opt_on_device=None):
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads, metrics = _grads(loss_fn, state.params, batch, rng, frozen, micro_batches)
  grad_norm = optax.tree.norm(grads)
  opt_state = state.opt_state
  if opt_on_device is not None:  # offloaded: on the device for the update only
    opt_state = jax.device_put(opt_state, opt_on_device)
  updates, new_opt = optimizer.update(grads, opt_state, state.params)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, opt_state),
      rng=state.rng,
      bad_steps=jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32),
  )
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                 skipped=(~finite).astype(jnp.float32),
                 bad_steps=new_state.bad_steps.astype(jnp.float32))
  if lr_schedule is not None:
    metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
  return new_state, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    state_sharding: TrainState | None = None, batch_sharding=None,
                    frozen_sharding=None, micro_batches: int = 1,
                    lr_schedule: Callable | None = None, donate: bool = True):
  """The compiled `step(state, batch, frozen) -> (state, metrics)`.

  Shardings may be None (single device, or let XLA choose). Metrics come back replicated
  scalars. The state is donated: do not reuse the `state` you passed in.
  """
  opt_on_device = None
  if state_sharding is not None and any(
      s.memory_kind == "pinned_host" for s in jax.tree.leaves(
          state_sharding.opt_state, is_leaf=lambda x: isinstance(x, NamedSharding))):
    opt_on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), state_sharding.opt_state,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  fn = functools.partial(_train_step, loss_fn=loss_fn, optimizer=optimizer,
                         micro_batches=micro_batches, lr_schedule=lr_schedule,
                         opt_on_device=opt_on_device)
  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if state_sharding is not None:
    mesh = jax.tree.leaves(state_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    kwargs["in_shardings"] = (state_sharding, batch_sharding, frozen_sharding)
    kwargs["out_shardings"] = (state_sharding, replicated)
    if mesh.size > 1:  # the forward's activations follow the batch (`constrain_batch`)
      return on_mesh(jax.jit(fn, **kwargs), mesh)
  return jax.jit(fn, **kwargs)
