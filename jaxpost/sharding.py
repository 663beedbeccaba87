"""Logical axis names -> mesh axes: one ordered rules table decides how everything is sharded.

Every parameter names its logical axes (see `jaxpost.models.params`). A rules table maps each
logical name to a mesh axis (or a tuple of them, or None for replicated). A mapping is skipped
for a dimension it does not divide, or when the mesh axis is already used by an earlier
dimension of the same array, so any model shards over any mesh without special cases.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Fully-sharded data parallel over `fsdp` (parameters split along the embedding axis) and
# Megatron-style tensor parallelism over `tensor` (heads and MLP columns).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
)


def constrain_batch(x: jax.Array, axis: int = 0) -> jax.Array:
  """`x` with its batch axis (`axis`) split over the rules' "batch" mesh axes, when traced
  under a mesh (`jax.set_mesh`, as the update step is: `on_mesh`); unchanged otherwise, and
  when the batch does not divide.

  Without it XLA is free to carry the embedding table's split (its embed axis over `fsdp`)
  into the activations and keep the whole batch on every device: on a pod the 8B SFT step
  then asked for 17-64 GiB of temporaries per chip instead of 5 (`jaxpost compile`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in dict(DEFAULT_RULES)["batch"]
               if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[axis] % int(np.prod([mesh.shape[a] for a in axes])):
    return x
  spec = [None] * x.ndim
  spec[axis] = axes
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


class on_mesh:  # pylint: disable=invalid-name
  """A jitted function called (and lowered) under `jax.set_mesh(mesh)`, so that the sharding
  constraints inside it (`constrain_batch`) see the mesh. Other attributes are the jitted
  function's."""

  def __init__(self, fn, mesh: Mesh):
    self._fn, self._mesh = fn, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._fn.lower(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._fn, name)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh. Axis types are Auto: shardings are given explicitly at the jit
  boundary and XLA propagates them inside (jax 0.10's `jax.make_mesh` defaults to Explicit)."""
  devices = jax.devices() if devices is None else devices
  need = data * fsdp * tensor
  if need != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {need} devices, "
                     f"but {len(devices)} are available")
  arr = np.asarray(devices).reshape(data, fsdp, tensor)
  auto = (jax.sharding.AxisType.Auto,) * 3
  return Mesh(arr, MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, object]] = DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of an array with logical `axes` and `shape` under `rules` on `mesh`."""
  table: Mapping[str, object] = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used)
    size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
    if not mesh_axes or size == 1 or dim % size:
      out.append(None)
      continue
    used.update(mesh_axes)
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def param_shardings(specs, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of parameter specs (leaves with `.axes` and `.shape`, such as
  `jaxpost.models.param_specs(config)` or `jaxpost.peft.lora_specs(...)`)."""
  return jax.tree.map(
      lambda s: NamedSharding(mesh, logical_to_spec(s.axes, s.shape, mesh, rules)), specs,
      is_leaf=lambda x: hasattr(x, "axes") and hasattr(x, "shape"))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, enabled: bool | None = None) -> bool:
  """Starts multi-process JAX when configured or detected; returns whether it runs (see
  `jaxpost.multihost.initialize`: an explicit coordinator, `JAX_COORDINATOR_ADDRESS`, or a
  cluster found in the environment such as SLURM; a single process stays as it is)."""
  from jaxpost import multihost  # pylint: disable=import-outside-toplevel
  return multihost.initialize(coordinator_address, num_processes, process_id, enabled)
