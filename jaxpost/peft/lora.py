"""LoRA adapters as their own pytree beside a frozen base (Hu et al. 2021, arXiv:2106.09685).

For a target weight W (a linear map from its input axes to its output axes) the adapter holds
A (inputs -> rank) and B (rank -> outputs), and the effective weight is

    W' = W + s * A @ B,   s = alpha / r   (rsLoRA: s = alpha / sqrt(r), Kalajievski 2023)

Adapters live under the same paths as the weights they adapt (`layers/attn/q` -> `{a, b}`),
stacked over layers like the base. A starts random and B at zero, so W' = W exactly at
initialisation. Only the adapter tree is trained: the update step gets it as `params` and the
base as a frozen input, so gradients and optimizer state exist for the adapters alone.

This module provides the tree operations (specs, init, merge); `lora_loss` wraps any loss so it
trains adapters over a frozen base by merging on the fly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig
from jaxpost.models.params import ParamSpec, is_spec, param_specs

# target -> (group, number of leading input axes after "layers")
_TARGETS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
            "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which weights get adapters, their rank and scale. Hashable (static under jit)."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  rslora: bool = False

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    unknown = [t for t in self.targets if t not in _TARGETS]
    if unknown:
      raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(_TARGETS)}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def lora_specs(config: ModelConfig, lora: LoraConfig) -> dict:
  """The adapter tree with a `ParamSpec` (shape, logical axes) at every leaf.

  A keeps the input axes of its weight and B the output axes, with the same logical names, so
  adapters shard along with their base weights on any mesh; the rank axis is replicated.
  """
  layers = param_specs(config)["layers"]
  tree: dict = {"layers": {}}
  for name in lora.targets:
    group, n_in = _TARGETS[name]
    w: ParamSpec = layers[group][name]
    L, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
    ax_in, ax_out = w.axes[1:1 + n_in], w.axes[1 + n_in:]
    a = ParamSpec((L, *ins, lora.rank), ("layers", *ax_in, "lora_rank"), "normal")
    b = ParamSpec((L, lora.rank, *outs), ("layers", "lora_rank", *ax_out), "zeros")
    tree["layers"].setdefault(group, {})[name] = {"a": a, "b": b}
  return tree


def init_lora(config: ModelConfig, lora: LoraConfig, rng: jax.Array, dtype=jnp.float32) -> dict:
  """Adapters with A ~ N(0, 1 / fan_in) and B = 0: the adapted model equals the base."""
  specs = lora_specs(config, lora)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for key, spec in zip(keys, leaves):
    if spec.init == "zeros":
      out.append(jnp.zeros(spec.shape, dtype))
    else:
      fan_in = math.prod(spec.shape[1:-1])
      out.append((jax.random.normal(key, spec.shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def merge_lora(params: dict, adapters: dict, lora: LoraConfig) -> dict:
  """The base parameters with every adapted weight replaced by W + s * A @ B (same dtype)."""
  merged = jax.tree.map(lambda x: x, params)  # new dict structure; arrays are shared
  for group, targets in adapters["layers"].items():
    for name, ab in targets.items():
      w = params["layers"][group][name]
      a, b = ab["a"], ab["b"]
      rank = a.shape[-1]
      a2 = a.reshape(a.shape[0], -1, rank)
      b2 = b.reshape(b.shape[0], rank, -1)
      delta = jnp.einsum("lir,lro->lio", a2.astype(jnp.float32), b2.astype(jnp.float32))
      merged["layers"][group][name] = (w.astype(jnp.float32) + lora.scale * delta.reshape(
          w.shape)).astype(w.dtype)
  return merged


def lora_loss(loss_fn: Callable, lora: LoraConfig) -> Callable:
  """`loss_fn(params, batch, rng, **frozen)` turned into a loss over adapters:
  `(adapters, batch, rng, *, base, **frozen)`; the base arrives frozen (no gradient, no
  optimizer state) and is merged with the adapters on the fly."""

  def adapted(adapters, batch, rng, *, base, **frozen):
    return loss_fn(merge_lora(base, adapters, lora), batch, rng, **frozen)

  return adapted
