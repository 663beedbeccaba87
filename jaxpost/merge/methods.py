"""Merge methods as pure functions over arrays and parameter pytrees.

Every method takes models (pytrees of one structure, or single arrays) and returns a model:

    merged = merge.slerp(params_a, params_b, 0.5)                 # a at t=0, b at t=1
    merged = merge.ties(base, [ft_1, ft_2], [0.5, 0.5], density=0.5)
    merged = merge.dare_ties(base, [ft_1, ft_2], [1.0, 1.0], density=0.3, key=jax.random.key(0))

The formulas, defaults and conventions are mergekit 0.1.5's (its `linear.py`, `slerp.py`,
`generalized_task_arithmetic.py`, `sparsify.py`, `model_stock.py`): `jaxpost merge` equals
`mergekit-yaml` on the same YAML tensor by tensor within 1e-6 (`tests/test_merge_parity.py`).
Arithmetic is float32 (float64 for float64 inputs under x64); the result has the inputs'
(promoted) dtype. Only `jnp` operations are used, so a sharded input gives a sharded output
(placed back on the first model's sharding).

Stacked layers: a jaxpost parameter tree keeps every layer's weights stacked on a leading axis
under `params["layers"]`, where a Hugging Face checkpoint has one tensor per layer. Methods whose
result depends on a whole tensor (SLERP's angle, TIES' top-k, DARE's rescaling, Model Stock's
cosine) treat each layer's slice as its own tensor under the `stacked` key, so merging jaxpost
trees in memory equals merging their checkpoints. `stacked=None` treats every leaf as one tensor.

Parameters: a scalar, or a pytree of the models' structure (a per-tensor value; on stacked
leaves a scalar or a [L] array, one value per layer) — what mergekit's filters and gradients
resolve to. Per-model parameters (`weights`, `density`) are a sequence of such values (or one
value for every model).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Tree = Any

# mergekit's constants: SLERP falls back to linear interpolation above this |cos|; norms below
# EPS count as 1; a task-arithmetic weight sum below 1e-8 is not divided by; a DARE/TIES
# rescale is skipped when either L1 norm is below 1e-7; Model Stock keeps the base where
# 1 + (N - 1) cos is below 1e-6.
DOT_THRESHOLD = 0.9995
EPS = 1e-8


# -- per-tensor kernels ---------------------------------------------------------------------


def _work_dtype(*xs) -> jnp.dtype:
  return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


@functools.partial(jax.jit, static_argnames=("normalize",))
def _linear(xs, weights, *, normalize: bool):
  dt, out_dt = _work_dtype(*xs), jnp.result_type(*xs)
  w = jnp.asarray(weights, dt)
  out = jnp.zeros(xs[0].shape, dt)
  for i, x in enumerate(xs):
    out = out + x.astype(dt) * w[i]
  if normalize:
    out = out / jnp.sum(w)
  return out.astype(out_dt)


@functools.partial(jax.jit, static_argnames=("dot_threshold", "eps"))
def _slerp(a, b, t, *, dot_threshold: float, eps: float):
  dt, out_dt = _work_dtype(a, b), jnp.result_type(a, b)
  x, y, t = a.astype(dt), b.astype(dt), jnp.asarray(t, dt)
  if x.size == 0:
    return ((1 - t) * x + t * y).astype(out_dt)
  norm_x, norm_y = jnp.sqrt(jnp.sum(x * x)), jnp.sqrt(jnp.sum(y * y))
  norm_x = jnp.where(norm_x > eps, norm_x, 1)
  norm_y = jnp.where(norm_y > eps, norm_y, 1)
  dot = jnp.clip(jnp.sum((x / norm_x) * (y / norm_y)), -1, 1)
  parallel = jnp.abs(dot) > dot_threshold
  theta = jnp.arccos(jnp.where(parallel, 0, dot))
  sin_theta = jnp.where(parallel, 1, jnp.sin(theta))
  coef_x = jnp.where(parallel, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
  coef_y = jnp.where(parallel, t, jnp.sin(t * theta) / sin_theta)
  return (coef_x * x + coef_y * y).astype(out_dt)


def _rescaled(delta, mask, rescale: bool):
  """delta * mask, scaled back to delta's L1 norm when `rescale` (unless either is ~0)."""
  masked = delta * mask
  if not rescale:
    return masked
  before, after = jnp.sum(jnp.abs(delta)), jnp.sum(jnp.abs(masked))
  ok = (before >= 1e-7) & (after >= 1e-7)
  return jnp.where(ok, masked * (before / jnp.where(ok, after, 1)), masked)


def _top_k_mask(magnitude, k):
  """A bool mask of the k largest entries of a non-negative array, ties to the lower index
  (what a stable descending sort keeps). The k-th largest value is found by bisection on the
  float's bits (monotonic for non-negative floats): 32 counting passes, 7x faster than a sort
  of 8M entries on a CPU and no index arrays."""
  bits = jax.lax.bitcast_convert_type(magnitude.astype(jnp.float32), jnp.int32)

  def halve(_, bounds):  # count(bits >= lo) >= k > count(bits >= hi)
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  kth, _ = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800001)))
  above, at = bits > kth, bits == kth
  room = k - jnp.sum(above)
  return above | (at & (jnp.cumsum(at.reshape(-1)).reshape(at.shape) <= room))


def _magnitude(delta, k, rescale: bool):
  """Keeps the k largest |delta| (TIES' trim). k is traced, so every density shares one
  compiled program."""
  return _rescaled(delta, _top_k_mask(jnp.abs(delta), k).astype(delta.dtype), rescale)


def _bernoulli(delta, density, rescale: bool, key):
  """Keeps each entry with probability `density` (DARE's drop; all of them at density 1)."""
  mask = jax.random.bernoulli(key, density, delta.shape).astype(delta.dtype)
  return _rescaled(delta, mask, rescale)


def _kept(density: float, n: int) -> int:
  """mergekit's count of entries TIES keeps: all at density >= 1, none at <= 0, else
  max(1, int(density n)) (computed in float64 on the host, as mergekit does)."""
  if density >= 1:
    return n
  if density <= 0 or n == 0:
    return 0
  return max(1, int(density * n))


@functools.partial(jax.jit, static_argnames=("sparsify", "consensus", "normalize", "rescale"))
def _task_arithmetic(base, xs, weights, lam, key, densities, kept, *, sparsify, consensus,
                     normalize, rescale):
  dt, out_dt = _work_dtype(base, *xs), jnp.result_type(base, *xs)
  b = base.astype(dt)
  deltas = []
  for i, x in enumerate(xs):
    delta = x.astype(dt) - b
    if sparsify == "magnitude":
      delta = _magnitude(delta, kept[i], rescale)
    elif sparsify == "random":
      delta = _bernoulli(delta, densities[i], rescale, jax.random.fold_in(key, i))
    deltas.append(delta)
  w = jnp.asarray(weights, dt).reshape((-1,) + (1,) * base.ndim)
  d = jnp.stack(deltas) * w
  if consensus is not None:
    sign = jnp.sign(d)
    votes = jnp.sum(d if consensus == "sum" else sign, axis=0)
    mask = sign == jnp.where(votes >= 0, 1, -1).astype(dt)[None]
    mixed = jnp.sum(d * mask, axis=0)
    divisor = jnp.sum(w * mask, axis=0)
    divisor = jnp.where(divisor == 0, 1, divisor)
  else:
    mixed = jnp.sum(d, axis=0)
    divisor = jnp.sum(w, axis=0)
    divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
  if normalize:
    mixed = mixed / divisor
  return (b + mixed * jnp.asarray(lam, dt)).astype(out_dt)


@functools.partial(jax.jit, static_argnames=("filter_wise",))
def _model_stock(base, xs, *, filter_wise: bool):
  dt, out_dt = _work_dtype(base, *xs), jnp.result_type(base, *xs)
  shape = base.shape
  w0, ws = base.astype(dt), [x.astype(dt) for x in xs]
  if filter_wise:  # one ratio per row of the last axis
    if w0.ndim == 1:
      w0, ws = w0[None], [w[None] for w in ws]
  else:
    w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
  offsets = [w - w0 for w in ws]
  cosines = []
  for i, oa in enumerate(offsets):
    for ob in offsets[i + 1:]:
      norms = jnp.linalg.norm(oa, axis=-1) * jnp.linalg.norm(ob, axis=-1)
      cosines.append(jnp.clip(jnp.sum(oa * ob, axis=-1) / jnp.maximum(norms, 1e-6), -1, 1))
  cos = jnp.mean(jnp.stack(cosines), axis=0)[..., None]
  n = len(ws)
  denominator = 1 + (n - 1) * cos
  singular = jnp.abs(denominator) < 1e-6
  t = jnp.where(singular, 0, n * cos / jnp.where(singular, 1, denominator))
  average = sum(ws) / n
  return (t * average + (1 - t) * w0).reshape(shape).astype(out_dt)


# -- pytrees ---------------------------------------------------------------------------------


def _is_scalar(value) -> bool:
  return isinstance(value, (int, float, np.number)) or (
      isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0)


def _per_leaf(value, treedef, n: int, what: str) -> list:
  """`value` as one entry per leaf: a scalar repeated, or the leaves of a tree like the model."""
  if value is None or _is_scalar(value):
    return [value] * n
  try:
    return treedef.flatten_up_to(value)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: a scalar, or a pytree of the models' structure ({e})") from None


def _py(value):
  """A 0-d array or NumPy scalar as a Python number (hashable, for static arguments)."""
  return value.item() if hasattr(value, "item") and np.ndim(value) == 0 else value


def _layer(value, i: int | None):
  """The value for layer i (None: a leaf without layers): a per-layer [L] value's i-th
  entry, else the value itself."""
  if value is None or _is_scalar(value):
    return _py(value)
  value = np.asarray(value)
  if i is None or value.ndim != 1:
    raise ValueError(f"a per-tensor value must be a scalar (or, on stacked layers, one per "
                     f"layer), got an array of shape {list(value.shape)}")
  return value[i].item()


def _on_one_device(x) -> bool:
  sharding = getattr(x, "sharding", None)
  return sharding is None or isinstance(sharding, jax.sharding.SingleDeviceSharding)


def _flat(kernel: Callable, xs: list):
  """`kernel(xs)` on the arrays flattened to 1-D, so one program is compiled per size, not per
  shape (a model's layout, ours or HF's, has fewer sizes, and both share them); sharded arrays
  keep their shape (flattening would move their shards). Only for the methods that see a
  tensor as one vector of entries in C order."""
  if not all(_on_one_device(x) for x in xs):
    return kernel(xs)
  shape = np.shape(xs[0])
  return kernel([x.reshape(-1) for x in xs]).reshape(shape)


def _placed(y, like):
  return y if _on_one_device(like) else jax.device_put(y, like.sharding)


def merge_trees(fn: Callable, models: Sequence[Tree], *, stacked: str | None = "layers",
                shared: dict | None = None, per_model: dict | None = None) -> Tree:
  """`fn(arrays, index, **values) -> array` applied to each leaf of `models`, layer by layer on
  the leaves under `stacked`; `shared` values are scalars or trees, `per_model` values a list
  of such values, one per model. `index` is (leaf,) or (leaf, layer), e.g. to fold into a
  random key. The building block of every method here, public for custom methods."""
  leaves, treedef = jax.tree.flatten(models[0])
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(models[0])[0]]
  columns = [leaves]
  for k, m in enumerate(models[1:], 1):
    try:
      columns.append(treedef.flatten_up_to(m))
    except (ValueError, TypeError) as e:
      raise ValueError(f"model {k} does not have model 0's structure: {e}") from None
  n = len(leaves)
  values = {name: _per_leaf(v, treedef, n, name) for name, v in (shared or {}).items()}
  for name, items in (per_model or {}).items():
    per = [_per_leaf(item, treedef, n, f"{name}[{k}]") for k, item in enumerate(items)]
    values[name] = [tuple(p[j] for p in per) for j in range(n)]

  def at(v, i):
    return tuple(_layer(e, i) for e in v) if isinstance(v, tuple) else _layer(v, i)

  out = []
  for j, path in enumerate(paths):
    xs = [c[j] for c in columns]
    here = {name: v[j] for name, v in values.items()}
    on_layers = (stacked is not None and path and isinstance(path[0], jax.tree_util.DictKey)
                 and path[0].key == stacked and jnp.ndim(xs[0]) >= 1)
    if on_layers:
      y = jnp.stack([fn([x[i] for x in xs], (j, i), **{k: at(v, i) for k, v in here.items()})
                     for i in range(jnp.shape(xs[0])[0])])
    else:
      y = fn(xs, (j,), **{k: at(v, None) for k, v in here.items()})
    out.append(_placed(y, xs[0]))
  return treedef.unflatten(out)


def _per_model(value, n: int, what: str) -> list:
  """One value per model: a list of n values, or one value for all."""
  items = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(items) != n:
    raise ValueError(f"{what}: {len(items)} values for {n} models")
  return items


def _check_density(density, n: int) -> list:
  items = _per_model(density, n, "density")
  for d in items:
    if _is_scalar(d) and not 0 <= float(d) <= 1:
      raise ValueError(f"density must be in [0, 1], got {float(d)}")
  return items


def linear(models: Sequence[Tree], weights, *, normalize: bool = True,
           stacked: str | None = "layers") -> Tree:
  """The weighted average sum_i w_i theta_i / sum_i w_i (without the division when
  `normalize=False`): model soups (Wortsman et al. 2022, arXiv:2203.05482)."""
  return merge_trees(
      lambda xs, index, weight: _flat(lambda v: _linear(tuple(v), weight, normalize=normalize),
                                      xs), models,
      stacked=stacked, per_model={"weight": _per_model(weights, len(models), "linear weights")})


def slerp(a: Tree, b: Tree, t, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS,
          stacked: str | None = "layers") -> Tree:
  """Spherical interpolation of each tensor (flattened to one vector) from `a` (t=0) to `b`:

      cos(theta) = <a / |a|, b / |b|>
      slerp(a, b, t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b

  on the raw (unnormalised) tensors; linear interpolation when |cos(theta)| > dot_threshold
  (near-parallel or antiparallel); norms below `eps` count as 1 (Shoemake 1985)."""
  return merge_trees(
      lambda xs, index, t: _flat(lambda v: _slerp(v[0], v[1], t, dot_threshold=dot_threshold,
                                                  eps=eps), xs),
      [a, b], stacked=stacked, shared={"t": t})


def _generalized(base, models, weights, *, what, sparsify, consensus, density, normalize,
                 rescale, lambda_, key, stacked):
  if not models:
    raise ValueError(f"{what} needs at least one model besides the base")
  weights = _per_model(weights, len(models), f"{what} weights")
  densities = _check_density(density, len(models))
  if sparsify == "random" and key is None:
    raise ValueError(f"{what} drops entries at random: give key=jax.random.key(seed)")
  if consensus not in (None, "sum", "count"):
    raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")

  def fn(xs, index, weight, density, lam):
    k = None if key is None else functools.reduce(jax.random.fold_in, index, key)
    kept = tuple(_kept(d, int(np.size(xs[0]))) for d in density)
    return _flat(lambda v: _task_arithmetic(v[0], tuple(v[1:]), weight, lam, k, density, kept,
                                            sparsify=sparsify, consensus=consensus,
                                            normalize=normalize, rescale=rescale), xs)

  return merge_trees(fn, [base, *models], stacked=stacked, shared={"lam": lambda_},
                     per_model={"weight": weights, "density": densities})


def task_arithmetic(base: Tree, models: Sequence[Tree], weights, *, normalize: bool = False,
                    lambda_=1.0, stacked: str | None = "layers") -> Tree:
  """base + lambda * sum_i w_i (theta_i - base) (divided by sum_i w_i when `normalize`):
  task vectors (Ilharco et al. 2023, arXiv:2212.04089)."""
  return _generalized(base, models, weights, what="task_arithmetic", sparsify=None,
                      consensus=None, density=1.0, normalize=normalize, rescale=False,
                      lambda_=lambda_, key=None, stacked=stacked)


def ties(base: Tree, models: Sequence[Tree], weights, *, density=1.0, consensus: str = "sum",
         normalize: bool = True, rescale: bool = False, lambda_=1.0,
         stacked: str | None = "layers") -> Tree:
  """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): each task vector d_i = theta_i - base
  trimmed to its k = max(1, int(density n)) largest |entries| (L1-rescaled when `rescale`),
  weighted (w_i d_i); each entry's sign elected by the sum of the weighted deltas
  (`consensus="sum"`, the paper's) or by a count of their signs ("count"); only agreeing
  entries summed, divided by the sum of their weights when `normalize`:

      base + lambda * sum_i [sign(w_i d_i) = s] w_i d_i / sum_i [sign(w_i d_i) = s] w_i"""
  return _generalized(base, models, weights, what="ties", sparsify="magnitude",
                      consensus=consensus, density=density, normalize=normalize,
                      rescale=rescale, lambda_=lambda_, key=None, stacked=stacked)


def dare_linear(base: Tree, models: Sequence[Tree], weights, *, density, key,
                rescale: bool = True, normalize: bool = False, lambda_=1.0,
                stacked: str | None = "layers") -> Tree:
  """DARE (Yu et al. 2023, arXiv:2311.03099) then task arithmetic: each entry of each task
  vector kept with probability `density` (seeded by `key`), the kept ones rescaled so the task
  vector keeps its L1 norm (mergekit's rescaling; in expectation the paper's 1 / density)."""
  return _generalized(base, models, weights, what="dare_linear", sparsify="random",
                      consensus=None, density=density, normalize=normalize, rescale=rescale,
                      lambda_=lambda_, key=key, stacked=stacked)


def dare_ties(base: Tree, models: Sequence[Tree], weights, *, density, key,
              consensus: str = "sum", rescale: bool = True, normalize: bool = False,
              lambda_=1.0, stacked: str | None = "layers") -> Tree:
  """DARE's random drop and rescaling, then TIES' sign election (see `ties`)."""
  return _generalized(base, models, weights, what="dare_ties", sparsify="random",
                      consensus=consensus, density=density, normalize=normalize,
                      rescale=rescale, lambda_=lambda_, key=key, stacked=stacked)


def model_stock(base: Tree, models: Sequence[Tree], *, filter_wise: bool = False,
                stacked: str | None = "layers") -> Tree:
  """Model Stock (Jang et al. 2024, arXiv:2403.19522): with cos the mean pairwise cosine of
  the N >= 2 task vectors theta_i - base, t = N cos / (1 + (N - 1) cos) and the result
  t mean_i(theta_i) + (1 - t) base (the base where 1 + (N - 1) cos ~ 0). Per tensor, or per
  row of the last axis with `filter_wise` (an HF [out, in] weight's rows)."""
  if len(models) < 2:
    raise ValueError("model_stock needs at least two models besides the base")
  def fn(xs, index):
    def kernel(v):
      return _model_stock(v[0], tuple(v[1:]), filter_wise=filter_wise)
    return kernel(xs) if filter_wise else _flat(kernel, xs)

  return merge_trees(fn, [base, *models], stacked=stacked)
