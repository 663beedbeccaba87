"""The `jaxpost` command line.

    jaxpost train CONFIG.yaml [key.path=value ...]   train (every algorithm, one command)
    jaxpost eval EVAL.yaml [key=value ...]           evaluate a model, or follow=RUN_DIR
    jaxpost merge MERGE.yaml [key=value ...]         merge models (mergekit's YAML) to an HF folder
    jaxpost steer STEER.yaml [key=value ...]         a CAA steering vector, generations at -k..k
    jaxpost probe PROBE.yaml [key=value ...]         linear probes per layer: held-out accuracy
    jaxpost heads HEADS.yaml [key=value ...]         per-head knockout: change in a metric, heat map
    jaxpost compile CONFIG.yaml topology=v5e-256     compile the step for a pod: memory, collectives
    jaxpost plot RUN_DIR                             draw a run's loss and metric curves (PNG)
    jaxpost generate MODEL_DIR --prompt "..."        chat with a local HF model folder
    jaxpost demo [--run-dir runs/demo]               build a tiny model on the spot and generate
"""

from __future__ import annotations

import argparse
import errno
import random
import sys
import time
from pathlib import Path

from jaxpost.chat_template import ChatTemplateError
from jaxpost.compile_cache import enable_compile_cache
from jaxpost.errors import TrainingError


def _demo_corpus(n: int = 2000, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = ("what is the sum of and plus minus times answer question number result "
           "please compute tell me equals").split()
  lines = []
  for _ in range(n):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    lines.append(f"{' '.join(rng.choice(words) for _ in range(rng.randint(2, 6)))} "
                 f"{a} + {b} = {a + b}")
  return lines


def _generate(model_dir: Path, prompt: str, *, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, seed: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel

  from jaxpost.data import pad_id_of  # pylint: disable=import-outside-toplevel
  from jaxpost.models import load_hf, num_params  # pylint: disable=import-outside-toplevel
  from jaxpost.sampling import generate  # pylint: disable=import-outside-toplevel
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  config, params = load_hf(model_dir)
  tokenizer = load_tokenizer(model_dir)
  messages = [{"role": "user", "content": prompt}]
  if tokenizer.chat_template:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  else:
    ids = tokenizer.encode(prompt)
  stops = tokenizer.eos_ids
  kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, stop_tokens=stops, pad_id=pad_id_of(tokenizer))
  t0 = time.perf_counter()
  out = generate(config, params, [ids], seed=seed, **kwargs)
  jax.block_until_ready(out.tokens)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = generate(config, params, [ids], seed=seed, **kwargs)
  jax.block_until_ready(out.tokens)
  steady = time.perf_counter() - t0
  n = int(out.lengths[0])
  text = tokenizer.decode([int(t) for t in out.tokens[0, :n]], skip_special_tokens=True)
  print(f"model: {model_dir} ({config.model_type}, {num_params(config) / 1e6:.2f}M parameters)")
  print(f"prompt: {prompt!r}")
  print(f"completion: {text!r}")
  print(f"{n} tokens; first call {first:.2f}s (with compilation), "
        f"then {n / steady:.1f} tokens/s")


def _cmd_demo(args) -> int:
  from jaxpost.tiny import make_model  # pylint: disable=import-outside-toplevel

  model_dir = Path(args.run_dir) / "model"
  print(f"building a tiny tokenizer and model in {model_dir} ...")
  make_model(model_dir, _demo_corpus(), seed=args.seed)
  _generate(model_dir, "what is 12 + 30?", max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=None, top_p=None, seed=args.seed)
  print(f"demo: ok. The model is untrained, so its text is noise; the folder {model_dir} is a "
        "Hugging Face checkpoint (try `jaxpost generate` on it or on your own model).")
  return 0


def _cmd_generate(args) -> int:
  _generate(Path(args.model_dir), args.prompt, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  return 0


def _print_continual(result: dict) -> int:
  """The accuracy matrix and forgetting metrics of a finished task sequence."""
  names = result["tasks"]
  print("accuracy (rows: after each stage; columns: " + ", ".join(names) + ")")
  for label, row in [("before", result["before"]), *zip(names, result["accuracy"])]:
    print(f"  {label:>12}: " + "  ".join(f"{x:.3f}" for x in row))
  print(", ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items()))
  print(f"forgetting report: {result['report']}")
  return 0


def _cmd_train(args) -> int:
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel

  cfg = load_config(args.config, args.overrides)  # validated before anything compiles
  enable_compile_cache(cfg.compile_cache)
  from jaxpost.train.trainer import train  # pylint: disable=import-outside-toplevel

  summary = train(cfg)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:  # a multi-host run: the first process reports and plots
    return 0
  if "continual" in summary:  # a stages: recipe (a task sequence)
    return _print_continual(summary["continual"])
  run_dir = summary["run_dir"]
  final = summary["final_metrics"]
  print(f"trained {summary['steps']} steps in {summary['seconds']:.1f}s; "
        + ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())
                    if k in ("train/loss", "eval/loss", "eval/perplexity")))
  print(f"model (Hugging Face format): {summary['final_model']}")
  print(f"checkpoints: {run_dir}/checkpoints; metrics: {run_dir}/metrics.jsonl and {run_dir}/tb")
  try:
    from jaxpost.plot import plot_run  # pylint: disable=import-outside-toplevel
    plots = plot_run(run_dir)
    print(f"plots: {', '.join(str(p) for p in plots)}")
  except (ValueError, FileNotFoundError) as e:
    print(f"plots: none ({e})")
  kept = [o for o in args.overrides if not o.startswith("train.steps=")]
  print(f"continue: jaxpost train {' '.join([args.config, *kept])} train.steps=<more> "
        f"(resumes from the last checkpoint in {run_dir})")
  key = summary["headline"]
  if "eval_before" in summary and key in final:
    print(f"held-out {key}: before={summary['eval_before'].get(key, float('nan')):.3f} "
          f"after={final[key]:.3f}")
  start = summary.get("suites_before", {})
  shown = [k for k in start if k in final and not k.endswith(("seconds", "examples_per_s"))]
  if shown:
    print("evaluation (before -> after): " + ", ".join(
        f"{k[5:]} {start[k]:.3g} -> {final[k]:.3g}" for k in shown))
    print(f"evaluation report: {run_dir}/eval/report.md")
  if "exact_match_after" in summary:
    before = summary.get("exact_match_before", float("nan"))
    print(f"{Path(args.config).stem}: exact-match before={before:.3f} "
          f"after={summary['exact_match_after']:.3f}")
  return 0


def _cmd_export(args) -> int:
  from jaxpost.train.trainer import export_run  # pylint: disable=import-outside-toplevel
  export_run(args.run_dir, args.out, args.step)
  return 0


def _cmd_eval(args) -> int:
  from jaxpost.config import EvalConfig, load_config  # pylint: disable=import-outside-toplevel

  cfg = load_config(args.config, args.overrides, root=EvalConfig)
  from jaxpost.eval.command import run_eval  # pylint: disable=import-outside-toplevel
  from jaxpost.multihost import initialize  # pylint: disable=import-outside-toplevel

  initialize()  # a multi-host evaluation: JAX_COORDINATOR_ADDRESS, ... or a detected cluster
  summary = run_eval(cfg)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return 0
  out = Path(summary["out_dir"])
  print(f"evaluated steps {summary['steps']}; metrics: {out}/metrics.jsonl"
        + (f"; report: {out}/report.md" if (out / "report.md").exists() else ""))
  return 0


def _cmd_merge(args) -> int:
  from jaxpost.merge import load_merge_config  # pylint: disable=import-outside-toplevel

  # mergekit's `mergekit-yaml CONFIG OUT` form: one argument without '=' is the output folder
  folders = [o for o in args.overrides if "=" not in o]
  overrides = [o for o in args.overrides if "=" in o]
  if len(folders) > 1 or (folders and args.out):
    raise ValueError(f"expected key=value overrides, got {folders[-1]!r} (the output folder is "
                     "--out DIR, or one argument)")
  cfg = load_merge_config(args.config, overrides)  # validated before anything is read
  from jaxpost.merge import merge_folders  # pylint: disable=import-outside-toplevel

  out = args.out or (folders[0] if folders else str(Path("runs") / Path(args.config).stem))
  r = merge_folders(cfg, out, seed=args.seed, max_shard_size=args.max_shard_size)
  print(f"merged {len(cfg.models)} models by {cfg.merge_method} into {r['out']}: {r['tensors']} "
        f"tensors, {r['output_mib']:.1f} MiB, in {r['seconds']:.1f}s; peak memory "
        f"{r['peak_rss_mib']:.0f} MiB resident (inputs {r['input_mib']:.0f} MiB, largest tensor "
        f"{r['largest_tensor_mib']:.1f} MiB)")
  print(f"evaluate it: jaxpost eval EVAL.yaml model={r['out']}")
  return 0


def _cmd_whitebox(args) -> int:
  """`jaxpost steer | probe | heads`: the config is validated before the model is read."""
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel
  from jaxpost.config.whitebox_tools import HeadsConfig, ProbeConfig, SteerConfig  # pylint: disable=import-outside-toplevel

  root = {"steer": SteerConfig, "probe": ProbeConfig, "heads": HeadsConfig}[args.command]
  cfg = load_config(args.config, args.overrides, root=root)
  from jaxpost.whitebox import commands  # pylint: disable=import-outside-toplevel

  getattr(commands, f"run_{args.command}")(cfg)
  return 0


def _cmd_compile(args) -> int:
  from jaxpost.aot.command import run_compile  # pylint: disable=import-outside-toplevel
  return run_compile(args.config, args.overrides, sampler=not args.no_sampler)


def _cmd_plot(args) -> int:
  from jaxpost.plot import plot_run  # pylint: disable=import-outside-toplevel

  for path in plot_run(args.run_dir):
    print(path)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxpost", description=__doc__.split("\n")[0])
  parser.add_argument("--debug", action="store_true",
                      help="show the full traceback of an error")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train from a YAML recipe, with key.path=value overrides")
  train.add_argument("config")
  train.add_argument("overrides", nargs="*", help="e.g. train.steps=100 optim.lr=3e-4")
  train.set_defaults(func=_cmd_train)
  export = sub.add_parser(
      "export", help="write a run's checkpoint as a Hugging Face folder (final/) and, for "
      "LoRA / prompt tuning, a PEFT adapter (adapter/)")
  export.add_argument("run_dir", help="the run folder (holds config.yaml and checkpoints/)")
  export.add_argument("--out", default=None, help="output folder (default: the run folder)")
  export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  export.set_defaults(func=_cmd_export)
  ev = sub.add_parser(
      "eval", help="evaluate a model folder, a run or a checkpoint (model=PATH), or follow a "
      "training run and evaluate each checkpoint as it is written (follow=RUN_DIR)")
  ev.add_argument("config", help="an EVAL.yaml (see configs/eval.yaml)")
  ev.add_argument("overrides", nargs="*", help="e.g. model=runs/dpo suites.arith.k=8")
  ev.set_defaults(func=_cmd_eval)
  merge = sub.add_parser(
      "merge", help="merge models (HF folders, runs, PEFT adapters) by a mergekit YAML config, "
      "one tensor at a time, into a Hugging Face folder")
  merge.add_argument("config", help="a mergekit YAML (see configs/merge_slerp.yaml)")
  merge.add_argument("overrides", nargs="*",
                     help="e.g. parameters.t=0.3 models.0.parameters.weight=0.7 (one argument "
                     "without '=' is the output folder, as in mergekit-yaml CONFIG OUT)")
  merge.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
  merge.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
  merge.add_argument("--max-shard-size", default="5GB", help="split the output above this size")
  merge.set_defaults(func=_cmd_merge)
  for name, what, example in (
      ("steer", "a steering vector by contrastive activation addition from a JSONL of pairs, "
       "saved, with generations at coefficients -k..k", "configs/steer.yaml"),
      ("probe", "linear probes per layer on cached activations: held-out accuracy table and "
       "PNG", "configs/probe.yaml"),
      ("heads", "per-head knockout: the change in a metric when each head is ablated, as a "
       "heat map", "configs/heads.yaml")):
    wb = sub.add_parser(name, help=what)
    wb.add_argument("config", help=f"a YAML config (see {example})")
    wb.add_argument("overrides", nargs="*", help="e.g. model=runs/quickstart out_dir=runs/x")
    wb.set_defaults(func=_cmd_whitebox)
  comp = sub.add_parser(
      "compile", help="compile a recipe's training step (and sampler) ahead of time for a TPU "
      "topology (v5e-256, v5p-128, ...) or cpu-N, from shapes only: memory per device, fit, "
      "collectives")
  comp.add_argument("config", help="a training recipe (see configs/)")
  comp.add_argument("overrides", nargs="*",
                    help="topology=NAME (required) and key=value overrides, e.g. "
                    "model.preset=llama3-8b train.batch_size=256 mesh.fsdp=32 mesh.tensor=8")
  comp.add_argument("--no-sampler", action="store_true",
                    help="compile only the training step (not an RL algorithm's sampler)")
  comp.set_defaults(func=_cmd_compile)
  plot = sub.add_parser("plot", help="draw a run's metrics to PNG files in RUN_DIR/plots")
  plot.add_argument("run_dir")
  plot.set_defaults(func=_cmd_plot)
  demo = sub.add_parser("demo", help="build a tiny model on the spot and generate from it")
  demo.add_argument("--run-dir", default="runs/demo")
  demo.add_argument("--max-new-tokens", type=int, default=32)
  demo.add_argument("--temperature", type=float, default=1.0)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(func=_cmd_demo)
  gen = sub.add_parser("generate", help="generate from a local Hugging Face model folder")
  gen.add_argument("model_dir")
  gen.add_argument("--prompt", required=True)
  gen.add_argument("--max-new-tokens", type=int, default=64)
  gen.add_argument("--temperature", type=float, default=0.0)
  gen.add_argument("--top-k", type=int, default=None)
  gen.add_argument("--top-p", type=float, default=None)
  gen.add_argument("--seed", type=int, default=0)
  gen.set_defaults(func=_cmd_generate)
  return parser


# Errors of ours, whose message already names the key, file, row or step (exit 2).
_KNOWN = (ValueError, OSError, TrainingError, ChatTemplateError)


def error_message(e: BaseException) -> str:
  """One line for a user-facing error: ours name the file, key, row or step already; an
  `OSError` is given its path and what to check; anything else is an internal error."""
  if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "free disk space (or point run_dir elsewhere) and rerun",
            errno.EACCES: "check the folder's permissions, or choose another run_dir",
            errno.EROFS: "the file system is read-only: choose another run_dir",
            errno.ENOTDIR: "a file stands where a folder is needed: move it or choose another "
                           "path",
            errno.EISDIR: "a folder stands where a file is needed"}.get(e.errno, "")
    return f"{what}: {e.filename}" + (f"; {hint}" if hint else "")
  if isinstance(e, _KNOWN):
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__
  return (f"internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]}); rerun with "
          "--debug for the traceback and please report it")


def main(argv: list[str] | None = None) -> int:
  """Runs the command; every error ends in one line `jaxpost: error: ...` and exit status 2
  (1 for an internal error), with the traceback only under `--debug`."""
  args = build_parser().parse_args(argv)
  if args.func not in (_cmd_train, _cmd_plot):  # train reads `compile_cache` from its recipe
    enable_compile_cache()
  try:
    return args.func(args)
  except KeyboardInterrupt:
    print("jaxpost: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    if args.debug:
      raise
    print(f"jaxpost: error: {error_message(e)}", file=sys.stderr)
    return 2 if isinstance(e, _KNOWN) else 1


if __name__ == "__main__":
  sys.exit(main())
