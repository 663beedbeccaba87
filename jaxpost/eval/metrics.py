"""Evaluation metrics: pure NumPy/stdlib functions of sampled answers, confidences and texts.

    pass_at_k(n=20, c=3, k=5)                    # unbiased pass@k from n samples, c correct
    mean_pass_at_k(correct_PxN, k=5)             # averaged over P prompts
    maj_at_k(answers, references, k=8, equal=numeric_match)
    expected_calibration_error(conf_N, correct_N), brier_score(probs_NxC, gold_N)
    distinct_n(texts, 2), self_bleu(texts)       # diversity of a set of samples
    preference_flips(ref_margin_N, model_margin_N)

No JAX here: these run on host arrays after sampling, in the evaluation loop.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import sacrebleu

# The last-number pattern: an optional minus not glued to a word ("3-4" is 3 and 4), then
# either thousands-grouped digits (1,234,567) or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<!\w)-)?\.\d+")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374).

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

  The product form avoids huge binomials; it is 1.0 when n - c < k (every k-subset has a hit).
  """
  if k < 1:
    raise ValueError(f"pass_at_k needs k >= 1, got k={k}")
  if k > n:
    raise ValueError(f"pass_at_k needs k <= n, got k={k} > n={n}")
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
  """Mean over prompts of pass@k: (1/P) sum_i pass_at_k(n, c_i, k), c_i = sum_j correct[i, j].

  `correct` is [P, n] bool, n samples per prompt (Chen et al. 2021, arXiv 2107.03374, eq. 1).
  """
  correct_PxN = np.asarray(correct)
  if correct_PxN.ndim != 2 or correct_PxN.shape[0] == 0:
    raise ValueError(f"mean_pass_at_k needs a non-empty [P, n] array, got {correct_PxN.shape}")
  n = correct_PxN.shape[1]
  c_P = correct_PxN.astype(bool).sum(axis=1)
  return float(np.mean([pass_at_k(n, int(c), k) for c in c_P]))


def majority_vote(answers: Sequence[str]) -> str:
  """The most common stripped answer (self-consistency, Wang et al. 2022, arXiv 2203.11171).

  Ties go to the answer that first occurs earliest. Empty answers ("" after strip) abstain;
  if every answer is empty (or there are none) the vote is "".
  """
  votes = [a.strip() for a in answers if a.strip()]
  if not votes:
    return ""
  counts = Counter(votes)  # insertion-ordered: first occurrence order
  return max(counts, key=counts.__getitem__)  # max keeps the first of equal maxima


def _stripped_equal(a: str, b: str) -> bool:
  return a.strip() == b.strip()


def maj_at_k(
  answers: Sequence[Sequence[str]],
  references: Sequence[str],
  k: int,
  *,
  equal: Callable[[str, str], bool] | None = None,
) -> float:
  """maj@k: (1/P) sum_i equal(majority_vote(answers[i][:k]), references[i]).

  Self-consistency voting (Wang et al. 2022, arXiv 2203.11171) over each prompt's first k
  answers; `equal` defaults to stripped string equality (pass `numeric_match` for math).
  """
  if k < 1:
    raise ValueError(f"maj_at_k needs k >= 1, got k={k}")
  if len(answers) != len(references):
    raise ValueError(f"maj_at_k got {len(answers)} answer lists but {len(references)} references")
  if not answers:
    raise ValueError("maj_at_k needs at least one prompt")
  for i, prompt_answers in enumerate(answers):
    if len(prompt_answers) < k:
      raise ValueError(f"maj_at_k: prompt {i} has {len(prompt_answers)} answers, fewer than k={k}")
  equal = _stripped_equal if equal is None else equal
  hits = [bool(equal(majority_vote(a[:k]), r)) for a, r in zip(answers, references)]
  return float(np.mean(hits))


def expected_calibration_error(
  confidence: np.ndarray, correct: np.ndarray, bins: int = 10
) -> float:
  """ECE = sum_b (n_b / N) |acc_b - conf_b| (Naeini et al. 2015; Guo et al. 2017, arXiv 1706.04599).

  Equal-width bins over [0, 1]: bin i holds confidences in (i/bins, (i+1)/bins], and a
  confidence of exactly 0 goes in bin 0. acc_b and conf_b are the bin's mean correctness and
  mean confidence; empty bins contribute nothing.
  """
  conf_N = np.asarray(confidence, dtype=np.float64)
  correct_N = np.asarray(correct).astype(np.float64)
  if bins < 1:
    raise ValueError(f"expected_calibration_error needs bins >= 1, got {bins}")
  if conf_N.ndim != 1 or conf_N.shape != correct_N.shape or conf_N.size == 0:
    raise ValueError(
      "expected_calibration_error needs equal non-empty 1-D arrays, "
      f"got {conf_N.shape} and {correct_N.shape}"
    )
  if not np.all((conf_N >= 0.0) & (conf_N <= 1.0)):
    raise ValueError("expected_calibration_error needs confidences in [0, 1]")
  edges = np.arange(bins + 1, dtype=np.float64) / bins  # exactly i / bins
  bin_N = np.maximum(np.digitize(conf_N, edges, right=True) - 1, 0)
  ece = 0.0
  for b in range(bins):
    in_bin = bin_N == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct_N[in_bin].mean() - conf_N[in_bin].mean())
  return float(ece)


def brier_score(probs: np.ndarray, gold: np.ndarray) -> float:
  """Multi-class Brier score (Brier 1950): (1/N) sum_i sum_c (p_ic - 1[c == gold_i])^2.

  `probs` is [N, C], `gold` is [N] integer class ids in [0, C).
  """
  probs_NxC = np.asarray(probs, dtype=np.float64)
  gold_N = np.asarray(gold)
  if probs_NxC.ndim != 2 or probs_NxC.shape[0] == 0 or gold_N.shape != probs_NxC.shape[:1]:
    raise ValueError(
      f"brier_score needs probs [N, C] and gold [N], got {probs_NxC.shape} and {gold_N.shape}"
    )
  if not np.issubdtype(gold_N.dtype, np.integer):
    raise ValueError(f"brier_score needs integer gold labels, got dtype {gold_N.dtype}")
  if np.any((gold_N < 0) | (gold_N >= probs_NxC.shape[1])):
    raise ValueError(f"brier_score: gold labels must be in [0, {probs_NxC.shape[1]})")
  onehot_NxC = np.eye(probs_NxC.shape[1])[gold_N]
  return float(np.mean(np.sum((probs_NxC - onehot_NxC) ** 2, axis=1)))


def distinct_n(texts: Sequence[str], n: int) -> float:
  """distinct-n = |unique n-grams| / |n-grams| over all texts (Li et al. 2016, arXiv 1510.03055).

  Whitespace tokens; n-grams do not cross text boundaries; 0.0 when there are no n-grams.
  """
  if n < 1:
    raise ValueError(f"distinct_n needs n >= 1, got {n}")
  ngrams = []
  for text in texts:
    tokens = text.split()
    ngrams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
  return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def self_bleu(texts: Sequence[str]) -> float:
  """Self-BLEU = (1/M) sum_i BLEU(texts[i], {texts[j] : j != i}) / 100 (Zhu et al. 2018, Texygen,
  arXiv 1802.01886). Higher means less diverse.

  Sentence BLEU is `sacrebleu.sentence_bleu` with default settings (Post 2018, arXiv 1804.08771),
  clipped to [0, 1] against float round-off; 0.0 for fewer than 2 texts.
  """
  if len(texts) < 2:
    return 0.0
  scores = [
    sacrebleu.sentence_bleu(text, [other for j, other in enumerate(texts) if j != i]).score / 100.0
    for i, text in enumerate(texts)
  ]
  return float(min(max(np.mean(scores), 0.0), 1.0))


def normalize_answer(text: str) -> str:
  """Strip and collapse every run of internal whitespace to one space."""
  return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
  """normalize_answer(prediction) == normalize_answer(reference)."""
  return normalize_answer(prediction) == normalize_answer(reference)


def extract_number(text: str) -> float | None:
  """The last number in `text`, or None: integers, decimals, negatives, 1,234 -> 1234.

  A minus counts only when not glued to a preceding word character ("3-4" gives 4).
  """
  matches = _NUMBER.findall(text)
  return float(matches[-1].replace(",", "")) if matches else None


def numeric_match(prediction: str, reference: str, *, tolerance: float = 1e-6) -> bool:
  """|a - b| <= tolerance * max(1, |b|), a and b the last numbers of prediction and reference.

  False when either has no number.
  """
  a, b = extract_number(prediction), extract_number(reference)
  if a is None or b is None:
    return False
  return abs(a - b) <= tolerance * max(1.0, abs(b))


def regex_extract(text: str, pattern: str, *, group: int = 1, which: str = "last") -> str:
  """Group `group` of the first or last match of `pattern` in `text` (re.finditer order).

  "" when nothing matches or the group did not take part; group 0 when the pattern has no groups.
  """
  if which not in ("first", "last"):
    raise ValueError(f"regex_extract: which must be 'first' or 'last', got {which!r}")
  compiled = re.compile(pattern)
  if compiled.groups == 0:
    group = 0
  elif not 0 <= group <= compiled.groups:
    raise ValueError(f"regex_extract: group {group} out of range, pattern has {compiled.groups}")
  match = None
  for match in compiled.finditer(text):
    if which == "first":
      break
  if match is None:
    return ""
  return match.group(group) or ""


def preference_flips(reference_margin: np.ndarray, model_margin: np.ndarray) -> dict[str, float]:
  """How training moved preferences on probe pairs (A preferred to B).

  margin = log p(A) - log p(B); a probe prefers A iff margin > 0 (a zero margin does not):

      flipped    = mean_i 1[(ref_i > 0) != (model_i > 0)]
      mean_shift = mean_i (model_i - ref_i)

  The log-ratio margin is the implicit reward of DPO (Rafailov et al. 2023, arXiv 2305.18290).
  """
  ref_N = np.asarray(reference_margin, dtype=np.float64).reshape(-1)
  model_N = np.asarray(model_margin, dtype=np.float64).reshape(-1)
  if np.shape(reference_margin) != np.shape(model_margin) or ref_N.size == 0:
    raise ValueError(
      "preference_flips needs equal non-empty shapes, "
      f"got {np.shape(reference_margin)} and {np.shape(model_margin)}"
    )
  if not (np.all(np.isfinite(ref_N)) and np.all(np.isfinite(model_N))):
    raise ValueError("preference_flips needs finite margins")
  return {
    "flipped": float(np.mean((ref_N > 0) != (model_N > 0))),
    "mean_shift": float(np.mean(model_N - ref_N)),
  }
