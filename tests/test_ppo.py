"""PPO with a critic (`algorithm: ppo`): the update against a float64 NumPy transcription of PPO
and GAE, the KL-penalised per-token rewards, the adaptive KL controller, exact accumulation
(micro-batches, 8 devices), the rollout batch and the critic's warm-up, a tiny run and its
export, the critic from a reward model, config errors, and exact resume after SIGKILL."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from kill_after_checkpoint import WRAPPER
from devices import run_on_8_cpu_devices

from jaxpost.algorithms.ppo import (CRITIC, VALUE, critic_values, policy_of, ppo_loss,
                                    ppo_objective, ppo_param_specs, with_critic)
from jaxpost.config import ConfigError, load_config
from jaxpost.losses.rl import gae, masked_whiten
from jaxpost.losses.tokens import target_logprobs
from jaxpost.models import ModelConfig, forward, init_params, param_specs
from jaxpost.rl.ppo_rollout import adaptive_kl_update, token_rewards
from jaxpost.rl.rollout import completion_rows
from jaxpost.train.step import init_state, make_train_step

jax.config.update("jax_numpy_rank_promotion", "raise")

# ----------------------------------------------------------------------------------------------
# Literal NumPy references (float64 loops), written from the papers.


def np_token_rewards(scores, old, ref, mask, kl_coef):
  """Ziegler et al. 2019 / TRL: -kl_coef (logp_old - logp_ref) on every completion token, the
  score added at the last one."""
  r, kl = np.zeros(mask.shape), np.zeros(mask.shape)
  for i in range(mask.shape[0]):
    toks = [t for t in range(mask.shape[1]) if mask[i, t]]
    for t in toks:
      kl[i, t] = old[i, t] - ref[i, t]
      r[i, t] = -kl_coef * kl[i, t]
    if toks:
      r[i, toks[-1]] += scores[i]
  return r, kl


def np_gae(r, v, mask, gamma, lam):
  """GAE (1506.02438, eq. 16) over each row's completion tokens: delta_k = r_k + gamma V_{k+1}
  - V_k, A_k = delta_k + gamma lam A_{k+1}, 0 after the last token; returns A + V."""
  adv, ret = np.zeros(r.shape), np.zeros(r.shape)
  for i in range(r.shape[0]):
    toks = [t for t in range(r.shape[1]) if mask[i, t]]
    next_v = next_a = 0.0
    for t in reversed(toks):
      delta = r[i, t] + gamma * next_v - v[i, t]
      next_a = delta + gamma * lam * next_a
      next_v = v[i, t]
      adv[i, t], ret[i, t] = next_a, next_a + v[i, t]
  return adv, ret


def np_whiten(x, mask, eps=1e-8):
  """(x - mean) / sqrt(var + eps) over the batch's completion tokens, var unbiased (verl)."""
  vals = [x[i, t] for i, t in np.ndindex(x.shape) if mask[i, t]]
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
  out = np.zeros(x.shape)
  for i, t in np.ndindex(x.shape):
    if mask[i, t]:
      out[i, t] = (x[i, t] - mean) / math.sqrt(var + eps)
  return out


def np_ppo_loss(logp, values, old, old_v, adv, ret, mask, *, clip_low, clip_high, value_clip,
                vf_coef, policy_on=1.0):
  """PPO (1707.06347): the clipped surrogate, eq. 7, as a loss, and the clipped squared value
  error (sec. 5; baselines' ppo2), each a mean over completion tokens."""
  pol = val = 0.0
  n = 0
  for i, t in np.ndindex(mask.shape):
    if not mask[i, t]:
      continue
    n += 1
    ratio = math.exp(logp[i, t] - old[i, t])
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    pol += max(-adv[i, t] * ratio, -adv[i, t] * clipped)
    v_clip = old_v[i, t] + min(max(values[i, t] - old_v[i, t], -value_clip), value_clip)
    val += 0.5 * max((values[i, t] - ret[i, t]) ** 2, (v_clip - ret[i, t]) ** 2)
  return policy_on * pol / n + vf_coef * val / n


def central_differences(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g


LENGTHS = (5, 3, 0, 6, 1, 4)  # completion lengths; row 2 is empty (e.g. no reward)
PROMPTS = (2, 3, 1, 1, 4, 2)
T = 10


def completion_mask(lengths=LENGTHS, prompts=PROMPTS, width=T):
  """Completion tokens after a prompt, as `completion_rows` lays them out (targets-aligned)."""
  mask = np.zeros((len(lengths), width), bool)
  for i, (p, n) in enumerate(zip(prompts, lengths)):
    mask[i, p - 1:p - 1 + n] = True
  return mask


# ----------------------------------------------------------------------------------------------
# The math


def test_token_rewards_and_gae_match_numpy_loops():
  rng = np.random.default_rng(0)
  mask = completion_mask()
  old = rng.uniform(-3, -0.1, mask.shape)
  ref = old + rng.normal(0, 0.3, mask.shape)
  old, ref = np.where(mask, old, 9.0), np.where(mask, ref, -9.0)  # garbage on padding
  scores = rng.normal(0, 1, len(LENGTHS))
  rewards, k1 = token_rewards(scores, old, ref, mask, 0.07)
  want_r, want_kl = np_token_rewards(scores, old, ref, mask, 0.07)
  np.testing.assert_allclose(rewards, want_r, atol=1e-6)
  np.testing.assert_allclose(k1, want_kl, atol=1e-6)
  assert rewards.dtype == np.float32 and not rewards[2].any()  # the empty row gets nothing
  last = [max(np.flatnonzero(m)) for m in mask if m.any()]
  assert all(rewards[i, t] != -0.07 * k1[i, t] for i, t in zip((0, 1, 3, 4, 5), last))
  values = np.where(mask, rng.normal(0, 1, mask.shape), 0.0)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values, jnp.float32), jnp.asarray(mask),
                   gamma=gamma, lam=lam)
    want_adv, want_ret = np_gae(rewards.astype(np.float64), values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, atol=1e-5)
  # lam = gamma = 1: the return of each token is the row's summed rewards from there on
  np.testing.assert_allclose(ret[0, PROMPTS[0] - 1], rewards[0].sum(), atol=1e-5)


@pytest.mark.parametrize("policy_on,fresh", [(1.0, 0.0), (0.0, 0.0), (1.0, 1.0)])
def test_ppo_update_matches_numpy_values_and_gradients(policy_on, fresh):
  """GAE -> whitening -> clipped surrogate + vf_coef x clipped value loss: the loss and its
  gradients w.r.t. the log-probs and the values, float32 against float64 loops."""
  rng = np.random.default_rng(1)
  mask = completion_mask()
  B = mask.shape[0]
  logp = rng.uniform(-3, -0.1, mask.shape)
  old = logp + rng.normal(0, 0.3, mask.shape)
  old_v = rng.normal(0, 1, mask.shape)
  values = old_v + rng.normal(0, 0.4, mask.shape)
  rewards = np.where(mask, rng.normal(0, 0.3, mask.shape), 0.0)
  opts = dict(clip_low=0.2, clip_high=0.28, value_clip=0.2, vf_coef=0.5)
  adv, ret = np_gae(rewards, old_v, mask, 0.9, 0.95)
  adv = np_whiten(adv, mask)
  old_np = logp if fresh else old  # fresh: the ratio is exactly 1 (old = current, no gradient)
  want = np_ppo_loss(logp, values, old_np, old_v, adv, ret, mask, policy_on=policy_on, **opts)
  want_g_logp = central_differences(  # old is a constant (fresh: the stopped current value)
      lambda x: np_ppo_loss(x, values, old_np, old_v, adv, ret, mask, policy_on=policy_on,
                            **opts), logp)
  want_g_v = central_differences(
      lambda x: np_ppo_loss(logp, x, old_np, old_v, adv, ret, mask, policy_on=policy_on,
                            **opts), values)

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  j_adv, j_ret = gae(f32(rewards), f32(old_v), jnp.asarray(mask), gamma=0.9, lam=0.95)
  batch = {"loss_mask": jnp.asarray(mask, jnp.int32), "advantages": masked_whiten(j_adv, mask),
           "returns": j_ret, "old_values": f32(old_v), "old_logps": f32(old),
           "fresh": jnp.full((B,), fresh), "policy_on": jnp.full((B,), policy_on)}

  def loss(lp, v):
    return ppo_objective(lp, v, batch, vf_coef=0.5, value_clip=0.2, clip_low=0.2,
                         clip_high=0.28)

  (value, metrics), (g_logp, g_v) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      f32(logp), f32(values))
  np.testing.assert_allclose(value, want, atol=1e-5)
  np.testing.assert_allclose(g_logp, np.where(mask, want_g_logp, 0.0), atol=1e-5)
  np.testing.assert_allclose(g_v, np.where(mask, want_g_v, 0.0), atol=1e-5)
  assert float(metrics["weight"]) == mask.sum()
  if not fresh:
    assert 0 < float(metrics["policy/clipfrac"]) < 1 and 0 < float(metrics["val/clipfrac"]) < 1
  else:
    assert float(metrics["ratio/mean"]) == 1.0 and float(metrics["policy/clipfrac"]) == 0.0
  m = mask
  np.testing.assert_allclose(metrics["val/error"], ((values - ret) ** 2)[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["val/explained_variance"],
                             1 - (ret - values)[m].var() / ret[m].var(), rtol=1e-4)
  if policy_on == 0:
    assert not np.asarray(g_logp).any()  # the critic's warm-up: only the values train


def test_adaptive_kl_controller_is_trls():
  """TRL's AdaptiveKLController (Ziegler et al. 2019), transcribed."""
  class TRL:
    def __init__(self, init, target, horizon):
      self.value, self.target, self.horizon = init, target, horizon

    def update(self, current, n_steps):
      proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
      mult = 1 + proportional_error * n_steps / self.horizon
      self.value *= mult

  ref, ours = TRL(0.05, 6.0, 10000), 0.05
  for kl in (0.0, 3.0, 5.9, 6.0, 7.0, 40.0, -1.0):
    ref.update(kl, 128)
    ours = adaptive_kl_update(ours, kl, target=6.0, horizon=10000, n_steps=128)
    assert ours == pytest.approx(ref.value, rel=1e-15)


# ----------------------------------------------------------------------------------------------
# The loss on a tiny model: alignment, exact accumulation

CONFIG = ModelConfig(model_type="llama", vocab_size=48, hidden_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     pad_token_id=0, eos_token_id=1)
ROWS, WIDTH = 16, 16
LOSS = functools.partial(ppo_loss, config=CONFIG, temperature=0.7, vf_coef=0.5,
                         value_clip=0.2, clip_low=0.2, clip_high=0.28)


def ppo_params(seed=0):
  """Policy and critic; the critic's trunk is then moved off the policy's and its head made
  large enough for values of order 1."""
  params = with_critic(CONFIG, init_params(CONFIG, jax.random.key(seed)),
                       jax.random.key(seed + 1))
  critic = params[CRITIC]
  critic["layers"] = jax.tree.map(lambda x: x * 1.1, critic["layers"])
  critic[VALUE] = 0.3 * jax.random.normal(jax.random.key(seed + 2), critic[VALUE].shape)
  return params


def ppo_batch(params, seed=0):
  """16 prompt + completion rows (one without completion tokens, as a row no reward scored),
  old log-probs and values off the current ones, GAE targets; rows 0-3 fresh."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(2, CONFIG.vocab_size, rng.integers(1, 5)).tolist() for _ in range(ROWS)]
  lengths = rng.integers(1, 9, ROWS)
  completions = rng.integers(2, CONFIG.vocab_size, (ROWS, 8))
  rows = completion_rows(prompts, completions, lengths, 1, WIDTH)
  rows["loss_mask"][5] = 0
  logps, values = _current(params, rows)
  mask = rows["loss_mask"] > 0
  old = logps + rng.normal(0, 0.3, logps.shape)
  old_v = values + rng.normal(0, 0.3, values.shape)
  rewards = np.where(mask, rng.normal(0, 0.5, mask.shape), 0.0)
  adv, ret = gae(jnp.asarray(rewards), jnp.asarray(old_v), jnp.asarray(mask), gamma=1.0, lam=0.95)
  return dict(rows, old_logps=old.astype(np.float32), old_values=old_v.astype(np.float32),
              advantages=np.asarray(masked_whiten(adv, mask)), returns=np.asarray(ret),
              fresh=(np.arange(ROWS) < 4).astype(np.float32), policy_on=np.ones(ROWS, np.float32))


@jax.jit
def _current(params, rows):
  """(log-probs at temperature 0.7, values) of the rows, as the rollout computes them."""
  out = forward(CONFIG, policy_of(params), rows["tokens"], positions=rows["positions"],
                segment_ids=rows["segment_ids"], compute_logits=False)
  logps = target_logprobs(CONFIG, policy_of(params), out.final_hidden, rows["targets"],
                          temperature=0.7)
  values = critic_values(CONFIG, params[CRITIC], rows["tokens"], positions=rows["positions"],
                         segment_ids=rows["segment_ids"])
  return logps, values


def ppo_step(micro_batches, **kw):
  """`(batch, state=None) -> (params, metrics)`: one SGD step from `ppo_params()`."""
  opt = optax.sgd(0.5)
  step = make_train_step(LOSS, opt, micro_batches=micro_batches, **kw)

  def run(batch, state=None):
    state = init_state(ppo_params(), opt, jax.random.key(0)) if state is None else state
    state, metrics = step(state, batch, {})
    return state.params, metrics
  return run


def test_values_are_aligned_with_the_targets_and_the_loss_reads_both_models():
  """V at position t is the head on the critic's state after tokens[<= t] (a reward model's
  score of that prefix); on fresh rows with old values = values, the ratio is 1 and the value
  loss is the squared error to the returns."""
  from jaxpost.reward import rewards as reward_of
  params = ppo_params()
  batch = ppo_batch(params)
  critic = dict(params[CRITIC])
  rm = {**{k: v for k, v in critic.items() if k != VALUE}, "score": critic[VALUE]}
  _, values = _current(params, {k: jnp.asarray(batch[k]) for k in ("tokens", "targets",
                                                                    "segment_ids", "positions")})
  row = 0
  for t in range(int(batch["segment_ids"][row].sum())):
    seg = (np.arange(WIDTH) <= t).astype(np.int32)[None]
    want = reward_of(CONFIG, rm, jnp.asarray(batch["tokens"][row:row + 1]), jnp.asarray(seg))
    np.testing.assert_allclose(values[row, t], want[0], atol=1e-5)
  fresh = dict(batch, fresh=np.ones(ROWS, np.float32), old_values=np.asarray(values))
  _, m = jax.jit(LOSS)(params, fresh, None)
  assert float(m["ratio/mean"]) == 1.0
  mask = batch["loss_mask"] > 0
  np.testing.assert_allclose(m["val/error"], ((np.asarray(values) - batch["returns"]) ** 2)[mask]
                             .mean(), rtol=1e-5)


def test_micro_batches_equal_one_batch():
  batch = ppo_batch(ppo_params())
  p1, m1 = ppo_step(1)(batch)
  p4, m4 = ppo_step(4)(batch)
  assert float(m1["skipped"]) == 0.0 and float(m4["skipped"]) == 0.0
  np.testing.assert_allclose(m4["loss"], m1["loss"], atol=1e-6, rtol=0)
  for k in ("policy/clipfrac", "val/clipfrac", "val/vpred", "val/error", "loss/value_avg"):
    np.testing.assert_allclose(m4[k], m1[k], atol=1e-6, rtol=0, err_msg=k)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, p4)
  assert max(jax.tree.leaves(diff)) < 1e-6, diff
  # both the policy and the critic moved (each term's gradient reaches its own model)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, ppo_params())
  assert moved["layers"]["mlp"]["up"] > 1e-4 and moved[CRITIC]["layers"]["mlp"]["up"] > 1e-4
  assert moved[CRITIC][VALUE] > 1e-4 and moved["lm_head"] > 1e-4


SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    sys.path.insert(0, sys.argv[1])
    from test_ppo import CONFIG, ppo_batch, ppo_params, ppo_step
    from jaxpost import sharding as sharding_lib
    from jaxpost.algorithms.ppo import ppo_param_specs
    from jaxpost.train.step import batch_sharding, init_state, state_shardings

    assert jax.device_count() == 8
    mesh = sharding_lib.make_mesh(data=4, fsdp=2)
    opt = optax.sgd(0.5)
    pshard = sharding_lib.param_shardings(ppo_param_specs(CONFIG), mesh)
    sshard = state_shardings(pshard, ppo_params(), opt, mesh)
    batch = ppo_batch(ppo_params(), 3)
    p1, m1 = ppo_step(1)(batch)
    # 8 batch shards x 2 micro-batches: each device holds one row of each micro-batch
    eight = ppo_step(2, state_sharding=sshard, batch_sharding=batch_sharding(mesh))
    sharded = jax.device_put(batch, batch_sharding(mesh))
    assert len(sharded["tokens"].sharding.device_set) == 8
    state = jax.device_put(init_state(ppo_params(), opt, jax.random.key(0)), sshard)
    p8, m8 = eight(sharded, state)
    err = max([abs(float(m8["loss"]) - float(m1["loss"]))]
              + [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p8),
                                                                 jax.tree.leaves(p1))])
    print("err", err)
    assert err < 1e-6, err
    print("OK")
""")


def test_8_devices_equal_one_device():
  run_on_8_cpu_devices(SHARDED)


def test_param_specs_cover_the_critic():
  params = ppo_params()
  specs = ppo_param_specs(CONFIG)
  assert jax.tree.structure(jax.tree.map(lambda _: 0, params)) == jax.tree.structure(
      jax.tree.map(lambda _: 0, specs, is_leaf=lambda x: hasattr(x, "axes")))
  assert "lm_head" not in specs[CRITIC] and specs[CRITIC][VALUE].shape == (CONFIG.hidden_size,)
  assert set(param_specs(CONFIG)) == set(policy_of(specs))
  # the critic starts as the policy's trunk, in its own buffers
  fresh = with_critic(CONFIG, init_params(CONFIG, jax.random.key(0)), jax.random.key(1))
  np.testing.assert_array_equal(fresh[CRITIC]["layers"]["mlp"]["up"],
                                fresh["layers"]["mlp"]["up"])
  assert (fresh[CRITIC]["embed"].unsafe_buffer_pointer()
          != fresh["embed"].unsafe_buffer_pointer())


# ----------------------------------------------------------------------------------------------
# Runs on the tiny model

RECIPE = """\
algorithm: ppo
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
rl: {{num_generations: 4, max_new_tokens: 5, reward_funcs: "{rewards}:digits"}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 8, log_every: 1}}
checkpoint: {{every: {every}, async_save: false}}
"""

REWARDS = """\
def digits(prompts, completions, **kwargs):
  texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
  return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]
"""


def _recipe(tmp, name, steps=2, every=0, overrides=()):
  rewards = tmp / "my_rewards.py"
  rewards.write_text(REWARDS)
  text = RECIPE.format(run_dir=tmp / name, rewards=rewards, steps=steps, every=every or steps)
  for o in overrides:  # section.key=value, written into the recipe (a subprocess reads it)
    section, kv = o.split(".", 1)
    key, value = kv.split("=")
    text = text.replace(f"{section}: {{", f"{section}: {{{key}: {value}, ", 1)
  path = tmp / f"{name}.yaml"
  path.write_text(text)
  return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A built PPO run (2 mini-batches per rollout, 1 warm-up step, adaptive KL) and its source."""
  from jaxpost.train.build import build
  tmp = tmp_path_factory.mktemp("ppo")
  cfg = load_config(_recipe(tmp, "built"), [
      "rl.mini_batches=2", "rl.temperature=0.7", "rl.value_warmup_steps=1",
      "rl.adaptive_kl=true", "rl.kl_horizon=100", "rl.target_kl=0.5"])
  run = build(cfg)
  state, frozen = run.init_state()
  source = run.algorithm.batches("train", run.policy(state.params, frozen, 0))
  return run, state, frozen, source


def test_rollout_batch_warm_up_and_kl_coefficient(built):
  """The rollout's PPO keys; old values are the critic's; the KL is 0 at the start (policy =
  reference), so the adaptive coefficient shrinks by 0.2 n / horizon; the warm-up step trains
  the critic only, the next one both."""
  run, state, frozen, source = built
  source.queue.clear()
  first = source.next(run.policy(state.params, frozen, 0))
  second = source.next(run.policy(state.params, frozen, 1))
  assert {"advantages", "returns", "old_values", "old_logps", "fresh", "policy_on"} <= set(first)
  assert "ref_logps" not in first
  assert first["policy_on"].tolist() == [0.0] * 8 and second["policy_on"].tolist() == [1.0] * 8
  assert first["fresh"].tolist() == [1.0] * 8 and second["fresh"].tolist() == [0.0] * 8
  mask = first["loss_mask"] > 0
  rows = run.place({k: first[k] for k in ("tokens", "segment_ids", "positions")})
  model = run.trainable.model(state.params, frozen)
  values = np.asarray(jax.jit(functools.partial(critic_values, run.config))(
      model[CRITIC], rows["tokens"], positions=rows["positions"],
      segment_ids=rows["segment_ids"]))
  np.testing.assert_allclose(first["old_values"][mask], values[mask], atol=1e-6)
  both = np.concatenate([first["advantages"], second["advantages"]])[
      np.concatenate([mask, second["loss_mask"] > 0])]
  assert abs(both.mean()) < 1e-5 and abs(both.std(ddof=1) - 1) < 1e-3  # whitened over both
  metrics = source.host_metrics()
  assert abs(metrics["objective/kl"]) < 1e-5 and metrics["kl_coef"] == 0.05
  n = 16  # samples per rollout: batch_size x mini_batches
  assert source.state()["ppo"]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * n / 100), rel=1e-12)

  before = jax.tree.map(np.array, state.params)
  s1, m1 = run.step(state, run.place(first), frozen)  # (donates the fixture's state)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), s1.params, before)
  assert max(jax.tree.leaves(policy_of(moved))) == 0.0 and moved[CRITIC][VALUE] > 0
  assert float(m1["ratio/mean"]) == 1.0  # fresh: the first update's ratio is exactly 1
  before = jax.tree.map(np.array, s1.params)
  s2, _ = run.step(s1, run.place(second), frozen)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), s2.params, before)
  assert moved["layers"]["mlp"]["up"] > 0 and moved[CRITIC]["layers"]["mlp"]["up"] > 0
  saved = json.loads(json.dumps(source.state()))
  source.ppo.kl_coef = 1.0
  source.restore(saved)
  assert source.ppo.kl_coef == saved["ppo"]["kl_coef"]
  source.queue.clear()


def test_a_tiny_run_reports_and_exports_the_policy_alone(tmp_path):
  from jaxpost.models import load_hf
  from jaxpost.train.trainer import train
  summary = train(load_config(_recipe(tmp_path, "run", steps=3),
                              ["rl.mini_batches=2", "rl.num_generations=1"]))
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "train/loss" in r][-1]
  for key in ("objective/entropy", "policy/clipfrac", "policy/approxkl", "val/clipfrac",
              "val/vpred", "val/error", "val/explained_variance", "objective/kl",
              "objective/rlhf_reward", "objective/scores", "kl_coef", "reward",
              "completions/mean_length", "timing/sampling_s"):
    assert f"train/{key}" in last and np.isfinite(last[f"train/{key}"]), key
  assert summary["headline"] == "eval/reward"
  config, params = load_hf(tmp_path / "run" / "final")
  assert CRITIC not in params and set(params) == set(param_specs(config))
  assert (tmp_path / "run" / "final" / "tokenizer.model").exists()


def test_critic_from_a_reward_model_folder_or_run(tmp_path):
  """rl.critic_from: the reward model's decoder and score head become the critic; a run
  folder's final/ is read; a causal LM or another architecture is a clear ConfigError."""
  from jaxpost.models import load_hf
  from jaxpost.reward import save_reward_model_hf, with_score_head
  from jaxpost.tokenizer import load_tokenizer
  from jaxpost.train.build import build
  cfg = load_config(_recipe(tmp_path, "policy"))
  run = build(cfg)  # makes the tiny model
  model_dir = run.model_dir
  config, lm = load_hf(model_dir)
  rm = with_score_head(config, lm, jax.random.key(7), std=0.5)
  rm["layers"] = jax.tree.map(lambda x: x * 0.9, rm["layers"])
  save_reward_model_hf(config, rm, tmp_path / "rm", pad_token_id=load_tokenizer(model_dir).pad_id)
  (tmp_path / "rm_run" / "final").mkdir(parents=True)
  (tmp_path / "rm_run" / "config.yaml").write_text("algorithm: reward\n")
  for f in (tmp_path / "rm").iterdir():
    (tmp_path / "rm_run" / "final" / f.name).write_bytes(f.read_bytes())
  base = ["model.tiny=false", f"model.path={model_dir}"]
  for where in (tmp_path / "rm", tmp_path / "rm_run"):
    run = build(load_config(_recipe(tmp_path, "from_rm"), base + [f"rl.critic_from={where}"]))
    critic = run.tree[CRITIC]
    np.testing.assert_array_equal(critic[VALUE], rm["score"])
    np.testing.assert_array_equal(critic["layers"]["mlp"]["up"], rm["layers"]["mlp"]["up"])
    np.testing.assert_array_equal(run.tree["layers"]["mlp"]["up"], lm["layers"]["mlp"]["up"])
  with pytest.raises(ConfigError, match="critic_from.*not a reward"):
    build(load_config(_recipe(tmp_path, "bad1"), base + [f"rl.critic_from={model_dir}"]))
  other = config.replace(intermediate_size=2 * config.intermediate_size)
  wide = with_score_head(other, init_params(other, jax.random.key(0)), jax.random.key(1))
  save_reward_model_hf(other, wide, tmp_path / "wide", pad_token_id=0)
  with pytest.raises(ConfigError, match="intermediate_size"):
    build(load_config(_recipe(tmp_path, "bad2"), base + [f"rl.critic_from={tmp_path / 'wide'}"]))
  # Once the run has a checkpoint, the reward model it started from may go: export and
  # resume take the critic from the checkpoint.
  import shutil

  from jaxpost.train.trainer import export_run, train
  trained = load_config(_recipe(tmp_path, "rm_trained"), base + [f"rl.critic_from={tmp_path / 'rm'}"])
  train(trained)
  shutil.rmtree(tmp_path / "rm")
  assert export_run(tmp_path / "rm_trained", tmp_path / "rm_export")
  more = load_config(_recipe(tmp_path, "rm_trained", steps=3),
                     base + [f"rl.critic_from={tmp_path / 'rm'}"])
  assert train(more)["start_step"] == 2


def test_config_errors_and_one_sample_per_prompt(tmp_path):
  path = _recipe(tmp_path, "cfg")
  with pytest.raises(ConfigError, match="prompt / prefix tuning has none"):
    load_config(path, ["prompt.kind=prompt"])
  with pytest.raises(ConfigError, match="second base in memory"):
    load_config(path, ["lora.rank=4", "rl.critic_from=runs/rm"])
  assert load_config(path, ["lora.rank=4"]).lora.rank == 4  # a LoRA critic
  with pytest.raises(ConfigError, match="rl.kl_coef"):
    load_config(path, ["rl.beta=0.1"])
  with pytest.raises(ConfigError, match="lam must be in"):
    load_config(path, ["rl.lam=1.5"])
  with pytest.raises(ConfigError, match="whole groups"):
    load_config(path, ["rl.num_generations=3"])
  assert load_config(path, ["rl.num_generations=1"]).rl.num_generations == 1  # PPO needs no group
  with pytest.raises(ConfigError, match="advantage=group needs"):  # GRPO does
    load_config(path, ["algorithm=grpo", "rl.num_generations=1"])


def _final_state(run_dir):
  """(params, data state) of a run's latest checkpoint."""
  from jaxpost.train.build import build
  from jaxpost.train.checkpoint import Checkpointer
  run = build(load_config(run_dir / "config.yaml"), training=False)
  checkpointer = Checkpointer(run_dir / "checkpoints", save_every=1, read_only=True)
  state, data_state, _, _ = checkpointer.restore(run.abstract_state())
  checkpointer.close()
  return state.params, data_state


@pytest.mark.slow
def test_resume_after_sigkill_mid_rollout_gives_the_same_policy_critic_and_kl(tmp_path):
  """Killed after step 3's checkpoint, in the middle of a rollout's 2 x 2 updates, with the
  critic's warm-up and the adaptive KL coefficient: the rerun ends with the uninterrupted run's
  policy, critic and coefficient, bit for bit."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  overrides = ["rl.num_iterations=2", "rl.mini_batches=2", "rl.adaptive_kl=true",
               "rl.kl_horizon=50", "rl.target_kl=0.01", "rl.value_warmup_steps=2"]
  straight = _recipe(tmp_path, "straight", steps=8, every=3, overrides=overrides)
  killed = _recipe(tmp_path, "killed", steps=8, every=3, overrides=overrides)
  proc = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", str(straight)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-c", WRAPPER, "3", str(killed)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == -9, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", str(killed)], env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed" in proc.stdout + proc.stderr
  a = (tmp_path / "straight" / "final" / "model.safetensors").read_bytes()
  b = (tmp_path / "killed" / "final" / "model.safetensors").read_bytes()
  assert a == b
  (pa, da), (pb, db) = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
  for x, y in zip(jax.tree.leaves(pa[CRITIC]), jax.tree.leaves(pb[CRITIC])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert da["ppo"]["kl_coef"] == db["ppo"]["kl_coef"] != 0.05  # it moved, and identically


def test_lora_critic_shares_the_frozen_base_and_trains(tmp_path):
  """Under LoRA the critic is LoRA adapters on the policy's own frozen base plus a value head:
  one base in memory; at the start the critic's trunk is the base; a short run trains the
  critic's adapters (with 2 micro-batches); the export is the merged policy alone plus its PEFT
  adapter."""
  from jaxpost.models import load_hf
  from jaxpost.train.build import build
  from jaxpost.train.trainer import train
  cfg = load_config(_recipe(tmp_path, "lora"), ["lora.rank=4", "rl.value_warmup_steps=1"])
  run = build(cfg)
  state, frozen = run.init_state()
  tree = state.params
  assert set(tree[CRITIC]) == {"adapters", "value"} and CRITIC not in frozen.base
  assert set(tree[CRITIC]["adapters"]) == set(policy_of(tree))
  model = run.trainable.model(tree, frozen)
  assert "lm_head" not in model[CRITIC] and model[CRITIC]["embed"] is frozen.base["embed"]
  tokens = jnp.asarray([[1, 5, 9, 4]])
  v_lora = critic_values(run.config, model[CRITIC], tokens)
  v_base = critic_values(run.config, {**frozen.base, VALUE: tree[CRITIC][VALUE]}, tokens)
  np.testing.assert_allclose(np.asarray(v_lora), np.asarray(v_base), atol=1e-6)
  assert "critic" in run.trainable.describe.lower()

  summary = train(load_config(_recipe(tmp_path, "m2", steps=2),
                              ["lora.rank=4", "train.micro_batches=2"]))
  assert summary["final_model"]
  run_dir = tmp_path / "m2"
  trained, _ = _final_state(run_dir)
  config, params = load_hf(run_dir / "final")
  assert CRITIC not in params and (run_dir / "adapter").is_dir()
  assert any(float(jnp.abs(x).max()) > 0  # B was 0: the critic's adapters trained
             for x in jax.tree.leaves(trained[CRITIC]["adapters"]))


def test_the_reference_copies_the_policy_not_the_critic(tmp_path):
  """The start-model reference (KL penalty) is a copy of the policy alone: no second critic
  in memory."""
  from jaxpost.train.build import build
  run = build(load_config(_recipe(tmp_path, "ref"), []))
  state, frozen = run.init_state()
  assert "critic" in state.params and "critic" not in frozen.reference
  assert sorted(frozen.reference) == sorted(k for k in state.params if k != "critic")


@pytest.mark.parametrize("policy_on", [1.0, 0.0])
def test_on_policy_route_equals_the_general_one(policy_on):
  """One update per rollout (every row fresh): `ppo_loss(on_policy=True)` (the LM head's
  gradient through `token_nll`) gives the general route's loss and gradients, policy and
  critic, also during the critic's warm-up."""
  params = ppo_params()
  batch = ppo_batch(params)
  batch = {k: jnp.asarray(v) for k, v in dict(batch, fresh=np.ones(ROWS, np.float32),
                                               policy_on=np.full(ROWS, policy_on,
                                                                 np.float32)).items()}

  def run(on_policy):
    fn = lambda p: LOSS(p, batch, None, on_policy=on_policy)  # noqa: E731
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (plain, m_plain), g_plain = run(False)
  (fused, m_fused), g_fused = run(True)
  np.testing.assert_allclose(float(fused), float(plain), atol=1e-6)
  for k in ("weight", "val/error", "policy/clipfrac"):
    np.testing.assert_allclose(float(m_fused[k]), float(m_plain[k]), atol=1e-7)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_plain)):
    b = np.asarray(b)  # float32 sums in another order: within 1e-4 of the leaf's largest
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4 * np.abs(b).max() + 1e-12,
                               rtol=1e-5)
