"""Two-number arithmetic questions with exactly checkable answers: addition (the quickstart's
task), subtraction and multiplication (`op`: "add", "sub", "mul").

Rows are chat conversations, `{"messages": [user question, assistant answer], "answer": "68"}`,
so the same files serve SFT (train on the assistant turn), evaluation by exact match, and
later preference pairs and RL rewards (`reward`). Train and eval sets never share a question.
The three operations ask the same questions ("What is 17 + 25?", "What is 17 - 25?", "What is
17 * 25?"; a difference may be negative) over the same pairs and held-out split, so they share
the model's number reading and writing and interfere when learnt one after another (the
continual-learning sequence of configs/continual.yaml).
"""

from __future__ import annotations

import json
import random
from pathlib import Path


OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b),
       "mul": ("*", lambda a, b: a * b)}


def _op(op: str):
  if op not in OPS:
    raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
  return OPS[op]


def question(a: int, b: int, op: str = "add") -> str:
  return f"What is {a} {_op(op)[0]} {b}?"


def row(a: int, b: int, op: str = "add") -> dict:
  answer = str(_op(op)[1](a, b))
  return {"messages": [{"role": "user", "content": question(a, b, op)},
                       {"role": "assistant", "content": answer}],
          "answer": answer}


def make_split(*, max_operand: int = 50, num_eval: int = 200, seed: int = 0, op: str = "add"):
  """(train_rows, eval_rows): every pair a, b < max_operand once, eval held out; the pairs and
  the split depend on (max_operand, num_eval, seed) only, not on `op`."""
  pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
  random.Random(seed).shuffle(pairs)
  if num_eval >= len(pairs):
    raise ValueError(f"num_eval={num_eval} leaves no training pairs out of {len(pairs)}")
  return ([row(a, b, op) for a, b in pairs[num_eval:]],
          [row(a, b, op) for a, b in pairs[:num_eval]])


def write_dataset(folder: str | Path, **kwargs) -> tuple[Path, Path]:
  """Writes train.jsonl and eval.jsonl into `folder`; returns their paths."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for name, rows in zip(("train", "eval"), make_split(**kwargs)):
    path = folder / f"{name}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    paths.append(path)
  return paths[0], paths[1]


def corpus(rows: list[dict]) -> list[str]:
  """Text lines to train a tokenizer on."""
  return [f"{r['messages'][0]['content']} {r['messages'][1]['content']}" for r in rows]


def operand_size(row: dict) -> float:
  """A row's difficulty for `data.curriculum.score=jaxpost.tasks.arithmetic:operand_size`: the
  larger operand of its question (sums of small numbers are learnt first)."""
  text = row["messages"][0]["content"] if "messages" in row else row["prompt"]
  a, _, b = text.removeprefix("What is ").removesuffix("?").split(" ")
  return float(max(int(a), int(b)))


def reward(completion: str, answer: str) -> float:
  """1.0 when the completion, stripped, is exactly the answer; else 0.0."""
  return float(completion.strip() == answer)
