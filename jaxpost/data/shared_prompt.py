"""Preference pairs with the prompt scored once: `prompt, chosen, rejected` in one row.

    batch = shared_pair_batch(pairs, seq_len=768)   # arrays [B, 768], plus branch_ids

`pair_batch` gives each side of a pair a row of its own ([B, 2, T]), so the model runs the
prompt twice. Here a pair is one row laid out as three branches of one segment:

    branch 0 (trunk)    the prompt without its last token          positions 0 .. p-2
    branch 1 (chosen)   the prompt's last token, the chosen reply   positions p-1 .. p-1+|c|
    branch 2 (rejected) the prompt's last token, the rejected reply positions p-1 .. p-1+|r|

`forward(..., branch_ids=)` lets a token see the trunk and its own branch only (see
`jaxpost.models.attention.attention_mask`), and the rejected branch's positions continue from
the trunk's end like the chosen one's, so every token sees exactly the keys, at the same
positions, that it sees in its own unshared row: each side's log-probs are the unshared ones.
The prompt's last token is repeated in both branches because it predicts each reply's first
token; everything before it is computed once. A pair costs |p| + 1 + |c| + |r| token slots
instead of 2 x seq_len.

Arrays (int32, `loss_mask` bool), [B, seq_len]: the row fields of `jaxpost.data.packing`
(`tokens`, `targets`, `loss_mask`, `segment_ids` (1 on the pair, 0 on padding), `positions`)
plus `branch_ids` (0 trunk and padding, 1 chosen, 2 rejected). Targets and the loss mask
follow `packing.make_rows`: `loss_mask[t]` says whether the prediction made at t is a trained
token of the branch; a side's summed log-prob is the sum over its branch
(`jaxpost.losses.dpo.pair_logps`).

`seq_len` is the length of a pair's row here. A pair whose row is longer has both replies cut
to the longest common cap that fits (a shorter reply keeps all its tokens); set
`data.max_prompt_length` and `data.seq_len` so that prompt + both replies fit to train on
exactly what the unshared layout trains on. A padding pair (None) is all padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRUNK, CHOSEN, REJECTED = 0, 1, 2
SHARED_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "branch_ids")


def reply_cap(branch_lengths: tuple[int, int], room: int) -> int:
  """The largest cap k with min(a, k) + min(b, k) <= room (a, b = `branch_lengths`)."""
  a, b = sorted(branch_lengths)
  if a + b <= room:
    return b
  if 2 * a <= room:
    return room - a  # the shorter branch whole, the longer one cut
  return room // 2


def _fill(rows: dict[str, np.ndarray], r: int, start: int, tokens: np.ndarray,
          mask: np.ndarray, first_position: int, branch: int) -> int:
  """Writes one branch (its `tokens`, trained-token `mask`) into row r from `start`; returns
  where it ends. The branch's last token has no target (the branch ends there)."""
  n = len(tokens)
  end = start + n
  if not n:
    return end
  rows["tokens"][r, start:end] = tokens
  rows["targets"][r, start:end - 1] = tokens[1:]
  rows["loss_mask"][r, start:end - 1] = mask[1:]
  rows["segment_ids"][r, start:end] = 1
  rows["positions"][r, start:end] = np.arange(first_position, first_position + n)
  rows["branch_ids"][r, start:end] = branch
  return end


def shared_pair_batch(pairs: Sequence, seq_len: int, *, pad_id: int = 0,
                      max_length: int | None = None) -> dict[str, np.ndarray]:
  """`Pair`s (None: a padding pair) -> arrays [B, seq_len] of the layout above.

  `max_length` is unused (the iterator truncated the sides already), as in `pair_batch`.
  Raises ValueError when a prompt leaves less than two tokens per reply in `seq_len`.
  """
  del max_length
  B = len(pairs)
  rows = {name: np.zeros((B, seq_len), np.bool_ if name == "loss_mask" else np.int32)
          for name in SHARED_FIELDS}
  rows["tokens"][:] = pad_id
  rows["targets"][:] = pad_id
  for r, pair in enumerate(pairs):
    if pair is None:
      continue
    chosen, rejected = pair.chosen, pair.rejected
    trunk = max(pair.prompt_length - 1, 0)
    room = seq_len - trunk
    cap = reply_cap((len(chosen) - trunk, len(rejected) - trunk), room)
    if cap < 2:
      raise ValueError(f"a prompt of {pair.prompt_length} tokens leaves {room} of seq_len="
                       f"{seq_len} slots for both replies of a shared-prompt pair; raise "
                       "data.seq_len or set data.max_prompt_length")
    end = _fill(rows, r, 0, chosen.tokens[:trunk], chosen.loss_mask[:trunk], 0, TRUNK)
    if trunk:  # the trunk's last target is the prompt's last token (never trained)
      rows["targets"][r, trunk - 1] = chosen.tokens[trunk]
    for side, branch in ((chosen, CHOSEN), (rejected, REJECTED)):
      stop = trunk + cap
      end = _fill(rows, r, end, side.tokens[trunk:stop], side.loss_mask[trunk:stop], trunk,
                  branch)
  return rows


def shared_row_length(pair) -> int:
  """Token slots a pair takes in the shared layout (uncut): |prompt| + 1 + |chosen| + |rejected|
  replies, i.e. len(chosen) + len(rejected) - (prompt_length - 1)."""
  trunk = max(pair.prompt_length - 1, 0)
  return len(pair.chosen) + len(pair.rejected) - trunk
