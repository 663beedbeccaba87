"""Training: the shared update step, optimizers, checkpoints and the training loop."""

from jaxpost.train.checkpoint import CheckpointCorruptError, Checkpointer
from jaxpost.train.optim import make_optimizer, make_schedule
from jaxpost.train.step import (TrainState, batch_sharding, init_state, make_train_step,
                                state_shardings)

__all__ = [
    "CheckpointCorruptError", "Checkpointer", "TrainState", "batch_sharding", "init_state",
    "make_optimizer", "make_schedule", "make_train_step", "state_shardings", "train",
]


def train(cfg, **kwargs):
  """Runs a `RunConfig` (see `jaxpost.train.trainer.train`)."""
  from jaxpost.train.trainer import train as _train  # pylint: disable=import-outside-toplevel
  return _train(cfg, **kwargs)
