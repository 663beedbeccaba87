"""Loading straight onto an 8-device mesh (data=2, fsdp=2, tensor=2) gives 1-device logits."""

from __future__ import annotations

import textwrap

from devices import run_on_8_cpu_devices

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    import chex, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from test_models import LLAMA
    from jaxpost.models import forward, init_params, load_hf, save_hf
    from jaxpost.sharding import make_mesh

    assert len(jax.devices()) == 8
    config = LLAMA.replace(num_kv_heads=4)
    path = tempfile.mkdtemp()
    save_hf(config, init_params(config, jax.random.key(0)), path)
    _, single = load_hf(path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, sharded = load_hf(path, mesh=mesh)
    q = sharded["layers"]["attn"]["q"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding.spec
    assert sharded["embed"].sharding.spec == P("tensor", "fsdp"), sharded["embed"].sharding.spec
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    chex.assert_trees_all_equal(single, sharded)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (4, 24)))
    f = jax.jit(forward, static_argnums=0)
    ref = f(config, single, tokens).logits
    got = f(config, sharded, jax.device_put(tokens, jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))))
    err = float(np.abs(np.asarray(got.logits) - np.asarray(ref)).max())
    assert err < 1e-5, err
    print("OK", err)
""")


def test_load_onto_8_device_mesh_matches_one_device():
  run_on_8_cpu_devices(SCRIPT)
