"""The training loop: a thin shell around the one compiled update step.

    summary = train(load_config("configs/quickstart.yaml", ["train.steps=200"]))

Per step: the data iterator yields a host batch, which is placed straight onto its sharding;
the compiled step updates the donated state; metrics are fetched one step late (so the host
never waits on the device it just fed), logged to JSONL / TensorBoard and the progress bar;
checkpoints save the state with the data iterator's position, so a killed run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import sharding as sharding_lib
from jaxpost.config import RunConfig, save_config
from jaxpost.metrics import MetricWriter, ProgressBar
from jaxpost.models import load_hf, param_specs
from jaxpost.tokenizer import Tokenizer, load_tokenizer
from jaxpost.train.algorithms import WithReference, make_algorithm, tokens_in
from jaxpost.train.checkpoint import Checkpointer
from jaxpost.train.optim import make_optimizer
from jaxpost.train.step import batch_sharding, init_state, make_train_step, state_shardings
from jaxpost.train.trainable import make_trainable, sync_reference


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. too many non-finite steps); the message says what to do."""


@dataclasses.dataclass
class Setup:
  """Everything a run is built from, for the loop and for callers (tests, notebooks)."""

  cfg: RunConfig
  run_dir: Path
  model_dir: Path
  config: Any
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  train_path: str
  eval_path: str | None
  exact_match_path: str | None = None  # chat rows with answers, for the task's exact match


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def prepare(cfg: RunConfig) -> tuple[Setup, dict]:
  """Makes the run folder, the task data and tiny model if asked, and loads model and tokenizer.

  Returns the setup and the parameters, already placed on the mesh.
  """
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  save_config(cfg, run_dir / "config.yaml")
  sharding_lib.initialize_distributed(cfg.distributed.coordinator_address,
                                      cfg.distributed.num_processes, cfg.distributed.process_id)
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)

  train_path, eval_path = cfg.data.train, cfg.data.eval
  exact_match_path = None
  task_rows = None
  if cfg.task is not None:
    from jaxpost.tasks import arithmetic  # pylint: disable=import-outside-toplevel
    t_path, e_path = arithmetic.write_dataset(run_dir / "data", max_operand=cfg.task.max_operand,
                                              num_eval=cfg.task.num_eval, seed=cfg.train.seed)
    train_path, eval_path = str(t_path), str(e_path)
    task_rows = arithmetic.make_split(max_operand=cfg.task.max_operand,
                                      num_eval=cfg.task.num_eval, seed=cfg.train.seed)[0]
    if cfg.algorithm != "sft":
      from jaxpost.tasks import arithmetic_pref  # pylint: disable=import-outside-toplevel
      kind = "unpaired" if cfg.algorithm == "kto" else "paired"
      p_train, p_eval = arithmetic_pref.write_preference_dataset(
          run_dir / "data", max_operand=cfg.task.max_operand, num_eval=cfg.task.num_eval,
          seed=cfg.train.seed, kind=kind)
      exact_match_path, train_path, eval_path = eval_path, str(p_train), str(p_eval)
    else:
      exact_match_path = eval_path

  if cfg.model.tiny:
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").exists():
      from jaxpost import tiny  # pylint: disable=import-outside-toplevel
      corpus = _corpus(task_rows, train_path)
      tiny.make_model(model_dir, corpus, seed=cfg.train.seed,
                      hidden_size=cfg.model.tiny_hidden_size,
                      num_layers=cfg.model.tiny_num_layers,
                      intermediate_size=4 * cfg.model.tiny_hidden_size)
  else:
    model_dir = Path(cfg.model.path)
    if not model_dir.exists():
      raise TrainingError(f"model.path {str(model_dir)!r} does not exist" + (
          "; run `jaxpost train configs/quickstart.yaml` first to make it"
          if "quickstart" in str(model_dir) else ""))
  config, params = load_hf(model_dir, dtype=jnp.dtype(cfg.model.dtype), mesh=mesh)
  tokenizer = load_tokenizer(model_dir)
  setup = Setup(cfg=cfg, run_dir=run_dir, model_dir=model_dir, config=config,
                tokenizer=tokenizer, mesh=mesh, train_path=train_path, eval_path=eval_path,
                exact_match_path=exact_match_path if cfg.task is not None else None)
  return setup, params


def _corpus(task_rows, train_path) -> list[str]:
  """Text to train a tiny tokenizer on: the task's rows, or the training file's text."""
  if task_rows is not None:
    from jaxpost.tasks import arithmetic  # pylint: disable=import-outside-toplevel
    return arithmetic.corpus(task_rows)
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  lines = []
  for row in read_rows(train_path):
    lines.append(" ".join(str(v) for v in _strings(row.data)))
  return lines


def _strings(value):
  if isinstance(value, str):
    yield value
  elif isinstance(value, dict):
    for v in value.values():
      yield from _strings(v)
  elif isinstance(value, list):
    for v in value:
      yield from _strings(v)


def _place(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host batch -> global arrays on `sharding`; every process holds the same global batch and
  contributes the rows of its own devices."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


def train(cfg: RunConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Runs `cfg` to `train.steps`, resuming from the latest checkpoint in `run_dir` if any.

  Returns a summary: final metrics, the exported model folder and, for a task with
  `exact_match`, the held-out accuracy before and after.
  """
  setup, params = prepare(cfg)
  c, t = setup.config, cfg.train
  mesh = setup.mesh
  optimizer, schedule = make_optimizer(cfg.optim, t.steps)
  algo = make_algorithm(cfg, c, setup.tokenizer)
  rng = jax.random.key(t.seed)
  if cfg.algorithm == "reward":
    from jaxpost.reward import with_score_head  # pylint: disable=import-outside-toplevel
    params = with_score_head(c, params, jax.random.fold_in(rng, 2))
  p_shard = _model_shardings(c, params, mesh)
  b_shard = batch_sharding(mesh)

  # What trains (the whole model, adapters or a prompt) and what goes in frozen.
  tr = make_trainable(cfg, c, params, p_shard, mesh, rng, tokenizer=setup.tokenizer,
                      needs_reference=algo.needs_reference, log=_log)
  _log(tr.describe)
  del params
  loss_fn = tr.wrap(algo.loss_fn)
  frozen = tr.frozen
  s_shard = state_shardings(tr.shardings, tr.params, optimizer, mesh)
  step_fn = make_train_step(loss_fn, optimizer, state_sharding=s_shard, batch_sharding=b_shard,
                            frozen_sharding=tr.frozen_shardings, micro_batches=t.micro_batches,
                            lr_schedule=schedule)
  eval_fn = jax.jit(lambda p, fr, b: loss_fn(p, b, None, **fr),
                    in_shardings=(tr.shardings, tr.frozen_shardings, b_shard))
  state = jax.jit(lambda p: init_state(p, optimizer, rng), out_shardings=s_shard)(tr.params)
  tr.params = None
  data = algo.make_batches(setup.train_path, True)
  eval_batches = list(algo.make_batches(setup.eval_path, False)) if setup.eval_path else []
  if cfg.algorithm in ("dpo", "kto") and cfg.preference.reference == "precomputed" and (
      cfg.preference.needs_reference):
    model = tr.model_params(state.params, frozen)
    data = _with_precomputed_reference(setup, algo, model, data, b_shard)
    eval_batches = [dict(b, ref_logps=_reference_table_batch(setup, model, b, b_shard))
                    for b in eval_batches]

  ck = cfg.checkpoint
  checkpointer = Checkpointer(setup.run_dir / "checkpoints", save_every=ck.every or t.steps,
                              keep_last=ck.keep_last, keep_best=ck.keep_best,
                              best_metric=ck.best_metric, best_mode=ck.best_mode,
                              async_save=ck.async_save)
  start = 0
  if ck.resume and checkpointer.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, data_state, _, start = checkpointer.restore(abstract, fallback=ck.fallback_on_corrupt)
    data.restore(data_state)
    _log(f"resumed from {checkpointer.directory} at step {start}")

  summary: dict[str, Any] = {"run_dir": str(setup.run_dir)}
  evaluate = functools.partial(_evaluate, eval_fn, eval_batches, b_shard, algo.name)
  model_params = lambda p: tr.model_params(p, frozen)  # noqa: E731
  if cfg.task is not None and cfg.task.exact_match and start == 0:
    summary["exact_match_before"] = _exact_match(setup, model_params(state.params))
    _log(f"held-out exact match before training: {summary['exact_match_before']:.3f}")

  writer = MetricWriter(setup.run_dir, enabled=jax.process_index() == 0)
  if eval_batches and t.eval_every and start == 0:  # the starting point, for before/after
    summary["eval_before"] = evaluate(state.params, frozen)
    writer.write(0, summary["eval_before"])
  bar = ProgressBar(t.steps, initial_step=start, disable=None if jax.process_index() == 0 else True)
  pending: tuple[int, dict, float] | None = None
  last: dict[str, float] = {}
  t0 = time.perf_counter()
  try:
    for step in range(start, t.steps):
      batch = next(data)
      real_tokens = tokens_in(batch)
      state, metrics = step_fn(state, _place(batch, b_shard), frozen)
      if pending is not None:
        last = _finish(pending, writer, bar, t, on_step, algo.headline)
      pending = (step + 1, metrics, real_tokens)
      done = step + 1
      p = cfg.preference
      if algo.needs_reference and p.sync_every and done % p.sync_every == 0:
        frozen = sync_reference(tr, state.params, frozen, p.sync_alpha)  # TR-DPO
      eval_now = t.eval_every and eval_batches and (done % t.eval_every == 0 or done == t.steps)
      extra = evaluate(state.params, frozen) if eval_now else {}
      if extra:
        writer.write(done, extra)
        last.update(extra)
      if (done % checkpointer.save_every == 0 or done == t.steps) and int(state.bad_steps) == 0:
        # never replace good checkpoints with a state in the middle of non-finite steps
        checkpointer.save(done, state, data_state=data.state(), metrics=extra or None,
                          force=True)
    if pending is not None:
      last = _finish(pending, writer, bar, t, on_step, algo.headline) | last
  finally:
    checkpointer.wait()
    writer.close()
    bar.close()
  elapsed = time.perf_counter() - t0

  final_dir = setup.run_dir / "final"
  if jax.process_index() == 0:
    export_outputs(setup, tr, state.params, frozen, setup.run_dir)
  summary.update(final_metrics=last, final_model=str(final_dir), steps=t.steps,
                 seconds=elapsed, start_step=start)
  if cfg.task is not None and cfg.task.exact_match and cfg.algorithm != "reward":
    summary["exact_match_after"] = _exact_match(setup, model_params(state.params))
  checkpointer.close()
  return summary


def export_outputs(setup: Setup, tr, params, frozen: dict, out_dir: Path) -> list[Path]:
  """Writes what a run produced into `out_dir`: `final/` (the Hugging Face model; under LoRA
  the merged model; for a reward model the SequenceClassification model) with the tokenizer,
  and `adapter/` (PEFT format) for PEFT runs. Returns the folders written."""
  out_dir = Path(out_dir)
  final_dir = out_dir / "final"
  if setup.cfg.algorithm == "reward":
    from jaxpost.reward import save_reward_model_hf  # pylint: disable=import-outside-toplevel
    save_reward_model_hf(setup.config, params, final_dir, pad_token_id=_reward_pad_id(setup))
  else:
    tr.export(params, frozen, out_dir, setup.model_dir)
  if final_dir.exists():
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "special_tokens_map.json", "chat_template.jinja"):
      if (setup.model_dir / f).exists():
        (final_dir / f).write_bytes((setup.model_dir / f).read_bytes())
  return [d for d in (final_dir, out_dir / "adapter") if d.exists()]


def export_run(run_dir: str | Path, out_dir: str | Path | None = None,
               step: int | None = None) -> list[Path]:
  """`jaxpost export`: rebuilds a run from `run_dir/config.yaml` and its checkpoint (the latest,
  or `step`) and writes `final/` and `adapter/` into `out_dir` (default `run_dir`)."""
  from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel
  run_dir = Path(run_dir)
  if not (run_dir / "config.yaml").exists():
    raise TrainingError(f"{run_dir} has no config.yaml; is it a jaxpost run folder?")
  cfg = load_config(run_dir / "config.yaml")
  setup, params = prepare(cfg)
  c = setup.config
  optimizer, _ = make_optimizer(cfg.optim, cfg.train.steps)
  rng = jax.random.key(cfg.train.seed)
  if cfg.algorithm == "reward":
    from jaxpost.reward import with_score_head  # pylint: disable=import-outside-toplevel
    params = with_score_head(c, params, jax.random.fold_in(rng, 2))
  p_shard = _model_shardings(c, params, setup.mesh)
  tr = make_trainable(cfg, c, params, p_shard, setup.mesh, rng, tokenizer=setup.tokenizer,
                      log=lambda m: None)
  s_shard = state_shardings(tr.shardings, tr.params, optimizer, setup.mesh)
  abstract = jax.eval_shape(lambda p: init_state(p, optimizer, rng), tr.params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, s_shard)
  checkpointer = Checkpointer(setup.run_dir / "checkpoints", save_every=cfg.checkpoint.every or 1)
  if checkpointer.latest_step() is None:
    raise TrainingError(f"no finalised checkpoint in {checkpointer.directory} to export")
  state, _, _, restored = checkpointer.restore(abstract, step=step)
  checkpointer.close()
  written = export_outputs(setup, tr, state.params, tr.frozen, Path(out_dir or run_dir))
  _log(f"exported step {restored} of {run_dir}: {', '.join(str(d) for d in written)}")
  return written


def _finish(pending, writer: MetricWriter, bar: ProgressBar, t, on_step,
            headline: str = "loss") -> dict:
  """Fetches a step's metrics (one step late), stops on too many bad steps, logs."""
  step, metrics, tokens = pending
  values = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
  bad = int(values.pop("train/bad_steps"))
  if t.max_bad_steps and bad >= t.max_bad_steps:
    raise TrainingError(
        f"{bad} consecutive steps had a non-finite loss or gradient (the last at step {step}); "
        "they were not applied and the last good checkpoint is kept. Lower optim.lr, check the "
        "data, or raise train.max_bad_steps.")
  shown = {"loss": values["train/loss"]}
  if headline != "loss" and f"train/{headline}" in values:
    shown[headline.split("/")[-1]] = values[f"train/{headline}"]
  bar.update(step, tokens=tokens, **shown)
  if step % t.log_every == 0 or step == t.steps:
    writer.write(step, values)
  if on_step is not None:
    on_step(step, values)
  return values


def _evaluate(eval_fn, batches, b_shard, name, params, frozen) -> dict[str, float]:
  """Held-out metrics: every metric of the loss, averaged with the loss's weights."""
  sums: dict[str, float] = {}
  weight = 0.0
  for b in batches:
    loss, m = eval_fn(params, frozen, _place(b, b_shard))
    m = jax.device_get(m)
    w = float(m.pop("weight", 1.0))
    sums["loss"] = sums.get("loss", 0.0) + float(loss) * w
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * w
    weight += w
  out = {f"eval/{k}": v / max(weight, 1.0) for k, v in sums.items()}
  if name == "sft" and "eval/loss" in out:
    out["eval/perplexity"] = float(np.exp(min(out["eval/loss"], 50.0)))
  return out


def _model_shardings(config, params, mesh):
  if "score" in params:  # a reward model: no LM head, a score head
    from jaxpost.models.hf_reward import reward_param_specs  # pylint: disable=import-outside-toplevel
    return sharding_lib.param_shardings(reward_param_specs(config), mesh)
  return sharding_lib.param_shardings(param_specs(config), mesh)


def _reward_pad_id(setup: Setup) -> int:
  """The pad id a SequenceClassification export needs: one that never ends a sequence."""
  tok = setup.tokenizer
  if tok.pad_id is not None and tok.pad_id not in tok.eos_ids:
    return tok.pad_id
  raise TrainingError(f"the tokenizer in {setup.model_dir} has no pad token distinct from EOS; "
                      "transformers reads a reward at the last non-pad token, so add a pad token "
                      "to the tokenizer before training a reward model")


def _reference_table_batch(setup: Setup, model, batch, b_shard) -> np.ndarray:
  fn = _reference_fn(setup)
  b = {k: v for k, v in batch.items() if k != "ref_logps"}
  return np.asarray(jax.device_get(fn(model, _place(b, b_shard))), np.float32)


@functools.lru_cache(maxsize=None)
def _reference_fn_cached(config, kind, compute_dtype):
  from jaxpost.losses.dpo import reference_logps  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda p, b: reference_logps(config, p, b, kind=kind,
                                              compute_dtype=compute_dtype))


def _reference_fn(setup: Setup):
  cd = setup.cfg.model.compute_dtype
  return _reference_fn_cached(setup.config, setup.cfg.algorithm, jnp.dtype(cd) if cd else None)


def _with_precomputed_reference(setup: Setup, algo, model, data, b_shard):
  """Reference log-probs of every item, computed once (reused from `run_dir/data` when the
  data's fingerprint matches) and looked up per batch."""
  path = setup.run_dir / "data" / f"reference_logps_{data.fingerprint}.npy"
  if path.exists():
    table = np.load(path)
  else:
    table = np.zeros((data.num_examples, 2), np.float32)
    once = algo.make_batches(setup.train_path, False)
    for batch in once:
      values = _reference_table_batch(setup, model, batch, b_shard)
      index = batch["index"]
      table[index[index >= 0]] = values[index >= 0]
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(".tmp.npy")
      np.save(tmp, table)
      tmp.replace(path)
    _log(f"reference log-probs of {len(table)} items precomputed into {path}")
  return WithReference(data, table)


def _exact_match(setup: Setup, params) -> float:
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  from jaxpost.evaluation import exact_match  # pylint: disable=import-outside-toplevel
  rows = [r.data for r in read_rows(setup.exact_match_path)]
  return exact_match(setup.config, params, setup.tokenizer, rows,
                     max_new_tokens=setup.cfg.task.max_new_tokens)
