"""Prompt tuning and prefix tuning: exact equivalences, training, generation, PEFT format."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.losses import sft_loss
from jaxpost.models import forward, init_params
from jaxpost.peft.prompt import (PromptConfig, attach_prompt, init_prompt, load_prompt,
                                 prompt_loss, save_prompt)
from jaxpost.sampling import generate
from jaxpost.train import init_state, make_train_step
from test_step import CONFIG, random_batch

INIT = jnp.asarray([5, 9, 2, 7], jnp.int32)
TOKENS = (jnp.arange(12, dtype=jnp.int32)[None] * 7 + 3) % CONFIG.vocab_size


@pytest.fixture(scope="module")
def base():
  return init_params(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_a_prefix_from_tokens_equals_those_tokens_written_before_the_input(base, kind):
  pc = PromptConfig(kind=kind, num_tokens=4)
  prompt = init_prompt(CONFIG, pc, base, jax.random.key(1), init_tokens=INIT)
  got = forward(CONFIG, attach_prompt(CONFIG, base, prompt, pc), TOKENS).logits
  want = forward(CONFIG, base, jnp.concatenate([INIT[None], TOKENS], axis=1)).logits[:, 4:]
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_parameters_train_alone_and_generation_starts_from_them(base, kind):
  pc = PromptConfig(kind=kind, num_tokens=4)
  prompt = init_prompt(CONFIG, pc, base, jax.random.key(1), init_tokens=INIT)
  opt = optax.adam(3e-2)
  step = make_train_step(prompt_loss(functools.partial(sft_loss, config=CONFIG), CONFIG, pc),
                         opt)
  state = init_state(jax.tree.map(jnp.copy, prompt), opt, jax.random.key(2))  # donated
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert size(state.opt_state) <= 2 * size(prompt) + 4
  losses = []
  for _ in range(6):
    state, m = step(state, random_batch(0), {"base": base})
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0], losses

  # generation from an untrained prefix equals generation after the init tokens
  attached = attach_prompt(CONFIG, base, prompt, pc)
  prompts = [[3, 4, 5], [6, 7]]
  ours = generate(CONFIG, attached, prompts, max_new_tokens=6, temperature=0.0)
  plain = generate(CONFIG, base, [list(map(int, INIT)) + p for p in prompts], max_new_tokens=6,
                   temperature=0.0)
  np.testing.assert_array_equal(ours.tokens, plain.tokens)
  np.testing.assert_allclose(ours.logprobs, plain.logprobs, atol=2e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_round_trips_through_the_peft_format(base, kind, tmp_path):
  pc = PromptConfig(kind=kind, num_tokens=4)
  prompt = init_prompt(CONFIG, pc, base, jax.random.key(1))
  save_prompt(CONFIG, pc, prompt, tmp_path)
  pc2, prompt2 = load_prompt(CONFIG, tmp_path)
  assert pc2 == pc
  chex.assert_trees_all_equal(prompt, prompt2)


def test_peft_prompt_tuning_gives_the_same_logits(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from hf_models import save_hf_model
  from jaxpost.models import load_hf

  hf = save_hf_model("llama", tmp_path / "model")
  config, params = load_hf(tmp_path / "model")
  pc = PromptConfig(kind="prompt", num_tokens=5)
  prompt = init_prompt(config, pc, params, jax.random.key(1))
  prompt = {"embeddings": prompt["embeddings"] + 0.1 * jax.random.normal(
      jax.random.key(2), prompt["embeddings"].shape)}
  save_prompt(config, pc, prompt, tmp_path / "prompt")
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 10))
  ours = forward(config, attach_prompt(config, params, prompt, pc), jnp.asarray(tokens)).logits
  model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "prompt")).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens)).logits.numpy()[:, -10:]
  err = float(np.abs(np.asarray(ours) - ref).max())
  print(f"max |jaxpost prompt tuning - peft| = {err:.2e}")
  assert err < 1e-4
