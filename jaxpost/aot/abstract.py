"""A run built from shapes only: the training step (and the sampler) lowered for any mesh.

    run = abstract_run(cfg, mesh)              # no weights, no data, no tokenizer
    lowered = lower_step(run)                  # the very `Run.step` that `jaxpost train` runs
    lowered.compile().memory_analysis()

`jaxpost train` builds its step from a loaded model (`jaxpost.train.build`). Here the same
pieces (the registry's algorithm, the trainable, the optimizer, `state_shardings`, `Run.step`)
are put together around `jax.ShapeDtypeStruct`s: the model's shapes come from `model.preset`
or a `config.json`, the trainable's `init` runs under `jax.eval_shape`, and the batch is the
shape the algorithm's batch source would produce. Nothing of the model's size is ever
allocated, so an 8B or 70B model lowers on a laptop, onto a mesh of compile-only TPU devices.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpost import sharding as sharding_lib
from jaxpost.algorithms import make_algorithm
from jaxpost.config import RunConfig
from jaxpost.models import ModelConfig, param_specs, read_config
from jaxpost.models.params import is_spec
from jaxpost.models.presets import preset_config
from jaxpost.train.build import Run, model_kwargs, step_needs_reference
from jaxpost.train.optim import make_optimizer
from jaxpost.train.step import batch_sharding, state_shardings
from jaxpost.train.trainable import make_trainable

_ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# Algorithms whose batch shapes `batch_shapes` knows (the others' batches carry more fields).
SUPPORTED = ("sft", "dpo", "grpo")
GENERATES = ("grpo",)


def model_config(cfg: RunConfig) -> ModelConfig:
  """The model's architecture: `model.preset`, or the `config.json` of `model.path` (no
  weights are read)."""
  m = cfg.model
  if m.preset is not None:
    return preset_config(m.preset)
  if m.path is not None:
    return read_config(m.path)
  raise ValueError("jaxpost compile needs the model's shapes: set model.preset (e.g. "
                   "llama3-8b) or model.path (a folder with a config.json); model.tiny's "
                   "vocabulary comes from a tokenizer trained at run time")


def make_topology_mesh(cfg: RunConfig, devices) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `cfg.mesh` over `devices`, laid out by
  `mesh_utils.create_device_mesh` so that the fast (tensor) axis stays on neighbouring chips."""
  from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
  m = cfg.mesh
  shape = (m.data, m.fsdp, m.tensor)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh data={m.data} x fsdp={m.fsdp} x tensor={m.tensor} = "
                     f"{int(np.prod(shape))} devices, but the topology has {len(devices)}")
  try:
    arranged = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    arranged = np.asarray(devices).reshape(shape)  # CPU devices have no physical layout
  return sharding_lib.make_mesh(*shape, devices=list(arranged.reshape(-1)))


def _shaped(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_run(cfg: RunConfig, mesh: jax.sharding.Mesh) -> Run:
  """A `Run` whose trainable tree and frozen inputs are `ShapeDtypeStruct`s (see the module
  docstring); `run.step` is the update step `jaxpost train` would compile."""
  if cfg.algorithm not in SUPPORTED:
    raise ValueError(f"jaxpost compile supports algorithm={'|'.join(SUPPORTED)} so far; got "
                     f"{cfg.algorithm}")
  if cfg.lora is not None and cfg.lora.init_from:
    raise ValueError("jaxpost compile builds adapters from shapes: drop lora.init_from")
  config = model_config(cfg)
  run = Run(cfg=cfg, run_dir=Path(cfg.run_dir), model_dir=Path(cfg.model.path or "."),
            config=config, tokenizer=None, mesh=mesh, data=None,
            batch_sharding=batch_sharding(mesh), model_kwargs=model_kwargs(cfg),
            rng=jax.random.key(cfg.train.seed))
  algorithm = run.algorithm = make_algorithm(cfg.algorithm, run)
  specs = (algorithm.param_specs or param_specs)(config)
  p_shard = sharding_lib.param_shardings(specs, mesh)
  dtype = jnp.dtype(cfg.model.dtype)
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)
  params = jax.eval_shape(algorithm.init, params, jax.random.key(2))
  run.trainable = make_trainable(cfg, config, p_shard, mesh, log=lambda _: None)
  if algorithm.wrap_trainable is not None:
    run.trainable = algorithm.wrap_trainable(run.trainable)
  init = lambda p: run.trainable.init(
      p, run.rng, reference=step_needs_reference(cfg, algorithm),
      moving_reference=algorithm.moving_reference, reference_of=algorithm.reference_of)
  run.tree, run.frozen = jax.eval_shape(init, params)
  run.frozen_shardings = run.trainable.frozen_shardings(run.frozen)
  if cfg.continual.l2_to_init > 0:  # the L2 pull's anchor: a copy of the start tree
    run.frozen = run.frozen.replace(start=run.tree)
    run.frozen_shardings = run.frozen_shardings.replace(start=run.trainable.shardings)
  run.frozen = _shaped(run.frozen, run.frozen_shardings)
  run.optimizer, run.schedule = make_optimizer(cfg.optim, cfg.train.steps)
  run.state_shardings = state_shardings(run.trainable.shardings, run.tree, run.optimizer, mesh,
                                        offload=cfg.optim.offload)
  return run


def batch_shapes(cfg: RunConfig, sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one training batch of `cfg.algorithm`, rows split by `sharding`:
  SFT packed rows [B, T]; DPO pairs [B, 2, T] (and `ref_logps` [B, 2] when precomputed);
  GRPO rollout rows [B, T] with per-token advantages and old log-probs."""
  B, T = cfg.train.batch_size, cfg.data.seq_len
  i32, f32 = jnp.int32, jnp.float32
  shaped = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  if cfg.algorithm == "dpo":
    batch = {k: shaped((B, 2, T), i32) for k in _ROW_KEYS}
    if cfg.reference.mode == "precomputed" and cfg.dpo.needs_reference:
      batch["ref_logps"] = shaped((B, 2), f32)
    return batch
  batch = {k: shaped((B, T), i32) for k in _ROW_KEYS}
  if cfg.algorithm == "grpo":
    rl = cfg.rl
    batch.update(advantages=shaped((B, T), f32), old_logps=shaped((B, T), f32),
                 fresh=shaped((B,), f32))
    if rl.beta > 0:
      batch["ref_logps"] = shaped((B, T), f32)
    if rl.tis_cap is not None:
      batch["sampler_logps"] = shaped((B, T), f32)
  return batch


def lower_step(run: Run) -> jax.stages.Lowered:
  """`run.step` lowered for the abstract state, one batch and the frozen inputs."""
  state = run.abstract_state()
  batch = batch_shapes(run.cfg, run.batch_sharding)
  return run.step.lower(state, batch, run.frozen)


def lower_sampler(run: Run) -> jax.stages.Lowered | None:
  """The rollout's generation program (prefill, then the compiled decode loop) as
  `jaxpost.sampling.generate` runs it in a rollout: `train.batch_size x rl.mini_batches /
  rl.num_generations` prompts of `data.seq_len - rl.max_new_tokens` tokens, each sampled
  `rl.num_generations` times, over the model's parameter shardings. None when the algorithm
  does not sample."""
  cfg = run.cfg
  if cfg.algorithm not in GENERATES:
    return None
  from jaxpost.sampling import generate  # pylint: disable=import-outside-toplevel
  rl = cfg.rl
  prompt_len = cfg.data.seq_len - rl.max_new_tokens
  if prompt_len < 1:
    raise ValueError(f"data.seq_len={cfg.data.seq_len} leaves no room for a prompt before "
                     f"rl.max_new_tokens={rl.max_new_tokens}")
  n_prompts = cfg.train.batch_size * rl.mini_batches // rl.num_generations
  prompts = [[1] * prompt_len] * n_prompts
  specs = param_specs(run.config)
  shardings = sharding_lib.param_shardings(specs, run.mesh)
  dtype = jnp.dtype(cfg.model.dtype)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                        specs, shardings, is_leaf=is_spec)
  replicated = NamedSharding(run.mesh, PartitionSpec())

  def sample(p):
    out = generate(run.config, p, prompts, max_new_tokens=rl.max_new_tokens,
                   temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
                   compute_dtype=run.model_kwargs["compute_dtype"], prompt_bucket=prompt_len,
                   num_samples=rl.num_generations)
    return out.tokens, out.sample_logprobs

  with jax.set_mesh(run.mesh):  # the rollout samples under the mesh (rows follow the batch)
    return jax.jit(sample, out_shardings=replicated).lower(params)
