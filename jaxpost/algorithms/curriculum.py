"""`data.curriculum` for a built run: the training items' difficulty scores, attached to the
algorithm's training iterator (`EpochIterator.use_curriculum`, `jaxpost.data.curriculum`).

Every algorithm's training data goes through `apply_curriculum`: SFT and distillation examples,
preference pairs and KTO rows, and RL prompts. The `loss` score runs the starting model once
over every item (packed, in chunks of the LM head, one compiled function) and caches the
per-item losses in RUN_DIR/curriculum/loss-<fingerprint>.npy, so a resumed run reads the same
scores back instead of scoring with its trained weights.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.base import save_on_first_process
from jaxpost.config import ConfigError
from jaxpost.data import BatchIterator
from jaxpost.data.curriculum import Curriculum, row_scores
from jaxpost.data.epochs import EpochIterator, fingerprint_of
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import forward
from jaxpost.multihost import host_tree


def start_losses(run, iterator: EpochIterator, policy, *, batch_size: int = 16) -> np.ndarray:
  """Each item's mean per-token loss (negative log-likelihood of its trained tokens) under the
  starting model `policy` (its step-0 params): float64 [num_items]; cached by fingerprint."""
  try:
    examples = iterator.item_examples()
  except NotImplementedError:
    raise ConfigError("data.curriculum.score=loss needs texts with trained tokens; RL prompts "
                      "have none: use length, a column or module:function") from None
  key = fingerprint_of(["loss", str(Path(run.model_dir).resolve()), run.cfg.model.dtype],
                       [iterator.fingerprint.encode()])
  path = Path(run.run_dir) / "curriculum" / f"loss-{key}.npy"
  if path.exists():
    return np.load(path)
  seq_len = max(len(e) for e in examples)
  rows = BatchIterator(examples, batch_size=batch_size, seq_len=max(seq_len, 2), pack=True,
                       shuffle=False, drop_remainder=False, epochs=1, example_index=True)
  config, kwargs = run.config, run.model_kwargs

  @jax.jit
  def token_nll(params, batch):
    hidden = forward(config, params, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"], compute_logits=False,
                     compute_dtype=kwargs["compute_dtype"]).final_hidden
    return -target_logprobs(config, params, hidden, batch["targets"])

  params = policy.model_params()
  total = np.zeros(len(examples), np.float64)
  count = np.zeros(len(examples), np.float64)
  for batch in rows:
    nll = np.asarray(host_tree(token_nll(params, {k: jnp.asarray(v) for k, v in
                                                  batch.items() if k != "example_index"})))
    mask = batch["loss_mask"]
    np.add.at(total, batch["example_index"][mask], nll[mask])
    np.add.at(count, batch["example_index"][mask], 1.0)
  losses = total / np.maximum(count, 1.0)
  save_on_first_process(path, lambda f: np.save(f, losses))
  return losses


def curriculum_scores(run, iterator: EpochIterator, policy, path: str | None) -> np.ndarray:
  """The difficulty of every item of `iterator` by `data.curriculum.score`; `path` is the data
  the items were read from (their rows, for a column or a function)."""
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  from jaxpost.user_code import import_function  # pylint: disable=import-outside-toplevel
  score = run.cfg.data.curriculum.score
  if score == "length":
    return iterator.item_lengths().astype(np.float64)
  if score == "loss":
    return start_losses(run, iterator, policy)
  function = None
  if ":" in score:
    _, function = import_function(score, key="data.curriculum.score")
  if path is None:
    raise ConfigError(f"data.curriculum.score={score} reads the data's rows; this data has no "
                      "file to read them from")
  rows = {r.where: r.data for r in read_rows(path)}
  return row_scores(score, iterator.item_wheres(), rows, function)


def apply_curriculum(run, iterator: EpochIterator, policy, path: str | None) -> None:
  """Paces `iterator` (training data of `run`, read from `path`) by `data.curriculum`, if set;
  logs the easiest and hardest scores and the pacing."""
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel
  c = run.cfg.data.curriculum
  if c is None:
    return
  scores = curriculum_scores(run, iterator, policy, path)
  full_at = c.full_at_step or max(1, run.cfg.train.steps // 2)
  iterator.use_curriculum(Curriculum(scores, pacing=c.pacing, start_fraction=c.start_fraction,
                                     full_at_step=full_at, stages=c.stages))
  log(f"curriculum: {len(scores)} items by {c.score} ({scores.min():.4g} .. {scores.max():.4g}), "
      f"{c.pacing} pacing from {c.start_fraction:g} of them to all at batch {full_at}")
