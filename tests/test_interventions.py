"""Interventions and captures inside the pure forward, generation and a loss."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost.models import forward, init_params, rms_norm
from jaxpost.models.sites import SITES, Capture, Fn
from jaxpost.models.transformer import unstack_layers
from jaxpost.sampling import _generate, generate
from jaxpost.whitebox import Ablate, AddVector, Patch, ProjectOut, logit_lens
from devices import run_on_8_cpu_devices
from test_models import LLAMA, TINY

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request):
  cfg = LLAMA if request.param == "llama" else TINY
  return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 1, 90)


def _hlo(fn, *args):
  text = jax.jit(fn).lower(*args).as_text()
  return re.sub(r"loc\([^)]*\)", "", text).split("\n#loc")[0]


def _op_counts(text: str) -> collections.Counter:
  return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))


def test_no_intervention_is_the_same_program(model, tokens):
  cfg, params = model
  plain = _hlo(lambda p, t: forward(cfg, p, t).logits, params, tokens)
  assert plain == _hlo(lambda p, t: forward(cfg, p, t, interventions=[], capture=[]).logits,
                       params, tokens)
  assert "optimization_barrier" not in plain
  # The hooks themselves trace nothing: an identity on every site at every layer adds two
  # optimization barriers per site (see `Sites.apply`) and not one other op.
  identity = [Fn(site, lambda x, i, ctx: x) for site in SITES if site != "attn_probs"]
  hooked = _hlo(lambda p, t: forward(cfg, p, t, interventions=identity).logits, params, tokens)
  extra = _op_counts(hooked) - _op_counts(plain)
  assert extra == collections.Counter(optimization_barrier=2 * len(identity)), extra
  assert not _op_counts(plain) - _op_counts(hooked)
  # ... and a real intervention changes the program (the comparison can fail).
  scaled = [Fn("mlp_out", lambda x, i, ctx: 2 * x)]
  assert plain != _hlo(lambda p, t: forward(cfg, p, t, interventions=scaled).logits,
                       params, tokens)
  grads = [jax.grad(lambda p: forward(cfg, p, tokens, interventions=iv).logits.sum())(params)
           for iv in (None, [])]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), *grads)


@pytest.mark.parametrize("unstacked", [False, True])
def test_patching_a_site_with_its_own_capture_is_exact(model, tokens, unstacked):
  """Patching a site with the activation captured there gives the capturing run's logits bit
  for bit, at every layer (None) or at one (alternating over the sites)."""
  cfg, params = model
  p = unstack_layers(params) if unstacked else params
  full = cfg is LLAMA and not unstacked  # every site once; a few elsewhere (CI time)
  for n, site in enumerate(SITES if full else ("k", "head_out", "resid_post")):
    layers = None if n % 2 else (1,)
    clean = jax.jit(lambda p, t: forward(cfg, p, t, capture=[Capture(site, layers)]))(p, tokens)
    patched = jax.jit(lambda p, t, v: forward(
        cfg, p, t, interventions=[Patch(site, v, layers=layers)]).logits)(
            p, tokens, clean.captured[site])
    if site in ("q", "k", "v"):
      # The same q, k, v in, but XLA may lay the patched buffer out differently, and the
      # attention matmuls then sum in another order: equal to float32 rounding, not bitwise.
      np.testing.assert_allclose(patched, clean.logits, atol=1e-6, rtol=0, err_msg=site)
    else:
      np.testing.assert_array_equal(patched, clean.logits, err_msg=site)


def test_capture_shapes_and_layer_subsets(model, tokens):
  cfg, params = model
  B, T = tokens.shape
  out = forward(cfg, params, tokens, capture=["resid_post", "q", "attn_probs", "mlp_hidden",
                                              Capture("head_out", (1, 0))])
  L, H, Dh = cfg.num_layers, cfg.num_heads, cfg.head_dim
  assert out.captured["resid_post"].shape == (L, B, T, cfg.hidden_size)
  assert out.captured["q"].shape == (L, B, T, H, Dh)
  assert out.captured["attn_probs"].shape == (L, B, H, T, T)
  assert out.captured["mlp_hidden"].shape == (L, B, T, cfg.intermediate_size)
  every = forward(cfg, params, tokens, capture=["head_out"]).captured["head_out"]
  np.testing.assert_array_equal(out.captured["head_out"], every[jnp.array([1, 0])])
  # resid_post equals the hidden states forward already returns; probabilities sum to one.
  hidden = forward(cfg, params, tokens, return_hidden_states=True).hidden_states
  np.testing.assert_array_equal(out.captured["resid_post"], hidden[1:])
  np.testing.assert_allclose(out.captured["attn_probs"].sum(-1), 1.0, atol=1e-5)


def test_add_vector_on_the_last_layer_moves_the_final_hidden(model, tokens):
  cfg, params = model
  L = cfg.num_layers
  v = jax.random.normal(jax.random.key(2), (cfg.hidden_size,))
  clean = forward(cfg, params, tokens, capture=[Capture("resid_post", (L - 1,))])
  out = forward(cfg, params, tokens, interventions=[AddVector("resid_post", v, 3.0, (L - 1,))])
  expected = rms_norm(cfg, clean.captured["resid_post"][0] + 3.0 * v[None, None], params["final_norm"])
  np.testing.assert_allclose(out.final_hidden, expected, atol=1e-6)
  zero = forward(cfg, params, tokens, interventions=[AddVector("resid_post", v, 0.0, (0,))])
  np.testing.assert_array_equal(zero.logits, clean.logits)


def test_ablations_and_projection(model, tokens):
  cfg, params = model
  all_heads = tuple(range(cfg.num_heads))
  out = forward(cfg, params, tokens, capture=["head_out", "attn_out", "resid_post"],
                interventions=[Ablate("head_out", layers=(0,), heads=(1,))])
  heads = out.captured["head_out"]
  assert not np.any(heads[0, :, :, 1]) and np.all(np.any(heads[0, :, :, 0] != 0, axis=-1))
  assert np.any(heads[1, :, :, 1] != 0)
  silent = forward(cfg, params, tokens, capture=["attn_out"],
                   interventions=[Ablate("head_out", heads=all_heads)])
  if not cfg.sandwich_norm:  # Gemma's post-norm of zero is zero too, but check Llama exactly
    np.testing.assert_array_equal(silent.captured["attn_out"], 0.0)
  mean = out.captured["resid_post"].mean(axis=(1, 2))  # [L, D]
  ablated = forward(cfg, params, tokens, capture=["resid_post"],
                    interventions=[Ablate("resid_post", layers=(0, 1), value=mean)])
  np.testing.assert_allclose(ablated.captured["resid_post"][1],
                             jnp.broadcast_to(mean[1], tokens.shape + mean.shape[1:]), atol=1e-6)
  d = jax.random.normal(jax.random.key(3), (cfg.hidden_size,))
  proj = forward(cfg, params, tokens, capture=["resid_mid"],
                 interventions=[ProjectOut("resid_mid", d)])
  np.testing.assert_allclose(proj.captured["resid_mid"] @ (d / jnp.linalg.norm(d)), 0.0,
                             atol=1e-4)
  with pytest.raises(ValueError, match="heads are only for"):
    Ablate("resid_post", heads=(0,))


def test_errors_name_the_site_and_layer(model, tokens):
  cfg, params = model
  with pytest.raises(ValueError, match="unknown site 'resid'.*resid_pre"):
    forward(cfg, params, tokens, capture=["resid"])
  with pytest.raises(ValueError, match="layer 7 is out of range; the model has 2 layers"):
    forward(cfg, params, tokens, interventions=[Ablate("mlp_out", layers=(7,))])


def test_where_limits_the_intervention_to_tokens_and_segments(model):
  cfg, params = model
  tokens = jax.random.randint(jax.random.key(4), (1, 10), 1, 90)
  segments = jnp.array([[1] * 6 + [2] * 4])
  v = jnp.ones((cfg.hidden_size,))
  plain = forward(cfg, params, tokens, segment_ids=segments)
  steered = forward(cfg, params, tokens, segment_ids=segments,
                    interventions=[AddVector("resid_pre", v, 5.0, where=segments == 2)])
  # Segment 1 is untouched (it cannot see segment 2); segment 2 changed.
  np.testing.assert_array_equal(steered.logits[:, :6], plain.logits[:, :6])
  assert np.all(np.abs(steered.logits[:, 6:] - plain.logits[:, 6:]).max(-1) > 1e-3)
  # A context-dependent Fn: the same thing through `context.segment_ids`.
  fn = Fn("resid_pre", lambda x, i, ctx, v: jnp.where((ctx.segment_ids == 2)[..., None],
                                                      x + 5.0 * v[None, None], x), data=v)
  np.testing.assert_array_equal(
      forward(cfg, params, tokens, segment_ids=segments, interventions=[fn]).logits,
      steered.logits)


def test_generation_with_interventions_matches_the_training_forward(model):
  cfg, params = model
  prompts = [[5, 9, 13], [7, 2]]
  v = jax.random.normal(jax.random.key(5), (cfg.hidden_size,))
  plain = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0, prompt_bucket=4)
  zero = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0, prompt_bucket=4,
                  interventions=[AddVector("resid_post", v, 0.0, (1,))])
  np.testing.assert_array_equal(plain.tokens, zero.tokens)
  compiled = _generate._cache_size()
  steered = generate(cfg, params, prompts, max_new_tokens=6, temperature=0.0, prompt_bucket=4,
                     interventions=[AddVector("resid_post", v, 8.0, (1,))])
  assert _generate._cache_size() == compiled  # a new coefficient reuses the compiled loop
  assert not np.array_equal(plain.tokens, steered.tokens)
  # The KV-cached steered log-probs equal one training forward over prompt + completion.
  for row, prompt in enumerate(prompts):
    n = int(steered.lengths[row])
    seq = jnp.asarray([prompt + steered.tokens[row, :n].tolist()])
    logits = forward(cfg, params, seq, interventions=[AddVector("resid_post", v, 8.0, (1,))]
                     ).logits[0, len(prompt) - 1:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), seq[0, len(prompt):, None], -1)[:, 0]
    np.testing.assert_allclose(steered.logprobs[row, :n], logp, atol=1e-5)


def test_a_loss_over_internals_trains_under_jit(model, tokens):
  """Gradients flow through captures and interventions inside a jitted update."""
  cfg, params = model
  target = jnp.full((cfg.hidden_size,), 0.3)

  @jax.jit
  def loss(v):
    out = forward(cfg, params, tokens, capture=[Capture("resid_post", (1,))],
                  interventions=[AddVector("resid_mid", v, layers=(1,))])
    return jnp.sum((out.captured["resid_post"][0].mean((0, 1)) - target) ** 2)

  v = jnp.zeros((cfg.hidden_size,))
  start = loss(v)
  for _ in range(30):
    v = v - 0.3 * jax.grad(loss)(v)
  assert loss(v) < 0.05 * start


def test_logit_lens_last_layer_is_the_logits(model, tokens):
  cfg, params = model
  out = forward(cfg, params, tokens, capture=["resid_post"])
  lens = logit_lens(cfg, params, out.captured["resid_post"])
  assert lens.shape == (cfg.num_layers,) + out.logits.shape
  np.testing.assert_allclose(lens[-1], out.logits, atol=1e-5)
  last = logit_lens(cfg, params, out.captured["resid_post"], positions=jnp.array([3, 11]))
  np.testing.assert_allclose(last[:, 1], lens[:, 1, 11], atol=1e-6)


def test_interventions_on_a_mesh_equal_one_device():
  out = run_on_8_cpu_devices("""
import sys; sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jaxpost.models import forward, init_params, param_specs
from jaxpost.sharding import make_mesh, param_shardings
from jaxpost.whitebox import AddVector, Ablate, Capture
from test_models import LLAMA as cfg
params = init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, 90)
ivs = [AddVector("resid_post", jnp.ones((cfg.hidden_size,)), 2.0, (0,)),
       Ablate("head_out", layers=(1,), heads=(0, 3))]
def run(p, t):
  out = forward(cfg, p, t, interventions=ivs, capture=[Capture("mlp_out", (1,))])
  return out.logits, out.captured["mlp_out"]
one = jax.jit(run)(params, tokens)
mesh = make_mesh(data=2, fsdp=2, tensor=2)
sp = jax.device_put(params, param_shardings(param_specs(cfg), mesh))
st = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
many = jax.jit(run)(sp, st)
for a, b in zip(one, many):
  np.testing.assert_allclose(a, b, atol=1e-5)
print("OK")
""")
  assert "OK" in out


def test_the_architecture_doc_example_runs_as_written():
  doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
  code = re.search(r"<!-- whitebox-example -->\s*```python\n(.*?)```", doc, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "docs/architecture.md", "exec"), namespace)  # pylint: disable=exec-used
  assert not jnp.allclose(namespace["ablated"].logits, namespace["out"].logits)
  assert not jnp.allclose(namespace["doubled"].logits[:, -1], namespace["out"].logits[:, -1])
  np.testing.assert_array_equal(namespace["doubled"].logits[:, :-1],
                                namespace["out"].logits[:, :-1])


def test_activations_follow_the_batch_under_a_mesh():
  """Under `jax.set_mesh` (how the update step runs) the embedding output is constrained to
  the batch axes; without a mesh the program has no constraint; the values are the same."""
  out = run_on_8_cpu_devices("""
import sys; sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jaxpost.models import forward, init_params, param_specs
from jaxpost.sharding import make_mesh, param_shardings
from test_models import LLAMA as cfg
params = init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (8, 12), 1, 90)
mesh = make_mesh(data=2, fsdp=4)
sp = jax.device_put(params, param_shardings(param_specs(cfg), mesh))
st = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
f = jax.jit(lambda p, t: forward(cfg, p, t).logits)
plain = f.lower(sp, st).as_text()
with jax.set_mesh(mesh):
  constrained = f.lower(sp, st).as_text()
  on_mesh = f(sp, st)
assert "sharding_constraint" not in plain
assert '<@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x12x64xf32>' in constrained
np.testing.assert_allclose(on_mesh, f(sp, st), atol=1e-6)
print("OK")
""")
  assert "OK" in out
