"""Per-head attribution by knockout: how much a metric changes when one attention head's output
is ablated (zero, or its mean output: mean ablation, Wang et al. 2022, "Interpretability in the
Wild"), for every (layer, head).

    effect[l, h] = metric(model with head h of layer l ablated) - metric(model)

The head to ablate is data, not code: `knockout(mask_LxH)` is one `Fn` intervention at
`head_out` whose [L, H] boolean mask is a traced leaf, so all L x H knockouts (and the clean run,
an all-false mask) run through one compiled program: `head_attribution` maps a traceable metric
over the one-hot masks with `lax.map` inside one `jax.jit`; `head_attribution_loop` calls a
host-side metric (e.g. greedy generation scored by a reward function) once per mask, and its
jitted pieces see a new mask as a new argument value, not a new program.

    metric = target_logprob_metric(cfg, params, tokens, segments, target_mask)
    clean, effect_LxH = head_attribution(metric, cfg.num_layers, cfg.num_heads)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import ModelConfig, forward
from jaxpost.models.sites import Capture, Fn, per_layer
from jaxpost.whitebox.activations import pad_right

Metric = Callable[[list], jax.Array]


def _knock(x_BxTxHxDh, layer, context, data):
  del context
  mask_LxH, mean_LxHxDh = data
  mask_H = per_layer(mask_LxH, None, layer, 1)[None, None, :, None]
  replacement = (jnp.zeros_like(x_BxTxHxDh) if mean_LxHxDh is None else jnp.broadcast_to(
      per_layer(mean_LxHxDh, None, layer, 2)[None, None].astype(x_BxTxHxDh.dtype),
      x_BxTxHxDh.shape))
  return jnp.where(mask_H, replacement, x_BxTxHxDh)


def knockout(mask_LxH: jax.Array, mean_LxHxDh: jax.Array | None = None) -> Fn:
  """An intervention that ablates the heads where `mask_LxH` is true: their `head_out` becomes
  zero, or `mean_LxHxDh` (mean ablation). An all-false mask changes nothing."""
  return Fn("head_out", _knock, data=(jnp.asarray(mask_LxH, bool), mean_LxHxDh))


def one_hot_masks(num_layers: int, num_heads: int) -> jax.Array:
  """[L * H + 1, L, H]: one head per mask, in (layer, head) order, then the all-false mask."""
  eye = jnp.eye(num_layers * num_heads, dtype=bool).reshape(-1, num_layers, num_heads)
  return jnp.concatenate([eye, jnp.zeros((1, num_layers, num_heads), bool)])


def head_attribution(metric: Metric, num_layers: int, num_heads: int, *,
                     mean_LxHxDh: jax.Array | None = None,
                     batch_size: int | None = None) -> tuple[float, np.ndarray]:
  """(clean metric, effect [L, H]) for a traceable `metric(interventions) -> scalar`: one
  compiled `lax.map` over the L * H + 1 masks (`batch_size` of them vmapped at a time)."""
  masks = one_hot_masks(num_layers, num_heads)

  @jax.jit
  def run(masks, mean):
    return jax.lax.map(lambda m: metric([knockout(m, mean)]), masks, batch_size=batch_size)

  values = np.asarray(run(masks, mean_LxHxDh), np.float64)
  clean = float(values[-1])
  return clean, (values[:-1] - clean).reshape(num_layers, num_heads)


def head_attribution_loop(metric: Callable[[list], float], num_layers: int, num_heads: int, *,
                          mean_LxHxDh: jax.Array | None = None) -> tuple[float, np.ndarray]:
  """As `head_attribution`, for a metric run on the host (it may generate and score text):
  called once per mask; the mask is a traced leaf, so jitted code inside it compiles once."""
  values = np.asarray([float(metric([knockout(m, mean_LxHxDh)]))
                       for m in one_hot_masks(num_layers, num_heads)], np.float64)
  clean = float(values[-1])
  return clean, (values[:-1] - clean).reshape(num_layers, num_heads)


def encode_targets(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                   pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [B, W], segment_ids [B, W], target_mask [B, W]): prompt + target right-padded;
  the mask marks the target's tokens."""
  if any(len(t) == 0 for t in targets):
    raise ValueError("every target needs at least one token")
  tokens, segments, _ = pad_right([[*p, *t] for p, t in zip(prompts, targets)], pad_id)
  mask = np.zeros_like(segments)
  for i, (p, t) in enumerate(zip(prompts, targets)):
    mask[i, len(p):len(p) + len(t)] = 1
  return tokens, segments, mask


def target_logprob_metric(config: ModelConfig, params: dict, tokens_BxT, segments_BxT,
                          target_mask_BxT) -> Metric:
  """metric(interventions): the mean over rows of log p(target | prompt), summed over each
  row's target tokens (`target_mask_BxT`)."""
  tokens_BxT, segments_BxT = jnp.asarray(tokens_BxT), jnp.asarray(segments_BxT)
  mask = jnp.asarray(target_mask_BxT, jnp.float32)[:, 1:]

  def metric(interventions):
    hidden = forward(config, params, tokens_BxT, segment_ids=segments_BxT,
                     compute_logits=False, interventions=interventions).final_hidden
    logp_BxT = target_logprobs(config, params, hidden[:, :-1], tokens_BxT[:, 1:])
    return jnp.sum(logp_BxT * mask) / tokens_BxT.shape[0]

  return metric


def head_means(config: ModelConfig, params: dict, tokens_BxT, segments_BxT) -> jax.Array:
  """[L, H, Dh]: each head's mean output over the real (segment > 0) tokens, for mean
  ablation."""
  heads = forward(config, params, jnp.asarray(tokens_BxT), segment_ids=jnp.asarray(segments_BxT),
                  compute_logits=False, capture=[Capture("head_out")]).captured["head_out"]
  real = (jnp.asarray(segments_BxT) > 0).astype(jnp.float32)[None, :, :, None, None]
  return jnp.sum(heads * real, axis=(1, 2)) / jnp.maximum(jnp.sum(real, axis=(1, 2)), 1.0)


def plot_heatmap(effect_LxH: np.ndarray, path: str | Path, *, title: str,
                 label: str = "change in metric") -> Path:
  """A PNG heat map of an [L, H] array (rows: layers, columns: heads; a diverging colour map
  centred on zero), each cell annotated."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  L, H = effect_LxH.shape
  fig = Figure(figsize=(1.2 + 0.7 * H, 1.4 + 0.5 * L))
  ax = fig.add_subplot(1, 1, 1)
  bound = float(np.max(np.abs(effect_LxH))) or 1.0
  image = ax.imshow(effect_LxH, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
  for l in range(L):
    for h in range(H):
      dark = abs(effect_LxH[l, h]) > 0.6 * bound
      ax.text(h, l, f"{effect_LxH[l, h]:.2g}", ha="center", va="center", fontsize=7,
              color="white" if dark else "black")
  ax.set_xticks(range(H))
  ax.set_yticks(range(L))
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_title(title, fontsize=9)
  fig.colorbar(image, ax=ax, label=label)
  fig.tight_layout()
  path = Path(path)
  FigureCanvasAgg(fig).print_png(str(path))
  return path
