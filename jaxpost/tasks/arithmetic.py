"""Two-number addition questions with exactly checkable answers.

Rows are chat conversations, `{"messages": [user question, assistant answer], "answer": "68"}`,
so the same files serve SFT (train on the assistant turn), evaluation by exact match, and
later preference pairs and RL rewards (`reward`). Train and eval sets never share a question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def question(a: int, b: int) -> str:
  return f"What is {a} + {b}?"


def row(a: int, b: int) -> dict:
  answer = str(a + b)
  return {"messages": [{"role": "user", "content": question(a, b)},
                       {"role": "assistant", "content": answer}],
          "answer": answer}


def make_split(*, max_operand: int = 50, num_eval: int = 200, seed: int = 0):
  """(train_rows, eval_rows): every pair a, b < max_operand once, eval held out."""
  pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
  random.Random(seed).shuffle(pairs)
  if num_eval >= len(pairs):
    raise ValueError(f"num_eval={num_eval} leaves no training pairs out of {len(pairs)}")
  return [row(a, b) for a, b in pairs[num_eval:]], [row(a, b) for a, b in pairs[:num_eval]]


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
  a, b = (int(x) for x in text.removeprefix("What is ").removesuffix("?").split(" + "))
  return float(max(a, b))


def reward(completion: str, answer: str) -> float:
  """1.0 when the completion, stripped, is exactly the answer; else 0.0."""
  return float(completion.strip() == answer)
