"""Tokenizers: one interface over sentencepiece `.model` files and HF `tokenizer.json` files.

`load_tokenizer(path)` reads a model folder (or a tokenizer file directly) the way transformers
reads it, without importing transformers and without running any code from the folder:

* the tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) if present, else `tokenizer.model`
  (sentencepiece). Pickled tokenizers (`*.bin`, `*.pkl`) are never loaded.
* `tokenizer_config.json`: the named special tokens (`bos_token`, `eos_token`, `pad_token`,
  `unk_token`, ... as strings or `{"content": ...}` dicts), `added_tokens_decoder`,
  `add_bos_token` / `add_eos_token` (sentencepiece only: with a tokenizer.json, its
  post-processor decides, as in transformers 5), `legacy`, `chat_template` (a string, or a list of
  `{name, template}` of which "default" is used unless another is asked for);
  `special_tokens_map.json` fills in named tokens the config lacks; `added_tokens.json` is read
  for old sentencepiece folders.
* `chat_template.jinja` (what transformers 5 writes) and `additional_chat_templates/*.jinja`
  take precedence over the config's `chat_template`.
* `generation_config.json`: its `eos_token_id` (an int or a list) gives every stop id.

A file that cannot be used (not UTF-8, invalid JSON, not a JSON object, a key of the wrong type)
raises `TokenizerError` (a `ValueError`) naming the file and the key; so does asking for a chat
template of a tokenizer without one, naming its folder and how to add one.

Encoding follows transformers' ids (tests compare them), with one deliberate difference: BOS is
never doubled. `encode(text)` with a text that already starts with the BOS token (a rendered chat
template, say) does not add a second one, where transformers would.

Sentencepiece models: added tokens (from `added_tokens_decoder`, beyond or inside the sp
vocabulary) and the named special tokens are split out of the text before sentencepiece sees it.
If the model adds a dummy prefix ("▁" before the text, as Llama 2 does), it is added only at the
very start of the text, as transformers 5's `LlamaTokenizer` does; `"legacy": true` in the config
adds it before every piece between added tokens instead (transformers' legacy behaviour, and
Meta's original encoding of each piece separately). Models without a dummy prefix (Gemma) give
the same ids either way.
"""

from jaxpost.tokenizer.base import Tokenizer
from jaxpost.tokenizer.config import AddedToken, TokenizerConfig, TokenizerError
from jaxpost.tokenizer.hf import HFTokenizer
from jaxpost.tokenizer.loading import load_tokenizer
from jaxpost.tokenizer.spm import SentencePieceTokenizer

__all__ = [
    "AddedToken",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerError",
    "load_tokenizer",
]
