"""`load_tokenizer`: finds the tokenizer file of a model folder and picks its backend."""

from __future__ import annotations

from pathlib import Path

from jaxpost.tokenizer.base import Tokenizer
from jaxpost.tokenizer.config import TokenizerConfig, TokenizerError
from jaxpost.tokenizer.hf import HFTokenizer
from jaxpost.tokenizer.spm import SentencePieceTokenizer

_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json", "added_tokens.json")
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth")


def load_tokenizer(path: str | Path) -> Tokenizer:
  """Loads the tokenizer of a model folder, or a `tokenizer.json` / `.model` file directly.

  In a folder, `tokenizer.json` is preferred to `tokenizer.model` (the other `*.model` file, if
  exactly one, also works). The config files described in the `jaxpost.tokenizer` docstring are
  read from the folder (the file's folder for a file path). No code from the folder is run.

  Raises:
    FileNotFoundError: `path` does not exist, or the folder holds no tokenizer file.
    TokenizerError: (a ValueError) `path` is a file of a kind that cannot be loaded (e.g.
      pickled), or a file of the folder is unreadable (the message names the file and key).
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer at {path}: the path does not exist.")
  if path.is_dir():
    folder = path
    file = _find_tokenizer_file(folder)
  else:
    folder, file = path.parent, path
  config = TokenizerConfig.read(folder)
  if file.suffix == ".model":
    return SentencePieceTokenizer(file, config)
  if file.suffix == ".json" and file.name not in _CONFIG_FILES:
    return HFTokenizer(file, config)
  why = (" Pickled tokenizers are never loaded: unpickling can run arbitrary code."
         if file.suffix in _PICKLE_SUFFIXES else "")
  raise TokenizerError(f"Cannot load {file} as a tokenizer: expected a Hugging Face "
                       f"tokenizer.json or a sentencepiece .model file.{why}")


def _find_tokenizer_file(folder: Path) -> Path:
  for name in ("tokenizer.json", "tokenizer.model"):
    if (folder / name).is_file():
      return folder / name
  models = sorted(folder.glob("*.model"))
  if len(models) == 1:
    return models[0]
  found = sorted(p.name for p in folder.iterdir())
  message = (f"No tokenizer found in {folder}: expected tokenizer.json (Hugging Face "
             f"tokenizers) or tokenizer.model (sentencepiece). Found: "
             f"{', '.join(found) if found else 'nothing'}.")
  if any(Path(name).suffix in _PICKLE_SUFFIXES for name in found):
    message += " Pickled files (*.bin, *.pkl) are never loaded: unpickling can run arbitrary code."
  if len(models) > 1:
    message += " Several *.model files: pass the one to use."
  if (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
    message += (" vocab.json/merges.txt without tokenizer.json is not supported: convert it with "
                "transformers once (AutoTokenizer.from_pretrained(...).save_pretrained(...)).")
  raise FileNotFoundError(message)
