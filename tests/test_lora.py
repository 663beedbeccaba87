"""LoRA adapters: exact at init, correct merge, only adapters train, they shard with the base."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost.losses import sft_loss
from jaxpost.models import forward, init_params, param_specs
from jaxpost.peft import LoraConfig, init_lora, lora_loss, lora_specs, merge_lora
from jaxpost.sharding import logical_to_spec
from devices import run_on_8_cpu_devices
from jaxpost.train import init_state, make_train_step
from test_step import CONFIG, random_batch

LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base():
  return init_params(CONFIG, jax.random.key(0))


def test_zero_initialised_adapters_reproduce_the_base_exactly(base):
  adapters = init_lora(CONFIG, LORA, jax.random.key(1))
  merged = merge_lora(base, adapters, LORA)
  chex.assert_trees_all_equal(base, merged)
  tokens = jnp.arange(16)[None] % CONFIG.vocab_size
  f = jax.jit(forward, static_argnums=0)
  np.testing.assert_array_equal(f(CONFIG, base, tokens).logits, f(CONFIG, merged, tokens).logits)


def test_merge_adds_scaled_low_rank_product(base):
  adapters = init_lora(CONFIG, LORA, jax.random.key(1))
  rng = np.random.default_rng(0)
  b = adapters["layers"]["attn"]["o"]["b"]
  adapters["layers"]["attn"]["o"]["b"] = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
  merged = merge_lora(base, adapters, LORA)
  a = np.asarray(adapters["layers"]["attn"]["o"]["a"])  # [L, H, Dh, r]
  bb = np.asarray(adapters["layers"]["attn"]["o"]["b"])  # [L, r, D]
  expect = np.asarray(base["layers"]["attn"]["o"]) + LORA.scale * np.einsum("lhdr,lre->lhde", a, bb)
  np.testing.assert_allclose(merged["layers"]["attn"]["o"], expect, atol=1e-6)
  assert LoraConfig(rank=16, alpha=8.0, rslora=True).scale == 2.0


def test_only_adapters_train_and_optimizer_state_follows_their_size(base):
  adapters = init_lora(CONFIG, LORA, jax.random.key(1))
  opt = optax.adamw(1e-2)
  loss = lora_loss(functools.partial(sft_loss, config=CONFIG), LORA)
  step = make_train_step(loss, opt)
  state = init_state(adapters, opt, jax.random.key(2))
  frozen = {"base": base}
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert size(state.opt_state) < 2.5 * size(adapters) < 0.3 * size(base)
  losses = []
  for i in range(8):
    state, m = step(state, random_batch(0), frozen)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]
  assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
  assert float(jnp.abs(state.params["layers"]["mlp"]["up"]["b"]).max()) > 0


def test_adapters_shard_like_their_base_weights():
  """On a data=2, fsdp=2, tensor=2 mesh, A splits like its weight's input axes and B like the
  output axes; the rank axis is never split."""
  config = CONFIG.replace(num_kv_heads=4)
  mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  base = param_specs(config)["layers"]
  for group, targets in lora_specs(config, LORA)["layers"].items():
    for name, ab in targets.items():
      w = base[group][name]
      w_spec = logical_to_spec(w.axes, w.shape, mesh)
      a_spec = logical_to_spec(ab["a"].axes, ab["a"].shape, mesh)
      b_spec = logical_to_spec(ab["b"].axes, ab["b"].shape, mesh)
      n_in = len(ab["a"].shape) - 2
      assert tuple(a_spec)[:n_in + 1] == tuple(w_spec)[:n_in + 1], (name, a_spec, w_spec)
      assert tuple(b_spec)[2:] == tuple(w_spec)[n_in + 1:], (name, b_spec, w_spec)
      assert a_spec[-1] is None and b_spec[1] is None
  q = lora_specs(config, LORA)["layers"]["attn"]["q"]
  assert logical_to_spec(q["a"].axes, q["a"].shape, mesh) == jax.sharding.PartitionSpec(
      None, "fsdp", None)
  with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
    LoraConfig(targets=("qkv",))


# (family, LoRA variant): embedding and LM-head adapters on untied Llama; rsLoRA + DoRA on Qwen3
PEFT_CASES = [
    ("llama", LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down",
                                                     "embed", "lm_head"))),
    ("qwen3", LoraConfig(rank=4, alpha=8.0, rslora=True, dora=True,
                         targets=("q", "k", "v", "o", "gate", "up", "down"))),
]


@pytest.mark.parametrize("family,lora", PEFT_CASES, ids=["llama-lora-embed-head", "qwen3-dora"])
def test_peft_format_round_trip_and_peft_library_gives_the_same_logits(tmp_path, family, lora):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from hf_models import save_hf_model
  from jaxpost.models import load_hf
  from jaxpost.peft import attach_lora, load_peft_adapter, save_peft_adapter

  hf = save_hf_model(family, tmp_path / family)
  config, params = load_hf(tmp_path / family)
  adapters = init_lora(config, lora, jax.random.key(1), base=params)
  # random B (and magnitudes) too, so the adapters change the logits
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: (0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
                    if str(p[-1].key) == "b" else
                    x * (1 + 0.1 * jax.random.normal(jax.random.key(3), x.shape))
                    if str(p[-1].key) == "m" else x), adapters)
  save_peft_adapter(config, lora, adapters, tmp_path / "adapter")
  lora2, adapters2 = load_peft_adapter(config, tmp_path / "adapter")
  assert lora2 == lora
  chex.assert_trees_all_equal(adapters, adapters2)

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 24)))
  merged = forward(config, merge_lora(params, adapters, lora), tokens).logits
  factored = forward(config, attach_lora(params, adapters, lora), tokens).logits
  plain = forward(config, params, tokens).logits
  model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()
  assert float(np.abs(np.asarray(plain) - ref).max()) > 1e-3  # the adapters matter
  err = float(np.abs(np.asarray(factored) - ref).max())
  merge_err = float(np.abs(np.asarray(merged) - np.asarray(factored)).max())
  print(f"{family}: max |jaxpost - peft| = {err:.2e}, |merged - factored| = {merge_err:.2e}")
  assert err < 1e-4, family
  assert merge_err < 1e-5, family


def test_unsupported_peft_options_are_refused(tmp_path):
  from jaxpost.peft import load_peft_adapter, save_peft_adapter

  lora = LoraConfig(rank=2, alpha=4.0, targets=("q",))
  save_peft_adapter(CONFIG, lora, init_lora(CONFIG, lora, jax.random.key(0)), tmp_path)
  cfg = tmp_path / "adapter_config.json"
  import json
  data = json.loads(cfg.read_text())
  cfg.write_text(json.dumps(dict(data, bias="all")))
  with pytest.raises(ValueError, match="bias='all' is not supported"):
    load_peft_adapter(CONFIG, tmp_path)
  cfg.write_text(json.dumps(dict(data, target_modules=["q_proj", "score"])))
  with pytest.raises(ValueError, match="target module 'score'"):
    load_peft_adapter(CONFIG, tmp_path)
  cfg.write_text(json.dumps(dict(data, use_dora=True)))
  with pytest.raises(ValueError, match="lora_magnitude_vector' is missing"):
    load_peft_adapter(CONFIG, tmp_path)


SHARDED = """
import functools, sys
import jax, numpy as np, optax
sys.path.insert(0, sys.argv[1])
from test_step import CONFIG, random_batch
from jaxpost.losses import sft_loss
from jaxpost.models import init_params, param_specs
from jaxpost.peft import LoraConfig, init_lora, lora_loss, lora_specs
from jaxpost.sharding import make_mesh, param_shardings
from jaxpost.train import batch_sharding, init_state, make_train_step, state_shardings

config, lora = CONFIG.replace(num_kv_heads=4), LoraConfig(rank=4, alpha=8.0)
loss = lora_loss(functools.partial(sft_loss, config=config), lora)
opt = optax.adamw(1e-2)
base = init_params(config, jax.random.key(0))
adapters = init_lora(config, lora, jax.random.key(1))

def run(mesh):
  if mesh is None:
    fresh = jax.tree.map(lambda x: x.copy(), adapters)  # the step donates its state
    step, state, frozen = make_train_step(loss, opt), init_state(fresh, opt, jax.random.key(2)), {"base": base}
  else:
    specs = lora_specs(config, lora)
    b_shard = param_shardings(param_specs(config), mesh)
    a_shard = param_shardings(specs, mesh)
    s_shard = state_shardings(a_shard, adapters, opt, mesh)
    state = jax.jit(lambda a: init_state(a, opt, jax.random.key(2)), out_shardings=s_shard)(adapters)
    frozen = {"base": jax.device_put(base, b_shard)}
    step = make_train_step(loss, opt, state_sharding=s_shard, batch_sharding=batch_sharding(mesh),
                           frozen_sharding={"base": b_shard})
    a = state.params["layers"]["attn"]["q"]["a"]
    w = frozen["base"]["layers"]["attn"]["q"]
    assert a.sharding.spec[:2] == w.sharding.spec[:2] == (None, "fsdp"), (a.sharding, w.sharding)
  out = []
  for i in range(4):
    state, m = step(state, random_batch(i), frozen)
    out.append(float(m["loss"]))
  return np.array(out)

one, eight = run(None), run(make_mesh(data=2, fsdp=2, tensor=2))
assert np.abs(one - eight).max() < 1e-5, (one, eight)
print("OK")
"""


def test_lora_on_8_devices_matches_one_device():
  run_on_8_cpu_devices(SHARDED)


def test_dora_and_factored_lora_equal_the_base_at_init(base):
  from jaxpost.peft import attach_lora
  tokens = jnp.arange(16)[None] % CONFIG.vocab_size
  f = jax.jit(forward, static_argnums=0)
  want = f(CONFIG, base, tokens).logits
  adapters = init_lora(CONFIG, LORA, jax.random.key(1))
  np.testing.assert_array_equal(f(CONFIG, attach_lora(base, adapters, LORA), tokens).logits, want)
  # DoRA: m / ||W||_c is 1 up to the rounding of two separately reduced norms
  dora = LoraConfig(rank=4, alpha=8.0, dora=True)
  adapters = init_lora(CONFIG, dora, jax.random.key(1), base=base)
  got = f(CONFIG, attach_lora(base, adapters, dora), tokens).logits
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  m = init_lora(CONFIG, dora, jax.random.key(1), base=base)["layers"]["attn"]["o"]["m"]
  w = np.asarray(base["layers"]["attn"]["o"])  # [L, H, Dh, D]: norm over (H, Dh) per output
  np.testing.assert_allclose(m, np.sqrt((w ** 2).sum(axis=(1, 2))), rtol=1e-6)
  with pytest.raises(ValueError, match="pass base=params"):
    init_lora(CONFIG, dora, jax.random.key(1))


def test_lora_dropout_only_while_training(base):
  lora = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
  adapters = init_lora(CONFIG, lora, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero B, so dropout shows
  loss = jax.jit(lora_loss(functools.partial(sft_loss, config=CONFIG), lora))
  batch = random_batch(0)
  evals = [float(loss(adapters, batch, None, base=base)[0]) for _ in range(2)]
  trains = [float(loss(adapters, batch, jax.random.key(i), base=base)[0]) for i in range(2)]
  assert evals[0] == evals[1]
  assert trains[0] != trains[1] and evals[0] not in trains
  no_drop = lora_loss(functools.partial(sft_loss, config=CONFIG), LORA)
  assert float(no_drop(adapters, batch, jax.random.key(0), base=base)[0]) == float(
      no_drop(adapters, batch, None, base=base)[0])


def test_qlora_trains_adapters_over_an_nf4_base_without_dequantising_it_for_good(base):
  from jaxpost.peft import attach_lora, dequantize_params, quantize_params
  qbase = quantize_params(base, kind="nf4")
  tokens = jnp.arange(16)[None] % CONFIG.vocab_size
  f = jax.jit(forward, static_argnums=0)
  # the quantised forward equals the forward of the dequantised weights
  np.testing.assert_allclose(f(CONFIG, qbase, tokens).logits,
                             f(CONFIG, dequantize_params(qbase), tokens).logits, atol=1e-5)
  lora = LoraConfig(rank=4, alpha=8.0, dora=True)
  adapters = init_lora(CONFIG, lora, jax.random.key(1), base=qbase)
  got = f(CONFIG, attach_lora(qbase, adapters, lora), tokens).logits
  np.testing.assert_allclose(got, f(CONFIG, qbase, tokens).logits, atol=2e-6)
  # merging folds the adapters into dequantised plain weights
  merged = merge_lora(qbase, adapters, lora)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
  np.testing.assert_allclose(f(CONFIG, merged, tokens).logits, got, atol=2e-5)

  opt = optax.adamw(1e-2)
  step = make_train_step(lora_loss(functools.partial(sft_loss, config=CONFIG), LORA), opt)
  state = init_state(init_lora(CONFIG, LORA, jax.random.key(1)), opt, jax.random.key(2))
  losses = []
  for _ in range(6):
    state, m = step(state, random_batch(0), {"base": qbase})
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
