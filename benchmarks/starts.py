"""Time to first step, cold and warm: what the persistent compilation cache saves.

    python benchmarks/run.py --only starts               # alone, or beside other workloads

jaxpost's CLI turns on JAX's persistent compilation cache (`jaxpost/compile_cache.py`), so a
second run of the same programs (a resumed run, an export, an evaluation, a second
quickstart) reads them back instead of compiling. Measured here, each round:

* **quickstart**: `python -m jaxpost.cli train configs/quickstart.yaml run_dir=<fresh>` with
  `JAXPOST_COMPILE_CACHE` set to `off`, then to an empty folder (cold), then to that same
  folder again (warm). Timed from launch until the run logs `time to first step` (building
  the tiny model and tokenizer, the evaluation before training and every compile up to the
  end of step 1); the process is then stopped. The run's own figure, from `train`'s start
  (imports excluded), is kept beside it.
* **sft** (the harness's 40M SFT step, 8 x 256): each framework's `sft` worker, timed from
  launch to the end of its first step (imports, initialisation, compile, one step). jaxpost:
  with no cache (the worker's default), an empty cache (cold) and the same cache again
  (warm), the cache turned on by `enable_compile_cache` as the CLI does. Tunix turns on no
  persistent cache itself: its row is its default (off), and warm with JAX's own cache
  switched on through the environment (`JAX_COMPILATION_CACHE_DIR`, every program cached),
  which is what a Tunix user would do.

Every run is a fresh process; cold runs always precede the warm run that reads their cache.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from workloads import REPO, Settings, make_spec

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
MARKER = "time to first step:"  # the line `jaxpost train` logs after its first step
CACHES = ("off", "cold", "warm")
# (target, framework, the caches it is measured with)
PLAN = (("quickstart", "jaxpost", CACHES), ("sft", "jaxpost", CACHES),
        ("sft", "tunix", ("off", "warm")))
JAX_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def logged_seconds(line: str) -> float | None:
  """The seconds in `jaxpost train`'s "time to first step: 43.2s" line; None for another."""
  if MARKER not in line:
    return None
  return float(line.split(MARKER, 1)[1].strip().rstrip("s"))


def quickstart_start(cache: str | None, run_dir: str, log_path: str,
                     timeout_s: float) -> dict[str, Any]:
  """Launches the quickstart with `JAXPOST_COMPILE_CACHE=cache` (None: off); seconds from
  launch to its `time to first step` line, and the run's own figure; stops it there."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2",
             JAXPOST_COMPILE_CACHE=cache or "off")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "jaxpost.cli", "train", QUICKSTART, f"run_dir={run_dir}"]
  t0 = time.perf_counter()
  with open(log_path, "w") as log, subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) as proc:
    try:
      for line in proc.stdout:
        log.write(line)
        logged = logged_seconds(line)
        if logged is not None:
          return {"time_to_first_step_s": time.perf_counter() - t0, "logged_s": logged}
        if time.perf_counter() - t0 > timeout_s:
          return {"error": f"no '{MARKER}' line after {timeout_s:.0f} s (log: {log_path})"}
      return {"error": f"exit code {proc.wait()} before '{MARKER}' (log: {log_path})"}
    finally:
      proc.kill()


def measure_starts(s: Settings, run_worker: Callable[..., dict], pythons: dict[str, str],
                   log_dir: str, timeout_s: float,
                   log: Callable[..., None] = print) -> list[dict]:
  """Every (round, target, framework, cache) start of `PLAN`, one fresh process each."""
  spec = dict(make_spec(s, "sft"), warmup=1, steps=1)  # the first step, then one more
  out = []
  for rnd in range(1, s.rounds + 1):
    for target, fw, caches in PLAN:
      if fw not in s.frameworks:
        continue
      folder = tempfile.mkdtemp(prefix=f"jaxpost-starts-{target}-{fw}-")
      cache_dir = os.path.join(folder, "xla")  # the runs' folders beside it
      try:
        for cache in caches:
          tag = f"starts-{target}-{fw}-{cache}-r{rnd}"
          log(f"[round {rnd}/{s.rounds}] time to first step: {target} / {fw} / {cache} ...")
          log_path = os.path.join(log_dir, f"{tag}.log")
          if target == "quickstart":
            result = quickstart_start(None if cache == "off" else cache_dir,
                                      os.path.join(folder, f"run-{cache}"), log_path,
                                      timeout_s)
          else:
            result = run_worker(pythons[fw], fw,
                                dict(spec, **worker_cache(fw, cache, cache_dir)), log_path,
                                timeout_s, env=worker_env(fw, cache, cache_dir))
          if "error" in result:
            log(f"  FAILED: {result['error'][:400]}")
          else:
            log(f"  {result['time_to_first_step_s']:.1f} s from launch to the first step")
          out.append({"round": rnd, "target": target, "framework": fw, "cache": cache,
                      "result": result})
      finally:
        shutil.rmtree(folder, ignore_errors=True)
  return out


def worker_cache(framework: str, cache: str, folder: str) -> dict:
  """The spec entry that turns a jaxpost worker's cache on (its default is off)."""
  return {"compile_cache": folder} if framework == "jaxpost" and cache != "off" else {}


def worker_env(framework: str, cache: str, folder: str) -> dict:
  """Extra environment of a worker: JAX's own cache for a warm Tunix."""
  if framework == "tunix" and cache != "off":
    return dict(JAX_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=folder)
  return {}


def aggregate_starts(runs: list[dict]) -> list[dict]:
  """One row per (target, framework): the median over rounds of each cache's seconds."""
  rows = []
  for target, fw, caches in PLAN:
    row: dict[str, Any] = {"target": target, "framework": fw}
    for cache in caches:
      ok = [r["result"] for r in runs if (r["target"], r["framework"], r["cache"])
            == (target, fw, cache) and "error" not in r["result"]]
      if ok:
        row[cache] = statistics.median(r["time_to_first_step_s"] for r in ok)
        logged = [r["logged_s"] for r in ok if "logged_s" in r]
        if logged:
          row[f"{cache}_logged"] = statistics.median(logged)
        row[f"{cache}_rounds"] = len(ok)
    if any(c in row for c in caches):
      rows.append(row)
  return rows


def starts_table(rows: list[dict]) -> str:
  """The markdown table of `aggregate_starts` rows."""
  title = {"quickstart": "quickstart (`jaxpost train configs/quickstart.yaml`)",
           "sft": "40M SFT step (the `sft` worker)"}
  fw_title = {"jaxpost": "jaxpost", "tunix": "Tunix"}

  def cell(row, cache):
    if cache not in row:
      return "-"
    text = f"{row[cache]:.1f}"
    if f"{cache}_logged" in row:
      text += f" ({row[f'{cache}_logged']:.1f})"
    return text

  lines = ["| to the first step, s | framework | cache off | cold (empty cache) | warm | "
           "warm / off |", "|---|---|--:|--:|--:|--:|"]
  for r in rows:
    ratio = f"{r['warm'] / r['off']:.2f}" if "warm" in r and "off" in r else "-"
    lines.append(f"| {title[r['target']]} | {fw_title[r['framework']]} | {cell(r, 'off')} | "
                 f"{cell(r, 'cold')} | {cell(r, 'warm')} | {ratio} |")
  return "\n".join(lines)


def starts_section(runs: list[dict], rounds: int) -> str:
  """RESULTS.md's section on warm starts."""
  return "\n".join([
      "## Time to first step, cold and warm", "",
      f"Seconds from launching the process to the end of its first step, median of {rounds} "
      "round(s); in brackets the quickstart's own `time to first step` (from `train`'s "
      "start: imports excluded). Cold: an empty persistent compilation cache; warm: the same "
      "cache again; off: no persistent cache. What runs: `benchmarks/starts.py`.", "",
      starts_table(aggregate_starts(runs)), ""])
