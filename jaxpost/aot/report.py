"""What a compiled program costs on one device: memory, collectives, and whether it fits.

    report = program_report("train step", lowered.compile(), hbm_bytes=16 << 30)
    print(format_report(report))
    check_fits([report])          # raises DoesNotFit naming the program and the overshoot

Memory comes from XLA's buffer assignment (`Compiled.memory_analysis()`): the arguments (the
sharded state, batch and frozen inputs), the outputs, the part of the outputs that reuses a
donated argument's buffer (aliased: counted once), the temporaries, and the compiler's own peak
where it reports one (the TPU compiler does; it includes what the program's code and runtime
reserve). The collectives are counted by kind in the optimized HLO: each op as written in the
program, so one inside a layer scan's body counts once however many layers it runs for.
"""

from __future__ import annotations

import dataclasses
import re

from jaxpost.aot.topology import GIB

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


class DoesNotFit(ValueError):
  """A compiled program needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """Per-device bytes of one compiled program and its collectives (static counts by kind)."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  peak_bytes: int
  host_bytes: int
  hbm_bytes: int | None
  collectives: dict[str, int]
  compile_seconds: float = 0.0

  @property
  def headroom_bytes(self) -> int | None:
    """HBM left at the peak (negative: the overshoot); None without a known capacity."""
    return None if self.hbm_bytes is None else self.hbm_bytes - self.peak_bytes

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_bytes is None else self.peak_bytes <= self.hbm_bytes


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective op the (optimized) HLO text holds; async pairs count once."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for m in _OP.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def program_report(name: str, compiled, *, hbm_bytes: int | None,
                   compile_seconds: float = 0.0) -> ProgramReport:
  """The `ProgramReport` of a compiled program (`jax.stages.Compiled`)."""
  ma = compiled.memory_analysis()
  args, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  live = args + out - alias + temp
  peak = max(int(getattr(ma, "peak_memory_in_bytes", 0) or 0), live)
  host = (ma.host_argument_size_in_bytes + ma.host_output_size_in_bytes
          - ma.host_alias_size_in_bytes + ma.host_temp_size_in_bytes)
  return ProgramReport(name, args, out, alias, temp, ma.generated_code_size_in_bytes, peak,
                       host, hbm_bytes, count_collectives(compiled.as_text()), compile_seconds)


def gib(n: float) -> str:
  """Bytes as GiB, or as MiB below 1 GiB (a small model's step reads 0.00 GiB otherwise)."""
  return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


def format_report(r: ProgramReport) -> str:
  """A few lines: memory per device, fit, collectives."""
  lines = [f"{r.name} (compiled in {r.compile_seconds:.1f}s), per device:",
           (f"  arguments {gib(r.argument_bytes)}, outputs {gib(r.output_bytes)} "
            f"({gib(r.alias_bytes)} of them in donated buffers), temporaries "
            f"{gib(r.temp_bytes)}, code {r.code_bytes / (1 << 20):.1f} MiB"),
           f"  peak {gib(r.peak_bytes)}" + (
               "" if r.hbm_bytes is None else
               f" of {gib(r.hbm_bytes)} HBM: " + (
                   f"fits, {gib(r.headroom_bytes)} free" if r.fits else
                   f"DOES NOT FIT, {gib(-r.headroom_bytes)} over"))]
  if r.host_bytes:
    lines.append(f"  host memory (offloaded): {gib(r.host_bytes)}")
  lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in r.collectives.items()))
  return "\n".join(lines)


def check_fits(reports: list[ProgramReport]) -> None:
  """Raises `DoesNotFit` (one line) for the first program over its device's memory."""
  for r in reports:
    if r.fits is False:
      raise DoesNotFit(
          f"the {r.name} needs {gib(r.peak_bytes)} per device at its peak but a device has "
          f"{gib(r.hbm_bytes)} ({gib(-r.headroom_bytes)} over: arguments "
          f"{gib(r.argument_bytes)}, temporaries {gib(r.temp_bytes)}); shard further "
          "(mesh.fsdp / mesh.tensor), lower train.batch_size or raise train.micro_batches, "
          "set model.remat=true or model.dtype=bfloat16, or offload the optimizer state "
          "(optim.offload=true)")
