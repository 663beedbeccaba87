"""`jaxpost compile CONFIG.yaml topology=v5e-256 [key=value ...]`: will this run fit on a pod?

The recipe is read as `jaxpost train` reads it, with three differences: `topology=` names the
target (`jaxpost.aot.topology`); nothing is read from disk but the recipe (and a config.json
for `model.path`), so a recipe without `data.train` gets a placeholder; and without any
`mesh.*` override the mesh is pure FSDP over every device (mesh.fsdp=N, as MaxText's
default). Exit status 0 when every program fits, 2 with one `jaxpost: error:` line otherwise.
"""

from __future__ import annotations

import os

_PLACEHOLDER_DATA = "(not read by jaxpost compile)"


def split_overrides(overrides: list[str]) -> tuple[str, list[str]]:
  """(the topology name, the other overrides); `topology=` is required."""
  topo = [o.split("=", 1)[1] for o in overrides if o.startswith("topology=")]
  rest = [o for o in overrides if not o.startswith("topology=")]
  if len(topo) != 1:
    raise ValueError("jaxpost compile needs exactly one topology=NAME (e.g. topology=v5e-256, "
                     "topology=v5p-128, topology=cpu-8)")
  return topo[0], rest


def compile_overrides(overrides: list[str], num_devices: int) -> list[str]:
  """The overrides `jaxpost compile` adds to the user's (see the module docstring)."""
  keys = {o.split("=", 1)[0] for o in overrides}
  extra = []
  if not any(k.startswith("mesh.") for k in keys):
    extra.append(f"mesh.fsdp={num_devices}")
  if "data.train" not in keys and "task" not in {k.split(".")[0] for k in keys}:
    extra.append(f"data.train={_PLACEHOLDER_DATA}")
  if "train.eval_every" not in keys:
    extra.append("train.eval_every=0")
  return extra + overrides


_ACCELERATOR_TYPE = {"v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e", "v4": "v4"}


def prepare_backend(platform: str, num_devices: int, name: str = "") -> None:
  """Environment for the compile, set before JAX starts its backends: CPU as the default
  backend (the TPU devices are compile-only, described by libtpu; a TPU runtime is never
  started, so libtpu's one-process lock is not needed), and N CPU devices for a cpu-N
  topology."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # libtpu takes a lock file per process unless told otherwise; a compile-only process
  # never touches a TPU, so several (a test, a benchmark) may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if platform == "tpu":  # what libtpu would ask a TPU VM's metadata server (else it warns)
    gen, size = name.lower().split("-")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{_ACCELERATOR_TYPE[gen]}-{size}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if platform == "cpu":
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def run_compile(config_path: str, overrides: list[str], *, sampler: bool = True) -> int:
  """The command: prints each program's report; raises `DoesNotFit` when one cannot fit."""
  from jaxpost.aot.topology import parse_topology  # pylint: disable=import-outside-toplevel

  name, rest = split_overrides(overrides)
  topo = parse_topology(name)
  prepare_backend(topo.platform, topo.num_devices, topo.name)
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel

  cfg = load_config(config_path, compile_overrides(rest, topo.num_devices))
  from jaxpost import aot  # pylint: disable=import-outside-toplevel
  from jaxpost.models import num_params  # pylint: disable=import-outside-toplevel

  m = cfg.mesh
  config = aot.abstract.model_config(cfg)
  print(f"compiling {cfg.algorithm} for {topo.name} ({topo.num_devices} {topo.platform} "
        f"devices"
        + ("" if topo.hbm_bytes is None else f", {aot.report.gib(topo.hbm_bytes)} each")
        + f"; mesh data={m.data} fsdp={m.fsdp} tensor={m.tensor}): "
        f"{num_params(config) / 1e9:.3g}B parameters in {cfg.model.dtype}, batch "
        f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens"
        + (f" in {cfg.train.micro_batches} micro-batches" if cfg.train.micro_batches > 1
           else "") + f", remat={cfg.model.remat}", flush=True)
  reports = aot.compile_run(cfg, topo, sampler=sampler, log=lambda s: print(s, flush=True))
  for r in reports:
    print(aot.format_report(r), flush=True)
  aot.check_fits(reports)
  return 0
