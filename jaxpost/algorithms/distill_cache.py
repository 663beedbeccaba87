"""The offline teacher of `distill.cache_top_k=K`: the teacher's top K at every trained
position, computed once before training and read by the batches, so no teacher is in memory
while the student trains.

    batches = topk_batches(run, run.cfg.distill, log)   # `Algorithm.batches`
    batch = batches("train", None).next()               # + teacher_ids, teacher_logp, teacher_rest

For each split ("train", and "eval" when the run has held-out data) the teacher runs once
over the split's examples (packed rows, `train.batch_size` rows per call, one compiled
program, its LM head `distill.chunk` positions at a time). What is kept, at the positions a
loss is taken at (the prediction made at t where the example's loss_mask[t + 1]):

    ids   [M, K] int32    the teacher's K most likely next tokens (`jax.lax.top_k`)
    logp  [M, K] float32  their log-probs at `distill.temperature`
    rest  [M]    float32  log of the mass of every other token (`jaxpost.losses.topk_support`)

float32, not float16: the loss is exact at K = vocabulary size only with the teacher's own
float32 values, and a peaked teacher's rest (1e-6 and below) is what reverse KL and JSD read
through its logarithm. Size: M x (8 K + 4) bytes, M the trained tokens (prompts cost 4 bytes
a token, for the position index), e.g. 1M trained tokens at K = 32: 260 MB.

The file is RUN_DIR/distill/topk-<fingerprint>.npz, written atomically by the first process,
reused while the fingerprint matches: the teacher folder (resolved path, config.json, the
weight files' names, sizes and mtimes), K, temperature, quantize, the dtypes the teacher runs
in, and every example's tokens and loss mask (not the batching settings: a new batch size
or seed reuses it). The batches are the SFT batches of the same examples (`example_index`
gives each token's example, `positions` its position in it), so resuming is the iterator's:
exact.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.base import Offline, save_on_first_process
from jaxpost.algorithms.distill import load_teacher, teacher_folder
from jaxpost.algorithms.sft import sft_batches
from jaxpost.data.epochs import example_bytes, fingerprint_of
from jaxpost.data.formats import Example
from jaxpost.data.packing import make_rows, plan_rows
from jaxpost.losses import topk_support
from jaxpost.losses.tokens import chunked
from jaxpost.models import ModelConfig, forward, lm_head
from jaxpost.multihost import host_tree

FIELDS = ("offsets", "slot", "ids", "logp", "rest")
_VERSION = "topk-v1"


@dataclasses.dataclass(frozen=True)
class TopK:
  """A teacher's top K over a list of examples, stored at the trained positions only.

  offsets: [N + 1] int64; example i's tokens are `slot[offsets[i]:offsets[i + 1]]`.
  slot: [tokens] int32, each token's row of `ids` / `logp` / `rest`; -1 where no loss is
    taken (position t of an example whose loss_mask[t + 1] is False).
  ids [M, K] int32, logp [M, K] float32, rest [M] float32: the module docstring's.
  """

  offsets: np.ndarray
  slot: np.ndarray
  ids: np.ndarray
  logp: np.ndarray
  rest: np.ndarray

  def attach(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` (with `example_index`, which it drops) plus `teacher_ids` [B, T, K],
    `teacher_logp` [B, T, K] and `teacher_rest` [B, T] at every position. Positions outside
    the loss mask get the cache's first entry: a real distribution the loss never counts."""
    batch = dict(batch)
    index = batch.pop("example_index")
    trained = batch["loss_mask"]
    slot = self.slot[self.offsets[np.maximum(index, 0)] + batch["positions"]]
    if (slot[trained] < 0).any():
      raise ValueError("the teacher's top-K cache has no entry for a trained token: it was "
                       "computed over other examples")
    row = np.where(trained, slot, 0)
    return {**batch, "teacher_ids": self.ids[row], "teacher_logp": self.logp[row],
            "teacher_rest": self.rest[row]}


def trained_slots(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
  """(`offsets`, `slot`) of `TopK` for `examples`: the trained positions numbered in order."""
  offsets = np.concatenate([[0], np.cumsum([len(e) for e in examples])]).astype(np.int64)
  trained = np.concatenate([np.append(e.loss_mask[1:], False) for e in examples])
  return offsets, np.where(trained, np.cumsum(trained) - 1, -1).astype(np.int32)


def teacher_topk(config: ModelConfig, params, batch: dict, *, k: int, temperature: float,
                 chunk: int = 256, compute_dtype=None):
  """The teacher's top `k` at every position of `batch` (`tokens`, `positions`,
  `segment_ids` [B, T]): (ids [B, T, k] int32, log-probs [B, T, k], rest [B, T]) of
  softmax(logits / temperature), the LM head `chunk` positions at a time."""
  hidden = forward(config, params, batch["tokens"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], compute_dtype=compute_dtype,
                   compute_logits=False).final_hidden
  B, T = batch["tokens"].shape
  (h_NxBxCxD,) = chunked(chunk, hidden)

  def one(h_BxCxD):
    logits = lm_head(config, params, h_BxCxD).astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(logits, -1)
    _, ids = jax.lax.top_k(logp, k)
    return (ids.astype(jnp.int32), *topk_support(logp, ids))

  out = jax.lax.map(one, h_NxBxCxD)
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, -1, *x.shape[3:])[:, :T], out)


def cache_path(run, section, examples: Sequence[Example], k: int) -> Path:
  """RUN_DIR/distill/topk-<fingerprint>.npz (the module docstring's fingerprint)."""
  folder = teacher_folder(section.teacher)
  weights = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.iterdir()
                   if f.suffix in (".safetensors", ".bin"))
  settings = [_VERSION, str(folder.resolve()), json.loads((folder / "config.json").read_text()),
              weights, k, section.temperature, section.quantize, run.cfg.model.dtype,
              str(run.model_kwargs["compute_dtype"])]
  key = fingerprint_of(settings, itertools.chain.from_iterable(map(example_bytes, examples)))
  return Path(run.run_dir) / "distill" / f"topk-{key}.npz"


def compute_topk(run, section, config, params, examples: Sequence[Example], k: int) -> TopK:
  """The teacher (`config`, `params` on the run's mesh) once over `examples`."""
  offsets, slot = trained_slots(examples)
  m = max(int(slot.max()) + 1, 1)  # one entry at least: `attach` gives it to padding
  ids, logp, rest = (np.zeros((m, k), np.int32), np.zeros((m, k), np.float32),
                     np.zeros((m,), np.float32))
  fn = jax.jit(functools.partial(teacher_topk, config, k=k, temperature=section.temperature,
                                 chunk=section.chunk,
                                 compute_dtype=run.model_kwargs["compute_dtype"]),
               out_shardings=jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec()))
  seq_len, size = run.cfg.data.seq_len, run.cfg.train.batch_size
  plan = plan_rows(np.diff(offsets), range(len(examples)), seq_len, pack=True)
  for start in range(0, len(plan), size):
    part = plan[start:start + size]
    rows = make_rows(examples, part + [[]] * (size - len(part)), seq_len, example_index=True)
    out = host_tree(fn(params, run.place({f: rows[f] for f in
                                          ("tokens", "positions", "segment_ids")})))
    at = rows["loss_mask"]
    to = slot[offsets[rows["example_index"][at]] + rows["positions"][at]]
    ids[to], logp[to], rest[to] = (x[at] for x in out)
  return TopK(offsets, slot, ids, logp, rest)


def load_or_compute(run, section, examples: dict[str, Sequence[Example]],
                    log: Callable[[str], None]) -> dict[str, TopK]:
  """Each split's `TopK`: read from its file, else computed (the teacher loaded once for all
  splits that need it, then freed) and written."""
  k = min(section.cache_top_k, run.config.vocab_size)
  paths = {split: cache_path(run, section, ex, k) for split, ex in examples.items()}
  tables = {}
  for split, path in paths.items():
    if path.exists():
      with np.load(path) as z:
        tables[split] = TopK(**{f: z[f] for f in FIELDS})
      log(f"distill: the teacher's top {k} over the {split} examples from {path}")
  if len(tables) == len(paths):
    return tables
  config, params, _ = load_teacher(run, section)
  for split in [s for s in paths if s not in tables]:  # one order on every process
    start = time.perf_counter()
    tables[split] = table = compute_topk(run, section, config, params, examples[split], k)
    save_on_first_process(paths[split], lambda f, t=table: np.savez(f, **dataclasses.asdict(t)))
    log(f"distill: the teacher's top {k} over the {split} examples ({len(examples[split])}; "
        f"{len(table.rest)} trained tokens) in {time.perf_counter() - start:.1f}s -> "
        f"{paths[split]}")
  for x in jax.tree.leaves(params):  # no teacher in memory while the student trains
    if isinstance(x, jax.Array):
      x.delete()
  return tables


def topk_batches(run, section, log: Callable[[str], None]):
  """`Algorithm.batches` of a cached teacher: the SFT batches of each split (a curriculum
  included: the cache is looked up by example, whatever the order) with the teacher's top K
  attached (`TopK.attach`). The first call computes or reads every split's cache (one
  teacher load for all)."""
  tables: dict[str, TopK] = {}

  def batches(split: str, policy) -> Offline | None:
    source = sft_batches(run, split, example_index=True, policy=policy)
    if source is None:
      return None
    if not tables:
      sources = {s: source if s == split else
                 sft_batches(run, s, example_index=True, policy=policy)
                 for s in ("train", "eval")}
      tables.update(load_or_compute(run, section, {s: src.examples for s, src in
                                                   sources.items() if src is not None}, log))
    return Offline(source.batches, tables[split].attach)

  return batches
