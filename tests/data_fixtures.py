"""Helpers for tests/test_data.py: tiny data files written on the spot, and mask readers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

WORDS = ("the quick brown fox jumps over a lazy dog hello world what is two plus three answer "
         "five you are helpful how fine thanks").split()

# ChatML, but earlier assistant turns are shortened: not prefix-stable, so assistant turns can
# only be located through the {% generation %} spans (when `generation` is True).
_SHORTENING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{GEN}"
    "{{ (m['content'] if loop.last else 'old') + '<|im_end|>' }}{END}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def sentence(rng: random.Random, lo: int = 2, hi: int = 8) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversation(rng: random.Random, turns: int = 2) -> list[dict[str, str]]:
  messages = [{"role": "system", "content": sentence(rng)}]
  for _ in range(turns):
    messages += [{"role": "user", "content": sentence(rng)},
                 {"role": "assistant", "content": sentence(rng)}]
  return messages


def mixed_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
  """`n` prompt/completion rows of varied lengths."""
  rng = random.Random(seed)
  return [{"prompt": sentence(rng, 1, 12), "completion": sentence(rng, 1, 10)} for _ in range(n)]


def write_jsonl(path: Path, lines: list[Any]) -> Path:
  """Writes JSON lines; a str item is written verbatim (blank or invalid lines)."""
  path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n"
                          for item in lines), encoding="utf-8")
  return path


def with_template(source: Path, folder: Path, generation: bool) -> Path:
  """A copy of a tokenizer folder whose chat template is `_SHORTENING`."""
  shutil.copytree(source, folder)
  template = _SHORTENING.replace("{GEN}", "{% generation %}" if generation else "")
  template = template.replace("{END}", "{% endgeneration %}" if generation else "")
  config_path = folder / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["chat_template"] = template
  config_path.write_text(json.dumps(config))
  return folder


def runs(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """The decoded runs of consecutive tokens where `mask` is True."""
  out, current = [], []
  for token, keep in zip(tokens.tolist(), mask.tolist()):
    if keep:
      current.append(token)
    elif current:
      out.append(tokenizer.decode(current))
      current = []
  if current:
    out.append(tokenizer.decode(current))
  return out
