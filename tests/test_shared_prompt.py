"""`dpo.shared_prompt`: a pair as one row `prompt, chosen, rejected` scores the prompt once and
gives the unshared log-probs, losses and gradients (`jaxpost.data.shared_prompt`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.data.formats import Example
from jaxpost.data.preference import Pair, pair_batch
from jaxpost.data.shared_prompt import (CHOSEN, REJECTED, TRUNK, reply_cap, shared_pair_batch,
                                        shared_row_length)
from jaxpost.losses.dpo import dpo_loss, pair_logps
from jaxpost.models import init_params
from jaxpost.tiny import tiny_config


V = 97


def _pair(rng, prompt_len, chosen_len, rejected_len):
  prompt = rng.integers(1, V, prompt_len)
  sides = []
  for n in (chosen_len, rejected_len):
    tokens = np.concatenate([prompt, rng.integers(1, V, n)])
    mask = np.arange(len(tokens)) >= max(prompt_len, 1)
    sides.append(Example(tokens, mask))
  return Pair(sides[0], sides[1], prompt_len)


def _pairs():
  rng = np.random.default_rng(0)
  # prompts of 0, 1 and several tokens; replies of different lengths; a padding pair
  return [_pair(rng, 7, 5, 9), _pair(rng, 1, 6, 3), None, _pair(rng, 0, 4, 4),
          _pair(rng, 12, 2, 11)]


def _model():
  config = tiny_config(V, hidden_size=32, num_layers=2)
  params = init_params(config, jax.random.key(0), dtype=jnp.float32)
  ref = init_params(config, jax.random.key(1), dtype=jnp.float32)
  return config, params, ref


def test_layout_branches_positions_and_targets():
  pair = _pairs()[0]  # prompt 7, chosen 5, rejected 9 reply tokens
  b = shared_pair_batch([pair], 40)
  branch, pos = b["branch_ids"][0], b["positions"][0]
  n = shared_row_length(pair)
  assert n == 6 + 6 + 10 and (b["segment_ids"][0, :n] == 1).all() and b["segment_ids"][0, n:].sum() == 0
  assert (branch[:6] == TRUNK).all() and (branch[6:12] == CHOSEN).all()
  assert (branch[12:22] == REJECTED).all()
  np.testing.assert_array_equal(pos[:22], np.r_[0:6, 6:12, 6:16])
  # the last prompt token (position 6) opens each branch and predicts that reply's first token
  assert b["tokens"][0, 6] == b["tokens"][0, 12] == pair.chosen.tokens[6]
  assert b["targets"][0, 6] == pair.chosen.tokens[7] and b["targets"][0, 12] == pair.rejected.tokens[7]
  assert b["loss_mask"][0].sum() == pair.chosen.num_targets + pair.rejected.num_targets


def test_reply_cap_keeps_the_shorter_reply_whole():
  assert reply_cap((3, 9), 20) == 9
  assert reply_cap((3, 9), 10) == 7
  assert reply_cap((8, 9), 10) == 5
  b = shared_pair_batch([_pairs()[4]], 20)  # trunk 11 + replies 3 and 12: cut to 3 + 6
  assert (b["branch_ids"][0] == CHOSEN).sum() == 3 and (b["branch_ids"][0] == REJECTED).sum() == 6
  with pytest.raises(ValueError, match="max_prompt_length"):
    shared_pair_batch([_pairs()[4]], 13)


def test_shared_logps_equal_unshared_for_policy_and_reference():
  config, params, ref = _model()
  pairs = _pairs()
  unshared = jax.device_put(pair_batch(pairs, 24))
  shared = jax.device_put(shared_pair_batch(pairs, 32))
  logps = jax.jit(functools.partial(pair_logps, config))
  for p in (params, ref):  # the policy's and the reference's (chosen, rejected, lengths)
    for x, y in zip(logps(p, unshared), logps(p, shared)):
      np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_shared_loss_and_gradient_equal_unshared():
  config, params, ref = _model()
  pairs = _pairs()
  unshared = jax.device_put(pair_batch(pairs, 24))
  shared = jax.device_put(shared_pair_batch(pairs, 32))
  loss = functools.partial(dpo_loss, config=config, ref_params=ref, beta=0.5, sft_weight=0.3)

  @jax.jit
  def losses(batch):  # SimPO and ORPO (with RPO's NLL term) read the same log-probs
    return {t: loss(params, batch, None, loss_type=t)[0] for t in ("simpo", "orpo")}

  a, b = losses(unshared), losses(shared)
  for key in a:
    assert abs(float(a[key]) - float(b[key])) < 1e-5, key
  dpo = jax.jit(jax.value_and_grad(functools.partial(loss, loss_type="sigmoid"), has_aux=True))
  (la, ma), ga = dpo(params, unshared, None)
  (lb, mb), gb = dpo(params, shared, None)
  assert abs(float(la) - float(lb)) < 1e-5
  assert float(ma["weight"]) == float(mb["weight"]) == 4  # the padding pair does not count
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_dpo_run_with_shared_prompt_gives_the_unshared_losses(tmp_path):
  """The tiny DPO run of the conformance table, unshared with the reference in the step, and
  shared with the reference precomputed over the shared rows: the same loss at every step."""
  from test_algorithms import run
  _, plain = run(tmp_path, "plain", "dpo", steps=2)
  _, shared = run(tmp_path, "shared", "dpo", steps=2,
                  overrides=["dpo.shared_prompt=true", "data.seq_len=64",
                             "reference.mode=precomputed"])
  losses = lambda rows: np.array([r["train/loss"] for r in rows])  # noqa: E731
  assert abs(losses(plain)[0] - losses(shared)[0]) < 1e-5
  # after a step the policy has moved from the reference: the losses still agree
  assert losses(plain)[1] != losses(plain)[0]
  np.testing.assert_allclose(losses(shared), losses(plain), atol=2e-5)
  assert list((tmp_path / "shared" / "data").glob("reference_logps_*.npy"))


def test_shared_prompt_is_refused_outside_offline_dpo(tmp_path):
  from test_algorithms import RECIPE

  from jaxpost.config import ConfigError, load_config
  recipe = tmp_path / "kto.yaml"
  recipe.write_text(RECIPE.format(algorithm="kto", run_dir=tmp_path / "r", steps=2))
  with pytest.raises(ConfigError, match="dpo.shared_prompt"):
    load_config(recipe, ["dpo.shared_prompt=true"])
