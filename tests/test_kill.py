"""SIGKILL at the worst moments: while an old checkpoint is being deleted, and while the final
model is being exported. The killed run, run again, must end with exactly the weights of an
uninterrupted run, leave only loadable checkpoints, and export.

The kill is placed by a wrapper around the real command (the file system call of that moment
kills the process from inside): no fault-injection code in the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

RECIPE = """\
algorithm: sft
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 40, pack: true}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: 8, batch_size: 4, log_every: 1}}
checkpoint: {{every: 2, keep_last: 1, async_save: {async_save}}}
"""

# Runs `jaxpost train RECIPE` with `shutil.rmtree` (deleting a checkpoint) or `os.replace`
# (moving a written safetensors file into the final folder) killing the process at its first
# call that matches.
WRAPPER = textwrap.dedent("""\
    import os, shutil, signal, sys
    moment, recipe = sys.argv[1], sys.argv[2]
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def rmtree(path, *args, **kwargs):
      path = str(path)
      if moment == "prune" and "checkpoints" in path:
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        for f in files[:len(files) // 2]:  # half deleted, then killed
          os.remove(f)
        os.kill(os.getpid(), signal.SIGKILL)
      return real_rmtree(path, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
      if moment == "export" and str(dst).endswith(".safetensors") and "final" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
      return real_replace(src, dst, *args, **kwargs)

    shutil.rmtree, os.replace = rmtree, replace
    from jaxpost.cli import main
    sys.exit(main(["train", recipe]))
    """)


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _train(recipe: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxpost.cli", "train", str(recipe)], env=_env(),
                        capture_output=True, text=True, timeout=600)


def _recipe(tmp: Path, name: str, async_save: bool) -> Path:
  path = tmp / f"{name}.yaml"
  path.write_text(RECIPE.format(run_dir=tmp / name, async_save=str(async_save).lower()))
  return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("straight")
  proc = _train(_recipe(tmp, "run", False))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return (tmp / "run" / "final" / "model.safetensors").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("moment,async_save", [("prune", False), ("prune", True),
                                               ("export", False)])
def test_killed_then_rerun_ends_as_an_uninterrupted_run(tmp_path, straight, moment, async_save):
  recipe = _recipe(tmp_path, "run", async_save)
  script = tmp_path / "wrapper.py"
  script.write_text(WRAPPER)
  killed = subprocess.run([sys.executable, str(script), moment, str(recipe)], env=_env(),
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
  run = tmp_path / "run"
  if moment == "export":
    assert not (run / "final" / "model.safetensors").exists()

  again = _train(recipe)
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
  assert "resumed from" in again.stdout
  assert (run / "final" / "model.safetensors").read_bytes() == straight
  # Only finalised, loadable checkpoints are left: step folders and nothing half deleted.
  left = sorted(p.name for p in (run / "checkpoints").iterdir())
  assert left and all(name.isdigit() for name in left), left
  export = subprocess.run([sys.executable, "-m", "jaxpost.cli", "export", str(run), "--out",
                           str(tmp_path / "out")], env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert export.returncode == 0, export.stderr[-3000:]
  assert (tmp_path / "out" / "final" / "model.safetensors").read_bytes() == straight
