"""Tests of jaxpost.tokenizer: loading, ids against transformers, special tokens, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from jaxpost.tokenizer import (HFTokenizer, SentencePieceTokenizer, TokenizerConfig,
                               TokenizerError, load_tokenizer)
import tokenizer_fixtures as fx

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the network

TEXTS = [
    "hello world",
    "Hello, how are you? I'm fine: 1234 5678!",
    "café 日本語 🙂 1234",
    "a\n\nb  c\t d",
    "",
    "<start_of_turn>user\nhello world<end_of_turn>\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "[INST] what is two plus three? [/INST]",
    "<|tool|>hello<extra> world and hi <|tool|> there",
    "x<think>y</think>",
    "<start_of_image> look",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("tokenizers")
  return {
      "gemma": fx.make_sentencepiece(root / "gemma", "gemma"),
      "llama2": fx.make_sentencepiece(root / "llama2", "llama"),
      "llama3": fx.make_hf_bpe(root / "llama3", "llama3"),
      "qwen": fx.make_hf_bpe(root / "qwen", "qwen"),
      "mistral": fx.make_hf_bpe(root / "mistral", "mistral"),
  }


@pytest.fixture(scope="module")
def hf_tokenizers(folders: dict[str, Path]) -> dict[str, object]:
  pytest.importorskip("transformers")
  return {name: fx.transformers_tokenizer(folder) for name, folder in folders.items()}


def _copy(folder: Path, to: Path, **config_updates: object) -> Path:
  shutil.copytree(folder, to)
  config_path = to / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  for key, value in config_updates.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  config_path.write_text(json.dumps(config))
  return to


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_load_picks_the_tokenizer_kind(folders: dict[str, Path], tmp_path: Path) -> None:
  assert isinstance(load_tokenizer(folders["gemma"]), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(folders["llama3"]), HFTokenizer)
  # Direct file paths; the config files are read from the file's folder.
  tok = load_tokenizer(folders["gemma"] / "tokenizer.model")
  assert isinstance(tok, SentencePieceTokenizer) and tok.bos_id == 2
  tok = load_tokenizer(str(folders["qwen"] / "tokenizer.json"))
  assert isinstance(tok, HFTokenizer) and tok.eos_id == tok.token_to_id("<|im_end|>")
  # tokenizer.json is preferred when a folder has both.
  both = shutil.copytree(folders["llama3"], tmp_path / "both")
  shutil.copy(folders["gemma"] / "tokenizer.model", both / "tokenizer.model")
  assert isinstance(load_tokenizer(both), HFTokenizer)
  # Any single *.model file works too (e.g. T5's spiece.model).
  spiece = tmp_path / "spiece"
  spiece.mkdir()
  shutil.copy(folders["gemma"] / "tokenizer.model", spiece / "spiece.model")
  assert isinstance(load_tokenizer(spiece), SentencePieceTokenizer)


def test_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="No tokenizer found in .*expected tokenizer.json"):
    load_tokenizer(tmp_path)


def test_pickled_tokenizer_is_never_loaded(tmp_path: Path) -> None:
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  (tmp_path / "tokenizer.bin").write_bytes(b"\x80\x04")
  with pytest.raises(FileNotFoundError) as info:
    load_tokenizer(tmp_path)
  message = str(info.value)
  assert str(tmp_path) in message and "tokenizer.model" in message
  assert "pytorch_model.bin" in message and "never loaded" in message
  with pytest.raises(ValueError, match="Pickled tokenizers are never loaded"):
    load_tokenizer(tmp_path / "tokenizer.bin")


def test_missing_path_and_bad_files(tmp_path: Path) -> None:
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="Cannot read the Hugging Face tokenizer file"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="Cannot load .*tokenizer_config.json as a tokenizer"):
    load_tokenizer(tmp_path / "tokenizer_config.json")


# ------------------------------------------------------------------------------------------------
# Round trips and special tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "llama2", "llama3", "qwen", "mistral"])
def test_round_trip(folders: dict[str, Path], name: str) -> None:
  tok = load_tokenizer(folders[name])
  for text in [*TEXTS, " leading space", "  two", " "]:
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text, (name, text, ids)
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_sentencepiece_special_and_added_tokens(folders: dict[str, Path]) -> None:
  tok = load_tokenizer(folders["gemma"])
  sp = spm.SentencePieceProcessor(model_file=str(folders["gemma"] / "tokenizer.model"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
  assert tok.eos_ids == (1, 5)  # eos, then generation_config's <end_of_turn>
  assert tok.special_tokens == {"<bos>": 2, "<eos>": 1, "<pad>": 0, "<unk>": 3,
                                "<start_of_turn>": 4, "<end_of_turn>": 5, "<start_of_image>": 400}
  assert tok.named_special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>",
                                      "pad_token": "<pad>", "unk_token": "<unk>"}
  # An added token beyond the sentencepiece vocabulary.
  assert sp.get_piece_size() == 400 and tok.vocab_size == 401
  assert tok.token_to_id("<start_of_image>") == 400 and tok.id_to_token(400) == "<start_of_image>"
  assert tok.encode("<start_of_image>", add_bos=False) == [400]
  assert tok.token_to_id("<start_of_turn>") == 4 and tok.id_to_token(1) == "<eos>"
  assert tok.token_to_id("not a piece") is None and tok.id_to_token(10_000) is None
  # Special tokens written in the text are their ids (sentencepiece alone spells them out).
  assert tok.encode("<bos>hi", add_bos=False)[0] == 2 and sp.encode("<bos>hi")[0] != 2
  # Plain text is exactly sentencepiece's.
  for text in TEXTS[:5]:
    assert tok.encode(text, add_bos=False) == sp.encode(text)
  ids = tok.encode("<start_of_turn>user\nhi<end_of_turn><eos>", add_bos=True)
  assert ids[:2] == [2, 4] and ids[-2:] == [5, 1]
  assert tok.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn><eos>"
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_sentencepiece_non_special_added_token(folders: dict[str, Path]) -> None:
  tok = load_tokenizer(folders["llama2"])
  assert tok.added_tokens == {"<|tool|>": 400, "<extra>": 401, "<s>": 1, "</s>": 2, "<unk>": 0}
  assert "<extra>" not in tok.special_tokens and tok.special_tokens["<|tool|>"] == 400
  ids = tok.encode("<|tool|>hi<extra>", add_bos=True)
  assert ids[:2] == [1, 400] and ids[-1] == 401
  assert tok.decode(ids, skip_special_tokens=True) == "hi<extra>"


def test_hf_special_tokens(folders: dict[str, Path]) -> None:
  tok = load_tokenizer(folders["llama3"])
  bos, eot, eot_text = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>",
                                                       "<|end_of_text|>"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eot, None)
  assert tok.eos_ids == (eot, eot_text)
  assert set(fx.HF_SPECIAL_TOKENS) == set(tok.special_tokens)
  assert tok.added_tokens["<think>"] == 412 and "<think>" not in tok.special_tokens
  qwen = load_tokenizer(folders["qwen"])
  assert qwen.bos_id is None and qwen.pad_id == qwen.token_to_id("<|endoftext|>")
  # Mistral's config names <unk>, which the file lacks: it is added, as transformers does.
  mistral = load_tokenizer(folders["mistral"])
  assert mistral.unk_id == mistral.vocab_size - 1 == 413


def test_bos_is_inferred_from_the_post_processor(folders: dict[str, Path], tmp_path: Path) -> None:
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(folders["llama3"] / "tokenizer.json", bare / "tokenizer.json")
  tok = load_tokenizer(bare)
  assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") and tok.eos_id is None
  assert tok.encode("hi") == [tok.bos_id, *tok.encode("hi", add_bos=False)]
  assert tok.eos_ids == ()


# ------------------------------------------------------------------------------------------------
# BOS / EOS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "llama2", "llama3", "mistral"])
def test_add_bos(folders: dict[str, Path], name: str) -> None:
  tok = load_tokenizer(folders[name])
  plain = tok.encode("hello world", add_bos=False)
  assert tok.add_bos_default
  assert tok.encode("hello world") == [tok.bos_id, *plain]
  assert tok.encode("hello world", add_bos=True) == [tok.bos_id, *plain]
  assert tok.encode("hello world", add_eos=True) == [tok.bos_id, *plain, tok.eos_id]
  # Never twice: a text that starts with the BOS token (a rendered chat, say) gets no other.
  with_bos = tok.encode(tok.id_to_token(tok.bos_id) + "hello world")
  assert with_bos[0] == tok.bos_id and with_bos[1] != tok.bos_id
  assert with_bos == tok.encode(tok.id_to_token(tok.bos_id) + "hello world", add_bos=False)
  eos = tok.id_to_token(tok.eos_id)
  assert tok.encode("hi" + eos, add_eos=True)[-2:] != [tok.eos_id, tok.eos_id]


def test_no_bos_tokenizer(folders: dict[str, Path]) -> None:
  tok = load_tokenizer(folders["qwen"])
  assert not tok.add_bos_default
  assert tok.encode("hello") == tok.encode("hello", add_bos=False)
  with pytest.raises(ValueError, match="no BOS token"):
    tok.encode("hello", add_bos=True)
  assert tok.encode("hello", add_eos=None) == tok.encode("hello")  # add_eos_token not set


def test_add_bos_token_in_config(folders: dict[str, Path], tmp_path: Path) -> None:
  # With a tokenizer.json its post-processor decides and the config's add_bos_token /
  # add_eos_token are ignored (transformers 5 drops them too); sentencepiece follows them.
  hf = _copy(folders["llama3"], tmp_path / "hf", add_bos_token=False, add_eos_token=True)
  tok = load_tokenizer(hf)
  plain = tok.encode("hi", add_bos=False)
  assert tok.encode("hi", add_eos=None) == [tok.bos_id, *plain]
  sp = _copy(folders["gemma"], tmp_path / "sp", add_bos_token=False, add_eos_token=True)
  tok = load_tokenizer(sp)
  plain = tok.encode("hi", add_bos=False)
  assert tok.encode("hi", add_eos=None) == [*plain, tok.eos_id]
  assert tok.encode("hi") == plain  # add_eos=False unless asked for
  # Not given: no BOS (transformers 5's GemmaTokenizer and LlamaTokenizer agree).
  sp_default = _copy(folders["gemma"], tmp_path / "sp_default", add_bos_token=None)
  assert load_tokenizer(sp_default).encode("hi") == plain
  pytest.importorskip("transformers")
  assert fx.transformers_tokenizer(hf).encode("hi") == load_tokenizer(hf).encode("hi", add_eos=None)
  assert fx.transformers_tokenizer(sp).encode("hi") == load_tokenizer(sp).encode("hi", add_eos=None)
  assert fx.transformers_tokenizer(sp_default).encode("hi") == plain


# ------------------------------------------------------------------------------------------------
# Against transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "llama2", "llama3", "qwen", "mistral"])
def test_ids_match_transformers(folders: dict[str, Path], hf_tokenizers: dict[str, object],
                                name: str) -> None:
  # transformers 5 loads a sentencepiece-only folder (GemmaTokenizer, LlamaTokenizer) by
  # converting the .model file to a `tokenizers` tokenizer; that is the reference here.
  tok, ref = load_tokenizer(folders[name]), hf_tokenizers[name]
  for text in TEXTS:
    assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False), text
    assert tok.encode(text) == ref.encode(text), text
    ids = tok.encode(text)
    for skip in (False, True):
      expected = ref.decode(ids, skip_special_tokens=skip)
      if name == "llama2" and not skip:
        # transformers keeps the dummy-prefix space after a leading BOS ("<s> hello");
        # jaxpost drops it, so that decode(encode(text)) == BOS + text.
        expected = expected.replace("<s> ", "<s>", 1)
      assert tok.decode(ids, skip_special_tokens=skip) == expected, (text, skip)
  assert tok.bos_id == ref.bos_token_id and tok.eos_id == ref.eos_token_id
  assert tok.pad_id == ref.pad_token_id
  if name != "gemma":  # GemmaTokenizer adds a "<mask>" token of its own
    assert tok.vocab_size == len(ref)


def test_double_bos_is_the_one_deliberate_difference(folders: dict[str, Path],
                                                     hf_tokenizers: dict[str, object]) -> None:
  tok, ref = load_tokenizer(folders["llama3"]), hf_tokenizers["llama3"]
  text = "<|begin_of_text|>hello"
  assert ref.encode(text)[:2] == [tok.bos_id, tok.bos_id]  # transformers doubles it
  assert tok.encode(text) == ref.encode(text)[1:]


def test_sentencepiece_dummy_prefix_and_leading_space(folders: dict[str, Path],
                                                      hf_tokenizers: dict[str, object]) -> None:
  # The Llama-2-style model adds a dummy prefix "▁". For a text that starts with a space,
  # sentencepiece (and Llama 2's original tokenizer) still adds it: " hi" -> "▁", "▁hi".
  # transformers 5's LlamaTokenizer (Metaspace, prepend_scheme="first") does not. jaxpost
  # follows sentencepiece, so these ids differ from transformers' by that one "▁" token.
  tok, ref = load_tokenizer(folders["llama2"]), hf_tokenizers["llama2"]
  sp = spm.SentencePieceProcessor(model_file=str(folders["llama2"] / "tokenizer.model"))
  for text in [" hello world", "  two  spaces "]:
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.encode(text, add_bos=False)[1:] == ref.encode(text, add_special_tokens=False)
  # After an added token, no dummy prefix (legacy=False), as in transformers.
  ids = tok.encode("<|tool|>hello", add_bos=False)
  assert tok.id_to_token(sp.encode("hello")[0]).startswith("▁")
  assert ids[0] == 400 and not tok.id_to_token(ids[1]).startswith("▁")
  assert ids == ref.encode("<|tool|>hello", add_special_tokens=False)


def test_sentencepiece_legacy_encodes_each_piece_alone(folders: dict[str, Path],
                                                       tmp_path: Path) -> None:
  folder = _copy(folders["llama2"], tmp_path / "legacy", legacy=True)
  tok = load_tokenizer(folder)
  sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
  text = "hi <|tool|>hello<extra> world"
  assert tok.encode(text, add_bos=False) == [*sp.encode("hi "), 400, *sp.encode("hello"), 401,
                                             *sp.encode(" world")]
  assert tok.decode(tok.encode(text)) == "<s>" + text
  transformers = pytest.importorskip("transformers")
  # transformers' own sentencepiece backend (legacy) splits added tokens and encodes each
  # piece with sentencepiece in the same way.
  ref = transformers.tokenization_utils_sentencepiece.SentencePieceBackend.from_pretrained(
      str(folder))
  for text in ["<|tool|>hello<extra> world", "hello world", "a<|tool|>b"]:
    assert tok.encode(text, add_bos=False) == ref.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# Config files
# ------------------------------------------------------------------------------------------------


def test_chat_template_sources(folders: dict[str, Path], tmp_path: Path) -> None:
  folder = _copy(folders["qwen"], tmp_path / "list", chat_template=[
      {"name": "default", "template": "D{{ messages[0].content }}"},
      {"name": "tool_use", "template": "T{{ tools | length }}"}])
  tok = load_tokenizer(folder)
  messages = [{"role": "user", "content": "x"}]
  assert tok.chat_template == "D{{ messages[0].content }}"
  assert tok.apply_chat_template(messages) == "Dx"
  assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "T1"
  assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "T0"
  assert tok.apply_chat_template(messages, chat_template="{{ 'literal' }}") == "literal"
  # transformers 5 writes chat_template.jinja; it takes precedence over the config.
  (folder / "chat_template.jinja").write_text("J{{ messages[0].content }}")
  (folder / "additional_chat_templates").mkdir()
  (folder / "additional_chat_templates" / "rag.jinja").write_text("R")
  tok = load_tokenizer(folder)
  assert tok.chat_templates == {"default": "J{{ messages[0].content }}", "rag": "R"}
  assert tok.apply_chat_template(messages, tokenize=True) == tok.encode("Jx")
  bare = load_tokenizer(folders["gemma"])
  with pytest.raises(ValueError, match="no chat template"):
    bare.apply_chat_template(messages)


def test_missing_chat_template_names_the_folder(folders: dict[str, Path], tmp_path: Path) -> None:
  bare = load_tokenizer(folders["gemma"])
  assert bare.path == folders["gemma"] / "tokenizer.model"
  assert load_tokenizer(folders["qwen"]).path == folders["qwen"] / "tokenizer.json"
  with pytest.raises(TokenizerError) as e:
    bare.apply_chat_template([{"role": "user", "content": "x"}])
  assert str(e.value) == (
      f"The tokenizer in {folders['gemma']} has no chat template, needed for rendering a "
      f"conversation: add chat_template.jinja to {folders['gemma']} or a \"chat_template\" to "
      "its tokenizer_config.json (e.g. the instruct model's), or pass one as `chat_template=`.")
  assert bare.apply_chat_template([{"role": "user", "content": "x"}],
                                  chat_template="{{ messages[0].content }}") == "x"
  named = load_tokenizer(_copy(folders["qwen"], tmp_path / "named", chat_template=[
      {"name": "rag", "template": "R"}]))
  with pytest.raises(TokenizerError, match=r"has chat templates \['rag'\] but no 'default' one"):
    named.require_chat_template()


BAD_FILES = [  # (file, content, message after the file's path)
    ("tokenizer_config.json", b"[1, 2]", " must hold a JSON object, got a list"),
    ("tokenizer_config.json", b'"hi"', " must hold a JSON object, got a string"),
    ("tokenizer_config.json", b"{oops", " is not valid JSON: Expecting property name"),
    ("tokenizer_config.json", b'{"bos_token": "caf\xe9"}', " line 1: not valid UTF-8 (byte 0xe9)"),
    ("special_tokens_map.json", b"3", " must hold a JSON object, got a number"),
    ("generation_config.json", b'{"eos_token_id": "2"}',
     ": eos_token_id should be a token id or a list of ids, got '2'"),
    ("added_tokens.json", b'{"<x>": "seven"}', ": '<x>' should have a token id"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"5": {"special": true}}}',
     ": added_tokens_decoder['5'] should be a token"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": {"x": {"content": "<x>"}}}',
     ": added_tokens_decoder['x'] should have a token id"),
    ("tokenizer_config.json", b'{"added_tokens_decoder": ["<x>"]}',
     ": added_tokens_decoder should be an object of id -> token, got list"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "default"}]}',
     ": chat_template[0] should be {\"name\": \"...\", \"template\": \"...\"}"),
    ("tokenizer_config.json", b'{"chat_template": 5}',
     ": chat_template should be a template string or a list"),
    ("chat_template.jinja", b"{{ 'caf\xe9' }}", " line 1: not valid UTF-8 (byte 0xe9)"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES)
def test_a_bad_config_file_names_file_and_key(folders: dict[str, Path], tmp_path: Path,
                                              name: str, content: bytes, message: str) -> None:
  folder = tmp_path / "bad"
  shutil.copytree(folders["qwen"], folder)
  (folder / name).write_bytes(content)
  with pytest.raises(TokenizerError) as e:
    load_tokenizer(folder)
  assert str(e.value).startswith(f"{folder / name}{message}"), str(e.value)


def test_special_tokens_map_and_added_tokens_json(folders: dict[str, Path],
                                                  tmp_path: Path) -> None:
  folder = _copy(folders["gemma"], tmp_path / "legacy_files", pad_token=None,
                 added_tokens_decoder=None, additional_special_tokens=["<start_of_turn>"])
  (folder / "special_tokens_map.json").write_text(json.dumps(
      {"pad_token": {"content": "<pad>", "lstrip": False}, "eos_token": "<unk>"}))
  (folder / "added_tokens.json").write_text(json.dumps({"<start_of_image>": 400}))
  config = TokenizerConfig.read(folder)
  assert config.named_tokens["pad_token"] == "<pad>"
  assert config.named_tokens["eos_token"] == "<eos>"  # tokenizer_config.json wins
  assert config.extra_special_tokens == ("<start_of_turn>",)
  tok = load_tokenizer(folder)
  assert tok.pad_id == 0 and tok.token_to_id("<start_of_image>") == 400
  assert "<start_of_turn>" in tok.special_tokens and "<start_of_image>" not in tok.special_tokens


def test_sentencepiece_without_config(folders: dict[str, Path], tmp_path: Path) -> None:
  # The model's own control pieces name BOS/EOS/UNK/PAD; written in the text they are ids.
  shutil.copy(folders["gemma"] / "tokenizer.model", tmp_path / "tokenizer.model")
  tok = load_tokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (2, 1, 3, 0)
  assert tok.named_special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>",
                                      "unk_token": "<unk>", "pad_token": "<pad>"}
  assert not tok.add_bos_default and tok.chat_template is None
  assert tok.encode("<bos>hi<eos>", add_bos=False)[::len(tok.encode("hi")) + 1] == [2, 1]


def test_sentencepiece_added_token_strips(folders: dict[str, Path], tmp_path: Path) -> None:
  decoder = json.loads((folders["llama2"] / "tokenizer_config.json").read_text())[
      "added_tokens_decoder"]
  decoder["400"].update(lstrip=True, rstrip=True)
  folder = _copy(folders["llama2"], tmp_path / "strips", added_tokens_decoder=decoder)
  tok = load_tokenizer(folder)
  assert tok.encode("hi  <|tool|>  there", add_bos=False) == tok.encode("hi<|tool|>there",
                                                                        add_bos=False)
  pytest.importorskip("transformers")
  ref = fx.transformers_tokenizer(folder)
  for text in ["hi  <|tool|>  there", "a <|tool|>b <extra> c"]:
    assert tok.encode(text) == ref.encode(text), text
