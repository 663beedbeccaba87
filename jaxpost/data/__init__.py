"""Post-training data: rows from files -> tokenised examples with loss masks -> packed batches.

    batches = build_sft_batches("data/train.jsonl", tokenizer, seq_len=2048, batch_size=8)
    batch = next(batches)          # numpy arrays, each [batch_size, seq_len]
    saved = batches.state()        # JSON-serialisable; BatchIterator(..., state=saved) resumes

The stages, each usable alone:

1. `load_rows` / `read_rows` (`sources`): local .jsonl/.json/.parquet/.csv files or a folder of
   them, or a hub dataset; every row keeps its origin ("data/train.jsonl row 17").
2. `tokenize_rows` / `to_example` (`formats`): a row in the `messages`, `prompt` +
   `completion` or `text` format -> `Example(tokens, loss_mask)`, where `loss_mask[t]` says
   whether token t is a trained target. A bad row raises `DataError` naming file, row and field,
   or is skipped and counted (`on_bad_row="skip"`).
3. `truncate`, `plan_rows`, `make_rows` (`packing`): examples -> rows of `seq_len` tokens,
   packed greedily in order or one per row.
4. `BatchIterator` (`iterator`): shuffled epochs, fixed-shape batches, exact resume, `stats`;
   its schedule (`epochs.EpochIterator`) is also `preference.PreferenceIterator`'s. `stats`
   count and name (`truncated_rows`, `dropped_rows`) the examples truncation cut;
   `describe_truncation(stats, seq_len)` makes the one-line warning a trainer logs.
5. `ShardedBatches` (`shards`): a multi-host run's batches from S data shards, each process
   tokenising only the shards of its rows; the same batches on any number of processes.

A bad input raises one error naming it: `DataError` (a `ValueError`) for a data file, row or
field ("data/train.jsonl row 17: field 'completion' is empty", "data/train.jsonl has no rows:
the file is empty"), `jaxpost.tokenizer.TokenizerError` for a tokenizer that lacks what the
data needs (a chat template), naming its folder.

Batch layout (B = batch_size, T = seq_len), ready for `jaxpost.models.forward` and a loss:

  tokens      [B, T] int32  examples back to back in each row, then padding (pad_id)
  targets     [B, T] int32  targets[b, t] = tokens[b, t + 1] within the same example
  loss_mask   [B, T] bool   whether the prediction at t (logits[b, t] vs targets[b, t]) is
                            trained: the example's mask shifted left by one; False at each
                            example's last token and on padding
  segment_ids [B, T] int32  1, 2, 3, ... per example in the row; 0 = padding
  positions   [B, T] int32  0, 1, 2, ... restarting at every example; 0 on padding

    logits = forward(config, params, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"]).logits
    loss = sum(loss_mask * cross_entropy(logits, targets)) / sum(loss_mask)
"""

from jaxpost.data.epochs import InputStats, describe_truncation
from jaxpost.data.errors import DataError
from jaxpost.data.formats import (FORMATS, ROLES, TRAIN_ON, Example, Tokenized, detect_format,
                                  detect_rows_format, to_example, tokenize_rows)
from jaxpost.data.iterator import BatchIterator, DataStats
from jaxpost.data.packing import (ROW_FIELDS, TruncationStats, make_rows, packing_efficiency,
                                  plan_rows, truncate)
from jaxpost.data.pipeline import build_sft_batches, pad_id_of
from jaxpost.data.shards import ShardedBatches
from jaxpost.data.sources import Row, load_rows, read_rows

__all__ = [
    "BatchIterator", "DataError", "DataStats", "Example", "FORMATS", "InputStats", "ROLES",
    "ROW_FIELDS", "Row", "ShardedBatches", "TRAIN_ON", "Tokenized", "TruncationStats", "build_sft_batches",
    "describe_truncation", "detect_format", "detect_rows_format", "load_rows", "make_rows",
    "pad_id_of", "packing_efficiency", "plan_rows", "read_rows", "to_example", "tokenize_rows",
    "truncate",
]
