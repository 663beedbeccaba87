"""Tiny models and tokenizers made on the spot, for demos, the quickstart and tests.

Nothing is downloaded: a sentencepiece tokenizer is trained on a given corpus and written,
with a ChatML chat template, into a folder laid out like a Hugging Face checkpoint; a randomly
initialised model of the same vocabulary is saved beside it with `save_hf`. The folder then
loads like any real checkpoint (`load_hf`, `load_tokenizer`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable

import jax

from jaxpost.models import ModelConfig, init_params, save_hf

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def make_tokenizer(folder: str | Path, corpus: Iterable[str], *, vocab_size: int = 320) -> Path:
  """Trains a byte-fallback BPE sentencepiece tokenizer on `corpus` into `folder`.

  Ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, then "<|im_start|>" and "<|im_end|>" (the end of a
  chat turn, also listed as a stop token in generation_config.json).
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  # The chat template's role names are text too: give them merges of their own.
  lines = list(corpus)
  lines += ["user assistant system"] * max(50, len(lines) // 10)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe",
      vocab_size=vocab_size, byte_fallback=True, split_digits=True, add_dummy_prefix=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
      num_threads=1, hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=list(SPECIAL_TOKENS))
  (folder / "tokenizer.model").write_bytes(buffer.getvalue())
  added = {str(4 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
           for i, t in enumerate(SPECIAL_TOKENS)}
  config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False,
            "added_tokens_decoder": added, "chat_template": CHATML_TEMPLATE}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  (folder / "generation_config.json").write_text(
      json.dumps({"bos_token_id": 2, "eos_token_id": [1, 5], "pad_token_id": 0}, indent=2))
  return folder


def tiny_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 192,
                tie_embeddings: bool = True) -> ModelConfig:
  """A small Llama-style config (RoPE theta 10000) of the given vocabulary."""
  return ModelConfig(
      model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
      intermediate_size=intermediate_size, tie_embeddings=tie_embeddings,
      max_position_embeddings=2048, bos_token_id=2, eos_token_id=(1, 5), pad_token_id=0)


def make_model(folder: str | Path, corpus: Iterable[str], *, seed: int = 0,
               vocab_size: int = 320, **config_kwargs) -> Path:
  """A tokenizer trained on `corpus` and a random tiny model, as one HF-style folder."""
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  folder = make_tokenizer(folder, corpus, vocab_size=vocab_size)
  vocab = load_tokenizer(folder).vocab_size
  config = tiny_config(vocab, **config_kwargs)
  save_hf(config, init_params(config, jax.random.key(seed)), folder)
  return folder
