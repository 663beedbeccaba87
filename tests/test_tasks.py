"""The generated arithmetic task: disjoint splits, chat rows, an exact reward."""

from __future__ import annotations

import json

from jaxpost.tasks import arithmetic


def test_splits_are_disjoint_and_complete(tmp_path):
  train, held_out = arithmetic.make_split(max_operand=12, num_eval=20, seed=3)
  key = lambda r: r["messages"][0]["content"]  # noqa: E731
  assert len(held_out) == 20 and len(train) == 144 - 20
  assert not {key(r) for r in train} & {key(r) for r in held_out}
  t_path, e_path = arithmetic.write_dataset(tmp_path, max_operand=12, num_eval=20, seed=3)
  rows = [json.loads(line) for line in e_path.read_text().splitlines()]
  assert rows == held_out
  assert rows[0]["messages"][1] == {"role": "assistant", "content": rows[0]["answer"]}


def test_reward_is_exact_match_of_the_sum():
  row = arithmetic.row(17, 25)
  assert row["answer"] == "42" and row["messages"][0]["content"] == "What is 17 + 25?"
  assert arithmetic.reward(" 42\n", "42") == 1.0
  assert arithmetic.reward("43", "42") == 0.0 and arithmetic.reward("42 apples", "42") == 0.0
