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
from jaxpost.data import build_sft_batches
from jaxpost.losses import sft_loss
from jaxpost.metrics import MetricWriter, ProgressBar
from jaxpost.models import load_hf, param_specs, save_hf
from jaxpost.peft import (LoraConfig, init_lora, load_peft_adapter, lora_loss, lora_specs,
                          merge_lora, save_peft_adapter)
from jaxpost.tokenizer import Tokenizer, load_tokenizer
from jaxpost.train.checkpoint import Checkpointer
from jaxpost.train.optim import make_optimizer
from jaxpost.train.step import batch_sharding, init_state, make_train_step, state_shardings


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
  task_rows = None
  if cfg.task is not None:
    from jaxpost.tasks import arithmetic  # pylint: disable=import-outside-toplevel
    t_path, e_path = arithmetic.write_dataset(run_dir / "data", max_operand=cfg.task.max_operand,
                                              num_eval=cfg.task.num_eval, seed=cfg.train.seed)
    train_path, eval_path = str(t_path), str(e_path)
    task_rows = arithmetic.make_split(max_operand=cfg.task.max_operand,
                                      num_eval=cfg.task.num_eval, seed=cfg.train.seed)[0]

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
  config, params = load_hf(model_dir, dtype=jnp.dtype(cfg.model.dtype), mesh=mesh)
  tokenizer = load_tokenizer(model_dir)
  setup = Setup(cfg=cfg, run_dir=run_dir, model_dir=model_dir, config=config,
                tokenizer=tokenizer, mesh=mesh, train_path=train_path, eval_path=eval_path)
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


def _eval_batches(setup: Setup, batch_size: int) -> list[dict[str, np.ndarray]]:
  d = setup.cfg.data
  it = build_sft_batches(setup.eval_path, setup.tokenizer, format=d.format, seq_len=d.seq_len,
                         batch_size=batch_size, pack=d.pack, shuffle=False, epochs=1,
                         drop_remainder=False, max_length=d.max_length,
                         on_bad_row=d.on_bad_row, train_on=d.train_on)
  return list(it)


def train(cfg: RunConfig, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Runs `cfg` to `train.steps`, resuming from the latest checkpoint in `run_dir` if any.

  Returns a summary: final metrics, the exported model folder and, for a task with
  `exact_match`, the held-out accuracy before and after.
  """
  setup, params = prepare(cfg)
  c, d, t = setup.config, cfg.data, cfg.train
  mesh = setup.mesh
  optimizer, schedule = make_optimizer(cfg.optim, t.steps)
  p_shard = sharding_lib.param_shardings(param_specs(c), mesh)
  b_shard = batch_sharding(mesh)
  compute_dtype = jnp.dtype(cfg.model.compute_dtype) if cfg.model.compute_dtype else None
  loss_fn = functools.partial(sft_loss, config=c, compute_dtype=compute_dtype,
                              remat=cfg.model.remat)
  rng = jax.random.key(t.seed)

  # What trains: the whole model, or LoRA adapters over a frozen base.
  if cfg.lora is not None:
    lora = LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                      targets=cfg.lora.target_tuple(), rslora=cfg.lora.rslora)
    loaded = None
    if cfg.lora.init_from:
      lora, loaded = load_peft_adapter(c, cfg.lora.init_from, jnp.dtype(cfg.model.dtype))
      _log(f"LoRA adapters from {cfg.lora.init_from} (r={lora.rank}, alpha={lora.alpha}, "
           f"targets={','.join(lora.targets)})")
    t_shard = sharding_lib.param_shardings(lora_specs(c, lora), mesh)
    if loaded is not None:
      trainable = jax.device_put(loaded, t_shard)
    else:
      trainable = jax.jit(lambda k: init_lora(c, lora, k, jnp.dtype(cfg.model.dtype)),
                          out_shardings=t_shard)(jax.random.fold_in(rng, 1))
    frozen, f_shard = {"base": params}, {"base": p_shard}
    loss_fn = lora_loss(loss_fn, lora)
    merge = jax.jit(functools.partial(merge_lora, lora=lora))
    full_params = lambda tr: merge(frozen["base"], tr)  # noqa: E731
  else:
    trainable, t_shard, frozen, f_shard = params, p_shard, {}, {}
    full_params = lambda tr: tr  # noqa: E731
  del params
  s_shard = state_shardings(t_shard, trainable, optimizer, mesh)
  step_fn = make_train_step(loss_fn, optimizer, state_sharding=s_shard, batch_sharding=b_shard,
                            frozen_sharding=f_shard, micro_batches=t.micro_batches,
                            lr_schedule=schedule)
  eval_fn = jax.jit(lambda p, fr, b: loss_fn(p, b, None, **fr),
                    in_shardings=(t_shard, f_shard, b_shard))
  state = jax.jit(lambda p: init_state(p, optimizer, rng), out_shardings=s_shard)(trainable)
  del trainable
  data = build_sft_batches(setup.train_path, setup.tokenizer, format=d.format,
                           seq_len=d.seq_len, batch_size=t.batch_size, pack=d.pack, seed=t.seed,
                           max_length=d.max_length, on_bad_row=d.on_bad_row,
                           train_on=d.train_on, shuffle=d.shuffle)
  eval_batches = _eval_batches(setup, t.batch_size) if setup.eval_path else []

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
  evaluate = functools.partial(_evaluate_loss, eval_fn, eval_batches, b_shard, frozen)
  if cfg.task is not None and cfg.task.exact_match and start == 0:
    summary["exact_match_before"] = _exact_match(setup, full_params(state.params))
    _log(f"held-out exact match before training: {summary['exact_match_before']:.3f}")

  writer = MetricWriter(setup.run_dir, enabled=jax.process_index() == 0)
  bar = ProgressBar(t.steps, initial_step=start, disable=None if jax.process_index() == 0 else True)
  pending: tuple[int, dict, float] | None = None
  last: dict[str, float] = {}
  t0 = time.perf_counter()
  try:
    for step in range(start, t.steps):
      batch = next(data)
      real_tokens = int(batch["segment_ids"].astype(bool).sum())
      state, metrics = step_fn(state, _place(batch, b_shard), frozen)
      if pending is not None:
        last = _finish(pending, writer, bar, t, on_step)
      pending = (step + 1, metrics, real_tokens)
      done = step + 1
      eval_now = t.eval_every and eval_batches and (done % t.eval_every == 0 or done == t.steps)
      extra = evaluate(state.params) if eval_now else {}
      if extra:
        writer.write(done, extra)
        last.update(extra)
      if (done % checkpointer.save_every == 0 or done == t.steps) and int(state.bad_steps) == 0:
        # never replace good checkpoints with a state in the middle of non-finite steps
        checkpointer.save(done, state, data_state=data.state(), metrics=extra or None,
                          force=True)
    if pending is not None:
      last = _finish(pending, writer, bar, t, on_step) | last
  finally:
    checkpointer.wait()
    writer.close()
    bar.close()
  elapsed = time.perf_counter() - t0

  final_dir = setup.run_dir / "final"
  if jax.process_index() == 0:
    save_hf(c, full_params(state.params), final_dir)  # LoRA: the merged model
    if cfg.lora is not None:
      save_peft_adapter(c, lora, state.params, setup.run_dir / "adapter",
                        base_model=str(setup.model_dir))
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "special_tokens_map.json", "chat_template.jinja"):
      if (setup.model_dir / f).exists():
        (final_dir / f).write_bytes((setup.model_dir / f).read_bytes())
  summary.update(final_metrics=last, final_model=str(final_dir), steps=t.steps,
                 seconds=elapsed, start_step=start)
  if cfg.task is not None and cfg.task.exact_match:
    summary["exact_match_after"] = _exact_match(setup, full_params(state.params))
  checkpointer.close()
  return summary


def _finish(pending, writer: MetricWriter, bar: ProgressBar, t, on_step) -> dict:
  """Fetches a step's metrics (one step late), stops on too many bad steps, logs."""
  step, metrics, tokens = pending
  values = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
  bad = int(values.pop("train/bad_steps"))
  if t.max_bad_steps and bad >= t.max_bad_steps:
    raise TrainingError(
        f"{bad} consecutive steps had a non-finite loss or gradient (the last at step {step}); "
        "they were not applied and the last good checkpoint is kept. Lower optim.lr, check the "
        "data, or raise train.max_bad_steps.")
  bar.update(step, loss=values["train/loss"], tokens=tokens)
  if step % t.log_every == 0 or step == t.steps:
    writer.write(step, values)
  if on_step is not None:
    on_step(step, values)
  return values


def _evaluate_loss(eval_fn, batches, b_shard, frozen, params) -> dict[str, float]:
  total, weight = 0.0, 0.0
  for b in batches:
    loss, m = eval_fn(params, frozen, _place(b, b_shard))
    w = float(m["weight"])
    total += float(loss) * w
    weight += w
  loss = total / max(weight, 1.0)
  return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}


def _exact_match(setup: Setup, params) -> float:
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  from jaxpost.evaluation import exact_match  # pylint: disable=import-outside-toplevel
  rows = [r.data for r in read_rows(setup.eval_path)]
  return exact_match(setup.config, params, setup.tokenizer, rows,
                     max_new_tokens=setup.cfg.task.max_new_tokens)
