"""jaxpost side by side with Tunix and PyTorch: same model shape, same data, same work.

    python benchmarks/run.py                        # everything, starts included (~3 h, 2 cores)
    python benchmarks/run.py --tiny --quick         # smoke run: 4 layers, width 256, 1 round
    python benchmarks/run.py --only sft,generate    # some workloads only
    python benchmarks/run.py --only starts          # time to first step, cold and warm
    python benchmarks/run.py --frameworks jaxpost,tunix --rounds 5

It writes, into `--out-dir` (default `benchmarks/`):

* `RESULTS.md`: the machine, the software on each side, the tables and what exactly is timed;
* `results.png`: tokens/s per workload and framework (bars: median over rounds, whiskers:
  the slowest and fastest round);
* `results.json`: the settings, every worker's raw result and the aggregates.

How it runs. Each measurement is one subprocess running one workload for one framework
(`benchmarks/workers/{jaxpost,tunix,torch}_worker.py`), given the workload spec as JSON and
printing its result as JSON, so compilation caches and peak memory are never shared. jaxpost
and PyTorch run in this interpreter's environment; Tunix (google-tunix 0.1.7 from PyPI) runs
in its own virtual environment, `benchmarks/.tunix-venv`, created on first use (it brings its
own jax/flax, whose versions are recorded). Frameworks alternate within each round and the
order reverses every other round (A B C, C B A, ...), so slow drift of the machine hits every
framework alike; a framework's time is the median over rounds of its per-round median step
time. The f32 matmul ceiling (for MFU) is measured by a jaxpost worker at the start and at
the end; the best of the two counts. So is the read bandwidth (`roofline.py`), from which
with the ceiling comes generation's bound: the least time the machine allows for it.

The harness, one job per module:

* `run.py` (this file): the command line, the Tunix venv, running the workers, aggregating
  their results into rows and writing the outputs;
* `workloads.py`: the frameworks, the model shape, the workloads (listed in its docstring)
  and the spec a worker receives (`Settings`, `make_spec`);
* `flops.py`: tokens and model FLOPs per step of each workload;
* `tables.py`: RESULTS.md (its tables and notes) and results.png;
* `workers/`: one script per framework, and what they share (`common.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

# First: it puts benchmarks/ and benchmarks/workers/ on sys.path for the imports below.
from workloads import (ALIASES, FRAMEWORKS, HERE, MODEL, REPO, TINY_MODEL, WORKERS, WORKLOADS,
                       Settings, Workload, make_spec)

import common
from bench_model import cpu_seconds
from jaxpost_worker import jaxpost_config
from starts import measure_starts, starts_section
from tables import summary_table, write_plot, write_results_md

TUNIX_VERSION = "0.1.7"
DEFAULT_TUNIX_VENV = os.path.join(HERE, ".tunix-venv")
WORKER_SCRIPTS = {"jaxpost": "jaxpost_worker.py", "tunix": "tunix_worker.py",
                  "pytorch": "torch_worker.py"}


# ---------------------------------------------------------------------------------------------
# Workers.


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


def ensure_tunix_venv(path: str, log_path: str) -> str:
  """The Python of the Tunix venv at `path`, creating it (pip install google-tunix) if needed.

  pip's output goes to `log_path`.
  """
  python = os.path.join(path, "bin", "python")
  check = [python, "-c", "import importlib.metadata as m; print(m.version('google-tunix'))"]
  if os.path.exists(python):
    got = subprocess.run(check, capture_output=True, text=True, check=False)
    if got.returncode == 0 and got.stdout.strip() == TUNIX_VERSION:
      return python
  log(f"creating the Tunix venv at {path} (pip install google-tunix=={TUNIX_VERSION}; a few "
      f"minutes; log: {log_path}) ...")
  with open(log_path, "w") as out:
    if not os.path.exists(python):
      subprocess.run([sys.executable, "-m", "venv", path], check=True, stdout=out, stderr=out)
    done = subprocess.run([python, "-m", "pip", "install", f"google-tunix=={TUNIX_VERSION}"],
                          stdout=out, stderr=out, check=False)
  if done.returncode or subprocess.run(check, capture_output=True, check=False).returncode:
    raise SystemExit(f"installing google-tunix=={TUNIX_VERSION} into {path} failed; see "
                     f"{log_path}")
  return python


def _children_cpu_s() -> float:
  """CPU seconds of this process's finished children so far."""
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def run_worker(python: str, framework: str, spec: dict, log_path: str,
               timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs one worker (`env`: extra environment); its result dict, or {"error": ...} when it
  failed.

  Adds `other_load`: the share of the machine's CPU time used by processes other than the
  worker while it ran (0 = the machine was quiet). The worker gets its launch time
  (`common.LAUNCHED_AT_ENV`), from which it reports `time_to_first_step_s`.
  """
  script = os.path.join(WORKERS, WORKER_SCRIPTS[framework])
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  env[common.LAUNCHED_AT_ENV] = repr(time.time())
  busy0, child0, t0 = cpu_seconds(), _children_cpu_s(), time.perf_counter()
  with open(log_path, "w") as err:
    try:
      proc = subprocess.run([python, script, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=err, text=True, timeout=timeout_s, cwd=REPO, env=env,
                            check=False)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout_s:.0f} s (log: {log_path})"}
  wall = time.perf_counter() - t0
  busy1, child1 = cpu_seconds(), _children_cpu_s()
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(common.RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    with open(log_path) as f:
      tail = f.read().strip().splitlines()[-12:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
  result = json.loads(lines[-1][len(common.RESULT_PREFIX):])
  if busy0 is not None and busy1 is not None:
    others = (busy1[0] - busy0[0]) - (child1 - child0)
    result["other_load"] = max(others, 0.0) / (wall * (os.cpu_count() or 1))
  result["process_wall_s"] = wall
  return result


# ---------------------------------------------------------------------------------------------
# Aggregation.


def aggregate(s: Settings, runs: list[dict], ceiling: float,
              bandwidth: float | None = None) -> list[dict]:
  """One row per (workload, framework): medians over rounds, throughput, MFU, ratios; for a
  workload with a `bound` (generation), the machine's least time from the ceiling and the
  read `bandwidth` (GB/s) and the step's fraction of it (`of_bound` = bound / median)."""
  config = jaxpost_config(s.model)
  rows = []
  for name in s.workloads:
    w = WORKLOADS[name]
    spec = make_spec(s, name)
    tokens = w.tokens_per_step(spec)
    flops = w.flops_per_step(config, spec)
    for fw in w.frameworks:
      if fw not in s.frameworks:
        continue
      mine = [r for r in runs if r["workload"] == name and r["framework"] == fw]
      ok = [r["result"] for r in mine if "error" not in r["result"]]
      errors = [r["result"]["error"] for r in mine if "error" in r["result"]]
      row: dict[str, Any] = {"workload": name, "framework": fw, "rounds_ok": len(ok),
                             "rounds": len(mine), "errors": errors, "tokens_per_step": tokens,
                             "model_flops_per_step": flops}
      if ok:
        medians = [r["median_s"] for r in ok]
        median = statistics.median(medians)
        row.update(
            median_s=median, fastest_round_s=min(medians), slowest_round_s=max(medians),
            tokens_per_s=tokens / median, mfu=flops / median / 1e9 / ceiling,
            compile_s=statistics.median(r["compile_s"] for r in ok),
            first_step_s=statistics.median(r["first_step_s"] for r in ok),
            peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
            other_load=statistics.median(r.get("other_load", 0.0) for r in ok),
            data_digest=sorted({r["data_digest"] for r in ok}),
            versions=ok[0]["versions"])
        cpu = [r["median_cpu_s"] for r in ok if "median_cpu_s" in r]
        if cpu:
          row["median_cpu_s"] = statistics.median(cpu)
        executed = [r["executed_matmul_flops"] for r in ok if "executed_matmul_flops" in r]
        if executed:
          row["executed_flops_per_step"] = executed[0]
        executed = [r["update_executed_matmul_flops"] for r in ok
                    if "update_executed_matmul_flops" in r]
        if executed:
          row["update_executed_flops_per_step"] = executed[0]
        if "trainable_params" in ok[0]:
          row["trainable_params"] = ok[0]["trainable_params"]
        for key in ("steps_per_epoch", "token_slots", "padding_share", "layout", "row_shape",
                    "attn_implementation"):  # what the user-shaped workloads record
          if key in ok[0]:
            row[key] = ok[0][key]
        if "precompute_s" in ok[0]:
          row["precompute_s"] = statistics.median(r["precompute_s"] for r in ok)
        if ok[0].get("losses"):
          row["loss_first"], row["loss_last"] = ok[0]["losses"][0], ok[0]["losses"][-1]
        row["phases"] = phase_rows(w, config, spec, ok, ceiling)
        if w.bound is not None and bandwidth:
          row["bound"] = w.bound(config, spec, ceiling, bandwidth)
          row["of_bound"] = row["bound"]["bound_s"] / median
      rows.append(row)
  by_key = {(r["workload"], r["framework"]): r for r in rows}
  for r in rows:
    mine = by_key.get((r["workload"], "jaxpost"))
    peers = WORKLOADS[r["workload"]].peers_from or r["workload"]
    for other in ("tunix", "pytorch"):
      theirs = by_key.get((peers, other))
      if r["framework"] == "jaxpost" and mine and theirs and "tokens_per_s" in mine \
          and "tokens_per_s" in theirs:
        r[f"speedup_vs_{other}"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
        for key, phase in mine.get("phases", {}).items():
          if key in theirs.get("phases", {}):
            phase[f"speedup_vs_{other}"] = (theirs["phases"][key]["median_s"]
                                            / phase["median_s"])
  return rows


def phase_rows(w: Workload, config, spec: dict, ok: list[dict], ceiling: float) -> dict:
  """The parts of a step a workload times separately (GRPO: rollout, update; and the sampling
  inside the rollout), each from the median over rounds of its per-round median."""
  out = {}
  for phase in w.phases:
    times = [r[f"{phase.key}_median_s"] for r in ok if f"{phase.key}_median_s" in r]
    if not times:
      continue
    median = statistics.median(times)
    tokens, flops = phase.tokens_per_step(spec), phase.flops_per_step(config, spec)
    out[phase.key] = {"title": phase.title, "unit": phase.unit, "median_s": median,
                      "fastest_round_s": min(times), "slowest_round_s": max(times),
                      "tokens_per_step": tokens, "model_flops_per_step": flops,
                      "tokens_per_s": tokens / median, "mfu": flops / median / 1e9 / ceiling}
    sampling = [r["sampling_median_s"] for r in ok if "sampling_median_s" in r]
    if phase.key == "rollout" and sampling:
      out["sampling"] = {"title": "of which sampling", "median_s": statistics.median(sampling)}
  return out


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line; see the module docstring for examples."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="4 layers, width 256")
  p.add_argument("--quick", action="store_true",
                 help="1 round, 2 timed training steps, 1 timed generation call")
  p.add_argument("--only", default=",".join((*WORKLOADS, "starts")),
                 help=f"comma-separated workloads (default: {','.join(WORKLOADS)},starts; "
                 f"long_context stands for {','.join(ALIASES['long_context'])}; starts: "
                 "time to first step, cold and warm, benchmarks/starts.py)")
  p.add_argument("--attention", default="auto",
                 help="jaxpost's attention for long_context: auto, dense or blockwise")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help=f"comma-separated frameworks (default: {','.join(FRAMEWORKS)})")
  p.add_argument("--rounds", type=int, help="rounds (default 3, --quick 1)")
  p.add_argument("--steps", type=int, help="timed training steps per worker (default 5)")
  p.add_argument("--out-dir", default=HERE, help="where RESULTS.md, results.png/.json go")
  p.add_argument("--tunix-venv", default=DEFAULT_TUNIX_VENV, help="the Tunix venv's path")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker")
  p.add_argument("--from-json", metavar="PATH",
                 help="measure nothing: rewrite the outputs from a results.json")
  return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
  """The `Settings` a command line asks for."""
  asked = [x for w in args.only.split(",") if w for x in ALIASES.get(w, (w,))]
  workloads = tuple(w for w in asked if w != "starts")
  frameworks = tuple({"torch": "pytorch"}.get(f, f) for f in args.frameworks.split(",") if f)
  for w in workloads:
    if w not in WORKLOADS:
      raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
  for f in frameworks:
    if f not in FRAMEWORKS:
      raise SystemExit(f"unknown framework {f!r}; choose from {', '.join(FRAMEWORKS)}")
  q = args.quick
  return Settings(
      model=TINY_MODEL if args.tiny else MODEL, workloads=workloads, frameworks=frameworks,
      rounds=args.rounds or (1 if q else 3), train_warmup=2,
      train_steps=args.steps or (2 if q else 5), gen_warmup=1, gen_steps=1 if q else 3,
      matmul_sizes=(1024, 2048) if q else (1024, 2048, 3072), matmul_reps=3 if q else 5,
      tiny=args.tiny, quick=q, starts="starts" in asked, chat_conversations=16 if q else 64,
      chat_epochs=1 if q else 2, attention=args.attention)


def measure(s: Settings, args: argparse.Namespace, command: str) -> dict[str, Any]:
  """Runs the ceiling, then every (round, workload, framework) worker; the raw results."""
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  t0 = time.perf_counter()
  log_dir = os.path.join(args.out_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  pythons = {"jaxpost": sys.executable, "pytorch": sys.executable}
  if "tunix" in s.frameworks:
    pythons["tunix"] = ensure_tunix_venv(args.tunix_venv,
                                         os.path.join(log_dir, "tunix-install.log"))

  def ceiling(tag: str) -> dict:
    log(f"[{tag}] f32 matmul ceiling ...")
    r = run_worker(pythons["jaxpost"], "jaxpost", make_spec(s, "matmul"),
                   os.path.join(log_dir, f"matmul-{tag}.log"), args.timeout)
    if "error" in r:
      raise SystemExit(f"the ceiling measurement failed: {r['error']}")
    log(f"  {r['ceiling_gflop_per_s']:.1f} GFLOP/s, read bandwidth "
        f"{r.get('bandwidth_gb_per_s', 0.0):.1f} GB/s")
    return r

  start_ceiling = ceiling("start")
  runs = []
  for rnd in range(s.rounds):
    for name in s.workloads:
      order = [f for f in WORKLOADS[name].frameworks if f in s.frameworks]
      if rnd % 2:
        order.reverse()
      for fw in order:
        log(f"[round {rnd + 1}/{s.rounds}] {name} / {fw} ...")
        result = run_worker(pythons[fw], fw, make_spec(s, name),
                            os.path.join(log_dir, f"{name}-{fw}-r{rnd + 1}.log"), args.timeout)
        if "error" in result:
          log(f"  FAILED: {result['error'][:400]}")
        else:
          log(f"  median {result['median_s']:.3f} s/step, compile {result['compile_s']:.1f} s, "
              f"peak RSS {result['peak_rss_mb']:,.0f} MiB")
        runs.append({"round": rnd + 1, "workload": name, "framework": fw, "result": result})
  starts = (measure_starts(s, run_worker, pythons, log_dir, args.timeout, log) if s.starts
            else [])
  end_ceiling = ceiling("end")
  return {"settings": dataclasses.asdict(s), "command": command, "started": started,
          "wall_s": time.perf_counter() - t0, "machine": start_ceiling.get("machine", {}),
          "ceilings_gflop_per_s": [start_ceiling["ceiling_gflop_per_s"],
                                   end_ceiling["ceiling_gflop_per_s"]],
          "bandwidths_gb_per_s": [start_ceiling.get("bandwidth_gb_per_s"),
                                  end_ceiling.get("bandwidth_gb_per_s")],
          "runs": runs, "starts": starts, "ceiling_runs": [start_ceiling, end_ceiling]}


def settings_from_json(d: dict) -> Settings:
  """The `Settings` saved in a results.json (lists back to tuples)."""
  return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def write_outputs(payload: dict[str, Any], out_dir: str) -> list[dict]:
  """Aggregates `payload` (from `measure`) and writes RESULTS.md, results.png, results.json."""
  s = settings_from_json(payload["settings"])
  ceilings = payload["ceilings_gflop_per_s"]
  bandwidths = [b for b in payload.get("bandwidths_gb_per_s", []) if b]  # older runs: none
  rows = aggregate(s, payload["runs"], max(ceilings), max(bandwidths, default=None))
  os.makedirs(out_dir, exist_ok=True)
  sections = (starts_section(payload["starts"], s.rounds),) if payload.get("starts") else ()
  write_results_md(os.path.join(out_dir, "RESULTS.md"), s, rows, payload["machine"], ceilings,
                   payload["command"], payload["started"], payload["wall_s"], bandwidths,
                   sections)
  if rows:
    write_plot(os.path.join(out_dir, "results.png"), s, rows)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(dict(payload, rows=rows), f, indent=1)
    f.write("\n")
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  """Measures (or, with --from-json, re-reads) and writes the results."""
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      payload = json.load(f)
  else:
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = measure(settings_from_args(args), args, command.strip())
  rows = write_outputs(payload, args.out_dir)
  print(summary_table(rows, settings_from_json(payload["settings"])))
  log(f"wrote {args.out_dir}/RESULTS.md, results.png, results.json "
      f"({payload['wall_s'] / 60:.1f} min of measurement)")


if __name__ == "__main__":
  main()
