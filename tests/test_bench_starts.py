"""The harness's time-to-first-step measurement (`benchmarks/starts.py`): what each start is
given, how rounds are summarised and the table RESULTS.md gets. No process is launched and no
time is asserted."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import starts  # noqa: E402  (first: it puts benchmarks/workers on the path, for common)
import common  # noqa: E402


def fake_runs(rounds: int = 3) -> list[dict]:
  runs = []
  for rnd in range(1, rounds + 1):
    for target, fw, caches in starts.PLAN:
      for cache in caches:
        seconds = {"off": 40.0, "cold": 44.0, "warm": 8.0}[cache] + rnd
        result = {"time_to_first_step_s": seconds}
        if target == "quickstart":
          result["logged_s"] = seconds - 3.0
        if (target, fw, cache, rnd) == ("sft", "tunix", "warm", 2):
          result = {"error": "timed out"}
        runs.append({"round": rnd, "target": target, "framework": fw, "cache": cache,
                     "result": result})
  return runs


def test_rounds_become_medians_and_failed_rounds_are_left_out():
  rows = {(r["target"], r["framework"]): r for r in starts.aggregate_starts(fake_runs())}
  assert set(rows) == {(t, f) for t, f, _ in starts.PLAN}
  quick = rows[("quickstart", "jaxpost")]
  assert (quick["off"], quick["cold"], quick["warm"]) == (42.0, 46.0, 10.0)
  assert quick["warm_logged"] == 7.0 and quick["warm_rounds"] == 3
  tunix = rows[("sft", "tunix")]
  assert "cold" not in tunix and tunix["warm_rounds"] == 2 and tunix["warm"] == 10.0  # 9, 11


def test_table_has_a_row_per_start_and_the_warm_to_off_ratio():
  text = starts.starts_section(fake_runs(), rounds=3)
  rows = [line for line in text.splitlines() if line.startswith("| ") and "framework" not in line]
  assert len(rows) == len(starts.PLAN)
  assert rows[0].split("|")[3:7] == [" 42.0 (39.0) ", " 46.0 (43.0) ", " 10.0 (7.0) ",
                                     " 0.24 "]
  assert "| Tunix | 42.0 | - | 10.0 |" in rows[2]


def test_the_cache_reaches_each_framework_its_own_way(tmp_path):
  folder = str(tmp_path)
  assert starts.worker_cache("jaxpost", "cold", folder) == {"compile_cache": folder}
  assert starts.worker_cache("jaxpost", "off", folder) == {}
  assert starts.worker_env("jaxpost", "warm", folder) == {}
  env = starts.worker_env("tunix", "warm", folder)
  assert env["JAX_COMPILATION_CACHE_DIR"] == folder
  assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
  assert starts.worker_env("tunix", "off", folder) == {}


def test_workers_report_time_from_launch_to_the_first_step(monkeypatch):
  monkeypatch.setenv(common.LAUNCHED_AT_ENV, repr(time.time() - 5.0))
  out = common.time_steps(lambda: time.sleep(0.01), warmup=1, steps=2)
  assert 5.0 < out["time_to_first_step_s"] < 5.0 + 10.0
  monkeypatch.delenv(common.LAUNCHED_AT_ENV)
  assert "time_to_first_step_s" not in common.time_steps(lambda: None, warmup=1, steps=1)


@pytest.mark.parametrize("line, logged", [("time to first step: 43.2s\n", 43.2),
                                          ("12:00:01 INFO time to first step: 7.0s\n", 7.0),
                                          ("step 1/600 loss 10.3\n", None)])
def test_the_quickstart_line_is_read(line, logged):
  assert starts.logged_seconds(line) == logged
  trainer = Path(__file__).resolve().parents[1] / "jaxpost" / "train" / "trainer.py"
  assert f'log(f"{starts.MARKER} {{seconds:.1f}}s")' in trainer.read_text()
