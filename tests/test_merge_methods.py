"""The merge methods as pure functions: their defining properties, TIES' count consensus against
mergekit's own kernel, DARE's statistics, stacked layers, and sharded arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from devices import run_on_8_cpu_devices
from jaxpost import merge


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def test_slerp_endpoints_great_circle_and_parallel_fallback():
  a, b = _normal(0, (8, 16)), _normal(1, (8, 16))
  np.testing.assert_allclose(merge.slerp(a, b, 0.0), a, atol=1e-6)
  np.testing.assert_allclose(merge.slerp(a, b, 1.0), b, atol=1e-6)
  # orthogonal unit vectors: the midpoint stays on the circle (a linear average would shrink)
  e0, e1 = jnp.eye(4)[0], jnp.eye(4)[1]
  np.testing.assert_allclose(merge.slerp(e0, e1, 0.5), jnp.array([1, 1, 0, 0]) / np.sqrt(2),
                             atol=1e-6)
  # near-parallel tensors (|cos| > 0.9995): plain linear interpolation, no division by ~0
  near = a * 2.0 + 1e-4 * b
  np.testing.assert_allclose(merge.slerp(a, near, 0.25), 0.75 * a + 0.25 * near, rtol=1e-6)
  assert merge.slerp(jnp.zeros(3), jnp.zeros(3), 0.5).tolist() == [0, 0, 0]


def test_linear_task_arithmetic_and_their_normalisation():
  x, y, base = _normal(0, (5, 3)), _normal(1, (5, 3)), _normal(2, (5, 3))
  np.testing.assert_allclose(merge.linear([x, y], [1.0, 3.0]), (x + 3 * y) / 4, rtol=1e-6)
  np.testing.assert_allclose(merge.linear([x, y], [1.0, 3.0], normalize=False), x + 3 * y,
                             rtol=1e-6)
  got = merge.task_arithmetic(base, [x, y], [0.5, 0.25], lambda_=2.0)
  np.testing.assert_allclose(got, base + 2 * (0.5 * (x - base) + 0.25 * (y - base)), rtol=1e-5)
  got = merge.task_arithmetic(base, [x, y], [0.5, 0.25], normalize=True)
  np.testing.assert_allclose(got, base + (0.5 * (x - base) + 0.25 * (y - base)) / 0.75,
                             rtol=1e-5, atol=1e-6)


def test_ties_keeps_the_top_k_and_elects_signs():
  base = jnp.zeros(6)
  x = jnp.array([5.0, -1.0, 0.5, -4.0, 2.0, 0.1])
  y = jnp.array([-1.0, -2.0, 3.0, 1.0, 2.0, 0.2])
  # density 0.5 keeps 3 entries of each: x -> [5, 0, 0, -4, 2, 0], y -> [0, -2, 3, 0, 2, 0]
  got = merge.ties(base, [x, y], [1.0, 1.0], density=0.5)
  np.testing.assert_allclose(got, [5.0, -2.0, 3.0, -4.0, 2.0, 0.0])
  # ties at the k-th magnitude go to the lower index, keeping exactly k
  got = merge.ties(jnp.zeros(4), [jnp.array([1.0, 1.0, 1.0, 2.0])], [1.0], density=0.5)
  np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 2.0])


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_consensus_equals_mergekits_kernel(consensus):
  torch = pytest.importorskip("torch")
  pytest.importorskip("mergekit")
  from mergekit.merge_methods.base import TensorGroup
  from mergekit.merge_methods.generalized_task_arithmetic import (ConsensusMethod,
                                                                   GeneralizedTaskArithmeticMerge)
  from mergekit.sparsify import SparsificationMethod
  method = GeneralizedTaskArithmeticMerge(
      consensus_method=ConsensusMethod(consensus),
      sparsification_method=SparsificationMethod.magnitude, default_normalize=True,
      default_rescale=False, method_name="t", method_pretty_name=None, method_reference_url=None)
  base = np.asarray(_normal(0, (32, 24)))
  xs = [base + np.asarray(_normal(k, (32, 24), 0.1)) for k in (1, 2, 3)]
  weights, density = [0.5, 1.0, 0.3], [0.6, 0.4, 0.9]
  group = TensorGroup.from_tensors([torch.tensor(t) for t in [base, *xs]], base_index=0)
  (want,) = method((group,), parameters={"weight": weights, "density": density,
                                         "rescale": True, "lambda": 0.8})
  got = merge.ties(base, xs, weights, density=density, consensus=consensus, rescale=True,
                   lambda_=0.8)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)


def test_dare_drop_rate_rescaling_and_seeds():
  base = _normal(0, (400, 500))
  ft = base + _normal(1, (400, 500), 0.01)
  key = jax.random.key(3)
  out = merge.dare_linear(base, [ft], [1.0], density=0.2, key=key)
  delta, kept = np.asarray(ft - base), np.asarray(out - base)
  on = np.abs(kept) > 0
  assert abs(on.mean() - 0.2) < 0.005                     # 200k entries: sd 0.0009
  factor = np.abs(delta).sum() / np.abs(delta[on]).sum()  # L1 kept: about 1 / density
  np.testing.assert_allclose(kept[on], delta[on] * factor, rtol=1e-4, atol=1e-7)
  assert abs(factor * 0.2 - 1) < 0.02
  np.testing.assert_array_equal(out, merge.dare_linear(base, [ft], [1.0], density=0.2, key=key))
  other = merge.dare_linear(base, [ft], [1.0], density=0.2, key=jax.random.key(4))
  assert not np.array_equal(out, other)
  # dare_ties: the drop, then sign election; density 1 is ties without trimming
  np.testing.assert_allclose(merge.dare_ties(base, [ft, base - delta], [1.0, 0.5], density=1.0,
                                             key=key),
                             merge.ties(base, [ft, base - delta], [1.0, 0.5], normalize=False),
                             atol=1e-6)


def test_model_stock_interpolates_by_the_task_vectors_angle():
  base = _normal(0, (64,))
  d = _normal(1, (64,), 0.1)
  # identical task vectors: cos = 1, t = 1: the average of the fine-tunes
  np.testing.assert_allclose(merge.model_stock(base, [base + d, base + d]), base + d, atol=1e-6)
  # opposite: cos = -1, 1 + (N - 1) cos = 0: the base
  np.testing.assert_allclose(merge.model_stock(base, [base + d, base - d]), base, atol=1e-6)


def test_stacked_layers_are_merged_one_layer_at_a_time():
  """A jaxpost tree's `layers` leaves hold L layers: each is merged as its own tensor (as in
  the HF checkpoint), and a per-layer parameter ([L] array) gives each layer its value."""
  tree = {"embed": _normal(0, (6, 4)), "layers": {"q": _normal(1, (3, 4, 5))}}
  other = jax.tree.map(lambda x: x + _normal(2, x.shape, 0.3), tree)
  third = jax.tree.map(lambda x: x + _normal(3, x.shape, 0.3), tree)
  t = {"embed": 0.2, "layers": {"q": np.array([0.0, 0.5, 1.0])}}
  got = merge.slerp(tree, other, t)
  for i, ti in enumerate([0.0, 0.5, 1.0]):
    np.testing.assert_allclose(got["layers"]["q"][i],
                               merge.slerp(tree["layers"]["q"][i], other["layers"]["q"][i], ti),
                               atol=1e-6)
  np.testing.assert_allclose(got["embed"], merge.slerp(tree["embed"], other["embed"], 0.2))
  got = merge.ties(tree, [other, third], [0.5, 0.5], density=0.3)
  for i in range(3):
    layer = [m["layers"]["q"][i] for m in (tree, other, third)]
    np.testing.assert_allclose(got["layers"]["q"][i],
                               merge.ties(layer[0], layer[1:], [0.5, 0.5], density=0.3),
                               atol=1e-6)
  whole = merge.ties(tree, [other, third], [0.5, 0.5], density=0.3, stacked=None)
  assert not np.allclose(whole["layers"]["q"], got["layers"]["q"])  # top-k over all layers


def test_bad_arguments_are_clear_errors():
  x = jnp.ones(3)
  with pytest.raises(ValueError, match="3 values for 2 models"):
    merge.linear([x, x], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
    merge.ties(x, [x], [1.0], density=1.5)
  with pytest.raises(ValueError, match="key=jax.random.key"):
    merge.dare_ties(x, [x], [1.0], density=0.5, key=None)
  with pytest.raises(ValueError, match="model 1 does not have model 0's structure"):
    merge.slerp({"a": x}, {"b": x}, 0.5)
  with pytest.raises(ValueError, match="at least two models"):
    merge.model_stock(x, [x])


def test_sharded_inputs_give_outputs_with_the_same_sharding():
  run_on_8_cpu_devices("""
import sys; sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxpost import merge
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
rng = np.random.default_rng(0)
trees = [{"embed": rng.standard_normal((16, 8), np.float32),
          "layers": {"q": rng.standard_normal((2, 8, 4), np.float32)}} for _ in range(3)]
shard = {"embed": NamedSharding(mesh, P("fsdp", "tensor")),
         "layers": {"q": NamedSharding(mesh, P(None, "fsdp", "tensor"))}}
sharded = [jax.device_put(t, shard) for t in trees]
key = jax.random.key(0)
for name, fn in [("slerp", lambda b, x, y: merge.slerp(x, y, 0.3)),
                 ("ties", lambda b, x, y: merge.ties(b, [x, y], [0.6, 0.4], density=0.5)),
                 ("task_arithmetic", lambda b, x, y: merge.task_arithmetic(b, [x, y], [1.0, 0.5])),
                 ("model_stock", lambda b, x, y: merge.model_stock(b, [x, y])),
                 ("dare_ties", lambda b, x, y: merge.dare_ties(b, [x, y], [1.0, 1.0], density=0.5,
                                                               key=key))]:
  got, want = fn(*sharded), fn(*trees)
  for g, w, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(shard)):
    assert g.sharding.is_equivalent_to(s, g.ndim), (name, g.sharding)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, err_msg=name)
print("OK")
""")
