"""Preference data for the arithmetic task: the right sum chosen, a plausible wrong one rejected.

Built on `arithmetic.make_split`, so the questions held out for evaluation there are held out
here too. Paired rows (DPO-family losses):

    {"prompt": [user: "What is 17 + 25?"], "chosen": [assistant: "42"],
     "rejected": [assistant: "43"], "answer": "42"}

Unpaired rows (KTO), two per question, a desirable and an undesirable one, in a shuffled order:

    {"prompt": [...], "completion": [assistant: "42"], "label": true, "answer": "42"}
    {"prompt": [...], "completion": [assistant: "32"], "label": false, "answer": "42"}

The wrong answer is a slip a model could make: the answer off by one or by ten (a dropped or
doubled carry) or with its last two digits swapped; never the right answer, of the same sign
(never negative for a sum or product), and the same for a question and seed every time. Every
operation of `arithmetic.OPS` has its pairs (`op`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from jaxpost.tasks import arithmetic

KINDS = ("paired", "unpaired")


def wrong_answer(answer: str, rng: random.Random) -> str:
  """A plausible wrong answer for `answer` (an integer): off by +-1 or +-10, or the last two
  digits swapped; never `answer`, and of its sign (never negative for a non-negative one)."""
  s = int(answer)
  candidates = {s + 1, s - 1, s + 10, s - 10}
  digits = answer.lstrip("-")
  if len(digits) >= 2 and digits[-1] != digits[-2] and (len(digits) > 2 or digits[-1] != "0"):
    candidates.add(int(answer[:-2] + answer[-1] + answer[-2]))
  return str(rng.choice(sorted(c for c in candidates if (c >= 0) == (s >= 0) and c != s)))


def _rng(seed: int, question: str) -> random.Random:
  """A generator fixed by the seed and the question (string seeds hash stably)."""
  return random.Random(f"arithmetic_pref/{seed}/{question}")


def _assistant(content: str) -> list[dict[str, str]]:
  return [{"role": "assistant", "content": content}]


def pair_row(row: dict, *, seed: int = 0) -> dict:
  """An `arithmetic.row` -> a paired preference row (its wrong answer fixed by seed)."""
  user, answer = row["messages"][0], row["answer"]
  wrong = wrong_answer(answer, _rng(seed, user["content"]))
  return {"prompt": [dict(user)], "chosen": _assistant(answer), "rejected": _assistant(wrong),
          "answer": answer}


def unpair(rows: list[dict], *, seed: int = 0) -> list[dict]:
  """Paired rows -> KTO rows: (prompt, chosen, true) and (prompt, rejected, false) each, in an
  order shuffled by `seed` (so a question's two rows are rarely neighbours)."""
  out = []
  for row in rows:
    for side, label in (("chosen", True), ("rejected", False)):
      out.append({"prompt": list(row["prompt"]), "completion": row[side], "label": label,
                  "answer": row["answer"]})
  random.Random(seed).shuffle(out)
  return out


def make_preference_split(*, max_operand: int = 50, num_eval: int = 200, seed: int = 0,
                          kind: str = "paired", op: str = "add") -> tuple[list[dict], list[dict]]:
  """(train_rows, eval_rows) of `kind` "paired" or "unpaired", over `arithmetic.make_split`'s
  questions of `op` (the eval questions held out of train)."""
  if kind not in KINDS:
    raise ValueError(f"kind should be one of {KINDS}, got {kind!r}.")
  splits = arithmetic.make_split(max_operand=max_operand, num_eval=num_eval, seed=seed, op=op)
  out = tuple([pair_row(r, seed=seed) for r in rows] for rows in splits)
  if kind == "unpaired":
    out = tuple(unpair(rows, seed=seed) for rows in out)
  return out[0], out[1]


def write_preference_dataset(folder: str | Path, *, max_operand: int = 50, num_eval: int = 200,
                             seed: int = 0, kind: str = "paired",
                             op: str = "add") -> tuple[Path, Path]:
  """Writes {kind}_train.jsonl and {kind}_eval.jsonl into `folder`; returns their paths."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  splits = make_preference_split(max_operand=max_operand, num_eval=num_eval, seed=seed, kind=kind,
                                 op=op)
  paths = []
  for name, rows in zip(("train", "eval"), splits):
    path = folder / f"{kind}_{name}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    paths.append(path)
  return paths[0], paths[1]
