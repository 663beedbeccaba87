"""`build(cfg) -> Run`: everything a run is made of, shared by `jaxpost train`, `export` and
`eval`.

    run = build(load_config("configs/quickstart.yaml"))
    state, frozen = run.init_state()
    state, metrics = run.step(state, run.place(batch), frozen)

In order: the mesh; the data source (the recipe's files, or a task the package generates); the
model folder (a tiny model is made on the spot the first time); the model and tokenizer; the
algorithm (from the registry by `cfg.algorithm`, or the object / factory the caller passes);
its `init` (e.g. a reward head); the trainable (whole model, adapters or prompt) with its
frozen inputs; the optimizer; and the compiled step and evaluation functions. Building reads
the run folder and never rewrites `config.yaml`; data files are written only when an
algorithm asks for a task's data.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import multihost
from jaxpost import sharding as sharding_lib
from jaxpost.algorithms import Algorithm, Frozen, Policy, make_algorithm
from jaxpost.config import RunConfig
from jaxpost.models import load_hf, param_specs
from jaxpost.tasks.source import data_source
from jaxpost.tokenizer import Tokenizer, load_tokenizer
from jaxpost.errors import TrainingError
from jaxpost.train.optim import make_optimizer
from jaxpost.train.step import batch_sharding, init_state, make_train_step, state_shardings
from jaxpost.train.trainable import Trainable, make_trainable, start_anchor, trainable_loss
from jaxpost.whitebox.drift import with_drift_penalty

# An algorithm, a factory `run -> Algorithm`, or None (the registry's, by `cfg.algorithm`).
AlgorithmArg = Algorithm | Callable[["Run"], Algorithm] | None
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json", "special_tokens_map.json", "chat_template.jinja")


def log(msg: str) -> None:
  """Prints on the first process only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def place(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host batch -> global arrays on `sharding`; every process holds the same global batch and
  contributes the rows of its own devices."""
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
          for k, v in batch.items()}


@dataclasses.dataclass
class Run:
  """A built run. `config` is the model's `ModelConfig`, `cfg` the run's `RunConfig`; `data`
  gives an algorithm its files (`data.path(kind, split)`); `model_kwargs` are the forward
  options every loss takes (`compute_dtype`, `remat`, `attention`)."""

  cfg: RunConfig
  run_dir: Path
  model_dir: Path
  config: Any
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  data: Any
  batch_sharding: Any
  model_kwargs: dict
  rng: jax.Array
  algorithm: Algorithm | None = None
  trainable: Trainable | None = None
  tree: Any = None  # the initial trainable tree, until `init_state` takes it
  frozen: Frozen | None = None
  optimizer: Any = None
  schedule: Any = None
  state_shardings: Any = None
  frozen_shardings: Any = None

  def place(self, batch: dict[str, np.ndarray], rows: tuple[int, int] | None = None
            ) -> dict[str, jax.Array]:
    """A host batch -> global arrays on the batch sharding. `rows=(lo, global_rows)`: the
    batch holds only this process's rows [lo, lo + len) of a global batch of `global_rows`
    (a per-process data source's, `jaxpost.data.ShardedBatches`)."""
    if rows is None:
      return place(batch, self.batch_sharding)
    return multihost.place_rows(batch, self.batch_sharding, lo=rows[0], global_rows=rows[1])

  def process_rows(self, global_rows: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global batch of `global_rows` this process feeds."""
    return multihost.process_rows(self.batch_sharding, global_rows)

  def init_state(self):
    """(the initial `TrainState`, the frozen inputs), placed on their shardings."""
    optimizer, rng = self.optimizer, self.rng
    state = jax.jit(lambda p: init_state(p, optimizer, rng),
                    out_shardings=self.state_shardings)(self.tree)
    self.tree = None
    return state, self.frozen

  def abstract_state(self):
    """The state's shapes, dtypes and shardings (to restore a checkpoint into)."""
    abstract = jax.eval_shape(lambda p: init_state(p, self.optimizer, self.rng), self.tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.state_shardings)

  def checkpoint_tree(self, state, frozen: Frozen):
    """What a checkpoint holds: the state, and the reference when the algorithm moves it
    (TR-DPO), so that a resumed run continues from the moved reference."""
    if not self.algorithm.moving_reference:
      return state
    return {"state": state, "reference": frozen.reference}

  def checkpoint_abstract(self, abstract_state):
    """`checkpoint_tree`'s shapes from the state's (a moving reference has the params' form)."""
    if not self.algorithm.moving_reference:
      return abstract_state
    return {"state": abstract_state, "reference": abstract_state.params}

  def from_checkpoint(self, tree, frozen: Frozen):
    """(state, frozen) from a restored `checkpoint_tree`."""
    if not self.algorithm.moving_reference:
      return tree, frozen
    return tree["state"], frozen.replace(reference=tree["reference"])

  def policy(self, params, frozen: Frozen, step: int = 0) -> Policy:
    return Policy(params, frozen, self.trainable.model, step)

  def reference_model(self, params, frozen: Frozen):
    """The reference model's full params (the start model, frozen; under PEFT the base)."""
    return self.trainable.reference(params, frozen)

  def _loss(self):
    """The algorithm's loss over model params, with the `drift:` term when it is on, and
    whether it reads the reference model."""
    a, d = self.algorithm, self.cfg.drift
    loss = a.loss
    if d.enabled:
      loss = with_drift_penalty(loss, self.config, weight=d.weight, site=d.site,
                                layers=d.layers, model_kwargs=self.model_kwargs)
    return loss, step_needs_reference(self.cfg, a)

  @functools.cached_property
  def step(self):
    """The compiled update step `step(state, batch, frozen) -> (state, metrics)`."""
    t = self.cfg.train
    algorithm_loss, reference = self._loss()
    loss = trainable_loss(self.trainable, algorithm_loss, training=True, reference=reference,
                          l2_to_init=self.cfg.continual.l2_to_init)
    return make_train_step(loss, self.optimizer, state_sharding=self.state_shardings,
                           batch_sharding=self.batch_sharding,
                           frozen_sharding=self.frozen_shardings, micro_batches=t.micro_batches,
                           lr_schedule=self.schedule)

  @functools.cached_property
  def evaluate_batch(self):
    """The compiled held-out loss `(params, frozen, batch) -> (loss, metrics)`: no dropout."""
    algorithm_loss, reference = self._loss()
    loss = trainable_loss(self.trainable, algorithm_loss, training=False, reference=reference)
    key = jax.random.key(0)
    return jax.jit(lambda p, fr, b: loss(p, b, key, fr),
                   in_shardings=(self.state_shardings.params, self.frozen_shardings,
                                 self.batch_sharding))

  def export(self, params, frozen: Frozen, out_dir: str | Path) -> list[Path]:
    """Writes `final/` (Hugging Face; the algorithm's export, else the trainable's: merged
    under LoRA) with the tokenizer, and `adapter/` (PEFT format) for PEFT runs. In a
    multi-process run every process must call it: all gather the params, the first writes."""
    if jax.process_count() > 1:  # every process gathers; the first writes (host memory)
      params, frozen = multihost.host_tree(params), multihost.host_tree(frozen)
      if jax.process_index() != 0:
        return []
    out_dir = Path(out_dir)
    final = out_dir / "final"
    if self.algorithm.export is not None:
      self.algorithm.export(self.trainable.model(params, frozen), final)
    else:
      self.trainable.export(params, frozen, out_dir, self.model_dir)
    if final.exists():
      for f in _TOKENIZER_FILES:
        if (self.model_dir / f).exists():
          (final / f).write_bytes((self.model_dir / f).read_bytes())
    return [d for d in (final, out_dir / "adapter") if d.exists()]


def make_tiny_model(cfg: RunConfig, folder: Path, corpus) -> Path:
  """The tiny model of `cfg.model` (`tiny_hidden_size` x `tiny_num_layers`, seeded by
  `train.seed`) with a tokenizer trained on `corpus`, made in `folder`."""
  from jaxpost import tiny  # pylint: disable=import-outside-toplevel
  m = cfg.model
  return tiny.make_model(folder, corpus, seed=cfg.train.seed, hidden_size=m.tiny_hidden_size,
                         num_layers=m.tiny_num_layers, intermediate_size=4 * m.tiny_hidden_size)


def _model_dir(cfg: RunConfig, run_dir: Path, data, *, create: bool) -> Path:
  if cfg.model.tiny:
    model_dir = run_dir / "model"
    multihost.sync("tiny-model:check")  # every process sees the folder as it was at the start
    if not (model_dir / "config.json").exists():
      if not create:
        raise TrainingError(f"{model_dir} is missing: this run's tiny model (model.tiny=true) "
                            "was never made, or was removed")
      multihost.first_process(lambda: make_tiny_model(cfg, model_dir, data.corpus()),
                              "tiny-model")
    return model_dir
  if cfg.model.preset is not None:
    raise TrainingError(f"model.preset={cfg.model.preset} is an architecture without weights, "
                        "for `jaxpost compile`; to train, set model.path to a model folder")
  model_dir = Path(cfg.model.path)
  if not model_dir.exists():
    raise TrainingError(f"model.path {str(model_dir)!r} does not exist" + (
        "; run `jaxpost train configs/quickstart.yaml` first to make it"
        if "quickstart" in str(model_dir) else ""))
  return model_dir


def model_kwargs(cfg: RunConfig) -> dict:
  """The forward options every loss takes, from `model:` (`Run.model_kwargs`); shared with
  `jaxpost compile`'s shape-only run (`jaxpost.aot.abstract`) so both build the same step."""
  m = cfg.model
  return {"compute_dtype": jnp.dtype(m.compute_dtype) if m.compute_dtype else None,
          "remat": m.remat, "attention": m.attention}


def step_needs_reference(cfg: RunConfig, algorithm: Algorithm) -> bool:
  """Whether the update step reads a reference model: the algorithm's, or the drift term's."""
  return algorithm.needs_reference or cfg.drift.enabled


def build(cfg: RunConfig, algorithm: AlgorithmArg = None, *, training: bool = True) -> Run:
  """Builds the run of `cfg` (see the module docstring). `training=False` (export, eval) keeps
  no copy of the reference model and writes nothing (a missing tiny model is an error)."""
  run_dir = Path(cfg.run_dir)
  dist = cfg.distributed
  sharding_lib.initialize_distributed(dist.coordinator_address, dist.num_processes,
                                      dist.process_id, dist.enabled)
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  data = data_source(cfg, run_dir)
  model_dir = _model_dir(cfg, run_dir, data, create=training)
  config, params = load_hf(model_dir, dtype=jnp.dtype(cfg.model.dtype), mesh=mesh)
  run = Run(cfg=cfg, run_dir=run_dir, model_dir=model_dir, config=config,
            tokenizer=load_tokenizer(model_dir), mesh=mesh, data=data,
            batch_sharding=batch_sharding(mesh), model_kwargs=model_kwargs(cfg),
            rng=jax.random.key(cfg.train.seed))
  if algorithm is None:
    algorithm = make_algorithm(cfg.algorithm, run)
  elif not isinstance(algorithm, Algorithm):
    algorithm = algorithm(run)
  run.algorithm = algorithm

  params = algorithm.init(params, jax.random.fold_in(run.rng, 2))
  specs = (algorithm.param_specs or param_specs)(config)
  p_shard = sharding_lib.param_shardings(specs, mesh)
  run.trainable = make_trainable(cfg, config, p_shard, mesh, tokenizer=run.tokenizer, log=log)
  if algorithm.wrap_trainable is not None:
    run.trainable = algorithm.wrap_trainable(run.trainable)
  run.tree, run.frozen = run.trainable.init(
      params, run.rng, reference=training and step_needs_reference(cfg, algorithm),
      moving_reference=algorithm.moving_reference, reference_of=algorithm.reference_of)
  run.frozen_shardings = run.trainable.frozen_shardings(run.frozen)
  if training and cfg.continual.l2_to_init > 0:  # the anchor of the L2 pull: the start tree
    run.frozen = run.frozen.replace(start=start_anchor(run.tree))
    run.frozen_shardings = run.frozen_shardings.replace(start=run.trainable.shardings)
  if training and algorithm.frozen_teacher is not None:
    teacher, teacher_shardings = algorithm.frozen_teacher()
    run.frozen = run.frozen.replace(teacher=teacher)
    run.frozen_shardings = run.frozen_shardings.replace(teacher=teacher_shardings)
  run.optimizer, run.schedule = make_optimizer(cfg.optim, cfg.train.steps)
  run.state_shardings = state_shardings(run.trainable.shardings, run.tree, run.optimizer, mesh,
                                        offload=cfg.optim.offload)
  return run
