"""What the white-box commands (`jaxpost steer`, `probe`, `heads`) read and write: the model, a
JSON lines file whose bad rows are named, prompts as token ids, markdown tables, the built-in
arithmetic data sets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxpost.tasks import arithmetic


def model_folder(path: str | Path) -> Path:
  """The Hugging Face folder of `path`: itself, or a run folder's `final/`."""
  path = Path(path)
  if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
    return path / "final"
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"model={path}: not a Hugging Face model folder (no config.json) "
                            "nor a finished run folder (no final/config.json)")
  return path


def out_folder(out_dir: str | None, model: str | Path, name: str) -> Path:
  """`out_dir`, else `<run folder>/<name>` (a run's `final/` model) or `<model>/<name>`."""
  if out_dir:
    return Path(out_dir)
  folder = model_folder(model)
  base = folder.parent if folder.name == "final" else folder
  return base / name


def open_model(path: str | Path):
  """(config, params, tokenizer) of a Hugging Face folder or a finished run, in float32."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxpost.models import load_hf  # pylint: disable=import-outside-toplevel
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel

  folder = model_folder(path)
  config, params = load_hf(folder, dtype=jnp.float32)
  return config, params, load_tokenizer(folder)


def read_jsonl(path: str | Path, fields: dict[str, type | tuple[type, ...]], *,
               key: str, limit: int | None = None) -> list[dict]:
  """The rows of the JSON lines file `path` (blank lines skipped), each checked to hold
  `fields` (name -> allowed types). Every error names the config `key`, the file and the row
  (its 1-based line number)."""
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except FileNotFoundError:
    raise FileNotFoundError(f"{key}: no file {path}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{key}: {path} is not UTF-8 text ({e.reason})") from None
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path} row {number}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected an object like "
                       f"{{{', '.join(repr(f) + ': ...' for f in fields)}}}, got {line[:60]}")
    for name, types in fields.items():
      if name not in row:
        raise ValueError(f"{where}: field {name!r} is missing (the row has "
                         f"{', '.join(map(repr, row)) or 'no fields'})")
      if not isinstance(row[name], types) or (isinstance(row[name], str) and not row[name]):
        raise ValueError(f"{where}: field {name!r} must be a non-empty "
                         f"{_type_names(types)}, got {json.dumps(row[name])[:60]}")
    rows.append(row)
    if limit is not None and len(rows) >= limit:
      break
  if not rows:
    raise ValueError(f"{key}: {path} has no rows")
  return rows


def _type_names(types) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join({str: "string", int: "integer", float: "number", bool: "boolean",
                      list: "list"}.get(t, t.__name__) for t in types)


def encode_prompts(tokenizer, texts: Sequence[str], *, chat: bool) -> list[list[int]]:
  """Token ids of each text: a user turn rendered by the chat template with the assistant's
  turn opened (`chat` and the tokenizer has a template), else the plain text."""
  if chat and tokenizer.chat_template:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                          add_generation_prompt=True, tokenize=True)
            for t in texts]
  return [tokenizer.encode(t) for t in texts]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; floats with 4 significant digits, `|` and newlines escaped."""
  def cell(x):
    text = f"{x:.4g}" if isinstance(x, (float, np.floating)) else str(x)
    return text.replace("|", "\\|").replace("\n", "\\n")
  lines = ["| " + " | ".join(map(cell, header)) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_json(path: Path, value: Any) -> Path:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
  tmp.replace(path)
  return path


# -- the arithmetic task as white-box data sets -----------------------------------------------

ARITHMETIC_LABELS = ("larger_operand", "answer_tens", "carry")


def arithmetic_probe_rows(label: str, *, max_operand: int = 30, op: str = "add") -> list[dict]:
  """{"text": question, "label": ...} for every pair a, b < max_operand: `larger_operand`
  ("first" / "second"; a == b left out), `answer_tens` (the answer's tens digit), `carry`
  (whether the ones digits carry)."""
  if label not in ARITHMETIC_LABELS:
    raise ValueError(f"task={label!r}: choose one of {', '.join(ARITHMETIC_LABELS)}")
  fn = arithmetic.OPS[op][1]
  rows = []
  for a in range(max_operand):
    for b in range(max_operand):
      if label == "larger_operand":
        if a == b:
          continue
        value: Any = "first" if a > b else "second"
      elif label == "answer_tens":
        value = abs(fn(a, b)) // 10 % 10
      else:
        value = a % 10 + b % 10 >= 10
      rows.append({"text": arithmetic.question(a, b, op), "label": value})
  return rows


def arithmetic_target_rows(*, max_operand: int = 30, num_eval: int = 100, seed: int = 0,
                           op: str = "add") -> list[dict]:
  """The task's held-out questions as {"prompt", "target", "answer"} (the target is the
  answer: its log-probability, or a reward of greedy answers, is what head knockout moves)."""
  _, held_out = arithmetic.make_split(max_operand=max_operand, num_eval=num_eval, seed=seed,
                                      op=op)
  return [{"prompt": r["messages"][0]["content"], "target": r["answer"], "answer": r["answer"]}
          for r in held_out]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) row indices: a seeded shuffle, the last `eval_fraction` held out."""
  order = list(range(n))
  random.Random(seed).shuffle(order)
  n_eval = max(1, int(round(n * eval_fraction)))
  return np.asarray(sorted(order[n_eval:])), np.asarray(sorted(order[:n_eval]))
