"""Linear probes on cached activations (Alain & Bengio 2016, "Understanding intermediate layers
using linear classifier probes"): multinomial logistic regression, one per layer.

On standardised features z = (x - mean) / std (train-split statistics), the probe minimises

    (1 / N) sum_i -log softmax(z_i W + b)[y_i]  +  (l2 / 2) ||W||^2

by full-batch L-BFGS (optax.lbfgs with its zoom line search) for a fixed number of steps;
every layer's probe is fitted at once (`jax.vmap` over the layer axis, one compile).

    acts_LxNxD = last_token_activations(cfg, params, prompts)
    result = probe_layers(acts_LxNxD, labels, train_idx, eval_idx)
    result.accuracy          # [L] held-out accuracy per layer
    result.control           # [L] the same probe trained on shuffled labels (chance level)

A probe trained on shuffled labels (a control task in the spirit of Hewitt & Liang 2019)
and the majority-class rate say what accuracy without information looks like.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Probe(NamedTuple):
  """A fitted probe: logits = ((x - mean) / scale) @ w + b; shapes [..., D, K], [..., K]."""

  w: jax.Array
  b: jax.Array
  mean: jax.Array
  scale: jax.Array


def _loss(wb, z_NxD, y_N, l2):
  w_DxK, b_K = wb
  logits = z_NxD @ w_DxK + b_K[None]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y_N[:, None], axis=1)[:, 0]
  return jnp.mean(nll) + 0.5 * l2 * jnp.sum(jnp.square(w_DxK))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_probe(x_NxD: jax.Array, y_N: jax.Array, *, num_classes: int, l2: float = 1e-2,
              steps: int = 200) -> Probe:
  """A logistic-regression probe of the labels `y_N` (ints in [0, num_classes)) on `x_NxD`."""
  x_NxD = jnp.asarray(x_NxD, jnp.float32)
  mean = x_NxD.mean(axis=0)
  scale = jnp.maximum(x_NxD.std(axis=0), 1e-6)
  z = (x_NxD - mean[None]) / scale[None]
  loss = functools.partial(_loss, z_NxD=z, y_N=y_N, l2=l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  start = (jnp.zeros((z.shape[1], num_classes), jnp.float32),
           jnp.zeros((num_classes,), jnp.float32))

  def step(carry, _):
    wb, state = carry
    value, grad = value_and_grad(wb, state=state)
    updates, state = opt.update(grad, state, wb, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(wb, updates), state), value

  (w, b), _ = jax.lax.scan(step, (start, opt.init(start)), None, length=steps)[0]
  return Probe(w, b, mean, scale)


def probe_predict(probe: Probe, x_NxD: jax.Array) -> jax.Array:
  """[N] predicted classes."""
  z = (jnp.asarray(x_NxD, jnp.float32) - probe.mean[None]) / probe.scale[None]
  return jnp.argmax(z @ probe.w + probe.b[None], axis=-1)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_layers(x_LxNxD, y_N, *, num_classes, l2, steps):
  return jax.vmap(lambda x: fit_probe(x, y_N, num_classes=num_classes, l2=l2, steps=steps))(
      x_LxNxD)


class ProbeResult(NamedTuple):
  """Per-layer accuracies ([L] float arrays), the majority-class rate of the held-out split,
  the class names (index order) and the fitted probes (leaves with a leading layer axis)."""

  accuracy: np.ndarray
  train_accuracy: np.ndarray
  control: np.ndarray
  majority: float
  classes: list[Any]
  probes: Probe


def encode_labels(labels: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
  """(class index per label, the classes sorted by their text)."""
  classes = sorted(set(labels), key=lambda v: (type(v).__name__, str(v)))
  index = {c: i for i, c in enumerate(classes)}
  return np.asarray([index[v] for v in labels], np.int32), classes


def probe_layers(acts_LxNxD, labels: Sequence[Any], train_idx, eval_idx, *, l2: float = 1e-2,
                 steps: int = 200, seed: int = 0, controls: int = 5) -> ProbeResult:
  """A probe per layer trained on the rows `train_idx` and scored on `eval_idx`; `control` is
  the mean held-out accuracy of `controls` probes trained on the same rows with their labels
  shuffled (seeded). One shuffle is a noisy estimate of chance when the rows are structured
  (a grid of questions): a random labelling can correlate with the true one."""
  y, classes = encode_labels(labels)
  if len(classes) < 2:
    raise ValueError(f"a probe needs at least two distinct labels, got only {classes!r}")
  acts = jnp.asarray(acts_LxNxD, jnp.float32)
  train_idx, eval_idx = np.asarray(train_idx), np.asarray(eval_idx)
  x_train, x_eval = acts[:, train_idx], acts[:, eval_idx]
  y_train, y_eval = y[train_idx], y[eval_idx]
  fit = functools.partial(_fit_layers, num_classes=len(classes), l2=l2, steps=steps)
  predict = jax.vmap(probe_predict)

  def accuracy(p, x, target):
    return np.asarray(jnp.mean(predict(p, x) == jnp.asarray(target)[None], axis=1))

  probes = fit(x_train, jnp.asarray(y_train))
  rng = np.random.default_rng(seed)
  control = np.mean([accuracy(fit(x_train, jnp.asarray(rng.permutation(y_train))), x_eval,
                              y_eval) for _ in range(max(controls, 1))], axis=0)
  majority = float(np.mean(y_eval == np.bincount(y_train, minlength=len(classes)).argmax()))
  return ProbeResult(accuracy(probes, x_eval, y_eval), accuracy(probes, x_train, y_train),
                     control, majority, classes, probes)


def plot_probe_accuracy(result: ProbeResult, path: str | Path, *, layers: Sequence[int],
                        title: str = "linear probe accuracy") -> Path:
  """A PNG of held-out accuracy per layer, with the shuffled-label control and the majority
  rate."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(5.5, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  xs = list(range(len(layers)))
  ax.plot(xs, result.accuracy, "o-", label="probe (held out)")
  ax.plot(xs, result.train_accuracy, "o:", alpha=0.6, label="probe (train)")
  ax.plot(xs, result.control, "s--", label="control: shuffled labels")
  ax.axhline(result.majority, color="grey", linestyle=":", label="majority class")
  ax.set_xticks(xs, [str(l) for l in layers])
  ax.set_xlabel("layer")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.legend(fontsize=8, loc="center right")
  fig.tight_layout()
  path = Path(path)
  FigureCanvasAgg(fig).print_png(str(path))
  return path
