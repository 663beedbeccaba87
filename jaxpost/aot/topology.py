"""Target machines for ahead-of-time compilation: TPU slices by name, or N fake CPU devices.

    topo = parse_topology("v5e-256")        # 256 chips, 16 GiB of HBM each
    devices = topology_devices(topo)        # compile-only TPU devices from libtpu

A TPU topology is described, never run: libtpu's `get_topology_desc` gives compile-only
devices of the slice (as MaxText's `train_compile` does), so a step is lowered and compiled by
the real TPU compiler on a machine without a TPU. libtpu must pair with the installed jaxlib
(jax 0.10.2 asks for `libtpu==0.0.42.*`, the `tpu-aot` extra; installed aside and found by
TPU_LIBRARY_PATH, since on a machine without a TPU it makes every JAX start warn). Names follow
Cloud TPU's: v5e-N and v6e-N count chips; v4-N and v5p-N count TensorCores, two per chip, and
a chip is one (megacore) device, so v5p-128 is 64 devices. `cpu-N` compiles for N CPU
devices of this host (XLA_FLAGS=--xla_force_host_platform_device_count=N, which must be set
before JAX starts); it checks shardings and sizes, not a TPU's memory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

GIB = 1 << 30

# generation -> (topology prefix, chip config, HBM bytes per device, names count cores?)
_TPU = {
    "v4": ("v4", "megacore", 32 * GIB, True),
    "v5e": ("v5e", "default", 16 * GIB, False),
    "v5p": ("v5", "megacore", 95 * GIB, True),
    "v6e": ("v6e", "default", 32 * GIB, False),
}
# chip count -> physical layout (2D for v5e / v6e, 3D for v4 / v5p), from Cloud TPU's tables
_LAYOUT_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_LAYOUT_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A compile target: `name` as given, `platform` ("tpu" or "cpu"), `num_devices`, the
  libtpu topology string (e.g. "v5e:16x16"), and the memory of one device (None: unknown)."""

  name: str
  platform: str
  num_devices: int
  topology_name: str = ""
  chip_config: str = "default"
  hbm_bytes: int | None = None
  wrap: tuple[bool, ...] = ()


def parse_topology(name: str) -> Topology:
  """`v5e-256`, `v5p-128`, `v6e-64`, `v4-32` or `cpu-8` as a `Topology`."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|cpu)-(\d+)", name.strip().lower())
  if not m:
    raise ValueError(f"topology={name!r}: expected a TPU slice such as v5e-256, v5p-128, "
                     "v6e-64, v4-32, or cpu-N for N fake CPU devices")
  gen, n = m.group(1), int(m.group(2))
  if gen == "cpu":
    if n < 1:
      raise ValueError(f"topology={name}: need at least one device")
    return Topology(name, "cpu", n)
  prefix, chip_config, hbm, counts_cores = _TPU[gen]
  chips = n // 2 if counts_cores else n
  table = _LAYOUT_3D if counts_cores else _LAYOUT_2D
  if chips not in table:
    sizes = sorted(k * 2 if counts_cores else k for k in table)
    raise ValueError(f"topology={name}: {gen} slices come in sizes {sizes}")
  layout = table[chips]
  dims = [int(d) for d in layout.split("x")]
  # a full ring wraps around (torus) from 4 chips per side in 3D, and on 16-chip sides in 2D
  wrap = tuple(d >= 4 and chips >= 64 for d in dims) if counts_cores else tuple(
      d == 16 for d in dims) + (False,)
  return Topology(name, "tpu", chips, f"{prefix}:{layout}", chip_config, hbm, wrap)


def libtpu_available() -> bool:
  """Whether libtpu can be found (the `libtpu` package, or TPU_LIBRARY_PATH)."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology) -> list:
  """The devices of `topo`: compile-only TPU devices from libtpu, or this host's CPU devices
  (the first `num_devices` of them)."""
  import jax  # pylint: disable=import-outside-toplevel
  if topo.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < topo.num_devices:
      raise ValueError(
          f"topology={topo.name} needs {topo.num_devices} CPU devices but JAX started with "
          f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{topo.num_devices} before JAX starts (`jaxpost compile` does it for you)")
    return devices[:topo.num_devices]
  if not libtpu_available():
    raise ValueError(f"topology={topo.name} needs libtpu for the TPU compiler (0.0.42 for jax "
                     "0.10.2): pip install --target DIR 'libtpu==0.0.42.*' and set "
                     "TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so, or use topology=cpu-N")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip_config,
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=topo.wrap)
  return list(desc.devices)
