"""Truncation and packing: examples -> fixed-length rows the model and the loss read directly.

A row of length `seq_len` holds one example (unpacked) or several (packed), then padding:

  tokens      [T] int32  the examples' tokens back to back, then `pad_id`
  targets     [T] int32  targets[t] = tokens[t + 1] within the same example; `pad_id` at the
                         last token of each example and on padding
  loss_mask   [T] bool   loss_mask[t] = the example's loss_mask[t + 1]: whether the prediction
                         made *at* t (of targets[t]) is trained; False at each example's last
                         token and on padding
  segment_ids [T] int32  1, 2, 3, ... for the examples of the row; 0 on padding
  positions   [T] int32  0, 1, 2, ... restarting for every example; 0 on padding
  example_index [T] int32  (only with `example_index=True`) which example (its index in the
                         examples list) each token is from; -1 on padding: lets a caller attach
                         per-example data computed once (e.g. a teacher's cached top-K)

The model attends within a segment only (`forward(..., positions=, segment_ids=)`), so an
example's logits, and so its loss, are the same packed as alone. The loss is
`sum(loss_mask * CE(logits, targets)) / sum(loss_mask)` with no further shifting.

Packing is greedy and in order (next-fit): examples fill the current row while they fit; the
first that does not starts a new row. It keeps the order of the (shuffled) examples, so a
row's contents depend only on the order, which makes resuming exact. An example longer than
`seq_len` is truncated first (`truncate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxpost.data.formats import Example

ROW_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


NAMED_ROWS = 3  # how many truncated (and dropped) examples `TruncationStats` names


@dataclasses.dataclass(frozen=True)
class TruncationStats:
  """What `truncate` cut: examples shortened, tokens dropped, examples dropped entirely
  because truncation left them no target token (a prompt longer than `max_length`).

  truncated_target_tokens: the trained tokens among `truncated_tokens`.
  truncated_rows, dropped_rows: where the first `NAMED_ROWS` truncated (dropped included) and
    dropped examples came from: their `Example.where` ("data/train.jsonl row 17"), else
    their index ("example i" for `truncate`, "item i" for preference items).
  """

  truncated_examples: int = 0
  truncated_tokens: int = 0
  dropped_examples: int = 0
  truncated_target_tokens: int = 0
  truncated_rows: tuple[str, ...] = ()
  dropped_rows: tuple[str, ...] = ()


def origin(example: Example, index: int) -> str:
  """Where an example came from, for messages: its `where`, else "example <index>"."""
  return example.where if example.where is not None else f"example {index}"


def truncate(examples: Sequence[Example],
             max_length: int | None) -> tuple[list[Example], TruncationStats]:
  """Keeps the first `max_length` tokens of each example (None: no limit).

  Examples left with no target token are dropped (and counted): they would cost compute and
  train nothing. The stats name the rows of the first few cut and dropped examples.
  """
  if max_length is None:
    return list(examples), TruncationStats()
  if max_length < 2:
    raise ValueError(f"max_length should be at least 2 (an input and a target), got "
                     f"{max_length}.")
  kept, truncated, tokens, targets, dropped = [], 0, 0, 0, 0
  truncated_rows: list[str] = []
  dropped_rows: list[str] = []
  for i, example in enumerate(examples):
    if len(example) > max_length:
      truncated += 1
      tokens += len(example) - max_length
      if len(truncated_rows) < NAMED_ROWS:
        truncated_rows.append(origin(example, i))
      cut = Example(example.tokens[:max_length], example.loss_mask[:max_length], example.where)
      targets += example.num_targets - cut.num_targets
      example = cut
      if example.num_targets == 0:
        dropped += 1
        if len(dropped_rows) < NAMED_ROWS:
          dropped_rows.append(origin(example, i))
        continue
    kept.append(example)
  return kept, TruncationStats(truncated, tokens, dropped, targets, tuple(truncated_rows),
                               tuple(dropped_rows))


def plan_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int, *,
              pack: bool = True) -> list[list[int]]:
  """Which examples go in which row: a list of rows, each a list of example indices.

  `order` is the order examples are taken in; every length must be at most `seq_len`.
  Unpacked (`pack=False`): one example per row.
  """
  rows: list[list[int]] = []
  current: list[int] = []
  used = 0
  for i in order:
    n = int(lengths[i])
    if n > seq_len:
      raise ValueError(f"Example {i} has {n} tokens, more than seq_len={seq_len}; truncate first.")
    if current and (not pack or used + n > seq_len):
      rows.append(current)
      current, used = [], 0
    current.append(int(i))
    used += n
  if current:
    rows.append(current)
  return rows


def make_rows(examples: Sequence[Example], plan: Sequence[Sequence[int]], seq_len: int, *,
              pad_id: int = 0, example_index: bool = False) -> dict[str, np.ndarray]:
  """The rows of `plan` (from `plan_rows`) as arrays [len(plan), seq_len] (layout above;
  `example_index` adds that field).

  An empty row in the plan is all padding (used to fill a final partial batch).
  """
  R = len(plan)
  tokens_RxT = np.full((R, seq_len), pad_id, np.int32)
  targets_RxT = np.full((R, seq_len), pad_id, np.int32)
  loss_mask_RxT = np.zeros((R, seq_len), np.bool_)
  segment_ids_RxT = np.zeros((R, seq_len), np.int32)
  positions_RxT = np.zeros((R, seq_len), np.int32)
  index_RxT = np.full((R, seq_len), -1, np.int32)
  for r, row in enumerate(plan):
    offset = 0
    for segment, i in enumerate(row, start=1):
      example = examples[i]
      n = len(example)
      if offset + n > seq_len:
        raise ValueError(f"Row {r} of the plan holds more than seq_len={seq_len} tokens.")
      end = offset + n
      tokens_RxT[r, offset:end] = example.tokens
      targets_RxT[r, offset:end - 1] = example.tokens[1:]
      loss_mask_RxT[r, offset:end - 1] = example.loss_mask[1:]
      segment_ids_RxT[r, offset:end] = segment
      positions_RxT[r, offset:end] = np.arange(n, dtype=np.int32)
      index_RxT[r, offset:end] = i
      offset = end
  rows = {"tokens": tokens_RxT, "targets": targets_RxT, "loss_mask": loss_mask_RxT,
          "segment_ids": segment_ids_RxT, "positions": positions_RxT}
  if example_index:
    rows["example_index"] = index_RxT
  return rows


def packing_efficiency(lengths: Sequence[int], plan: Sequence[Sequence[int]],
                       seq_len: int) -> float:
  """Fraction of the plan's token slots that hold example tokens (not padding)."""
  if not plan:
    return 0.0
  used = sum(int(lengths[i]) for row in plan for i in row)
  return used / (len(plan) * seq_len)
