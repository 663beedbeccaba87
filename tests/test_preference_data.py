"""Preference data: pair and KTO layouts and masks, row forms, truncation, bad rows, resume, and
the arithmetic preference set."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import tokenizer_fixtures
from data_fixtures import runs, write_jsonl
from jaxpost.data import describe_truncation
from jaxpost.data.errors import DataError
from jaxpost.data.formats import Example
from jaxpost.data.preference import (Pair, PreferenceIterator, Unpaired, build_kto_batches,
                                     build_preference_batches, kto_batch, pair_batch, to_pair,
                                     to_unpaired)
from jaxpost.tasks import arithmetic, arithmetic_pref
from jaxpost.tiny import make_tokenizer
from jaxpost.tokenizer import TokenizerError, load_tokenizer

END = "<|im_end|>"
KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok"),
                                       tokenizer_fixtures.corpus(300)))


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


def trained_text(tok, batch, index):
  """The decoded runs of targets under the loss mask of row `index` (a tuple into the batch)."""
  return runs(tok, batch["targets"][index], batch["loss_mask"][index])


def real_text(tok, batch, index, prefix=""):
  return tok.decode(batch[f"{prefix}tokens"][index][batch[f"{prefix}segment_ids"][index] > 0])


# -- layout and masks --------------------------------------------------------------------------


def test_pair_layout_is_exact_for_strings(tok, tmp_path):
  prompt, chosen, rejected = "what is two plus three", " five", " the answer is six"
  T = 40
  path = write_jsonl(tmp_path / "pairs.jsonl",
                     [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
  batches = build_preference_batches(path, tok, seq_len=T, batch_size=1, shuffle=False)
  batch = next(batches)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "tokens": ((1, 2, T), np.int32), "targets": ((1, 2, T), np.int32),
      "loss_mask": ((1, 2, T), np.bool_), "segment_ids": ((1, 2, T), np.int32),
      "positions": ((1, 2, T), np.int32), "index": ((1,), np.int32)}
  np.testing.assert_array_equal(batch["index"], [0])
  prompt_ids = tok.encode(prompt)
  P = len(prompt_ids)
  for side, completion in enumerate((chosen, rejected)):
    ids = prompt_ids + tok.encode(completion, add_bos=False) + [tok.eos_id]
    n = len(ids)
    assert n <= T
    np.testing.assert_array_equal(batch["tokens"][0, side], ids + [tok.pad_id] * (T - n))
    np.testing.assert_array_equal(batch["targets"][0, side],
                                  ids[1:] + [tok.pad_id] * (T + 1 - n))
    assert batch["loss_mask"][0, side].sum() == n - P
    np.testing.assert_array_equal(batch["loss_mask"][0, side],
                                  (np.arange(T) >= P - 1) & (np.arange(T) < n - 1))
    np.testing.assert_array_equal(batch["segment_ids"][0, side], np.arange(T) < n)
    np.testing.assert_array_equal(batch["positions"][0, side], np.where(np.arange(T) < n,
                                                                        np.arange(T), 0))
    assert trained_text(tok, batch, (0, side)) == [completion + "<eos>"]
  np.testing.assert_array_equal(batch["tokens"][0, 0, :P], batch["tokens"][0, 1, :P])
  # [B, 2, T] -> [2B, T] puts each pair's chosen then rejected side in consecutive rows.
  assert real_text(tok, {k: v.reshape(2, T) for k, v in batch.items() if k != "index"}, 1) == (
      prompt + rejected + "<eos>")


def test_pair_layout_for_messages_shares_the_rendered_prompt(tok):
  prompt = [{"role": "system", "content": "be helpful"}, user("what is two plus three")]
  pair = to_pair({"prompt": prompt, "chosen": [assistant("five")], "rejected": "six"}, tok)
  prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
  assert pair.prompt_length == len(prompt_ids)
  batch = pair_batch([pair, None], 64, pad_id=tok.pad_id)
  for side, completion in enumerate(("five", "six")):
    assert batch["tokens"][0, side, :len(prompt_ids)].tolist() == prompt_ids
    assert trained_text(tok, batch, (0, side)) == [completion + END]
    assert real_text(tok, batch, (0, side)) == tok.apply_chat_template(
        prompt, add_generation_prompt=True) + completion + END
  for key in KEYS:  # the padding pair
    assert not batch[key][1].any(), key


def test_implicit_prompt_is_the_shared_prefix(tok):
  prompt = [user("hello"), assistant("hi there"), user("what is two plus three")]
  explicit = to_pair({"prompt": prompt, "chosen": [assistant("five")],
                      "rejected": [assistant("six"), assistant("no, seven")]}, tok)
  implicit = to_pair({"chosen": prompt + [assistant("five")],
                      "rejected": prompt + [assistant("six"), assistant("no, seven")]}, tok)
  assert implicit.prompt_length == explicit.prompt_length
  for a, b in zip(implicit.examples, explicit.examples):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
  assert runs(tok, implicit.rejected.tokens, implicit.rejected.loss_mask) == [
      f"six{END}\n<|im_start|>assistant\nno, seven{END}"]


# -- truncation --------------------------------------------------------------------------------


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tok, tmp_path):
  prompt = "the quick brown fox jumps over a lazy dog hello world"
  rows = [{"prompt": prompt, "chosen": " five you are fine", "rejected": " six"},
          {"prompt": prompt, "chosen": " a", "rejected": " b"}]
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  prompt_ids = tok.encode(prompt)
  P, max_prompt = len(prompt_ids), 4
  assert P > max_prompt
  batches = build_preference_batches(path, tok, seq_len=16, batch_size=2, shuffle=False,
                                     max_prompt_length=max_prompt, max_length=6)
  batch = next(batches)
  chosen_ids = prompt_ids[-max_prompt:] + tok.encode(" five you are fine", add_bos=False)
  np.testing.assert_array_equal(batch["tokens"][0, 0, :6], chosen_ids[:6])
  assert batch["segment_ids"][0].sum(-1).tolist() == [6, 6]  # rejected: 4 + " six" + EOS
  assert batch["loss_mask"][0, 0].tolist() == [False] * 3 + [True] * 2 + [False] * 11
  stats = batches.stats
  lost = sum(P + len(tok.encode(c, add_bos=False)) + 1 - 6  # + 1: EOS
             for c in (" five you are fine", " six", " a", " b"))
  assert (stats.examples, stats.truncated_examples, stats.dropped_examples) == (2, 2, 0)
  assert stats.truncated_tokens == lost
  # Without max_prompt_length the prompt fills max_length: no completion token, pairs dropped.
  with pytest.raises(ValueError, match="No preference items"):
    build_preference_batches(path, tok, seq_len=16, batch_size=1, max_length=P)


def test_pairs_that_truncation_makes_identical_are_dropped(tok, tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": "hello", "chosen": " the quick fox", "rejected": " the quick dog"},
      {"prompt": "hello", "chosen": " fine", "rejected": " thanks"}])
  pair = to_pair({"prompt": "hello", "chosen": " the quick fox", "rejected": " the quick dog"},
                 tok)
  n = min(len(pair.chosen), len(pair.rejected))
  shared = int(np.argmin(pair.chosen.tokens[:n] == pair.rejected.tokens[:n]))
  assert shared > pair.prompt_length
  batches = build_preference_batches(path, tok, seq_len=32, batch_size=1, max_length=shared)
  assert (batches.stats.examples, batches.stats.dropped_examples) == (1, 1)
  long_enough = build_preference_batches(path, tok, seq_len=32, batch_size=1,
                                         max_length=shared + 1)
  assert (long_enough.stats.examples, long_enough.stats.dropped_examples) == (2, 0)


def test_truncation_names_the_rows_it_cut_and_dropped(tok, tmp_path):
  prompt = "the quick brown fox jumps over a lazy dog hello world"
  rows = [{"prompt": "a", "chosen": " b", "rejected": " c"},
          {"prompt": prompt, "chosen": " five you are fine", "rejected": " six"},
          {"prompt": "a", "chosen": " b", "rejected": " d"}]
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  P = len(tok.encode(prompt))
  batches = build_preference_batches(path, tok, seq_len=P + 16, batch_size=1, max_length=P)
  stats = batches.stats
  assert (stats.examples, stats.truncated_examples, stats.dropped_examples) == (2, 1, 1)
  assert stats.truncated_rows == stats.dropped_rows == [f"{path} row 2"]
  assert stats.truncated_target_tokens == sum(len(tok.encode(c, add_bos=False)) + 1  # + EOS
                                              for c in (" five you are fine", " six"))
  assert describe_truncation(stats, P + 16, max_length=P, max_prompt_length=40) == (
      f"1 of 3 pairs were longer than data.max_length={P} tokens or data.max_prompt_length=40 "
      f"prompt tokens and were cut, losing {stats.truncated_tokens} tokens "
      f"({stats.truncated_target_tokens} of them trained): {path} row 2; 1 of them were "
      f"dropped, left with nothing to train on: {path} row 2; raise data.max_length or "
      "data.max_prompt_length or shorten those rows")
  kto = write_jsonl(tmp_path / "kto.jsonl", [
      {"prompt": prompt, "completion": " five", "label": True}] * 2)
  with pytest.raises(ValueError, match=rf"^No preference items to batch: truncation to {P} tokens "
                     rf"left 2 of the preference items with nothing to train on \({kto} row 1, "
                     r"row 2\)"):
    build_kto_batches(kto, tok, seq_len=P + 16, batch_size=2, max_length=P)
  kept = build_kto_batches(kto, tok, seq_len=P + 1, batch_size=2)
  assert describe_truncation(kept.stats, P + 1).startswith("2 of 2 rows were longer than "
                                                           f"data.seq_len={P + 1} tokens")


def test_conversational_pairs_without_a_chat_template_name_row_and_folder(tmp_path):
  folder = make_tokenizer(tmp_path / "tok", tokenizer_fixtures.corpus(300))
  bare = load_tokenizer(tokenizer_fixtures.remove_chat_template(folder))
  path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, {"prompt": [U], "chosen": "five",
                                                            "rejected": "six"}])
  with pytest.raises(TokenizerError, match=rf"^{path} row 2: the tokenizer in {folder} has no "
                     "chat template, needed for conversational data"):
    build_preference_batches(path, bare, seq_len=32, batch_size=1, on_bad_row="skip")


# -- bad rows ----------------------------------------------------------------------------------

U, A, B = user("two plus three"), assistant("five"), assistant("six")
PAIR_ROWS = [  # (bad row, field, message)
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "rejected",
     "field 'rejected' is identical to 'chosen'"),
    ({"chosen": [U, A], "rejected": [U, A]}, "rejected",
     "field 'rejected' is identical to 'chosen'"),
    ({"prompt": [U], "chosen": "five", "rejected": [A]}, "rejected",
     "field 'rejected' is identical to 'chosen'"),
    ({"prompt": "a", "chosen": "", "rejected": " b"}, "chosen", "field 'chosen' is empty"),
    ({"prompt": "a", "chosen": " b", "rejected": "  "}, "rejected",
     "field 'rejected' is only whitespace"),
    ({"prompt": [U], "chosen": [], "rejected": "b"}, "chosen", "field 'chosen' is empty"),
    ({"prompt": [U], "chosen": [assistant(" ")], "rejected": "b"}, "chosen",
     "field 'chosen' has no text"),
    ({"prompt": "a", "chosen": " b"}, "rejected", "field 'rejected' is missing"),
    ({"chosen": " b", "rejected": " c"}, "prompt", "field 'prompt' is missing"),
    ({"prompt": "a", "chosen": 5, "rejected": " c"}, "chosen",
     "field 'chosen' should be a string, got int"),
    ({"prompt": "a", "chosen": [A], "rejected": " c"}, "chosen",
     "field 'chosen' should be a string, as 'prompt' is, got list"),
    ({"prompt": [U], "chosen": "five", "rejected": 6}, "rejected",
     "field 'rejected' should be a string or a list of assistant messages, got int"),
    ({"prompt": 3, "chosen": " b", "rejected": " c"}, "prompt",
     "field 'prompt' should be a string or a list of messages, got int"),
    ({"prompt": [U], "chosen": [U], "rejected": [B]}, "chosen[0].role",
     "field 'chosen[0].role' should be 'assistant', got 'user'"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role", "field 'prompt[0].role' has unknown role 'robot'"),
    ({"chosen": [U, A], "rejected": [user("other"), B]}, "prompt",
     "field 'prompt' is missing, and 'chosen' and 'rejected' share no first message"),
    ({"chosen": [U, A, U, A], "rejected": [U, B]}, "chosen[2].role",
     "field 'chosen[2].role' should be 'assistant', got 'user'"),
    ({"chosen": [U, A], "rejected": [U, A, B]}, "chosen",
     "field 'chosen' has no message after the prompt"),
    ({"chosen": [U, {"role": "assistant"}], "rejected": [U, B]}, "chosen[1].content",
     "field 'chosen[1].content' is missing"),
]
KTO_ROWS = [
    ({"prompt": "a", "completion": " b", "label": 1}, "label",
     "field 'label' should be a bool (true: desirable, false: undesirable), got int 1"),
    ({"prompt": "a", "completion": " b", "label": "true"}, "label",
     "field 'label' should be a bool (true: desirable, false: undesirable), got str 'true'"),
    ({"prompt": "a", "completion": " b"}, "label", "field 'label' is missing"),
    ({"prompt": "a", "label": True}, "completion", "field 'completion' is missing"),
    ({"prompt": "a", "completion": "", "label": False}, "completion",
     "field 'completion' is empty"),
    ({"prompt": [U], "completion": [U], "label": False}, "completion[0].role",
     "field 'completion[0].role' should be 'assistant', got 'user'"),
]
GOOD_PAIR = {"prompt": "two plus three", "chosen": " five", "rejected": " six"}
GOOD_KTO = {"prompt": "two plus three", "completion": " five", "label": True}


@pytest.mark.parametrize("bad, field, message", PAIR_ROWS)
def test_bad_pair_names_file_row_and_field(tok, tmp_path, bad, field, message):
  path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, "", bad, GOOD_PAIR])
  with pytest.raises(DataError) as e:
    build_preference_batches(path, tok, seq_len=32, batch_size=1)
  assert str(e.value).startswith(f"{path} row 3: {message}")
  assert e.value.field == field


@pytest.mark.parametrize("bad, field, message", KTO_ROWS)
def test_bad_kto_row_names_file_row_and_field(tok, tmp_path, bad, field, message):
  path = write_jsonl(tmp_path / "kto.jsonl", [GOOD_KTO, "", bad, GOOD_KTO])
  with pytest.raises(DataError) as e:
    build_kto_batches(path, tok, seq_len=32, batch_size=2)
  assert str(e.value).startswith(f"{path} row 3: {message}")
  assert e.value.field == field


def test_skip_mode_counts_bad_rows_by_reason(tok, tmp_path):
  path = write_jsonl(tmp_path / "pairs.jsonl", [
      GOOD_PAIR, {"prompt": "a", "chosen": " b", "rejected": " b"}, "{bad",
      {"prompt": "a", "chosen": "", "rejected": " b"}, GOOD_PAIR,
      {"prompt": "a", "chosen": 3, "rejected": " b"}, {"chosen": " b", "rejected": " c"},
      {"chosen": [U, A], "rejected": [U, A]}, GOOD_PAIR])
  batches = build_preference_batches(path, tok, seq_len=32, batch_size=1, on_bad_row="skip")
  assert batches.stats.examples == 3
  assert batches.stats.skipped_rows == {"identical": 2, "invalid_json": 1, "empty": 1,
                                        "wrong_type": 1, "missing_field": 1}
  kto = write_jsonl(tmp_path / "kto.jsonl", [GOOD_KTO, dict(GOOD_KTO, label=0), GOOD_KTO,
                                             dict(GOOD_KTO, completion=" ")])
  kto_batches = build_kto_batches(kto, tok, seq_len=32, batch_size=2, on_bad_row="skip")
  assert kto_batches.stats.skipped_rows == {"wrong_type": 1, "empty": 1}


# -- KTO ---------------------------------------------------------------------------------------


def test_kto_batches_labels_and_mismatched_kl_rows(tok, tmp_path):
  rows = [{"prompt": [user("two plus three")], "completion": "five", "label": True},
          {"prompt": "hello world", "completion": " fine thanks", "label": False},
          {"prompt": [user("how are you")], "completion": [assistant("fine")], "label": True}]
  item = to_unpaired(rows[0], tok)
  assert item.label is True and item.prompt_length == len(
      tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True))
  path = write_jsonl(tmp_path / "kto.jsonl", rows)
  batches = build_kto_batches(path, tok, seq_len=48, batch_size=3, shuffle=False)
  assert (batches.stats.desirable, batches.stats.undesirable) == (2, 1)
  batch = next(batches)
  assert set(batch) == {*KEYS, "label", "index", *(f"kl_{k}" for k in KEYS)}
  assert all(batch[k].shape == (3, 48) for k in batch if k not in ("label", "index"))
  assert batch["label"].dtype == np.int32 and batch["label"].tolist() == [1, 0, 1]

  def prompt(question):
    return tok.apply_chat_template([user(question)], add_generation_prompt=True)

  def chat(question, answer):
    return prompt(question) + answer + END

  assert [real_text(tok, batch, i) for i in range(3)] == [
      chat("two plus three", "five"), "hello world fine thanks<eos>", chat("how are you", "fine")]
  assert [trained_text(tok, batch, i) for i in range(3)] == [
      ["five" + END], [" fine thanks<eos>"], ["fine" + END]]
  # KL row i: row i's prompt, then row (i + 1) mod 3's completion; only the completion trained.
  assert [real_text(tok, batch, i, "kl_") for i in range(3)] == [
      prompt("two plus three") + " fine thanks<eos>", "hello world" + "fine" + END,
      prompt("how are you") + "five" + END]
  assert [runs(tok, batch["kl_targets"][i], batch["kl_loss_mask"][i]) for i in range(3)] == [
      [" fine thanks<eos>"], ["fine" + END], ["five" + END]]
  with pytest.raises(ValueError, match="batch_size >= 2"):
    build_kto_batches(path, tok, seq_len=48, batch_size=1)


def test_kto_partial_batch_pads_and_rotates_among_real_rows(tok, tmp_path):
  rows = [dict(GOOD_KTO, completion=f" {word}") for word in ("five", "six", "seven")]
  path = write_jsonl(tmp_path / "kto.jsonl", rows)
  out = list(build_kto_batches(path, tok, seq_len=24, batch_size=2, shuffle=False, epochs=1,
                               drop_remainder=False))
  assert len(out) == 2
  last = out[1]
  assert real_text(tok, last, 0, "kl_") == real_text(tok, last, 0)  # the only real row
  assert last["label"].tolist() == [1, 0]
  for key in KEYS:
    assert not last[key][1].any() and not last[f"kl_{key}"][1].any(), key


def test_kto_truncation_cuts_prompts_from_the_left(tok, tmp_path):
  rows = [dict(GOOD_KTO, prompt="the quick brown fox jumps", completion=" five"),
          dict(GOOD_KTO, prompt="hello world", completion=" six", label=False)]
  path = write_jsonl(tmp_path / "kto.jsonl", rows)
  batch = next(build_kto_batches(path, tok, seq_len=24, batch_size=2, shuffle=False,
                                 max_prompt_length=2))
  for i, row in enumerate(rows):
    prompt_end = tok.encode(row["prompt"])[-2:]
    assert batch["tokens"][i, :2].tolist() == prompt_end
    assert trained_text(tok, batch, i) == [row["completion"] + "<eos>"]
    assert batch["kl_tokens"][i, :2].tolist() == prompt_end
    assert runs(tok, batch["kl_targets"][i], batch["kl_loss_mask"][i]) == [
        rows[1 - i]["completion"] + "<eos>"]


# -- batches: shuffling and resume -------------------------------------------------------------


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_resume_is_exact_across_epochs(tok, tmp_path, kind):
  train, _ = arithmetic_pref.write_preference_dataset(tmp_path, max_operand=4, num_eval=6,
                                                      seed=1, kind=kind)
  build = build_preference_batches if kind == "paired" else build_kto_batches
  kwargs = dict(seq_len=48, batch_size=4, seed=7)
  batches = build(train, tok, **kwargs)
  assert batches.batches_per_epoch < 7  # the seven batches cross an epoch boundary
  reference = _take(build(train, tok, **kwargs), 7)
  _take(batches, 3)
  saved = json.loads(json.dumps(batches.state()))
  _assert_same(_take(build(train, tok, state=saved, **kwargs), 4), reference[3:])
  late = build(train, tok, **kwargs)
  _take(late, batches.batches_per_epoch)  # at the end of epoch 0
  restored = build(train, tok, **kwargs)
  restored.restore(late.state())
  assert restored.epoch == 1
  _assert_same(_take(restored, 7 - batches.batches_per_epoch),
               reference[batches.batches_per_epoch:])
  assert not np.array_equal(reference[0]["tokens"], reference[batches.batches_per_epoch]["tokens"])
  other_seed = next(build(train, tok, seq_len=48, batch_size=4, seed=8))
  assert not np.array_equal(reference[0]["tokens"], other_seed["tokens"])
  with pytest.raises(ValueError, match="fingerprint"):
    build(train, tok, seq_len=48, batch_size=4, seed=8, state=saved)


def _side(prompt, completion):
  tokens = np.concatenate([prompt, completion])
  return Example(tokens, np.arange(len(tokens)) >= len(prompt))


def _pinned_items(kind):
  """Five pairs or six KTO rows, fixed for good: a test pins their fingerprint."""
  if kind == "paired":
    return [Pair(_side(np.arange(3) + i, [40 + i, 41]), _side(np.arange(3) + i, [50 + i]), 3)
            for i in range(5)]
  return [Unpaired(_side(np.arange(2) + i, [60 + i, 61, 62][:1 + i % 3]), 2, i % 2 == 0)
          for i in range(6)]


@pytest.mark.parametrize("kind, settings, saved, indices", [
    ("paired", dict(collate=pair_batch),
     {"version": 1, "epoch": 1, "batch": 2, "seed": 5, "fingerprint": "ed5277b8e7a0ba0b"},
     [[4, 3], [1, 2], [2, 0], [4, 3]]),
    ("unpaired", dict(collate=kto_batch, shuffle=False, drop_remainder=False, max_length=4,
                      max_prompt_length=1, pad_id=3),
     {"version": 1, "epoch": 1, "batch": 1, "seed": 5, "fingerprint": "8b55886c6f7ebe0b"},
     [[0, 1], [2, 3], [4, 5], [0, 1]]),
])
def test_saved_state_and_fingerprint_are_pinned(kind, settings, saved, indices):
  """A data state saved in a checkpoint by an earlier jaxpost resumes: `state()`, its
  fingerprint and the epoch order are those observed before the epoch machinery was shared
  (`jaxpost.data.epochs`). Never update these values to make the test pass."""
  make = lambda **kw: PreferenceIterator(_pinned_items(kind), batch_size=2, seq_len=8, seed=5,
                                         **settings, **kw)  # noqa: E731
  batches, reference = make(), _take(make(), 5)
  assert [b["index"].tolist() for b in _take(batches, 4)] == indices
  assert batches.state() == saved
  _assert_same(_take(make(state=saved), 1), reference[4:])


def test_epochs_and_final_partial_batch(tok):
  pairs = [to_pair({"prompt": "hello", "chosen": f" {w}", "rejected": " no"}, tok)
           for w in ("a", "b", "c", "d", "e")]
  kept = list(PreferenceIterator(pairs, collate=pair_batch, batch_size=2, seq_len=16, epochs=2,
                                 shuffle=False))
  assert len(kept) == 4
  padded = list(PreferenceIterator(pairs, collate=pair_batch, batch_size=2, seq_len=16,
                                   epochs=1, shuffle=False, drop_remainder=False))
  assert len(padded) == 3 and not padded[2]["segment_ids"][1].any()
  seen = [real_text(tok, b, (i, 0)) for b in padded for i in range(2)
          if b["segment_ids"][i, 0].any()]
  assert seen == [f"hello {w}<eos>" for w in "abcde"]


# -- the arithmetic preference set -------------------------------------------------------------


def test_arithmetic_pairs_are_wrong_plausibly_and_keep_eval_held_out(tmp_path):
  kwargs = dict(max_operand=20, num_eval=30, seed=3)
  train, held_out = arithmetic_pref.make_preference_split(**kwargs)
  sft_train, sft_eval = arithmetic.make_split(**kwargs)
  questions = lambda rows, field: [r[field][0]["content"] for r in rows]  # noqa: E731
  assert questions(held_out, "prompt") == questions(sft_eval, "messages")
  assert questions(train, "prompt") == questions(sft_train, "messages")
  assert not set(questions(train, "prompt")) & set(questions(held_out, "prompt"))
  for r in train + held_out:
    right, wrong = r["chosen"][0]["content"], r["rejected"][0]["content"]
    assert r["chosen"] == [assistant(r["answer"])] and r["rejected"][0]["role"] == "assistant"
    s, w = int(right), int(wrong)
    swapped = right[:-2] + right[-1] + right[-2] if len(right) >= 2 else right
    assert w != s and w >= 0 and (abs(w - s) in (1, 10) or wrong == swapped), (right, wrong)
  assert arithmetic_pref.make_preference_split(**kwargs) == (train, held_out)
  other = arithmetic_pref.make_preference_split(max_operand=20, num_eval=30, seed=4)[0]
  assert [r["rejected"] for r in other] != [r["rejected"] for r in train]
  t_path, e_path = arithmetic_pref.write_preference_dataset(tmp_path, **kwargs)
  assert [json.loads(line) for line in e_path.read_text().splitlines()] == held_out
  assert t_path.name == "paired_train.jsonl"


def test_wrong_answer_candidates():
  rng = random.Random(0)
  assert {arithmetic_pref.wrong_answer("0", rng) for _ in range(50)} == {"1", "10"}
  assert {arithmetic_pref.wrong_answer("42", rng) for _ in range(200)} == {
      "41", "43", "32", "52", "24"}
  assert "04" not in {arithmetic_pref.wrong_answer("40", rng) for _ in range(200)}
  assert {arithmetic_pref.wrong_answer("11", rng) for _ in range(200)} == {"10", "12", "1", "21"}


def test_arithmetic_unpaired_rows_and_batches(tok, tmp_path):
  train, held_out = arithmetic_pref.make_preference_split(max_operand=10, num_eval=10, seed=0,
                                                          kind="unpaired")
  pairs, _ = arithmetic_pref.make_preference_split(max_operand=10, num_eval=10, seed=0)
  assert len(train) == 2 * len(pairs) == 180 and len(held_out) == 20
  by_question = {}
  for r in train:
    by_question.setdefault(r["prompt"][0]["content"], []).append(r)
  for rows in by_question.values():
    assert sorted(r["label"] for r in rows) == [False, True]
    for r in rows:
      assert (r["completion"][0]["content"] == r["answer"]) == r["label"]
  t_path, _ = arithmetic_pref.write_preference_dataset(tmp_path, max_operand=10, num_eval=10,
                                                       kind="unpaired")
  batch = next(build_kto_batches(t_path, tok, seq_len=48, batch_size=4))
  for i in range(4):
    (completion,) = trained_text(tok, batch, i)
    assert completion.endswith(END) and batch["label"][i] in (0, 1)
  p_path, _ = arithmetic_pref.write_preference_dataset(tmp_path, max_operand=10, num_eval=10)
  batches = build_preference_batches(p_path, tok, seq_len=48, batch_size=4)
  assert batches.stats.examples == len(pairs) and batches.stats.dropped_examples == 0
  with pytest.raises(ValueError, match="kind"):
    arithmetic_pref.make_preference_split(kind="triplets")
