"""Optimizers and learning-rate schedules from the `optim` config section (optax)."""

from __future__ import annotations

import jax
import optax

from jaxpost.config import OptimSection


def make_schedule(o: OptimSection, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `warmup_steps` (if any), then constant, linear or cosine decay to 0."""
  decay_steps = max(total_steps - o.warmup_steps, 1)
  if o.schedule == "constant":
    main = optax.constant_schedule(o.lr)
  elif o.schedule == "linear":
    main = optax.linear_schedule(o.lr, 0.0, decay_steps)
  else:  # "cosine", "warmup_cosine"
    main = optax.cosine_decay_schedule(o.lr, decay_steps)
  if o.warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
  return optax.join_schedules([warmup, main], [o.warmup_steps])


def decay_mask(params):
  """Weight decay on matrices only: not on norms and biases (as in TRL / HF Trainer)."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("norm") or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(o: OptimSection, total_steps: int):
  """(optax optimizer, schedule): optional global-norm clipping, then the optimizer."""
  lr = make_schedule(o, total_steps)
  if o.name == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=decay_mask)
  elif o.name == "adam":
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  elif o.name == "sgd":
    opt = optax.sgd(lr)
  elif o.name == "adafactor":
    opt = optax.adafactor(lr)
  elif o.name == "lion":
    opt = optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  else:
    raise ValueError(f"unknown optimizer {o.name!r}")
  if o.grad_clip is not None:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  return opt, lr
