"""The evaluation engine and its suites against brute force: every number is recomputed here
from the training forward's full logits (`jaxpost.models.forward`, one row at a time, in
float64), or from the very samples the suite drew (`EvalModel.generate` with the same seed),
and compiled programs are counted to show that a second checkpoint costs no compilation.

One tiny model (2 layers, width 64, the ChatML sentencepiece tokenizer of `jaxpost.tiny`) and
one `batch_size` serve every test, so the compiled functions are shared across the module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu

import tokenizer_fixtures
from jaxpost.config import ConfigError, EvalConfig, EvalSection, SuiteSection, load_config
from jaxpost.data import DataError
from jaxpost.eval import generation, suites
from jaxpost.eval import metrics as M
from jaxpost.eval.engine import EvalModel, compilations
from jaxpost.eval.runner import Evaluator, read_suite_rows
from jaxpost.models import forward, init_params
from jaxpost.sampling import _generate
from jaxpost.tiny import make_tokenizer, tiny_config
from jaxpost.tokenizer import load_tokenizer

BATCH = 4  # rows per compiled call, for every model of the module
WIDTH = 128  # the brute-force forward's row width (causal: right padding changes nothing)
GEN = dict(k=4, temperature=1.0, max_new_tokens=8)  # the sampled suites' settings
IM_END = 5  # the tokenizer's ids: 0-5 specials, 6-261 byte fallback <0x00>..<0xFF>, then pieces
FIRST_PIECE, VOCAB = 262, 320

SCORERS = """\
def parity(completion, row):
  return float(len(completion) % 2 == row["parity"])


def nonempty(completion, row):
  return 1.0 if completion else 0.25
"""


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


def _perturbed(params, seed, scale):
  """`params` plus normal(0, scale) noise on every matrix (norms kept)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + (scale * rng.standard_normal(p.shape)).astype(p.dtype)
                      if p.ndim > 1 else p, params)


def _params(config, tok):
  """Random weights (untied head) whose samples look like text: embedding dimension 0 is a
  constant 3, which reaches the final hidden state large and positive, and the head's row 0
  turns it into a bias: -1 on the specials before <|im_end|> and on the byte-fallback pieces,
  +0.7 on pieces starting with a space, +0.15 on digits, 0.3 on <|im_end|>. So completions
  are word-like (n-grams for distinct-n and self-BLEU), print numbers (the numeric scorer) and
  stop now and then."""
  p = init_params(config, jax.random.key(0))
  pieces = {i: tok.decode([i]) for i in range(FIRST_PIECE, VOCAB)}
  embed, head = np.array(p["embed"]) * 4, np.array(p["lm_head"]) * 15
  embed[:, 0] = 3.0
  head[0, :FIRST_PIECE] = -1.0
  head[0, IM_END] = 0.3
  head[0, [i for i, s in pieces.items() if s.startswith(" ")]] += 0.7
  head[0, [i for i, s in pieces.items() if s.isdigit()]] += 0.15
  return dict(p, embed=jnp.asarray(embed), lm_head=jnp.asarray(head))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tokenizer, config, three param trees of one shape (`params`; `other` and `third`,
  perturbed copies standing for later checkpoints) and EvalModels of the first two."""
  tok = load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok"),
                                      tokenizer_fixtures.corpus(300)))
  assert tok.decode([IM_END]) == "<|im_end|>" and tok.decode([6 + ord("A")]) == "A"
  assert tok.vocab_size == VOCAB
  config = tiny_config(tok.vocab_size, tie_embeddings=False)
  params = _params(config, tok)
  other, third = _perturbed(params, 1, 0.02), _perturbed(params, 2, 0.02)
  model = EvalModel(config, params, tok, batch_size=BATCH)
  return types.SimpleNamespace(tok=tok, config=config, params=params, other=other,
                               third=third, model=model,
                               ref=dataclasses.replace(model, params=other, label="reference"))


# -- brute force --------------------------------------------------------------------------------

_forward = jax.jit(forward, static_argnums=0)


def log_softmax_rows(config, params, seq):
  """[len(seq), V] float64 log-probs of the next token at every position of `seq`, from one
  right-padded row of the training forward (no segment ids: causal attention alone)."""
  row = np.zeros((1, WIDTH), np.int32)
  row[0, :len(seq)] = seq
  logits = np.asarray(_forward(config, params, jnp.asarray(row)).logits[0, :len(seq)],
                      np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def brute(config, params, ctx, cont):
  """(per-token log-probs of `cont` after `ctx`, whether each is the argmax, the full
  log-softmax rows at the continuation's positions)."""
  lp = log_softmax_rows(config, params, list(ctx) + list(cont))[len(ctx) - 1:-1]
  cont = np.asarray(cont)
  return lp[np.arange(len(cont)), cont], bool(np.all(lp.argmax(-1) == cont)), lp


def greedy_tokens(config, params, ctx, n):
  seq = list(ctx)
  for _ in range(n):
    seq.append(int(log_softmax_rows(config, params, seq)[-1].argmax()))
  return seq[len(ctx):]


def split(tok, prompt, completion):
  """(context, continuation) ids: a text prompt gets BOS and the completion is the rest of
  the encoding of prompt + completion; a chat prompt is rendered with a generation prompt
  and the completion is the rest of the rendering with the assistant turn appended."""
  if isinstance(prompt, str):
    ctx = tok.encode(prompt, add_bos=True)
    whole = tok.encode(prompt + completion, add_bos=True)
    assert ctx[0] == tok.bos_id
  else:
    ctx = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    whole = tok.apply_chat_template([*prompt, assistant(completion)], tokenize=True)
    assert tok.decode(whole[len(ctx):]) == completion + "<|im_end|>\n"
  assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)  # the test data splits cleanly
  return ctx, whole[len(ctx):]


def logp(t, params, prompt, completion):
  return float(brute(t.config, params, *split(t.tok, prompt, completion))[0].sum())


def random_ids(rng, n):
  return [int(x) for x in rng.integers(FIRST_PIECE, VOCAB, n)]  # merged pieces


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def suite(kind, **kwargs):
  return SuiteSection(kind=kind, data="rows.jsonl", **kwargs)


# -- the engine ---------------------------------------------------------------------------------


def test_score_equals_brute_force(tiny):
  """Seven rows in one call: four in the 32 bucket, three in the 64 bucket (batch_size 4:
  two compiled calls, the last one partial), two of them the model's own greedy text."""
  t, rng = tiny, np.random.default_rng(0)
  ctxs = [random_ids(rng, n) for n in (5, 30, 12, 40, 3, 25, 18)]
  conts = [random_ids(rng, n) for n in (4, 10)]
  conts += [greedy_tokens(t.config, t.params, ctxs[2], 6),
            greedy_tokens(t.config, t.params, ctxs[3], 3)]
  conts += [random_ids(rng, n) for n in (1, 12, 9)]
  assert sorted(32 if len(c) + len(d) <= 32 else 64 for c, d in zip(ctxs, conts)) == \
      [32] * 4 + [64] * 3
  got = t.model.score(ctxs, conts, per_token=True)
  for i, (ctx, cont) in enumerate(zip(ctxs, conts)):
    tokens, greedy, _ = brute(t.config, t.params, ctx, cont)
    np.testing.assert_allclose(got.logprob[i], tokens.sum(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.tokens[i], tokens, atol=1e-5, rtol=0)
    assert got.greedy[i] == greedy and got.length[i] == len(cont)
  assert list(got.greedy) == [False, False, True, True, False, False, False]


def test_score_max_length_cuts_the_context_from_the_left(tiny):
  t, rng = tiny, np.random.default_rng(1)
  cut = dataclasses.replace(t.model, max_length=16)
  ctxs = [random_ids(rng, 30), random_ids(rng, 4)]
  conts = [random_ids(rng, 5), random_ids(rng, 3)]
  got = cut.score(ctxs, conts)
  kept = [ctxs[0][-(16 - 5):], ctxs[1]]  # the long row keeps its last 16 tokens
  for i in range(2):
    expect = brute(t.config, t.params, kept[i], conts[i])[0].sum()
    np.testing.assert_allclose(got.logprob[i], expect, atol=1e-5, rtol=0)
  assert abs(got.logprob[0] - t.model.score(ctxs[:1], conts[:1]).logprob[0]) > 1e-3
  with pytest.raises(ValueError, match="no context within max_length=16"):
    cut.score([random_ids(rng, 3)], [random_ids(rng, 16)])


def test_kl_to_is_the_exact_kl_of_the_full_distributions(tiny):
  """Per row, sum over the continuation's positions of sum_v p (log p - log q); one-token
  continuations give single positions. Rows in the given order: batches of 64 then 32."""
  t, rng = tiny, np.random.default_rng(2)
  ctxs = [random_ids(rng, n) for n in (8, 3, 20, 35, 10)]
  conts = [random_ids(rng, n) for n in (5, 1, 1, 6, 2)]
  total, count = t.model.kl_to(t.ref, ctxs, conts)
  for i, (ctx, cont) in enumerate(zip(ctxs, conts)):
    lp, lq = brute(t.config, t.params, ctx, cont)[2], brute(t.config, t.other, ctx, cont)[2]
    expect = np.sum(np.exp(lp) * (lp - lq))
    assert expect > 1e-3  # the perturbed model really differs
    np.testing.assert_allclose(total[i], expect, atol=1e-5, rtol=0)
    assert count[i] == len(cont)
  self_total, self_count = t.model.kl_to(t.model, ctxs, conts)
  np.testing.assert_allclose(self_total, 0.0, atol=1e-6)
  np.testing.assert_array_equal(self_count, count)


def test_another_checkpoint_and_batch_reuse_the_compiled_scorer(tiny):
  t, rng = tiny, np.random.default_rng(3)
  a = ([random_ids(rng, n) for n in (4, 9, 6)], [random_ids(rng, n) for n in (3, 5, 2)])
  b = ([random_ids(rng, n) for n in (11, 2, 7, 13, 5)],
       [random_ids(rng, n) for n in (8, 1, 2, 4, 6)])
  first = t.model.score(*a)
  t.model.kl_to(t.ref, *a)
  before = compilations()
  second = t.ref.score(*a)  # another "checkpoint": same shapes, other values
  t.ref.score(*b)  # another batch of the same bucket
  t.ref.kl_to(t.model, *b)
  assert compilations() == before
  assert np.all(np.abs(first.logprob - second.logprob) > 1e-4)
  np.testing.assert_allclose(second.logprob[0], brute(t.config, t.other, a[0][0], a[1][0])[0].sum(),
                             atol=1e-5, rtol=0)


def test_evaluator_recompiles_nothing_for_a_second_checkpoint(tiny, tmp_path):
  t = tiny
  lik = write_jsonl(tmp_path / "lik.jsonl", [{"text": "the quick brown fox"},
                                             {"text": "hello world model " * 8}])
  mc = write_jsonl(tmp_path / "mc.jsonl", [
      {"prompt": "what is two plus three?\n", "choices": ["five", "six"], "answer": 0},
      {"question": "hello world\n", "choices": ["fine", "thanks", "you"], "answer": "you"}])
  prompts = write_jsonl(tmp_path / "prompts.jsonl", [
      {"prompt": "the quick brown"}, {"prompt": [user("what is two plus three")]}])
  section = EvalSection(batch_size=BATCH, suites={
      "lik": SuiteSection(kind="likelihood", data=lik),
      "mc": SuiteSection(kind="multiple_choice", data=mc),
      "drift": SuiteSection(kind="drift", data=prompts, max_new_tokens=8)})
  section.validate("eval.")
  ev = Evaluator(section, t.config, t.tok, log=lambda _: None)
  first = ev.evaluate(t.other, t.params)
  scoring, sampling = compilations(), _generate._cache_size()
  second = ev.evaluate(t.third, t.params)
  assert (compilations(), _generate._cache_size()) == (scoring, sampling)
  assert first["eval/lik/nll"] != second["eval/lik/nll"]
  assert first["eval/drift/kl"] > 0 and second["eval/drift/kl"] > 0
  assert abs(ev.evaluate(t.params, t.params)["eval/drift/kl"]) < 1e-6  # the reference itself
  assert (compilations(), _generate._cache_size()) == (scoring, sampling)


# -- likelihood suites --------------------------------------------------------------------------


def test_likelihood_is_token_weighted_over_the_scored_parts(tiny):
  t = tiny
  chat = [{"role": "system", "content": "you are helpful"}, user("hello"), assistant("how"),
          user("what is two plus three"), assistant("the answer is five")]
  rows = [{"text": "the quick brown fox jumps"},
          {"text": "hello world " * 6},
          {"messages": chat},
          {"messages": [user("how are you"), assistant("fine thanks")]},
          {"prompt": "what is two plus three?\n", "completion": "five"},
          {"prompt": [user("hello world")], "completion": [assistant("how are you")]}]
  pairs = []
  for row in rows[:2]:
    ids = t.tok.encode(row["text"], add_bos=True)
    assert ids[0] == t.tok.bos_id
    pairs.append((ids[:1], ids[1:]))  # all of the text given BOS
  for row in rows[2:4]:  # only the last assistant turn, given the conversation before it
    ctx, cont = split(t.tok, row["messages"][:-1], row["messages"][-1]["content"])
    rendered = t.tok.apply_chat_template(row["messages"], tokenize=True)
    assert ctx + cont == rendered and len(cont) < len(rendered) / 2
    pairs.append((ctx, cont))
  pairs.append(split(t.tok, rows[4]["prompt"], "five"))
  pairs.append(split(t.tok, rows[5]["prompt"], "how are you"))
  total = sum(brute(t.config, t.params, c, d)[0].sum() for c, d in pairs)
  tokens = sum(len(d) for _, d in pairs)
  got = suites.likelihood(t.model, None, rows, suite("likelihood"), {})
  assert got["tokens"] == tokens
  np.testing.assert_allclose(got["nll"], -total / tokens, atol=1e-6, rtol=0)
  np.testing.assert_allclose(got["perplexity"], math.exp(-total / tokens), rtol=1e-6)


def prompt_of(row):
  return row.get("prompt", row.get("question", row.get("messages")))


def _ece(conf, correct, bins=10):
  which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # (i/10, (i+1)/10] -> i
  return sum(np.mean(which == b) * abs(np.mean(correct[which == b]) - np.mean(conf[which == b]))
             for b in range(bins) if np.any(which == b))


def test_multiple_choice_accuracy_and_calibration(tiny):
  t = tiny
  rows = [
      {"prompt": "what is two plus three?\n", "choices": ["five", "six", "seven hundred"]},
      {"question": "Question: hello world\nAnswer:", "choices": [" a", " the quick brown fox"]},
      {"messages": [user("how are you")], "choices": ["fine", "fine thanks", "you", "hello"]},
      {"prompt": "the quick brown\n", "choices": ["fox", "dog jumps over"]},
      {"prompt": [user("what is two plus three")], "choices": ["five", "answer five", "two"]},
  ]
  lls = [np.array([logp(t, t.params, prompt_of(r), c) for c in r["choices"]]) for r in rows]
  golds = [int(np.argmax(ll)) if i % 2 == 0 else int(np.argmin(ll)) for i, ll in enumerate(lls)]
  for i, (r, g) in enumerate(zip(rows, golds)):
    r["answer"] = g if i < 3 else r["choices"][g]  # an index, or the right choice's text
  acc = np.array([np.argmax(ll) == g for ll, g in zip(lls, golds)])
  acc_norm = np.mean([np.argmax(ll / np.array([len(c) for c in r["choices"]])) == g
                      for ll, r, g in zip(lls, rows, golds)])
  probs = [np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum() for ll in lls]
  conf = np.array([p.max() for p in probs])
  brier = np.mean([np.sum((p - np.eye(len(p))[g]) ** 2) for p, g in zip(probs, golds)])
  got = suites.multiple_choice(t.model, None, rows, suite("multiple_choice"), {})
  assert got["acc"] == pytest.approx(0.6, abs=1e-12) and got["acc"] == acc.mean()
  assert got["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
  np.testing.assert_allclose(got["ece"], _ece(conf, acc.astype(float)), atol=1e-6, rtol=0)
  np.testing.assert_allclose(got["brier"], brier, atol=1e-6, rtol=0)
  assert 0 < got["ece"] < 1 and 0 < got["brier"] < 2


def test_multiple_choice_bad_rows_name_the_row(tiny, tmp_path):
  path = write_jsonl(tmp_path / "mc.jsonl", [
      {"prompt": "hello\n", "choices": ["a", "b"], "answer": 1},
      {"prompt": "hello\n", "choices": ["a", "b"], "answer": "zebra"},
      {"prompt": "hello\n", "answer": 0},
      {"prompt": "hello\n", "choices": ["a", "b"], "answer": 2},
      {"prompt": "hello\n", "choices": ["a"], "answer": 0},
      {"prompt": "hello\n", "choices": ["a", "b"]},
  ])
  rows = read_suite_rows(path, None)
  suites.multiple_choice(tiny.model, None, rows[:1], suite("multiple_choice"), {})
  for i, needle in [(1, "'zebra' is none of the choices"), (2, "needs 'choices'"),
                    (3, "answer 2 is not an index"), (4, "needs 'choices'"),
                    (5, "needs 'answer'")]:
    with pytest.raises(DataError, match=needle) as err:
      suites.multiple_choice(tiny.model, None, rows[:1] + rows[i:i + 1], suite("multiple_choice"),
                             {})
    assert err.value.where == f"{path} row {i + 1}" and str(err.value).startswith(err.value.where)


def test_preference_accuracy_margin_and_probe_flips(tiny):
  t, beta = tiny, 0.3
  rows = [
      {"prompt": "what is two plus three?\n", "chosen": "five", "rejected": "six"},
      {"prompt": [user("how are you")], "chosen": [assistant("fine thanks")],
       "rejected": [assistant("the dog")]},
      {"prompt": "hello world\n", "chosen": "hello", "rejected": "quick brown fox jumps"},
      {"prompt": [user("what is two plus three")], "chosen": [assistant("five")],
       "rejected": [assistant("answer two")]},
      {"prompt": "the quick brown\n", "chosen": "fox", "rejected": "dog"},
  ]

  def side(params, r, key):
    text = r[key] if isinstance(r[key], str) else r[key][-1]["content"]
    return logp(t, params, r["prompt"], text)

  c, r = (np.array([side(t.params, x, k) for x in rows]) for k in ("chosen", "rejected"))
  rc, rr = (np.array([side(t.other, x, k) for x in rows]) for k in ("chosen", "rejected"))
  s, cache = suite("preference", beta=beta), {}
  alone = suites.preference(t.model, None, rows, s, {})
  assert alone == {"logp_accuracy": float(np.mean(c > r))}
  got = suites.preference(t.model, t.ref, rows, s, cache)
  margin = beta * ((c - rc) - (r - rr))
  assert got["logp_accuracy"] == alone["logp_accuracy"]
  assert got["accuracy"] == np.mean(margin > 0)
  # each of the four summed log-probs of a row is within 1e-5 of the brute force
  np.testing.assert_allclose(got["margin"], margin.mean(), atol=beta * 4e-5, rtol=0)
  # the reference's scores are cached: a stand-in that cannot score gives the same answer
  again = suites.preference(t.model, object(), rows, s, cache)
  assert again["margin"] == got["margin"]

  probes = rows + [{"prompt": "what is two plus three?\n", "chosen": "six", "rejected": "two"}]
  flips = suites.probe_flips(t.model, t.ref, probes, {})
  ref_margin = np.append(rc - rr, side(t.other, probes[-1], "chosen") -
                         side(t.other, probes[-1], "rejected"))
  model_margin = np.append(c - r, side(t.params, probes[-1], "chosen") -
                           side(t.params, probes[-1], "rejected"))
  flipped = (ref_margin > 0) != (model_margin > 0)
  assert flipped[-1] and not flipped.all()  # the perturbation turned the last probe round
  assert flips["probe_flipped"] == flipped.mean()
  np.testing.assert_allclose(flips["probe_shift"], np.mean(model_margin - ref_margin), atol=4e-5,
                             rtol=0)
  assert flips["probe_shift"] != 0


# -- sampled suites -----------------------------------------------------------------------------

PROMPT_ROWS = [
    {"prompt": "the quick brown", "parity": 0},
    {"messages": [user("what is two plus three"), assistant("five")], "parity": 1},
    {"prompt": [user("hello world")], "parity": 0},
]


def prompt_ids(tok, row):
  if "messages" in row:  # the last assistant turn is the answer, not part of the prompt
    return tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
  if isinstance(row["prompt"], str):
    return tok.encode(row["prompt"], add_bos=True)
  return tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)


@pytest.fixture(scope="module")
def samples(tiny):
  """The samples every sampled suite of the module draws (`EvalModel.seed`: k=4 at
  temperature 1 from the same random numbers each call)."""
  return tiny.model.generate([prompt_ids(tiny.tok, r) for r in PROMPT_ROWS], **GEN)


def test_generation_is_seeded(tiny, samples):
  ids = [prompt_ids(tiny.tok, r) for r in PROMPT_ROWS]
  again = tiny.model.generate(ids, **GEN)
  assert [[x.text for x in g] for g in samples] == [[x.text for x in g] for g in again]
  for g, h in zip(samples, again):
    for x, y in zip(g, h):
      np.testing.assert_array_equal(x.entropies, y.entropies)
  other_seed = tiny.model.generate(ids, **GEN, seed=1)
  assert [[x.ids for x in g] for g in samples] != [[x.ids for x in g] for g in other_seed]
  assert all(len(g) == GEN["k"] for g in samples)
  assert len({x.text for g in samples for x in g}) > 8  # different samples of one prompt
  lengths = [len(x.ids) for g in samples for x in g]
  assert min(lengths) < GEN["max_new_tokens"] == max(lengths)  # some stopped early
  assert not any(IM_END in x.ids for g in samples for x in g)  # the stop token is cut off
  assert all(x.text == tiny.tok.decode(x.ids) for g in samples for x in g)


def test_generation_custom_scorer_and_pass_at_k(tiny, samples, tmp_path):
  path = tmp_path / "my_scorers.py"
  path.write_text(SCORERS)
  got = generation.generation(tiny.model, None, PROMPT_ROWS,
                              suite("generation", scorer=f"{path}:parity", **GEN), {})
  correct = np.array([[len(x.text) % 2 == r["parity"] for x in g]
                      for r, g in zip(PROMPT_ROWS, samples)])
  assert 0 < correct.mean() < 1
  assert set(got) == {"score", "length", "pass@1", "pass@2", "pass@4"}
  assert got["score"] == correct.mean()
  for j in (1, 2, 4):
    assert got[f"pass@{j}"] == M.mean_pass_at_k(correct, j)
  assert got["length"] == np.mean([len(x.ids) for g in samples for x in g])


def test_generation_numeric_scorer_and_majority(tiny, samples):
  """Each row's answer is the number its last sample with one gives (42 where none does)."""
  numbers = [[M.extract_number(x.text) for x in g] for g in samples]
  answers = [next((f"{n:g}" for n in ns[::-1] if n is not None), "42") for ns in numbers]
  rows = [{**r, "answer": a} for r, a in zip(PROMPT_ROWS, answers)]
  got = generation.generation(tiny.model, None, rows, suite("generation", scorer="numeric", **GEN),
                              {})
  right = np.array([[n is not None and abs(n - float(a)) <= 1e-6 * max(1, abs(float(a)))
                     for n in ns] for ns, a in zip(numbers, answers)])
  assert got["numeric_match"] == right.mean()
  assert any(n is not None for ns in numbers for n in ns)  # a random model does print digits
  hits = []
  for ns, a in zip(numbers, answers):
    votes = [repr(n) for n in ns if n is not None]
    top = max(Counter(votes).values(), default=0)
    vote = next((v for v in votes if votes.count(v) == top), "")
    hits.append(vote == repr(float(a)))
  assert got["maj@4"] == np.mean(hits)
  assert got["pass@4"] == M.mean_pass_at_k(right, 4)


def _vote(answers):
  """The most common non-empty answer, the earliest on ties ("" when none)."""
  answers = [a for a in answers if a]
  counts = Counter(answers)
  return next((a for a in answers if counts[a] == max(counts.values())), "")


def test_generation_majority_votes_against_the_scored_gold(tiny, samples):
  """maj@k compares the vote with the gold the score reads: a `solution` column (exact), the
  bare answer (regex: the pattern reads completions, not the gold)."""
  norm = lambda text: " ".join(text.split())  # noqa: E731
  texts = [[x.text for x in g] for g in samples]
  rows = [{"prompt": "the quick brown", "solution": texts[0][1]}, PROMPT_ROWS[1],
          {"prompt": [user("hello world")], "solution": texts[2][0]}]
  golds = [norm(texts[0][1]), "five", norm(texts[2][0])]
  got = generation.generation(tiny.model, None, rows, suite("generation", **GEN), {})
  assert got["exact_match"] == np.mean([[norm(x) == g for x in xs] for xs, g in zip(texts, golds)])
  maj = np.mean([_vote([norm(x) for x in xs]) == g for xs, g in zip(texts, golds)])
  assert got["maj@4"] == maj and maj > 0

  pattern = r"[a-z](\d)"
  digits = [[(re.findall(pattern, x) or [""])[-1] for x in xs] for xs in texts]
  golds = [_vote(d) or "9" for d in digits]
  rows = [{"prompt": "the quick brown", "answer": golds[0]},
          {"messages": PROMPT_ROWS[1]["messages"][:-1], "answer": golds[1]},
          {"prompt": [user("hello world")], "answer": golds[2]}]
  got = generation.generation(tiny.model, None, rows,
                              suite("generation", scorer="regex", pattern=pattern, **GEN), {})
  assert got["regex_match"] == np.mean([[d == g for d in ds] for ds, g in zip(digits, golds)])
  maj = np.mean([_vote(d) == g for d, g in zip(digits, golds)])
  assert got["maj@4"] == maj and maj > 0


def test_diversity_from_the_same_samples(tiny, samples):
  s = suite("diversity", entropy_tokens=3, **GEN)
  got = generation.diversity(tiny.model, None, PROMPT_ROWS, s, {})

  def distinct(texts, n):
    grams = [tuple(w[i:i + n]) for w in (x.split() for x in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0

  texts = [[x.text for x in g] for g in samples]
  for n in (1, 2, 3):
    assert got[f"distinct_{n}"] == pytest.approx(np.mean([distinct(g, n) for g in texts]),
                                                 abs=1e-12)
  bleu = np.mean([np.mean([sacrebleu.sentence_bleu(x, g[:i] + g[i + 1:]).score / 100
                           for i, x in enumerate(g)]) for g in texts])
  assert got["self_bleu"] == pytest.approx(min(max(bleu, 0.0), 1.0), abs=1e-12)
  # the sampler's entropies are those of the forward's softmax at the first 3 positions
  entropies = []
  for r, g in zip(PROMPT_ROWS, samples):
    ctx = prompt_ids(tiny.tok, r)
    for x in g:
      n = min(3, len(x.entropies))
      lp = log_softmax_rows(tiny.config, tiny.params, ctx + x.ids[:n])[len(ctx) - 1:][:n]
      h = -np.sum(np.exp(lp) * lp, -1)
      np.testing.assert_allclose(x.entropies[:n], h, atol=1e-5, rtol=0)
      entropies.extend(h)
  np.testing.assert_allclose(got["entropy"], np.mean(entropies), atol=1e-5, rtol=0)


def test_retention_is_relative_to_the_reference_evaluation(tiny, tmp_path):
  t = tiny
  scorers = tmp_path / "scorers.py"
  scorers.write_text(SCORERS)
  lik = write_jsonl(tmp_path / "lik.jsonl", [{"text": "the quick brown fox"},
                                             {"messages": [user("hello"), assistant("fine")]}])
  prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPT_ROWS)
  section = EvalSection(batch_size=BATCH, suites={
      "lik": SuiteSection(kind="likelihood", data=lik, retention=True),
      "gen": SuiteSection(kind="generation", data=prompts, retention=True, max_new_tokens=8,
                          scorer=f"{scorers}:nonempty")})
  section.validate("eval.")
  ev = Evaluator(section, t.config, t.tok, log=lambda _: None)
  assert ev.needs_reference()
  before = ev.evaluate(t.params, t.params)
  assert not any(k.endswith("_retention") for k in before)  # no reference results yet
  ref = ev.evaluate(t.params, t.params, is_reference=True)
  later = ev.evaluate(t.other, t.params)
  values = [k for k in ref if k.startswith(("eval/lik/", "eval/gen/"))
            and not k.endswith(("seconds", "_retention"))]
  assert {"eval/lik/nll", "eval/lik/perplexity", "eval/gen/score", "eval/gen/length"} <= set(values)
  for key in values:
    assert ref[f"{key}_retention"] == 1.0
    assert later[f"{key}_retention"] == later[key] / ref[key]
  assert later["eval/lik/nll_retention"] != 1.0
  assert "eval/lik/seconds_retention" not in later


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, key", [
    (dict(kind="generation", data="x.jsonl", k=4, temperature=0.0), "suites.s.temperature"),
    (dict(kind="diversity", data="x.jsonl", k=1, temperature=1.0), "suites.s.k"),
    (dict(kind="diversity", data="x.jsonl", k=4, temperature=0.0), "suites.s.temperature"),
    (dict(kind="generation", data="x.jsonl", scorer="regex"), "suites.s.pattern"),
    (dict(kind="generation", data="x.jsonl", scorer="fuzzy"), "suites.s.scorer"),
    (dict(kind="custom"), "suites.s.function"),
    (dict(kind="likelihood"), "suites.s.data"),
    (dict(kind="drift"), "suites.s.data"),
])
def test_suite_validation_names_the_key(kwargs, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    EvalSection(suites={"s": SuiteSection(**kwargs)}).validate("")


def test_empty_suites_and_yaml_overrides(tmp_path):
  with pytest.raises(ConfigError, match="suites is empty"):
    EvalSection(suites={}).validate("eval.")
  path = tmp_path / "EVAL.yaml"
  path.write_text("model: some/folder\nsuites:\n  arith:\n    kind: generation\n"
                  "    data: prompts.jsonl\n")
  cfg = load_config(path, ["suites.arith.k=4", "suites.arith.temperature=0.7",
                           "suites.arith.scorer=numeric"], root=EvalConfig)
  arith = cfg.suites["arith"]
  assert (arith.k, arith.temperature, arith.scorer, arith.kind) == (4, 0.7, "numeric", "generation")
  with pytest.raises(ConfigError, match=r"suites\.arith\.temperature"):
    load_config(path, ["suites.arith.k=4"], root=EvalConfig)
  with pytest.raises(ConfigError, match=r"unknown key 'suites\.arith\.kk'.*did you mean "
                                        r"'suites\.arith\.k'\?"):
    load_config(path, ["suites.arith.kk=4"], root=EvalConfig)
