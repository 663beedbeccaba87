"""Steering vectors (CAA), linear probes and per-head knockout, and their commands."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.cli import main
from jaxpost.config import ConfigError, load_config
from jaxpost.config.whitebox_tools import HeadsConfig, ProbeConfig, Site, SteerConfig
from jaxpost.models import forward
from jaxpost.models.sites import SITES, Capture
from jaxpost.sampling import generate
from jaxpost.tasks import arithmetic
from jaxpost.tiny import make_model
from jaxpost.whitebox import (Ablate, AddVector, contrastive_vector, fit_probe, head_attribution,
                              head_attribution_loop, knockout, last_token_activations,
                              probe_layers, probe_predict, steering_vector,
                              target_logprob_metric)
from jaxpost.whitebox.activations import pad_right
from jaxpost.whitebox.attribution import encode_targets, head_means
from jaxpost.whitebox.inputs import encode_prompts, open_model
from jaxpost.whitebox.steering import add_from_slot, steered_generations

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny random Llama (2 layers, 4 heads, width 32) with an arithmetic tokenizer."""
  folder = tmp_path_factory.mktemp("whitebox") / "model"
  rows, _ = arithmetic.make_split(max_operand=20, num_eval=10)
  make_model(folder, arithmetic.corpus(rows), hidden_size=32, num_layers=2,
             intermediate_size=64)
  config, params, tok = open_model(folder)
  return folder, config, params, tok


def _prompts(tok, pairs):
  return encode_prompts(tok, [arithmetic.question(a, b) for a, b in pairs], chat=True)


# -- activations and CAA -----------------------------------------------------------------------


def test_last_token_activations_ignore_padding_and_batching(tiny):
  _, config, params, tok = tiny
  prompts = [p[:n] for p, n in zip(_prompts(tok, [(1, 2), (13, 4), (7, 19)]), (5, 9, 12))]
  acts = last_token_activations(config, params, prompts, batch_size=2, layers=(1, 0))
  assert acts.shape == (2, 3, config.hidden_size)
  alone = jax.jit(lambda t: forward(config, params, t, capture=[Capture("resid_post")]
                                    ).captured["resid_post"])
  for i, p in enumerate(prompts):  # each prompt alone, unpadded
    np.testing.assert_allclose(acts[:, i], alone(jnp.asarray([p]))[::-1, 0, -1], atol=1e-5)


def test_caa_vector_is_the_mean_last_token_difference(tiny):
  _, config, params, tok = tiny
  pos, neg = _prompts(tok, [(15, 3), (17, 9), (12, 1)]), _prompts(tok, [(5, 3), (7, 9), (2, 1)])
  neg[1] = neg[1][:-3]  # a shorter negative: padding must not change its last token
  v = steering_vector(config, params, pos, neg, layers=(0,), batch_size=4)
  hidden = jax.jit(lambda t: forward(config, params, t, return_hidden_states=True
                                     ).hidden_states[1, 0, -1])  # layer 0's output, last token
  by_hand = [hidden(jnp.asarray([p])) - hidden(jnp.asarray([n])) for p, n in zip(pos, neg)]
  np.testing.assert_allclose(v[0], np.mean(by_hand, axis=0), atol=1e-5)
  assert np.linalg.norm(v) > 0
  with pytest.raises(ValueError, match="one shape"):
    contrastive_vector(np.zeros((1, 2, 3)), np.zeros((1, 3, 3)))


def test_steering_with_coefficient_zero_is_no_steering(tiny):
  _, config, params, tok = tiny
  prompts = _prompts(tok, [(3, 4), (11, 8)])
  v = jax.random.normal(jax.random.key(0), (config.hidden_size,))
  kw = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
  plain = generate(config, params, prompts, **kw)
  zero = generate(config, params, prompts, interventions=[AddVector("resid_post", v, 0.0, (0,))],
                  **kw)
  np.testing.assert_array_equal(zero.tokens, plain.tokens)
  np.testing.assert_allclose(zero.logprobs, plain.logprobs, atol=1e-6)
  strong = generate(config, params, prompts,
                    interventions=[AddVector("resid_post", v, 50.0, (0,))], **kw)
  assert not np.array_equal(strong.tokens, plain.tokens)  # the comparison can fail
  # positions="answer": from the last prompt token on; coefficient 0 is greedy decoding itself
  stops = tuple(tok.eos_ids)
  greedy = generate(config, params, prompts, max_new_tokens=6, temperature=0.0,
                    stop_tokens=stops)
  expected = [[int(t) for t in row[:n] if int(t) not in stops]
              for row, n in zip(np.asarray(greedy.tokens), np.asarray(greedy.lengths))]
  steered = steered_generations(config, params, prompts, v, [0.0, 50.0], layer=0,
                                max_new_tokens=6, stop_tokens=stops, batch_size=2)
  assert steered[0] == expected and steered[1] != expected


def test_add_from_slot_steers_only_from_its_slot_on(tiny):
  _, config, params, tok = tiny
  tokens = jnp.asarray(_prompts(tok, [(12, 7)]))
  T = tokens.shape[1]
  v = jax.random.normal(jax.random.key(1), (config.hidden_size,))
  plain = forward(config, params, tokens).logits
  steered = forward(config, params, tokens,
                    interventions=[add_from_slot("resid_post", v, 3.0, T - 1, 0)]).logits
  np.testing.assert_array_equal(steered[:, :T - 1], plain[:, :T - 1])
  assert not np.allclose(steered[:, T - 1], plain[:, T - 1])


# -- probes ------------------------------------------------------------------------------------


def _separable(n=400, d=24, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d,))
  return x, (x @ w > 0).astype(int)


def test_probe_separates_a_linear_set_and_is_at_chance_on_shuffled_labels():
  x, y = _separable()
  noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  acts = np.stack([x, noise])  # layer 0 holds the label, layer 1 does not
  labels = ["yes" if v else "no" for v in y]
  train, held = np.arange(280), np.arange(280, 400)
  r = probe_layers(acts, labels, train, held, l2=1e-3, steps=100)
  assert r.classes == ["no", "yes"]
  assert r.accuracy[0] >= 0.95 and r.train_accuracy[0] >= 0.97
  assert abs(r.accuracy[1] - 0.5) < 0.15 and abs(r.control[0] - 0.5) < 0.15
  # a single probe, three classes (the argmax of three linear scores: softmax-separable)
  y3 = np.argmax(x @ np.random.default_rng(2).normal(size=(x.shape[1], 3)), axis=1)
  probe = fit_probe(jnp.asarray(x[:280]), jnp.asarray(y3[:280]), num_classes=3, l2=1e-3,
                    steps=100)
  assert np.mean(np.asarray(probe_predict(probe, x[280:])) == y3[280:]) >= 0.9


# -- head knockout -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_batch(tiny):
  tok = tiny[3]
  pairs = [(3, 4), (11, 8), (6, 13)]
  prompts = _prompts(tok, pairs)
  targets = [tok.encode(str(a + b), add_bos=False) for a, b in pairs]
  return encode_targets(prompts, targets, 0)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_attribution_equals_a_direct_ablation_loop(tiny, target_batch, mode):
  _, config, params, _ = tiny
  tokens, segments, mask = target_batch
  metric = target_logprob_metric(config, params, tokens, segments, mask)
  mean = head_means(config, params, tokens, segments) if mode == "mean" else None
  clean, effect = head_attribution(metric, config.num_layers, config.num_heads,
                                   mean_LxHxDh=mean, batch_size=3)
  assert effect.shape == (config.num_layers, config.num_heads)
  np.testing.assert_allclose(clean, float(metric([])), atol=1e-5)
  for layer, head in ((0, 1), (1, 3)):
    value = None if mean is None else mean[layer]  # [H, Dh]: every head's mean
    direct = float(metric([Ablate("head_out", layers=(layer,), heads=(head,), value=value)]))
    np.testing.assert_allclose(effect[layer, head], direct - clean, atol=1e-4)
  assert np.any(np.abs(effect) > 1e-3)
  # the host-side loop (a metric that may generate) gives the same numbers
  loop_clean, loop = head_attribution_loop(lambda iv: float(jax.jit(metric)(iv)),
                                           config.num_layers, config.num_heads,
                                           mean_LxHxDh=mean)
  np.testing.assert_allclose(loop, effect, atol=1e-4)
  np.testing.assert_allclose(loop_clean, clean, atol=1e-5)


def test_knockout_of_no_head_changes_nothing_and_compiles_once(tiny, target_batch):
  _, config, params, _ = tiny
  tokens, segments, mask = target_batch
  metric = jax.jit(target_logprob_metric(config, params, tokens, segments, mask))
  none = jnp.zeros((config.num_layers, config.num_heads), bool)
  np.testing.assert_array_equal(metric([knockout(none)]), metric([knockout(none)]))
  metric([knockout(none.at[0, 2].set(True))])
  assert metric._cache_size() == 1  # pylint: disable=protected-access


def test_pad_right_rejects_empty_prompts():
  tokens, segments, lengths = pad_right([[5, 6, 7], [8]], 0, rows=3)
  assert tokens.shape == (3, 8) and lengths.tolist() == [3, 1, 1]
  assert segments[:, 0].tolist() == [1, 1, 1] and segments.sum() == 5
  with pytest.raises(ValueError, match="at least one token"):
    pad_right([[1], []])


# -- the commands ------------------------------------------------------------------------------


def _jsonl(path: Path, rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _yaml(path: Path, **keys) -> str:
  path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
  return str(path)


def test_steer_command_writes_vector_provenance_and_report(tiny, tmp_path, capsys):
  folder = tiny[0]
  pairs = _jsonl(tmp_path / "pairs.jsonl", [
      {"positive": arithmetic.question(a + 10, b), "negative": arithmetic.question(a, b)}
      for a, b in [(1, 2), (3, 4), (5, 6)]])
  prompts = _jsonl(tmp_path / "prompts.jsonl", [
      {"prompt": arithmetic.question(a, b), "answer": str(a + b)} for a, b in [(2, 2), (4, 1)]])
  cfg = _yaml(tmp_path / "steer.yaml", model=str(folder), pairs=pairs, prompts=prompts,
              out_dir=str(tmp_path / "out"), max_new_tokens=4)
  assert main(["steer", cfg, "k=8", "num_coefs=3", "metric=length", "threshold=1"]) == 0
  out = tmp_path / "out"
  vector = np.load(out / "vector.npy")
  meta = json.loads((out / "vector.json").read_text())
  assert vector.shape == (32,) and meta["layer"] == 1 and meta["num_pairs"] == 3
  assert meta["norm"] == pytest.approx(float(np.linalg.norm(vector)), rel=1e-5)
  summary = json.loads((out / "summary.json").read_text())
  assert [c["coef"] for c in summary["coefs"]] == [-8.0, 0.0, 8.0]
  assert all("accuracy" in c and c["metric_scored"] == 1.0 for c in summary["coefs"])
  assert len((out / "generations.jsonl").read_text().splitlines()) == 6
  report = (out / "report.md").read_text()
  assert "| coef | mean length | median length | length >= 1 | scored | accuracy |" in report
  assert "| -8 |" in report and report in capsys.readouterr().out


def test_probe_command_writes_table_and_png(tiny, tmp_path):
  cfg = _yaml(tmp_path / "probe.yaml", model=str(tiny[0]), task="larger_operand",
              max_operand=8, out_dir=str(tmp_path / "probe"), steps=20)
  assert main(["probe", cfg, "layers=[1]"]) == 0
  summary = json.loads((tmp_path / "probe" / "summary.json").read_text())
  assert summary["layers"] == [1] and summary["classes"] == ["first", "second"]
  assert summary["num_train"] + summary["num_eval"] == 8 * 7
  assert (tmp_path / "probe" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
  assert "| layer | held-out accuracy | train accuracy | control |" in (
      tmp_path / "probe" / "report.md").read_text()


def test_heads_command_with_a_reward_function(tiny, tmp_path):
  data = _jsonl(tmp_path / "targets.jsonl", [
      {"prompt": arithmetic.question(a, b), "target": str(a + b), "answer": str(a + b)}
      for a, b in [(1, 2), (3, 4)]])
  cfg = _yaml(tmp_path / "heads.yaml", model=str(tiny[0]), data=data,
              out_dir=str(tmp_path / "heads"), ablation="mean")
  assert main(["heads", cfg]) == 0
  effect = np.load(tmp_path / "heads" / "effect.npy")
  assert effect.shape == (2, 4) and np.any(effect != 0)
  assert main(["heads", cfg, "metric=jaxpost.rl.builtin_rewards:answer_reward",
               "max_new_tokens=3", f"out_dir={tmp_path / 'reward'}"]) == 0
  summary = json.loads((tmp_path / "reward" / "summary.json").read_text())
  assert np.asarray(summary["effect"]).shape == (2, 4) and 0.0 <= summary["clean"] <= 1.0
  assert (tmp_path / "reward" / "heads.png").exists()


# -- errors name the key, file and row ---------------------------------------------------------


def test_config_site_list_matches_the_models_sites():
  assert set(typing.get_args(Site)) == set(SITES) - {"attn_probs"}


@pytest.mark.parametrize("root,keys,message", [
    (SteerConfig, {"model": "m", "pairs": "p", "prompts": "q", "coef": 3},
     "unknown key 'coef'"),
    (SteerConfig, {"model": "m", "pairs": "p"}, "missing required key 'prompts'"),
    (SteerConfig, {"model": "m", "pairs": "p", "prompts": "q", "site": "resid"},
     "invalid value 'resid' for 'site'"),
    (SteerConfig, {"model": "m", "pairs": "p", "prompts": "q", "metric": "nope"},
     "metric must be number, length or module:function"),
    (ProbeConfig, {"model": "m"}, "set exactly one of data"),
    (ProbeConfig, {"model": "m", "task": "sum"}, "invalid value 'sum' for 'task'"),
    (HeadsConfig, {"model": "m", "task": "arithmetic", "ablation": "half"},
     "invalid value 'half' for 'ablation'"),
])
def test_config_errors_name_the_key(tmp_path, root, keys, message):
  with pytest.raises(ConfigError, match=message):
    load_config(_yaml(tmp_path / "c.yaml", **keys), root=root)


@pytest.mark.parametrize("rows,message", [
    (['{"positive": "a", "negative": "b"}', "{oops"], r"pairs.jsonl row 2: invalid JSON"),
    (['{"positive": "a"}'], r"pairs.jsonl row 1: field 'negative' is missing"),
    (['{"positive": "a", "negative": ""}'], r"row 1: field 'negative' must be a non-empty"),
])
def test_bad_rows_are_named_by_file_and_row(tiny, tmp_path, capsys, rows, message):
  pairs = _jsonl(tmp_path / "pairs.jsonl", rows)
  prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 + 2?"}])
  cfg = _yaml(tmp_path / "steer.yaml", model=str(tiny[0]), pairs=pairs, prompts=prompts)
  assert main(["steer", cfg]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxpost: error: ") and len(err.strip().splitlines()) == 1
  assert re.search(message, err), err


def test_the_architecture_doc_example_runs_as_written():
  doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
  code = re.search(r"<!-- whitebox-tools-example -->\s*```python\n(.*?)```", doc, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "docs/architecture.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["v"].shape == (1, 64) and len(namespace["completions"]) == 3
  assert namespace["effect"].shape == (2, 4) and np.isfinite(namespace["clean"])


def test_a_missing_model_is_named(tmp_path, capsys):
  cfg = _yaml(tmp_path / "probe.yaml", model=str(tmp_path / "nowhere"), task="carry")
  assert main(["probe", cfg]) == 2
  err = capsys.readouterr().err
  assert "nowhere: not a Hugging Face model folder" in err and len(err.splitlines()) == 1
