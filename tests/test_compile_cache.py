"""Warm starts: the CLI turns on JAX's persistent compilation cache (`jaxpost.compile_cache`).

A CLI run writes compiled programs to the cache folder; a second run in a new process with
the same folder reads them back: the folder does not grow (no program compiled again). No
timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax

from jaxpost.compile_cache import cache_dir, default_cache_dir, enable_compile_cache
from jaxpost.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv("JAXPOST_COMPILE_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_dir(True) == default_cache_dir() == tmp_path / "xdg" / "jaxpost" / "xla"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "jaxpost" / "xla"
  assert cache_dir(False) is None
  assert cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
  monkeypatch.setenv("JAXPOST_COMPILE_CACHE", str(tmp_path / "env"))
  assert cache_dir(True) == tmp_path / "env"
  assert cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"  # the recipe's folder wins
  for off in ("off", "0", "false", "none", ""):
    monkeypatch.setenv("JAXPOST_COMPILE_CACHE", off)
    assert cache_dir(True) is None


def test_an_existing_jax_setting_is_kept():
  # tests/conftest.py sets JAX_COMPILATION_CACHE_DIR for the session: the CLI keeps it
  before = jax.config.jax_compilation_cache_dir
  assert enable_compile_cache("/nonexistent/elsewhere") == os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert jax.config.jax_compilation_cache_dir == before
  assert not Path("/nonexistent/elsewhere").exists()


def test_recipe_key(tmp_path):
  cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
  assert cfg.compile_cache is True
  cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                    [f"run_dir={tmp_path}", "compile_cache=false"])
  assert cfg.compile_cache is False
  cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                    [f"run_dir={tmp_path}", f"compile_cache={tmp_path / 'xla'}"])
  assert cfg.compile_cache == str(tmp_path / "xla")


def _files(folder: Path) -> set[str]:
  return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_second_cli_run_reads_the_cache(tmp_path):
  """`jaxpost demo` (tiny model, a generation) twice in new processes sharing a folder."""
  cache = tmp_path / "xla"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["JAXPOST_COMPILE_CACHE"] = str(cache)

  def demo(i: int) -> None:
    subprocess.run([sys.executable, "-m", "jaxpost.cli", "demo", "--run-dir",
                    str(tmp_path / f"demo{i}"), "--max-new-tokens", "4"],
                   env=env, check=True, capture_output=True, cwd=ROOT, timeout=300)

  demo(1)
  first = _files(cache)
  assert first, "the first run wrote no cache entries"
  demo(2)
  assert _files(cache) == first, "the second run compiled programs again"
