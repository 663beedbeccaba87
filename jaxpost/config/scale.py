"""The scale-out sections: `mesh:` (the device mesh) and `distributed:` (multi-process start-up,
`jaxpost.multihost`)."""

from __future__ import annotations

import dataclasses

from jaxpost.config.sections_base import Section, _require


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
  """Device mesh sizes (`jaxpost.sharding.make_mesh`); their product is the device count.
  The batch is split over `data` x `fsdp`."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def batch_shards(self) -> int:
    """How many ways the batch axis is split."""
    return self.data * self.fsdp

  def validate(self, prefix: str) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      _require(value >= 1, f"{prefix}{f.name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class DistributedSection(Section):
  """Multi-process (multi-host) start-up for `jax.distributed.initialize`; None = detected
  from the environment (TPU pods, SLURM, ...) or a single process. `enabled`: None starts it
  when a coordinator or `num_processes` is given or a cluster is detected
  (`jaxpost.multihost.detected_cluster`), true always (JAX detects the rest: a GCE TPU VM
  pod), false never. See docs/multihost.md."""

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  enabled: bool | None = None

  def validate(self, prefix: str) -> None:
    n, i = self.num_processes, self.process_id
    _require(n is None or n >= 1, f"{prefix}num_processes must be >= 1, got {n}")
    _require(i is None or i >= 0, f"{prefix}process_id must be >= 0, got {i}")
    _require(n is None or i is None or i < n,
             f"{prefix}process_id={i} must be < {prefix}num_processes={n}")
