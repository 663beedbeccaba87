"""Ahead-of-time compilation for a pod on a machine without one (`jaxpost compile`).

    reports = compile_run(load_config("configs/sft.yaml", ["model.preset=llama3-8b"]),
                          parse_topology("v5e-256"))

Lowers `jaxpost train`'s update step (and, for RL, the sampler) from shapes only, compiles it
for a TPU slice described by libtpu (or N fake CPU devices), and reports per-device memory and
collectives (`jaxpost.aot.report`). `jaxpost.aot.golden` dumps the sharding of every parameter
and optimizer-state leaf, which CI compares with tests/golden/shardings/.
"""

from __future__ import annotations

import time

from jaxpost.aot.abstract import (
  abstract_run,
  lower_sampler,
  lower_step,
  make_topology_mesh,
)
from jaxpost.aot.report import (
  DoesNotFit,
  ProgramReport,
  check_fits,
  format_report,
  program_report,
)
from jaxpost.aot.topology import Topology, parse_topology, topology_devices


def compile_run(cfg, topo: Topology, *, sampler: bool = True,
                log=lambda _: None) -> list[ProgramReport]:
  """Compiles the training step of `cfg` (and the sampler where the algorithm samples) for
  `topo`; one `ProgramReport` each. The TPU compiler itself fails a program that cannot fit
  (RESOURCE_EXHAUSTED); that is raised as `DoesNotFit` with its message. `log` gets what
  trains (the trainable's one-line description)."""
  mesh = make_topology_mesh(cfg, topology_devices(topo))
  run = abstract_run(cfg, mesh)
  log(run.trainable.describe)
  programs = [("train step", lambda: lower_step(run))]
  if sampler:
    programs.append(("sampler (prefill + decode loop)", lambda: lower_sampler(run)))
  reports = []
  for name, lower in programs:
    t0 = time.perf_counter()
    lowered = lower()
    if lowered is None:
      continue
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
        raise DoesNotFit(f"the {name} does not fit on {topo.name}: "
                         + " ".join(str(e).split())[:600]) from e
      raise
    reports.append(program_report(name, compiled, hbm_bytes=topo.hbm_bytes,
                                  compile_seconds=time.perf_counter() - t0))
  return reports


__all__ = ["DoesNotFit", "ProgramReport", "Topology", "abstract_run", "check_fits",
           "compile_run", "format_report", "lower_sampler", "lower_step", "make_topology_mesh",
           "parse_topology", "program_report", "topology_devices"]
