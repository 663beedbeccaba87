"""The SFT data pipeline: formats and masks, bad rows, loading, packing, batches and resume."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tokenizer_fixtures
from data_fixtures import (conversation, mixed_rows, runs, sentence, with_template,
                           write_jsonl)
from jaxpost.data import (BatchIterator, DataError, Example, build_sft_batches,
                          describe_truncation, load_rows, make_rows, plan_rows, read_rows,
                          to_example, tokenize_rows, truncate)
from jaxpost.models import ModelConfig, ParamSpec, forward, param_specs
from jaxpost.tiny import make_tokenizer
from jaxpost.tokenizer import TokenizerError, load_tokenizer

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
  return make_tokenizer(tmp_path_factory.mktemp("tok"), tokenizer_fixtures.corpus(300))


@pytest.fixture(scope="module")
def tok(tok_folder):
  return load_tokenizer(tok_folder)


def targets_text(tok, example: Example) -> list[str]:
  return runs(tok, example.tokens, example.loss_mask)


# -- formats and masks --------------------------------------------------------------------------


def test_messages_masks_assistant_turns_with_end_token(tok):
  messages = [{"role": "system", "content": "be helpful"},
              {"role": "user", "content": "what is two plus three"},
              {"role": "assistant", "content": "five"},
              {"role": "user", "content": "thanks"},
              {"role": "assistant", "content": "you are fine"}]
  example = to_example({"messages": messages}, tok, format="messages")
  assert tok.decode(example.tokens) == tok.apply_chat_template(messages)
  assert targets_text(tok, example) == ["five" + END, "you are fine" + END]
  last = to_example({"messages": messages}, tok, format="messages", train_on="last_assistant")
  assert targets_text(tok, last) == ["you are fine" + END]
  every = to_example({"messages": messages}, tok, format="messages", train_on="all")
  assert not every.loss_mask[0] and every.loss_mask[1:].all()


def test_generation_spans_locate_turns_a_prefix_unstable_template_hides(tok_folder, tmp_path):
  messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
              {"role": "user", "content": "more"}, {"role": "assistant", "content": "fine"}]
  plain = load_tokenizer(with_template(tok_folder, tmp_path / "plain", generation=False))
  with pytest.raises(DataError, match="prefix") as e:
    to_example({"messages": messages}, plain, format="messages")
  assert e.value.reason == "chat_template"
  tagged = load_tokenizer(with_template(tok_folder, tmp_path / "tagged", generation=True))
  example = to_example({"messages": messages}, tagged, format="messages")
  assert targets_text(tagged, example) == ["old" + END, "fine" + END]


def test_prompt_completion_masks(tok):
  example = to_example({"prompt": "what is two plus three", "completion": " five"}, tok,
                       format="prompt_completion")
  assert targets_text(tok, example) == [" five<eos>"]
  assert tok.decode(example.tokens) == "what is two plus three five<eos>"
  no_eos = to_example({"prompt": "a", "completion": " five"}, tok, format="prompt_completion",
                      add_eos=False)
  assert targets_text(tok, no_eos) == [" five"]
  chat = to_example({"prompt": [{"role": "user", "content": "two plus three"}],
                     "completion": "five"}, tok, format="prompt_completion")
  assert targets_text(tok, chat) == ["five" + END]
  assert tok.decode(chat.tokens) == (
      "<|im_start|>user\ntwo plus three<|im_end|>\n<|im_start|>assistant\nfive<|im_end|>")
  every = to_example({"prompt": "a b", "completion": " c"}, tok, format="prompt_completion",
                     train_on="all")
  assert every.loss_mask[1:].all()


def test_text_trains_every_token_and_ends_with_eos(tok):
  example = to_example({"text": "hello world"}, tok, format="text")
  assert tok.decode(example.tokens) == "hello world<eos>"
  assert not example.loss_mask[0] and example.loss_mask[1:].all()


def test_train_on_is_checked_per_format(tok):
  with pytest.raises(ValueError, match="train_on='assistant' does not apply"):
    to_example({"text": "hi"}, tok, format="text", train_on="assistant")


# -- bad rows -------------------------------------------------------------------------------------

BAD_ROWS = [  # (line 3 of a file whose line 1 is good and line 2 blank, expected message)
    ({"prompt": "a"}, "field 'completion' is missing"),
    ({"prompt": "a", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "a", "completion": 5}, "field 'completion' should be a string, got int"),
    ({"messages": "hi"}, "field 'messages' should be a list of messages, got str"),
    ({"messages": [{"role": "user", "content": 5}]},
     "field 'messages[0].content' should be a string, got int"),
    ({"messages": [{"role": "robot", "content": "hi"}]},
     "field 'messages[0].role' has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     "field 'messages' gives no token to train on"),
    ('{"prompt": "a", "completion": ', "invalid JSON"),
    ("[1, 2]", "a row should be a JSON object, got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tok, tmp_path, bad, message):
  good = ({"messages": conversation(random.Random(0))} if "messages" in str(bad)
          else {"prompt": "a", "completion": " b"})
  path = write_jsonl(tmp_path / "train.jsonl", [good, "", bad, good])
  with pytest.raises(DataError) as e:
    tokenize_rows(read_rows(path), tok)
  assert str(e.value).startswith(f"{path} row 3: {message}")


def test_invalid_json_and_mixed_types_in_load_rows(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "b"}, "{oops"])
  with pytest.raises(DataError, match=rf"^{path} row 3: invalid JSON"):
    load_rows(path)
  path = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}], "n": 1},
                                            {"messages": [], "n": 2}, {"messages": "x", "n": 3}])
  with pytest.raises(DataError, match=rf"^{path} row 3: field 'messages' has a type"):
    load_rows(path)


def test_skip_mode_counts_bad_rows_by_reason(tok, tmp_path):
  good = {"prompt": "two plus three", "completion": " five"}
  path = write_jsonl(tmp_path / "train.jsonl", [
      good, {"prompt": "a"}, "{bad", {"prompt": "a", "completion": ""}, good,
      {"prompt": 3, "completion": "b"}, good])
  batches = build_sft_batches(path, tok, seq_len=32, batch_size=1, on_bad_row="skip")
  assert batches.stats.examples == 3
  assert batches.stats.skipped_rows == {"missing_field": 1, "invalid_json": 1, "empty": 1,
                                        "wrong_type": 1}


# -- bad files: one error naming the file and row ----------------------------------------------


def test_a_source_without_rows_is_named(tmp_path):
  cases = {"empty.jsonl": ("", "the file is empty"),
           "blank.jsonl": ("\n  \n", "it holds only blank lines"),
           "empty.json": ("[]", "it holds an empty JSON array"),
           "header.csv": ("prompt,completion\n", "it has a header line and no data rows"),
           "empty.csv": ("", "the file is empty")}
  for name, (text, why) in cases.items():
    path = tmp_path / name
    path.write_text(text)
    for read in (read_rows, load_rows):
      with pytest.raises(DataError, match=f"^{path} has no rows: {why}; check the path") as e:
        read(path)
      assert e.value.reason == "no_rows"
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "a.jsonl").write_text("")
  (folder / "b.jsonl").write_text("\n")
  with pytest.raises(DataError, match=rf"^{folder} has no rows: its data files \(a.jsonl, "
                     r"b.jsonl\) hold no rows"):
    read_rows(folder)
  (folder / "c.jsonl").write_text('{"text": "hello"}\n')  # an empty file beside data is fine
  assert [row.where for row in read_rows(folder)] == [f"{folder / 'c.jsonl'} row 1"]
  with pytest.raises(DataError, match=rf"^{folder}: split 'train\[5:\]' selects none of its 1 "
                     "rows"):
    read_rows(folder, split="train[5:]")
  with pytest.raises(DataError, match="^dataset has no rows"):
    read_rows(datasets.Dataset.from_list([]))
  with pytest.raises(DataError, match=rf"^{folder}: split 'test' does not apply to local files "
                     r"\(Unknown split \"test\".*\); they form one split, 'train'"):
    read_rows(folder, split="test")


def test_format_detection_names_file_row_and_fields(tok, tmp_path):
  path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}, {"extra": 1}])
  with pytest.raises(DataError) as e:
    tokenize_rows(read_rows(path), tok)
  message = str(e.value)
  assert message.startswith(f"{path} row 1: cannot tell the data format: no row has a field of "
                            "a known format; this row has the fields 'answer', 'question' (all "
                            "rows together: the fields 'answer', 'extra', 'question')")
  assert ("expected 'messages' (a list of {role, content} messages) for format messages, "
          "'prompt' and 'completion' for prompt_completion, or 'text' for text") in message
  assert "data.format" in message and e.value.reason == "unknown_format"
  # Invalid JSON first: its own error, not an empty list of fields.
  path = write_jsonl(tmp_path / "eval.jsonl", ['{"prompt": "a", ', '{"prompt": "a", '])
  for mode in ("error", "skip"):
    with pytest.raises(DataError, match=rf"^{path} row 1: invalid JSON: Expecting property name"):
      tokenize_rows(read_rows(path), tok, on_bad_row=mode)
  pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
  with pytest.raises(DataError, match=rf"^{pairs} row 1: this row has the fields 'chosen', "
                     "'prompt', 'rejected': preference pairs, not SFT data; train them with a "
                     r"preference algorithm \(e.g. algorithm=dpo\)"):
    tokenize_rows(read_rows(pairs), tok)
  path = write_jsonl(tmp_path / "mixed.jsonl", ["{oops", {"question": "a"}])
  with pytest.raises(DataError, match=rf"^{path} row 2: cannot tell the data format.*; also, "
                     rf"{path} row 1: invalid JSON"):
    tokenize_rows(read_rows(path), tok)


def test_non_utf8_bytes_name_file_and_row(tok, tmp_path):
  good = json.dumps({"prompt": "a", "completion": " b"}).encode()
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "completion": " b"}\n' + good + b"\n")
  with pytest.raises(DataError, match=rf"^{path} row 2: not valid UTF-8: byte 0xe9 at column 16; "
                     "the data file must be UTF-8") as e:
    build_sft_batches(path, tok, seq_len=32, batch_size=1)
  assert e.value.reason == "encoding"
  skipped = build_sft_batches(path, tok, seq_len=32, batch_size=1, on_bad_row="skip")
  assert skipped.stats.skipped_rows == {"encoding": 1} and skipped.stats.examples == 2
  array = tmp_path / "latin1.json"
  array.write_bytes(b'[{"prompt": "a", "completion": " b"},\n {"prompt": "caf\xe9"}]')
  with pytest.raises(DataError, match=rf"^{array} line 2: not valid UTF-8: byte 0xe9 at column "
                     "17; the data file must be UTF-8"):
    read_rows(array)
  table = tmp_path / "latin1.csv"
  table.write_bytes(b"prompt,completion\na,b\ncaf\xe9,b\n")
  with pytest.raises(DataError, match=rf"^{table} line 3: not valid UTF-8: byte 0xe9 at column 4"):
    read_rows(table)
  bom = tmp_path / "bom.jsonl"  # a UTF-8 byte-order mark is fine
  bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
  assert read_rows(bom)[0].data == {"prompt": "a", "completion": " b"}


def test_unreadable_json_array_and_parquet_name_the_file(tmp_path):
  array = tmp_path / "pretty.json"
  array.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
  with pytest.raises(DataError, match=rf"^{array} line 3: invalid JSON: .*one JSON array"):
    read_rows(array)
  number = tmp_path / "number.json"
  number.write_text("5")
  with pytest.raises(DataError, match=rf"^{number}: a JSON data file should hold an array of "
                     r"objects, got int; write \[\{\.\.\.\}"):
    read_rows(number)
  parquet = tmp_path / "broken.parquet"
  parquet.write_bytes(b"not a parquet file at all")
  with pytest.raises(DataError, match=rf"^{parquet}: cannot read it as a parquet file "
                     r"\(ArrowInvalid: .*\); check that it is a complete parquet file") as e:
    read_rows(parquet)
  assert e.value.reason == "unreadable_file"


def test_conversations_without_a_chat_template_name_the_tokenizer_folder(tok_folder, tmp_path):
  folder = tmp_path / "no_template"
  shutil.copytree(tok_folder, folder)
  bare = load_tokenizer(tokenizer_fixtures.remove_chat_template(folder))
  path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "completion": " b"},
                                               {"messages": conversation(random.Random(0))}])
  for mode in ("error", "skip"):  # never skipped: every conversation would be lost
    with pytest.raises(TokenizerError) as e:
      tokenize_rows(read_rows(path), bare, format="messages", on_bad_row=mode)
    assert str(e.value) == (
        f"{path} row 1: the tokenizer in {folder} has no chat template, needed for "
        "conversational data (a 'messages' list, or a 'prompt' that is a list of messages): add "
        f"chat_template.jinja to {folder} or a \"chat_template\" to its tokenizer_config.json "
        "(e.g. the instruct model's), or use plain-text data: string prompts with format "
        "prompt_completion, or format text.")
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [
      {"prompt": "a", "completion": " b"},  # plain text needs no template
      {"prompt": [{"role": "user", "content": "a"}], "completion": "b"}])
  with pytest.raises(TokenizerError, match=rf"^{prompts} row 2: the tokenizer in {folder} has no "
                     "chat template"):
    tokenize_rows(read_rows(prompts), bare)
  assert len(tokenize_rows(read_rows(prompts)[:1], bare).examples) == 1


def test_nothing_left_to_batch_says_why(tok, tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"prompt": "a"}, {"prompt": "a"}])
  with pytest.raises(ValueError, match=r"^No examples to batch: 3 rows were skipped as bad "
                     r"\(invalid_json 1, missing_field 2; on_bad_row='error' names the first\)"):
    build_sft_batches(path, tok, seq_len=32, batch_size=1, on_bad_row="skip")
  long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the quick brown fox " * 5,
                                                "completion": " five"}] * 2)
  with pytest.raises(ValueError, match=rf"^No examples to batch: truncation to 8 tokens left 2 "
                     rf"of the examples with nothing to train on \({long} row 1, row 2\); raise "
                     "data.seq_len"):
    build_sft_batches(long, tok, seq_len=8, batch_size=1)
  few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "a", "completion": " b"}])
  with pytest.raises(ValueError, match=rf"^Epoch 0 has 1 rows of 32 tokens \(from {few}\), "
                     "fewer than batch_size=2; lower batch_size, add data"):
    build_sft_batches(few, tok, seq_len=32, batch_size=2)


# -- loading ----------------------------------------------------------------------------------


def test_csv_and_parquet_load_and_name_data_rows(tok, tmp_path):
  rows = mixed_rows(6)
  rows[4]["completion"] = None  # an empty csv cell / a null parquet value
  for suffix in ("csv", "parquet"):
    path = tmp_path / f"train.{suffix}"
    getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path))
    loaded = load_rows(path)
    assert loaded.num_rows == 6 and loaded[0] == rows[0]
    with pytest.raises(DataError, match=rf"^{path} row 5: field 'completion' is missing"):
      build_sft_batches(path, tok, seq_len=64, batch_size=2)
    batches = build_sft_batches(path, tok, seq_len=64, batch_size=2, on_bad_row="skip")
    assert batches.stats.examples == 5 and next(batches)["tokens"].shape == (2, 64)


def test_parquet_folder_of_conversations(tok, tmp_path):
  rng = random.Random(1)
  folder = tmp_path / "chats"
  folder.mkdir()
  for part in range(2):
    rows = [{"messages": conversation(rng)} for _ in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / f"part{part}.parquet"))
  assert load_rows(folder).num_rows == 6
  tokenized = tokenize_rows(read_rows(folder), tok)
  assert tokenized.format == "messages" and len(tokenized.examples) == 6
  assert read_rows(folder)[3].where == f"{folder / 'part1.parquet'} row 1"


def test_json_array_split_slices_and_in_memory_datasets(tok, tmp_path):
  rows = mixed_rows(5)
  path = tmp_path / "train.json"
  path.write_text(json.dumps(rows[:4] + [{"prompt": "a", "completion": ""}]))
  assert [r.data for r in read_rows(path, split="train[:3]")] == rows[:3]
  assert load_rows(path, split="train[1:3]").to_list() == rows[1:3]
  with pytest.raises(DataError, match=rf"^{path} row 5: field 'completion' is empty"):
    tokenize_rows(read_rows(path), tok)
  batches = build_sft_batches(datasets.Dataset.from_list(rows), tok, seq_len=64, batch_size=1,
                              shuffle=False, pack=False)
  first = next(batches)
  assert tok.decode(first["tokens"][0][first["segment_ids"][0] == 1]) == (
      rows[0]["prompt"] + rows[0]["completion"] + "<eos>")


# -- packing ----------------------------------------------------------------------------------


def test_packed_row_layout():
  a = Example(np.array([10, 11, 12]), np.array([False, True, True]))
  b = Example(np.array([20, 21, 22, 23]), np.array([False, False, True, True]))
  c = Example(np.array([30, 31]), np.array([False, True]))
  plan = plan_rows([3, 4, 2], [0, 1, 2], 8)
  assert plan == [[0, 1], [2]]
  rows = make_rows([a, b, c], plan, 8, pad_id=0)
  np.testing.assert_array_equal(rows["tokens"][0], [10, 11, 12, 20, 21, 22, 23, 0])
  np.testing.assert_array_equal(rows["targets"][0], [11, 12, 0, 21, 22, 23, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"][0], [1, 1, 0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows["segment_ids"][1], [1, 1, 0, 0, 0, 0, 0, 0])
  assert plan_rows([3, 4, 2], [0, 1, 2], 8, pack=False) == [[0], [1], [2]]
  assert {k: v.dtype for k, v in rows.items()} == {
      "tokens": np.int32, "targets": np.int32, "loss_mask": np.bool_, "segment_ids": np.int32,
      "positions": np.int32}
  indexed = make_rows([a, b, c], plan, 8, pad_id=0, example_index=True)
  np.testing.assert_array_equal(indexed["example_index"],
                                [[0, 0, 0, 1, 1, 1, 1, -1], [2, 2, -1, -1, -1, -1, -1, -1]])


def test_truncation_counts_and_drops_examples_left_without_targets():
  long = Example(np.arange(10), np.arange(10) >= 2)     # 8 targets
  prompt_only = Example(np.arange(9), np.arange(9) >= 7)  # targets beyond 6 tokens
  short = Example(np.arange(4), np.arange(4) >= 1)
  kept, stats = truncate([long, prompt_only, short], 6)
  assert [len(e) for e in kept] == [6, 4]
  assert (stats.truncated_examples, stats.truncated_tokens, stats.dropped_examples) == (2, 7, 1)
  batches = BatchIterator([long, prompt_only, short], batch_size=1, seq_len=8, max_length=None)
  assert (batches.stats.truncated_examples, batches.stats.truncated_tokens) == (2, 3)


def test_truncation_names_the_rows_it_cut_and_dropped(tok, tmp_path):
  long_answer = {"prompt": "a", "completion": " the quick brown fox jumps over a lazy dog"}
  long_prompt = {"prompt": "the quick brown fox jumps over a lazy dog hello", "completion": " b"}
  short = {"prompt": "a", "completion": " b"}
  rows = [short, long_answer, long_prompt, short, long_answer, long_answer, long_prompt,
          long_answer]
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  seq_len = 8
  batches = build_sft_batches(path, tok, seq_len=seq_len, batch_size=1)
  stats = batches.stats
  assert (stats.examples, stats.truncated_examples, stats.dropped_examples) == (6, 6, 2)
  assert stats.truncated_rows == [f"{path} row {n}" for n in (2, 3, 5)]
  assert stats.dropped_rows == [f"{path} row {n}" for n in (3, 7)]
  examples = tokenize_rows(read_rows(path), tok).examples
  lost = [e for e in examples if len(e) > seq_len]
  assert stats.truncated_tokens == sum(len(e) - seq_len for e in lost)
  assert stats.truncated_target_tokens == sum(int(e.loss_mask[seq_len:].sum()) for e in lost)
  assert describe_truncation(stats, seq_len) == (
      f"6 of 8 examples were longer than data.seq_len=8 tokens and were cut, losing "
      f"{stats.truncated_tokens} tokens ({stats.truncated_target_tokens} of them trained): "
      f"{path} row 2, row 3, row 5, ...; 2 of them were dropped, left with nothing to train on: "
      f"{path} row 3, row 7; raise data.seq_len or shorten those rows")
  assert describe_truncation(stats, 64, max_length=seq_len).startswith(
      "6 of 8 examples were longer than data.max_length=8 tokens")
  assert describe_truncation(build_sft_batches(path, tok, seq_len=64, batch_size=1).stats,
                             64) is None
  # Without origins (plain Examples), the stats name the examples' indices.
  kept, cut = truncate([Example(np.arange(10), np.arange(10) >= 2)] * 2, 6)
  assert cut.truncated_rows == ("example 0", "example 1") and len(kept) == 2


def test_where_changes_neither_fingerprint_nor_batches():
  plain = _pinned_examples()
  located = [dataclasses.replace(e, where=f"x.jsonl row {i}") for i, e in enumerate(plain)]
  a = BatchIterator(plain, batch_size=2, seq_len=12, seed=5)
  b = BatchIterator(located, batch_size=2, seq_len=12, seed=5)
  assert a.fingerprint == b.fingerprint == "29025793b873e464"
  _assert_same(_take(a, 3), _take(b, 3))


def _random_params(config, std=0.2):
  """Random parameters made with numpy (compiling `init_params` costs seconds on 2 cores).

  A larger std than `init_params`' 0.02 makes attention sharp, so a leak across packed
  examples would move the losses far beyond the tolerance.
  """
  rng = np.random.default_rng(0)
  make = {"normal": lambda shape: rng.normal(0.0, std, shape), "zeros": np.zeros,
          "ones": np.ones}
  return jax.tree.map(lambda spec: make[spec.init](spec.shape).astype(np.float32),
                      param_specs(config), is_leaf=lambda x: isinstance(x, ParamSpec))


def _model_losses(vocab_size):
  config = ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
  params = _random_params(config)

  @jax.jit
  def token_losses(params, batch):
    logits = forward(config, params, batch["tokens"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"]).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.where(batch["loss_mask"], nll, 0.0)

  return lambda batch: np.asarray(token_losses(params, batch))


def test_packed_example_loss_equals_its_loss_alone(tok):
  rng = random.Random(2)
  rows = [{"messages": conversation(rng, turns=1)} for _ in range(2)]
  rows.append({"prompt": sentence(rng), "completion": " " + sentence(rng)})
  examples = [to_example(r, tok, format="messages" if "messages" in r else "prompt_completion")
              for r in rows]
  seq_len = sum(len(e) for e in examples) + 3
  packed = BatchIterator(examples, batch_size=3, seq_len=seq_len, shuffle=False,
                         drop_remainder=False)
  alone = BatchIterator(examples, batch_size=3, seq_len=seq_len, shuffle=False, pack=False)
  packed_batch, alone_batch = next(packed), next(alone)
  assert packed_batch["segment_ids"][0].max() == 3 and packed_batch["segment_ids"][1:].max() == 0
  losses = _model_losses(tok.vocab_size)
  packed_loss, alone_loss = losses(packed_batch), losses(alone_batch)
  for i, example in enumerate(examples):
    in_row = packed_batch["segment_ids"][0] == i + 1
    n = len(example)
    assert packed_batch["loss_mask"][0][in_row].sum() == example.num_targets > 0
    np.testing.assert_allclose(packed_loss[0][in_row], alone_loss[i][:n], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(alone_batch["loss_mask"][i][:n], example.loss_mask.tolist()[1:] +
                                  [False])
  leaky = dict(packed_batch, segment_ids=np.minimum(packed_batch["segment_ids"], 1))
  assert np.abs(losses(leaky) - packed_loss).max() > 1e-2  # the test can see a leak


# -- batches: shuffling and resume --------------------------------------------------------------


@pytest.fixture(scope="module")
def train_file(tok, tmp_path_factory):
  return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", mixed_rows(40))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_shuffling_is_deterministic_by_seed_and_epoch(tok, train_file):
  kwargs = dict(seq_len=48, batch_size=2, epochs=2)
  first = list(build_sft_batches(train_file, tok, seed=3, **kwargs))
  _assert_same(first, list(build_sft_batches(train_file, tok, seed=3, **kwargs)))
  other = list(build_sft_batches(train_file, tok, seed=4, **kwargs))
  assert not np.array_equal(first[0]["tokens"], other[0]["tokens"])
  per_epoch = build_sft_batches(train_file, tok, seed=3, **kwargs).batches_in_epoch(0)
  assert not np.array_equal(first[0]["tokens"], first[per_epoch]["tokens"])
  unshuffled = build_sft_batches(train_file, tok, seq_len=48, batch_size=1, shuffle=False,
                                 pack=False)
  first_row = next(unshuffled)
  n = int(first_row["segment_ids"][0].sum())
  assert tok.decode(first_row["tokens"][0][:n]).startswith(mixed_rows(1)[0]["prompt"])


def test_resume_is_exact_across_epochs(tok, train_file):
  kwargs = dict(seq_len=64, batch_size=8, seed=7)
  batches = build_sft_batches(train_file, tok, **kwargs)
  assert batches.batches_in_epoch(0) < 7  # the seven batches cross an epoch boundary
  reference = _take(build_sft_batches(train_file, tok, **kwargs), 7)
  _take(batches, 3)
  saved = json.loads(json.dumps(batches.state()))
  resumed = build_sft_batches(train_file, tok, state=saved, **kwargs)
  _assert_same(_take(resumed, 4), reference[3:])
  late = build_sft_batches(train_file, tok, **kwargs)
  _take(late, 5)
  restored = build_sft_batches(train_file, tok, **kwargs)
  restored.restore(late.state())
  _assert_same(_take(restored, 2), reference[5:])
  with pytest.raises(ValueError, match="fingerprint"):
    build_sft_batches(train_file, tok, seq_len=64, batch_size=8, seed=8, state=saved)


def _pinned_examples():
  """Seven examples of 3..9 tokens, fixed for good: a test pins their fingerprint."""
  return [Example(np.arange(n) + 10 * n, np.arange(n) % 2 == 1) for n in range(3, 10)]


@pytest.mark.parametrize("settings, saved, first_tokens", [
    (dict(pack=True),
     {"version": 1, "epoch": 1, "batch": 2, "seed": 5, "fingerprint": "29025793b873e464"},
     [[40, 50], [90, 80], [70, 30], [80, 60]]),
    (dict(pack=False, shuffle=False, drop_remainder=False, max_length=6, pad_id=2),
     {"version": 1, "epoch": 0, "batch": 4, "seed": 5, "fingerprint": "96cc6360db9a9c90"},
     [[30, 40], [50, 60], [70, 80], [90, 2]]),
])
def test_saved_state_and_fingerprint_are_pinned(settings, saved, first_tokens):
  """A data state saved in a checkpoint by an earlier jaxpost resumes: `state()`, its
  fingerprint and the epoch order are those observed before the epoch machinery was shared
  (`jaxpost.data.epochs`). Never update these values to make the test pass."""
  make = lambda **kw: BatchIterator(_pinned_examples(), batch_size=2, seq_len=12, seed=5,
                                    **settings, **kw)  # noqa: E731
  batches, reference = make(), _take(make(), 5)
  assert [b["tokens"][:, 0].tolist() for b in _take(batches, 4)] == first_tokens
  assert batches.state() == saved
  _assert_same(_take(make(state=saved), 1), reference[4:])


def test_batch_shapes_stats_and_final_partial_batch(tok, train_file):
  batches = build_sft_batches(train_file, tok, seq_len=64, batch_size=3, epochs=1,
                              shuffle=False, drop_remainder=False)
  stats = batches.stats
  out = list(batches)
  assert len(out) == stats.batches_per_epoch == -(-stats.rows_per_epoch // 3)
  assert all(b[k].shape == (3, 64) for b in out for k in b)
  segments = np.concatenate([b["segment_ids"] for b in out])
  assert (segments != 0).sum() == stats.tokens and stats.examples == 40
  assert stats.packing_efficiency == pytest.approx(stats.tokens / (stats.rows_per_epoch * 64))
  assert sum(int(b["loss_mask"].sum()) for b in out) == stats.target_tokens
  padding_rows = 3 * len(out) - stats.rows_per_epoch
  assert (out[-1]["segment_ids"][3 - padding_rows:] == 0).all()
