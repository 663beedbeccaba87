"""What `jaxpost eval` evaluates: a Hugging Face folder, or a run folder whose checkpoints are
restored onto the evaluation's own mesh (any trainable: full, LoRA / DoRA / QLoRA adapters
attached, prompt / prefix), with its reference.

    target, step = open_target("runs/dpo", mesh_shape=(1, 1, 1))
    target.steps()                 # the committed checkpoints, ascending
    params = target.params(100)    # the full model of checkpoint 100 (None: the final model)
    target.reference()             # the run's start model (under PEFT: the base, adapters off)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost.errors import TrainingError
from jaxpost.models import load_hf
from jaxpost.tokenizer import load_tokenizer


@dataclasses.dataclass
class FolderTarget:
  """A Hugging Face model folder: one model, no checkpoints."""

  path: Path
  mesh: Any
  dtype: Any = jnp.float32

  def __post_init__(self):
    self.config, self._params = load_hf(self.path, dtype=self.dtype, mesh=self.mesh)
    self.tokenizer = load_tokenizer(self.path)
    self.data = None
    self.run_dir = None

  def steps(self) -> list[int]:
    return []

  def params(self, step: int | None = None):
    del step
    return self._params

  def reference(self):
    return None


class RunTarget:
  """A jaxpost run folder, rebuilt from its `config.yaml` on `mesh` without training state
  (`jaxpost.train.build(training=False)`); checkpoints restore onto that mesh's shardings."""

  def __init__(self, run_dir: Path, mesh_shape: tuple[int, int, int] | None = None):
    from jaxpost.config import MeshSection, load_config  # pylint: disable=import-outside-toplevel
    from jaxpost.train.build import build  # pylint: disable=import-outside-toplevel
    from jaxpost.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    self.run_dir = run_dir
    cfg = load_config(run_dir / "config.yaml")
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if mesh_shape is not None:
      cfg = dataclasses.replace(cfg, mesh=MeshSection(*mesh_shape))
    self.cfg = cfg
    self.run = build(cfg, training=False)
    self.config, self.tokenizer, self.data = self.run.config, self.run.tokenizer, self.run.data
    if not self.run.algorithm.generates:
      raise TrainingError(f"{run_dir} is an algorithm={cfg.algorithm} run, not a language model: "
                          "evaluate it as a suite's reward_model instead")
    # the language model inside the trained tree (e.g. PPO's policy without its critic)
    self._lm = self.run.algorithm.reference_of or (lambda p: p)
    self.checkpointer = Checkpointer(run_dir / "checkpoints", save_every=1, read_only=True)

  def steps(self) -> list[int]:
    return self.checkpointer.all_steps()

  def final_step(self) -> int:
    """The step the run trains to, read again each time (a continued run raises it)."""
    from jaxpost.config import load_config  # pylint: disable=import-outside-toplevel
    return load_config(self.run_dir / "config.yaml").train.steps

  def params(self, step: int | None = None):
    """The full model of checkpoint `step` (default: the latest); raises `FileNotFoundError`
    when the checkpoint is gone (the trainer deletes old ones)."""
    run = self.run
    if step is not None and not (self.checkpointer.directory / str(step)).is_dir():
      raise FileNotFoundError(f"checkpoint {step} of {self.run_dir} is gone")
    try:
      tree, _, _, _ = self.checkpointer.restore(run.checkpoint_abstract(run.abstract_state()),
                                                step=step)
    except (ValueError, OSError) as e:
      if step is not None and not (self.checkpointer.directory / str(step)).is_dir():
        raise FileNotFoundError(f"checkpoint {step} of {self.run_dir} was deleted while it "
                                "was read") from e
      raise
    state, frozen = run.from_checkpoint(tree, run.frozen)
    return self._lm(run.trainable.model(state.params, frozen))

  def reference(self):
    """The run's start model: the base with adapters off under PEFT, else the model the run
    started from (held by the build as its initial tree)."""
    if self.run.trainable.kind == "full":
      return self._lm(self.run.tree)
    return self.run.frozen.base

  def close(self) -> None:
    self.checkpointer.close()


def open_target(path: str | Path, *, mesh_shape: tuple[int, int, int] | None = None
                ) -> tuple[Any, int | None]:
  """(the target, the checkpoint step asked for or None) of `path`: a Hugging Face folder
  (config.json), a run folder (config.yaml), or a run's `checkpoints/<step>`."""
  path = Path(path)
  if not path.exists():
    raise TrainingError(f"model {str(path)!r} does not exist (give a Hugging Face folder, a "
                        "run folder or a run's checkpoints/<step>)")
  if path.parent.name == "checkpoints" and path.name.isdigit():
    return RunTarget(path.parent.parent, mesh_shape), int(path.name)
  if (path / "config.yaml").is_file():
    return RunTarget(path, mesh_shape), None
  if (path / "config.json").is_file():
    from jaxpost import sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(*(mesh_shape or (len(jax.devices()), 1, 1)))
    return FolderTarget(path, mesh), None
  raise TrainingError(f"{path} is neither a Hugging Face model folder (no config.json) nor a "
                      "jaxpost run folder (no config.yaml)")
