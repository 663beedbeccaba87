"""A real 2-process run (JAX distributed over gloo on CPU) gives the single-process losses."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax

from jaxpost.losses import sft_loss
from jaxpost.models import init_params
from jaxpost.train.step import init_state, make_train_step
from test_step import CONFIG, random_batch

WORKER = textwrap.dedent("""
    import functools, sys
    pid, port, tests = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path.insert(0, tests)
    from jaxpost.sharding import initialize_distributed, make_mesh, param_shardings
    assert initialize_distributed(f"localhost:{port}", 2, pid)
    import jax, optax
    from test_step import CONFIG, random_batch
    from jaxpost.losses import sft_loss
    from jaxpost.models import init_params, param_specs
    from jaxpost.train.step import batch_sharding, init_state, make_train_step, state_shardings
    assert jax.process_count() == 2 and jax.device_count() == 2
    mesh = make_mesh(data=2)
    opt = optax.adamw(1e-2)
    params = init_params(CONFIG, jax.random.key(0))
    sshard = state_shardings(param_shardings(param_specs(CONFIG), mesh), params, opt, mesh)
    state = jax.jit(lambda p: init_state(p, opt, jax.random.key(1)), out_shardings=sshard)(params)
    bs = batch_sharding(mesh)
    step = make_train_step(functools.partial(sft_loss, config=CONFIG), opt, state_sharding=sshard,
                           batch_sharding=bs)
    for i in range(3):
      host = random_batch(i)  # every process holds the global batch and feeds its own rows
      batch = {k: jax.make_array_from_callback(v.shape, bs, lambda idx, v=v: v[idx])
               for k, v in host.items()}
      state, m = step(state, batch, {})
      print("loss", repr(float(m["loss"])), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one():
  opt = optax.adamw(1e-2)
  step = make_train_step(functools.partial(sft_loss, config=CONFIG), opt)
  state = init_state(init_params(CONFIG, jax.random.key(0)), opt, jax.random.key(1))
  expected = []
  for i in range(3):
    state, m = step(state, random_batch(i), {})
    expected.append(float(m["loss"]))

  port, tests = str(_free_port()), os.path.dirname(__file__)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, tests], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    losses = [float(line.split()[1]) for line in out.splitlines() if line.startswith("loss")]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
