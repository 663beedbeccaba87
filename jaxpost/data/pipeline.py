"""`build_sft_batches`: a data file (or dataset) and a tokenizer -> a `BatchIterator`.

The SFT pipeline in one call: read rows with their origins (`sources.read_rows`), tokenise
every row once with its format's loss mask (`formats.tokenize_rows`), then truncate, pack and
batch (`BatchIterator`). The stages are public for callers that need them apart (DPO and RL
data reuse the reading and the tokenisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxpost.data.formats import tokenize_rows
from jaxpost.data.iterator import BatchIterator
from jaxpost.data.sources import read_rows
from jaxpost.tokenizer import Tokenizer


def pad_id_of(tokenizer: Tokenizer) -> int:
  """The id written on padding: the pad token, else EOS, else 0 (padding is never attended
  to nor trained, so any valid id does)."""
  for index in (tokenizer.pad_id, tokenizer.eos_id):
    if index is not None:
      return index
  return 0


def build_sft_batches(
    path: str | Path | Any,
    tokenizer: Tokenizer,
    *,
    format: str = "auto",  # pylint: disable=redefined-builtin
    seq_len: int,
    batch_size: int,
    pack: bool = True,
    seed: int = 0,
    max_length: int | None = None,
    on_bad_row: str = "error",
    train_on: str | None = None,
    split: str = "train",
    shuffle: bool = True,
    epochs: int | None = None,
    drop_remainder: bool = True,
    add_eos: bool = True,
    example_index: bool = False,
    state: Mapping[str, Any] | None = None,
) -> BatchIterator:
  """SFT batches from a data file, folder, hub dataset name or `datasets.Dataset`.

  Args:
    path: a local .jsonl/.json/.parquet/.csv file or a folder of them, a hub dataset name, or
      an in-memory `datasets.Dataset`.
    tokenizer: the model's tokenizer (its chat template renders conversations).
    format: "auto", "messages", "prompt_completion" or "text" (see `jaxpost.data.formats`).
    seq_len, batch_size: every batch is [batch_size, seq_len].
    pack: pack several examples per row.
    seed: shuffling seed (the order of epoch e comes from (seed, e)).
    max_length: truncate each example to this many tokens first.
    on_bad_row: "error" (raise `DataError` naming file, row and field) or "skip" (count them
      in `stats.skipped_rows` by reason).
    train_on: which tokens are trained; default per format ("assistant", "completion", "all").
    split: the split of a hub dataset (local files are "train"; slices like "train[:100]").
    shuffle, epochs, drop_remainder, state: see `BatchIterator`.
    add_eos: append EOS to completions and texts.
    example_index: batches also carry "example_index" (see `BatchIterator`).

  Example:
    >>> batches = build_sft_batches("data/train.jsonl", tokenizer, seq_len=2048, batch_size=8)
    >>> batch = next(batches)   # {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    >>> checkpoint["data"] = batches.state()
  """
  rows = read_rows(path, split=split)
  tokenized = tokenize_rows(rows, tokenizer, format=format, train_on=train_on, add_eos=add_eos,
                            on_bad_row=on_bad_row)
  return BatchIterator(tokenized, batch_size=batch_size, seq_len=seq_len, pack=pack,
                       shuffle=shuffle, seed=seed, drop_remainder=drop_remainder, epochs=epochs,
                       max_length=max_length, pad_id=pad_id_of(tokenizer),
                       example_index=example_index, state=state)
