"""Running a test script on 8 fake CPU devices, in a subprocess (XLA reads the flag at start)."""

from __future__ import annotations

import os
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_on_8_cpu_devices(script: str, timeout: int = 600) -> str:
  """Runs `script` (argv[1] is the tests folder) with 8 CPU devices; it must print OK."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, TESTS_DIR], env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "OK" in proc.stdout, proc.stdout[-2000:]
  return proc.stdout
