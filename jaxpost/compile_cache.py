"""Warm starts: JAX's persistent compilation cache, turned on by the CLI.

    folder = enable_compile_cache(True)     # before the first compile; None when it stays off

A compiled program is written to the folder, keyed by its HLO, the compiler flags and the
backend, and read back the next time the same program is compiled in any process: a resumed
run, `jaxpost export`, an evaluation of the run or a second quickstart skip the compiles
already done. Where the folder is, first match wins:

1. `JAX_COMPILATION_CACHE_DIR` already set in the environment: JAX's own setting is kept
   as it is (the test suite sets one per session).
2. the recipe's top-level `compile_cache`: a folder, or `false` to turn the cache off;
3. `JAXPOST_COMPILE_CACHE`: a folder, or `off` (also `0`, `false`, `none`, empty);
4. `$XDG_CACHE_HOME/jaxpost/xla`, else `~/.cache/jaxpost/xla`.

Every program is cached however fast it compiled (the quickstart compiles many small ones).
"""

from __future__ import annotations

import os
from pathlib import Path

_OFF = ("", "0", "off", "false", "none", "null")
MIN_COMPILE_SECS = 0.0  # cache every program (JAX's default, 1 s, skips most of the quickstart's)


def default_cache_dir() -> Path:
  """`$XDG_CACHE_HOME/jaxpost/xla`, else `~/.cache/jaxpost/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "jaxpost" / "xla"


def cache_dir(setting: bool | str = True) -> Path | None:
  """The folder `enable_compile_cache(setting)` uses (None: off), from the order above,
  ignoring `JAX_COMPILATION_CACHE_DIR`."""
  if setting is False:
    return None
  if isinstance(setting, str):
    return None if setting.strip().lower() in _OFF else Path(setting).expanduser()
  env = os.environ.get("JAXPOST_COMPILE_CACHE")
  if env is not None:
    return None if env.strip().lower() in _OFF else Path(env).expanduser()
  return default_cache_dir()


def enable_compile_cache(setting: bool | str = True) -> str | None:
  """Points JAX's persistent compilation cache at `cache_dir(setting)` (created if missing)
  unless `JAX_COMPILATION_CACHE_DIR` is set; returns the folder in use, or None when off.
  Call it before anything compiles: JAX opens the cache at the first compile."""
  import jax  # pylint: disable=import-outside-toplevel

  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  folder = cache_dir(setting)
  if folder is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  folder.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  for name, value in (("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS),
                      ("jax_persistent_cache_min_entry_size_bytes", -1)):
    if name.upper() not in os.environ:  # JAX's own variable, when set, wins
      jax.config.update(name, value)
  return str(folder)
