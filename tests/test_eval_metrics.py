"""Evaluation metrics against hand-worked values and brute-force independent definitions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import sacrebleu

from jaxpost.eval.metrics import (
  brier_score,
  distinct_n,
  exact_match,
  expected_calibration_error,
  extract_number,
  maj_at_k,
  majority_vote,
  mean_pass_at_k,
  normalize_answer,
  numeric_match,
  pass_at_k,
  preference_flips,
  regex_extract,
  self_bleu,
)

# ---- pass@k -----------------------------------------------------------------------------------


def _pass_at_k_enumerated(n: int, c: int, k: int) -> float:
  """Fraction of all k-subsets of n samples (the first c correct) that hold a correct one."""
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_and_binomials(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      got = pass_at_k(n, c, k)
      assert got == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)
      assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
  n, c, k = 200, 10, 100
  exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
  assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
  assert pass_at_k(1000, 0, 10) == 0.0
  assert pass_at_k(10, 5, 6) == 1.0  # n - c < k: every 6-subset holds a correct sample
  assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is c / n


@pytest.mark.parametrize("n, c, k", [(5, 1, 6), (5, 6, 2), (5, 2, 0), (5, -1, 2)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
  with pytest.raises(ValueError, match="pass_at_k"):
    pass_at_k(n, c, k)


def test_mean_pass_at_k():
  correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
  # k=2, n=4: prompt 0: 1 - C(3,2)/C(4,2) = 1 - 3/6; prompt 1: 1 - 1/6; prompt 2: 0.
  assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
  assert mean_pass_at_k(correct, 1) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
  with pytest.raises(ValueError, match=r"\[P, n\]"):
    mean_pass_at_k(np.array([True, False]), 1)
  with pytest.raises(ValueError, match="k <= n"):
    mean_pass_at_k(correct, 5)


# ---- voting -----------------------------------------------------------------------------------


def test_majority_vote_ties_and_abstentions():
  assert majority_vote(["b", "a", "a", "b"]) == "b"  # tie: "b" occurs first
  assert majority_vote(["a", "b", "b"]) == "b"
  assert majority_vote(["", "  ", "7", " "]) == "7"  # blanks abstain even when they outnumber
  assert majority_vote([" 7 ", "7", "8"]) == "7"  # compared (and returned) stripped
  assert majority_vote(["", " "]) == ""
  assert majority_vote([]) == ""


def test_maj_at_k():
  answers = [["1", "2", "2", "2"], ["b", "a", "a", "b"], ["", "", "5", "6"]]
  references = ["2", "a", "5"]
  # k=1: votes "1", "b", "" -> 0 hits.
  assert maj_at_k(answers, references, 1) == 0.0
  # k=3: votes "2", "a", "5" -> 3 hits.
  assert maj_at_k(answers, references, 3) == 1.0
  # k=4: votes "2", "b" (tie, earliest first occurrence), "5" (tie of 5 and 6; blanks abstain).
  assert maj_at_k(answers, references, 4) == pytest.approx(2 / 3)
  # A custom `equal`: numeric comparison of the vote with the reference.
  assert maj_at_k([["so 4", "so 4", "3"]], ["4.0"], 3, equal=numeric_match) == 1.0
  assert maj_at_k([["so 4", "so 4", "3"]], ["4.0"], 3) == 0.0


def test_maj_at_k_rejects_bad_arguments():
  with pytest.raises(ValueError, match="references"):
    maj_at_k([["a"]], ["a", "b"], 1)
  with pytest.raises(ValueError, match="fewer than k"):
    maj_at_k([["a", "b"], ["a"]], ["a", "a"], 2)
  with pytest.raises(ValueError, match="k >= 1"):
    maj_at_k([["a"]], ["a"], 0)
  with pytest.raises(ValueError, match="at least one prompt"):
    maj_at_k([], [], 1)


# ---- calibration ------------------------------------------------------------------------------


def test_ece_hand_worked():
  # bins=5, edges 0, .2, .4, .6, .8, 1; each bin is (lo, hi], and confidence 0 joins bin 0.
  #   bin 0: conf {0.0, 0.2},  correct {0, 1}: |acc 0.5 - conf 0.100| = 0.400, weight 2/6
  #   bin 1: conf {0.35, 0.4}, correct {0, 1}: |acc 0.5 - conf 0.375| = 0.125, weight 2/6
  #   bin 4: conf {0.9, 1.0},  correct {1, 0}: |acc 0.5 - conf 0.950| = 0.450, weight 2/6
  #   ECE = (2 * 0.4 + 2 * 0.125 + 2 * 0.45) / 6 = 1.95 / 6 = 0.325
  conf = np.array([0.0, 0.2, 0.35, 0.4, 0.9, 1.0])
  correct = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
  assert expected_calibration_error(conf, correct, bins=5) == pytest.approx(0.325)
  # One bin: |mean acc - mean conf| = |0.5 - 2.85/6|.
  assert expected_calibration_error(conf, correct, bins=1) == pytest.approx(abs(0.5 - 2.85 / 6))


def test_ece_right_closed_edges_are_exact():
  # 0.3 sits on the edge 3/10 and belongs to (0.2, 0.3]; 0.35 to (0.3, 0.4].
  # Separate bins: 0.5 * |1 - 0.3| + 0.5 * |0 - 0.35| = 0.525 (one bin would give 0.175).
  ece = expected_calibration_error(np.array([0.3, 0.35]), np.array([1, 0]), bins=10)
  assert ece == pytest.approx(0.525)
  assert expected_calibration_error(np.array([0.8, 0.8]), np.array([1, 1])) == pytest.approx(0.2)


def test_ece_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    expected_calibration_error(np.array([1.5]), np.array([1]))
  with pytest.raises(ValueError, match="1-D"):
    expected_calibration_error(np.array([0.5, 0.5]), np.array([1]))
  with pytest.raises(ValueError, match="bins"):
    expected_calibration_error(np.array([0.5]), np.array([1]), bins=0)


def test_brier_score_by_hand():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
  # row 0 (gold 0): 0.3^2 + 0.2^2 + 0.1^2 = 0.14; row 1 (gold 1): 0.1^2 + 0.7^2 + 0.6^2 = 0.86.
  assert brier_score(probs, np.array([0, 1])) == pytest.approx(0.5)
  assert brier_score(np.array([[0.0, 1.0]]), np.array([1])) == 0.0
  assert brier_score(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(2.0)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    brier_score(probs, np.array([0, 3]))
  with pytest.raises(ValueError, match="integer"):
    brier_score(probs, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    brier_score(probs, np.array([0]))


# ---- diversity --------------------------------------------------------------------------------


def test_distinct_n_by_hand():
  texts = ["a b a b", "a  b c"]
  # unigrams: a b a b a b c -> 3 distinct of 7; bigrams: ab ba ab ab bc -> 3 distinct of 5.
  assert distinct_n(texts, 1) == pytest.approx(3 / 7)
  assert distinct_n(texts, 2) == pytest.approx(3 / 5)
  assert distinct_n(["a b", "a"], 3) == 0.0  # no trigram inside any text (none across texts)
  assert distinct_n([], 1) == 0.0
  with pytest.raises(ValueError, match="n >= 1"):
    distinct_n(texts, 0)


def test_self_bleu():
  assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
  texts = ["the cat sat on the mat", "the cat is on the mat", "a dog sat on a mat today"]
  expected = np.mean([
    sacrebleu.sentence_bleu(texts[0], [texts[1], texts[2]]).score,
    sacrebleu.sentence_bleu(texts[1], [texts[0], texts[2]]).score,
    sacrebleu.sentence_bleu(texts[2], [texts[0], texts[1]]).score,
  ]) / 100
  assert 0.0 < expected < 1.0
  assert self_bleu(texts) == pytest.approx(expected)
  assert self_bleu(["alpha beta", "gamma delta"]) == 0.0
  assert self_bleu(["only one"]) == 0.0
  assert self_bleu([]) == 0.0


# ---- answer matching --------------------------------------------------------------------------


def test_normalize_and_exact_match():
  assert normalize_answer("  a \t b\n\nc ") == "a b c"
  assert exact_match(" Paris  France", "Paris France")
  assert not exact_match("paris", "Paris")


@pytest.mark.parametrize(
  "text, number",
  [
    ("The answer is 42.", 42.0),
    ("first 3 then -7", -7.0),
    ("x = -3.5", -3.5),
    ("costs $1,234 in total", 1234.0),
    ("1,234,567.89 and done", 1234567.89),
    ("total: -1,000", -1000.0),
    ("pages 3-4", 4.0),
    ("0.25 or .5", 0.5),
    ("no digits here", None),
    ("", None),
  ],
)
def test_extract_number(text, number):
  assert extract_number(text) == number


def test_numeric_match():
  assert numeric_match("so the answer is 1,000", "1000")
  assert numeric_match("-2.50", "x = -2.5")
  assert numeric_match("1000000.5", "1000000", tolerance=1e-6)  # relative: 0.5 <= 1e-6 * 1e6
  assert not numeric_match("0.5", "0", tolerance=0.1)  # absolute below |b| = 1
  assert numeric_match("0.05", "0", tolerance=0.1)
  assert not numeric_match("no number", "3")
  assert not numeric_match("3", "none")


def test_regex_extract():
  text = "a=1, b=2, c=3"
  assert regex_extract(text, r"(\w)=(\d)") == "c"
  assert regex_extract(text, r"(\w)=(\d)", group=2) == "3"
  assert regex_extract(text, r"(\w)=(\d)", group=2, which="first") == "1"
  assert regex_extract(text, r"(\w)=(\d)", group=0, which="first") == "a=1"
  assert regex_extract(text, r"\d", which="first") == "1"  # no groups: group 0
  assert regex_extract(text, r"\d") == "3"
  assert regex_extract(text, r"(\d)x") == ""
  assert regex_extract("ab", r"a(z)?") == ""  # the group did not take part
  assert regex_extract("#### 72", r"####\s*(-?[\d,.]+)") == "72"
  with pytest.raises(ValueError, match="which"):
    regex_extract(text, r"(\d)", which="middle")
  with pytest.raises(ValueError, match="group 3"):
    regex_extract(text, r"(\w)=(\d)", group=3)


# ---- preference probes ------------------------------------------------------------------------


def test_preference_flips():
  ref = np.array([1.0, -1.0, 0.0, 2.0, 0.0])
  model = np.array([-1.0, -2.0, 0.5, 3.0, -1.0])
  # prefers A (margin > 0): ref T F F T F, model F F T T F -> flips at 0 and 2 -> 2/5.
  # shifts: -2, -1, 0.5, 1, -1 -> mean -2.5 / 5.
  out = preference_flips(ref, model)
  assert out == {"flipped": pytest.approx(0.4), "mean_shift": pytest.approx(-0.5)}
  assert preference_flips(np.array([1.0]), np.array([0.0]))["flipped"] == 1.0  # zero is not A
  with pytest.raises(ValueError, match="shapes"):
    preference_flips(np.array([1.0, 2.0]), np.array([1.0]))
  with pytest.raises(ValueError, match="finite"):
    preference_flips(np.array([np.nan]), np.array([1.0]))
