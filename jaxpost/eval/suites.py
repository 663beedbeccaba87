"""Metric suites over a model's log-likelihoods: likelihood, multiple choice, preference
accuracy, and the value-drift probes. Each is a function

    suite(model: EvalModel, reference: EvalModel | None, rows: list[dict], s: SuiteSection,
          cache: dict) -> {metric: value}

(`cache` keeps what only the reference determines, e.g. its scores, across checkpoints).
`jaxpost.eval.generation` has the suites that sample. Row formats:

- likelihood: `{"text"}` (all of it is scored), `{"messages"}` (the last assistant turn given
  the conversation before it), or `{"prompt", "completion"}` (text or messages).
- multiple_choice: `{"prompt" | "question" | "messages", "choices": [...], "answer": index
  or the right choice's text}`; a choice is scored as the continuation of the prompt.
- preference: `{"prompt", "chosen", "rejected"}`, each text or messages (TRL's format).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxpost.data import DataError
from jaxpost.data import errors as data_errors
from jaxpost.eval import metrics as M
from jaxpost.eval.engine import EvalModel
from jaxpost.tokenizer import Tokenizer

Rows = list[dict[str, Any]]


def _assistant(x: Any) -> str:
  """The text of a completion given as a string or as messages (the last assistant turn)."""
  if isinstance(x, str):
    return x
  if isinstance(x, list) and x and isinstance(x[-1], dict):
    return str(x[-1].get("content", ""))
  raise TypeError(f"a completion must be text or messages, got {type(x).__name__}")


def pair_ids(tokenizer: Tokenizer, prompt: str | Sequence[dict], completion: str,
             ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of a prompt and its completion, split from one encoding
  of the whole so the boundary tokenises as it would in training: a chat prompt is rendered
  with the chat template, the completion as the assistant turn; a text prompt gets BOS."""
  if isinstance(prompt, str):
    ctx = tokenizer.encode(prompt, add_bos=True)
    whole = tokenizer.encode(prompt + completion, add_bos=True)
  else:
    ctx = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    whole = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": completion}], tokenize=True)
  if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
    return list(ctx), list(whole[len(ctx):])
  return list(ctx), tokenizer.encode(completion, add_bos=False)


def _prompt(row: dict, where: str) -> str | list[dict]:
  for key in ("prompt", "question"):
    if key in row:
      return row[key]
  if "messages" in row:
    return row["messages"]
  raise DataError(data_errors.MISSING_FIELD, f"a row needs 'prompt', 'question' or 'messages'; "
                  f"it has {sorted(row)}", where=where)


def _likelihood_pair(tokenizer: Tokenizer, row: dict, where: str):
  if "text" in row:
    ids = tokenizer.encode(row["text"], add_bos=True)
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    return (ids[:1], ids[1:]) if ids[:1] == [first] else ([first], ids)
  if "completion" in row:
    return pair_ids(tokenizer, row["prompt"], _assistant(row["completion"]))
  messages = row.get("messages")
  if not (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"):
    raise DataError(data_errors.MISSING_FIELD, "a likelihood row needs 'text', 'prompt' + "
                    "'completion', or 'messages' ending with an assistant turn", where=where)
  return pair_ids(tokenizer, messages[:-1], messages[-1]["content"])


def likelihood(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """Token-weighted negative log-likelihood and perplexity of the rows' continuations."""
  del reference, s, cache
  pairs = [_likelihood_pair(model.tokenizer, r, r.get("_where", f"row {i}"))
           for i, r in enumerate(rows)]
  scored = model.score([c for c, _ in pairs], [t for _, t in pairs])
  nll = -float(np.sum(scored.logprob)) / max(float(np.sum(scored.length)), 1.0)
  return {"nll": nll, "perplexity": float(np.exp(nll)), "tokens": float(np.sum(scored.length))}


def _gold_index(row: dict, where: str) -> int:
  choices, answer = row["choices"], row.get("answer", row.get("label"))
  if isinstance(answer, bool) or answer is None:
    raise DataError(data_errors.MISSING_FIELD, "a multiple-choice row needs 'answer' (an index "
                    "or the right choice's text)", where=where)
  if isinstance(answer, int):
    if not 0 <= answer < len(choices):
      raise DataError(data_errors.WRONG_TYPE, f"answer {answer} is not an index of its "
                      f"{len(choices)} choices", where=where)
    return answer
  if answer in choices:
    return choices.index(answer)
  raise DataError(data_errors.WRONG_TYPE, f"answer {answer!r} is none of the choices",
                  where=where)


def multiple_choice(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """Accuracy by the highest summed log-likelihood (`acc`) and by log-likelihood per
  character of the choice (`acc_norm`, lm-eval's convention); calibration of the softmax over
  the choices' log-likelihoods: ECE (10 bins) and the multi-class Brier score."""
  del reference, s, cache
  contexts, continuations, owner, golds = [], [], [], []
  for i, r in enumerate(rows):
    where = r.get("_where", f"row {i}")
    if not isinstance(r.get("choices"), list) or len(r["choices"]) < 2:
      raise DataError(data_errors.MISSING_FIELD, "a multiple-choice row needs 'choices', a list "
                      "of at least two strings", where=where)
    golds.append(_gold_index(r, where))
    for choice in r["choices"]:
      ctx, cont = pair_ids(model.tokenizer, _prompt(r, where), str(choice))
      contexts.append(ctx)
      continuations.append(cont)
      owner.append(i)
  lp = model.score(contexts, continuations).logprob
  acc, acc_norm, conf, correct, probs = [], [], [], [], []
  start = 0
  for i, r in enumerate(rows):
    n = len(r["choices"])
    ll = lp[start:start + n]
    start += n
    lengths = np.array([max(len(str(c)), 1) for c in r["choices"]], np.float64)
    p = np.exp(ll - ll.max())
    p /= p.sum()
    acc.append(int(np.argmax(ll)) == golds[i])
    acc_norm.append(int(np.argmax(ll / lengths)) == golds[i])
    conf.append(float(p.max()))
    correct.append(acc[-1])
    probs.append(p)
  width = max(len(p) for p in probs)
  padded = np.stack([np.pad(p, (0, width - len(p))) for p in probs])
  return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
          "ece": M.expected_calibration_error(np.array(conf), np.array(correct)),
          "brier": M.brier_score(padded, np.array(golds))}


def _pair_scores(model: EvalModel, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
  """Summed log-probs of each row's chosen and rejected completions, [N] each."""
  contexts, continuations = [], []
  for i, r in enumerate(rows):
    where = r.get("_where", f"row {i}")
    for key in ("chosen", "rejected"):
      if key not in r:
        raise DataError(data_errors.MISSING_FIELD, f"a preference row needs '{key}'",
                        where=where)
      ctx, cont = pair_ids(model.tokenizer, r.get("prompt", ""), _assistant(r[key]))
      contexts.append(ctx)
      continuations.append(cont)
  lp = model.score(contexts, continuations).logprob
  return lp[0::2], lp[1::2]


def _cached(cache: dict, key: str, fn):
  if key not in cache:
    cache[key] = fn()
  return cache[key]


def preference(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """Held-out pair accuracy: of the log-likelihood margin (`logp_accuracy`), and, with a
  reference, of DPO's implicit reward beta * (log pi/pi_ref (chosen) - log pi/pi_ref
  (rejected)) (`accuracy`, `margin`; Rafailov et al. 2023, eq. 5). With `reward_model`, also
  the model's mean reward and its win rate against the reference (`jaxpost.eval.generation`).
  """
  chosen, rejected = _pair_scores(model, rows)
  out = {"logp_accuracy": float(np.mean(chosen > rejected))}
  if reference is not None:
    ref_c, ref_r = _cached(cache, "ref_pairs", lambda: _pair_scores(reference, rows))
    margin = s.beta * ((chosen - ref_c) - (rejected - ref_r))
    out.update(accuracy=float(np.mean(margin > 0)), margin=float(np.mean(margin)))
  if s.reward_model is not None:
    from jaxpost.eval.generation import reward_model_scores  # pylint: disable=import-outside-toplevel
    out.update(reward_model_scores(model, reference, rows, s, cache))
  return out


def probe_flips(model: EvalModel, reference: EvalModel, probes: Rows, cache) -> dict[str, float]:
  """The value-drift audit: for probe pairs (statement A preferred to B), the fraction whose
  log-probability preference flipped between the reference and the model, and the mean shift
  of the margin log p(A) - log p(B) (`jaxpost.eval.metrics.preference_flips`)."""
  chosen, rejected = _pair_scores(model, probes)
  ref_c, ref_r = _cached(cache, "ref_probes", lambda: _pair_scores(reference, probes))
  flips = M.preference_flips(ref_c - ref_r, chosen - rejected)
  return {"probe_flipped": flips["flipped"], "probe_shift": flips["mean_shift"]}
