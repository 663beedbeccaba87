"""Metric suites that sample: task accuracy (exact / numeric / regex / custom scorers,
pass@k, maj@k), drift from the reference, diversity, and reward-model scores and win rate.
Signatures as in `jaxpost.eval.suites`.

Prompt rows are those of RL (`jaxpost.rl.prompts`): `{"prompt": text or messages}` or
`{"messages": [...]}` whose final assistant turn is the reference answer; every other column
(e.g. `answer`) reaches a custom scorer. Samples are drawn from `model.seed`, so every
checkpoint answers with the same random numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from jaxpost.eval import metrics as M
from jaxpost.eval.engine import EvalModel, Sample
from jaxpost.rl.prompts import Prompt, read_prompts

Rows = list[dict[str, Any]]


def prompts_of(model: EvalModel, rows: Rows) -> list[Prompt]:
  return read_prompts([{k: v for k, v in r.items() if k != "_where"} for r in rows],
                      model.tokenizer, max_prompt_length=model.max_length)


def _sample(model: EvalModel, prompts: list[Prompt], s, *, k: int | None = None,
            temperature: float | None = None) -> list[list[Sample]]:
  return model.generate([p.ids for p in prompts], k=k or s.k,
                        temperature=s.temperature if temperature is None else temperature,
                        max_new_tokens=s.max_new_tokens, top_p=s.top_p)


def make_scorer(s) -> tuple[str, Callable[[str, dict], float], Callable[[str], str] | None,
                            Callable[[dict], str] | None]:
  """(metric name, `(completion, row) -> score in [0, 1]`, and for majority voting the answer
  a completion gives and the row's gold answer in the same form, or None twice) of a suite's
  `scorer`. The gold is the row's `answer`, `completion` or `solution`, as the score reads it."""
  def gold(row: dict) -> str:
    for key in ("answer", "completion", "solution"):
      if key in row:
        return str(row[key])
    raise KeyError(f"a {s.scorer} scorer needs the row's 'answer' (or a 'messages' row ending "
                   f"with the assistant's answer); it has {sorted(row)}")

  def normalized_gold(row: dict) -> str:
    return M.normalize_answer(gold(row))

  if s.scorer == "exact":
    return ("exact_match", lambda c, r: float(M.exact_match(c, gold(r))), M.normalize_answer,
            normalized_gold)
  if s.scorer == "numeric":
    def numeric(c, r):
      return float(M.numeric_match(c, gold(r), tolerance=s.tolerance))

    def answer(c):
      x = M.extract_number(c)
      return "" if x is None else repr(x)
    return "numeric_match", numeric, answer, lambda r: answer(gold(r))
  if s.scorer == "regex":  # the pattern reads a completion; the gold is the bare answer
    def regex(c, r):
      return float(M.exact_match(M.regex_extract(c, s.pattern), gold(r)))
    return ("regex_match", regex, lambda c: M.normalize_answer(M.regex_extract(c, s.pattern)),
            normalized_gold)
  from jaxpost.user_code import import_function  # pylint: disable=import-outside-toplevel
  _, fn = import_function(s.scorer, key="scorer")
  return "score", lambda c, r: float(fn(c, r)), None, None


def _ks(k: int) -> list[int]:
  """1, 2, 4, ... up to k, and k itself."""
  out, x = [], 1
  while x < k:
    out.append(x)
    x *= 2
  return out + [k]


def generation(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """The mean score of all k samples (`exact_match`, `numeric_match`, `regex_match` or
  `score`); with k > 1, pass@j for j = 1, 2, 4, ..., k (the unbiased estimator of Chen et al.
  2021; a sample is correct when its score is >= 0.5) and maj@k (majority vote over the
  answers the samples give; not for custom scorers); the mean completion length in tokens."""
  del reference, cache
  name, score, answer, gold_of = make_scorer(s)
  prompts = prompts_of(model, rows)
  samples = _sample(model, prompts, s)
  scores = np.array([[score(x.text, p.columns) for x in group]
                     for p, group in zip(prompts, samples)], np.float64)
  out = {name: float(scores.mean()),
         "length": float(np.mean([len(x.ids) for g in samples for x in g]))}
  if s.k > 1:
    for j in _ks(s.k):
      out[f"pass@{j}"] = M.mean_pass_at_k(scores >= 0.5, j)
    if answer is not None:
      answers = [[answer(x.text) for x in g] for g in samples]
      refs = [gold_of(p.columns) for p in prompts]
      out[f"maj@{s.k}"] = M.maj_at_k(answers, refs, s.k)
  return out


def greedy_exact_match(model: EvalModel, rows: Rows, *, max_new_tokens: int) -> float:
  """The fraction of chat rows whose greedy completion equals the answer (stripped): a task's
  before / after line."""
  from jaxpost.config import SuiteSection  # pylint: disable=import-outside-toplevel
  section = SuiteSection(kind="generation", scorer="exact", max_new_tokens=max_new_tokens)
  return generation(model, None, rows, section, {})["exact_match"]


def drift(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """KL(model || reference) per generated token on the model's own completions of held-out
  prompts: the exact KL of the two next-token distributions at each position (not a
  one-sample estimate), token-averaged (`kl`) and summed per completion (`kl_seq`); and,
  with `probes`, the value-drift audit (`jaxpost.eval.suites.probe_flips`)."""
  if reference is None:
    raise ValueError("a drift suite compares the model with a reference: set reference=base "
                     "(or a model folder)")
  out: dict[str, float] = {}
  if rows:
    prompts = prompts_of(model, rows)
    samples = _sample(model, prompts, s, k=1)
    keep = [(p.ids, g[0].ids) for p, g in zip(prompts, samples) if g[0].ids]
    total, count = model.kl_to(reference, [c for c, _ in keep], [t for _, t in keep])
    out.update(kl=float(total.sum() / max(count.sum(), 1.0)),
               kl_seq=float(total.mean()) if len(total) else 0.0)
  if s.probes is not None:
    from jaxpost.eval.suites import probe_flips  # pylint: disable=import-outside-toplevel
    out.update(probe_flips(model, reference, cache["probes"], cache))
  return out


def diversity(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """The signals of mode collapse over k samples of each prompt, averaged over prompts:
  distinct-1/2/3 (Li et al. 2016), self-BLEU (Zhu et al. 2018; `sacrebleu`), and the mean
  entropy of the sampler's distribution over the first `entropy_tokens` generated tokens."""
  del reference, cache
  samples = _sample(model, prompts_of(model, rows), s)
  out = {f"distinct_{n}": float(np.mean([M.distinct_n([x.text for x in g], n) for g in samples]))
         for n in (1, 2, 3)}
  out["self_bleu"] = float(np.mean([M.self_bleu([x.text for x in g]) for g in samples]))
  firsts = [x.entropies[:s.entropy_tokens] for g in samples for x in g if len(x.entropies)]
  out["entropy"] = float(np.mean(np.concatenate(firsts))) if firsts else 0.0
  return out


def reward_model_scores(model: EvalModel, reference, rows: Rows, s, cache) -> dict[str, float]:
  """The mean reward-model score of the model's completions of the rows' prompts
  (`reward`) and, with a reference, the win rate against the reference's completions of the
  same prompts (a tie counts one half)."""
  if "reward_fn" not in cache:
    from jaxpost.rl.builtin_rewards import reward_model_reward  # pylint: disable=import-outside-toplevel
    cache["reward_fn"] = reward_model_reward(s.reward_model, tokenizer=model.tokenizer)
  fn = cache["reward_fn"]
  prompts = prompts_of(model, [{"prompt": r["prompt"]} for r in rows])

  def rewards(m: EvalModel) -> np.ndarray:
    texts = [g[0].text for g in _sample(m, prompts, s, k=1)]
    return np.asarray(fn([p.prompt for p in prompts], texts), np.float64)

  mine = rewards(model)
  out = {"reward": float(mine.mean())}
  if reference is not None:
    theirs = cache.get("ref_rewards")
    if theirs is None:  # the reference's completions and rewards: once per process
      theirs = cache["ref_rewards"] = rewards(reference)
    out["reference_reward"] = float(theirs.mean())
    out["win_rate"] = float(np.mean((mine > theirs) + 0.5 * (mine == theirs)))
  return out
