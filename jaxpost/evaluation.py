"""Evaluation by generation: exact-match accuracy of greedy answers to chat prompts."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxpost.data import pad_id_of
from jaxpost.models import ModelConfig
from jaxpost.sampling import generate
from jaxpost.tokenizer import Tokenizer


def _prompt_and_answer(row: dict) -> tuple[list[dict], str]:
  messages = list(row["messages"])
  if messages and messages[-1]["role"] == "assistant":
    answer = row.get("answer", messages[-1]["content"])
    return messages[:-1], answer
  return messages, row["answer"]


def exact_match(config: ModelConfig, params: dict, tokenizer: Tokenizer, rows: Sequence[dict],
                *, max_new_tokens: int = 8, batch_size: int = 256, compute_dtype=None,
                return_completions: bool = False):
  """Fraction of rows whose greedy completion, stripped, equals the row's answer.

  Each row is a chat (`messages`, the last assistant turn being the reference answer, or an
  explicit `answer`). Prompts are rendered with the tokenizer's chat template and a generation
  prompt; generation stops at the tokenizer's stop tokens.
  """
  prompts, answers = [], []
  for r in rows:
    messages, answer = _prompt_and_answer(r)
    prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True))
    answers.append(answer)
  completions = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(prompts) > batch_size else chunk
    out = generate(config, params, chunk, max_new_tokens=max_new_tokens, temperature=0.0,
                   stop_tokens=tokenizer.eos_ids, pad_id=pad_id_of(tokenizer),
                   compute_dtype=compute_dtype)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i in range(min(batch_size, len(prompts) - start)):
      completions.append(tokenizer.decode(tokens[i, :lengths[i]].tolist(),
                                          skip_special_tokens=True))
  correct = [c.strip() == a.strip() for c, a in zip(completions, answers)]
  accuracy = float(np.mean(correct)) if correct else 0.0
  return (accuracy, completions) if return_completions else accuracy
