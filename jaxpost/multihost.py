"""Multi-process (multi-host) runs on JAX's own runtime: start-up, barriers, per-process rows.

A multi-host run is N copies of the same program, one per host (`jax.distributed`, as MaxText
and Tunix run): every process builds the same mesh over all `jax.devices()`, runs the same
compiled steps on global arrays, and owns the devices of its host. What differs per process:

- the rows of each global batch it feeds (`process_rows`: the rows its devices hold under the
  batch sharding, [i * B / N, (i + 1) * B / N) on a data-parallel mesh), placed by
  `place_rows` (`jax.make_array_from_callback`, offset by the first row);
- files: one process writes (`first_process`), the others wait at a barrier;
- host values of sharded arrays: `to_host` gathers what a process does not hold.

    initialize(coordinator_address=None, num_processes=None, process_id=None)  # detects
    lo, hi = process_rows(batch_sharding, global_rows=16)   # (8, 16) on process 1 of 2
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def detected_cluster() -> str | None:
  """The multi-process cluster this process runs in, from the environment alone (no network),
  as JAX's own cluster detection reads it: "slurm" (`srun` with more than one task), "ompi"
  (`mpirun`), "gke-tpu" (a TPU slice on GKE: `TPU_WORKER_HOSTNAMES` with several hosts);
  None otherwise. A TPU VM pod on GCE is found by JAX through the metadata server, which is
  not queried here: pass `distributed.enabled=true` there (`docs/multihost.md`)."""
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1:
    return "ompi"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "gke-tpu"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, enabled: bool | None = None) -> bool:
  """Starts multi-process JAX (`jax.distributed.initialize`) when asked; returns whether it
  runs. Must come before anything touches a device.

  enabled=None (the default): when a coordinator is given (here or `JAX_COORDINATOR_ADDRESS`),
  `num_processes` is given (here or `JAX_NUM_PROCESSES`, with `JAX_PROCESS_ID`: any jaxpost
  command, `export` and `eval` too, starts this way), or `detected_cluster()` finds one; the unset values are JAX's
  auto-detection's. enabled=True: always (JAX detects everything left unset; on a GCE TPU VM
  from the metadata server). enabled=False: never (a single process). On CPU, collectives
  across processes use gloo.
  """
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if enabled is None:
    enabled = address is not None or num_processes is not None or detected_cluster() is not None
  if not enabled:
    return False
  # Only read by the CPU backend; set before any backend starts (initialize must come first).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
  return True


def sync(name: str) -> None:
  """A barrier over every process (nothing on one process). `name` must be the same on all."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def first_process(fn: Callable[[], T], name: str) -> T | None:
  """`fn()` on process 0 between two barriers (every process must call it): files `fn` writes
  are complete when any process returns. Returns `fn()`'s value on process 0, None elsewhere."""
  sync(f"{name}:before")
  out = fn() if jax.process_index() == 0 else None
  sync(f"{name}:after")
  return out


def process_rows(sharding: jax.sharding.Sharding, global_rows: int) -> tuple[int, int]:
  """The rows [lo, hi) of a [global_rows, ...] batch this process's devices hold under
  `sharding` (the whole batch where its devices' rows are not one contiguous range)."""
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  spans = sorted({s[0].indices(global_rows)[:2] for s in index_map.values()})
  lo, hi = spans[0][0], spans[0][1]
  for a, b in spans[1:]:
    if a > hi:
      return 0, global_rows
    hi = max(hi, b)
  return lo, hi


def place_rows(batch: dict[str, np.ndarray], sharding, *, lo: int,
               global_rows: int) -> dict[str, jax.Array]:
  """Process-local rows [lo, lo + len) of each [global_rows, ...] array -> global arrays on
  `sharding`; every device's shard must lie in this process's rows (`process_rows`)."""

  def array(v: np.ndarray) -> jax.Array:
    shape = (global_rows, *v.shape[1:])

    def shard(index):
      rows = index[0].indices(global_rows)
      return v[(slice(rows[0] - lo, rows[1] - lo), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)

  return {k: array(v) for k, v in batch.items()}


def host_tree(tree: Any) -> Any:
  """`tree` with every array's full value in host memory (`to_host`, one array at a time; a
  collective: all processes must call it), e.g. for the first process to write a model."""
  return jax.tree.map(lambda x: to_host(x) if isinstance(x, jax.Array) else x, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """A global array's full value on every process (gathered across processes when this one
  holds only part of it); a plain `device_get` on one process."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def total(n: int) -> int:
  """The sum of `n` over every process (a collective: all must call it)."""
  if jax.process_count() == 1:
    return int(n)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(np.asarray(multihost_utils.process_allgather(np.int32(n))).sum())


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (a collective: all must call it)."""
  if jax.process_count() == 1:
    return [json.loads(json.dumps(value))]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]
