"""`jaxpost train` end to end: SIGKILL and resume bit-exactly, config errors before compiling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """\
algorithm: sft
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 12, num_eval: 16, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{format: messages, seq_len: 64, pack: true}}
optim: {{lr: 3.0e-3, schedule: cosine, warmup_steps: 5}}
train: {{steps: {steps}, batch_size: 4, log_every: 1, eval_every: 50}}
checkpoint: {{every: 10, keep_last: 2, async_save: true}}
"""


def _cmd(recipe: Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "jaxpost.cli", "train", str(recipe), *overrides]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _checkpoint_steps(run_dir: Path) -> list[int]:
  folder = run_dir / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
  steps = 150
  recipe = tmp_path / "recipe.yaml"
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "unused", steps=steps))
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_cmd(recipe, f"run_dir={straight}"), env=_env(), check=True,
                 capture_output=True, text=True, timeout=600)

  proc = subprocess.Popen(_cmd(recipe, f"run_dir={killed}"), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(s >= 20 for s in _checkpoint_steps(killed)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed: " + proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_checkpoint_steps(killed))
  assert 20 <= killed_at < steps

  resumed = subprocess.run(_cmd(recipe, f"run_dir={killed}"), env=_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  a = (straight / "final" / "model.safetensors").read_bytes()
  b = (killed / "final" / "model.safetensors").read_bytes()
  assert a == b, "resumed run's parameters differ from the uninterrupted run's"


def test_config_errors_are_caught_before_anything_compiles(tmp_path):
  recipe = tmp_path / "recipe.yaml"
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", steps=5))
  cases = {
      "optim.learning_rate=1e-3": "unknown key 'optim.learning_rate'.*did you mean 'optim.lr'",
      "train.steps=ten": "wrong type for 'train.steps'",
      "mesh.data=3": "train.batch_size=4 is not divisible",
      "optim.name=adamx": "invalid value 'adamx' for 'optim.name'",
  }
  for override, pattern in cases.items():
    proc = subprocess.run(_cmd(recipe, override), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, (override, proc.stderr)
    assert proc.stderr.startswith("jaxpost: error:") and "Traceback" not in proc.stderr
    import re
    assert re.search(pattern, proc.stderr), (override, proc.stderr)
    assert not (tmp_path / "run").exists()


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path):
  from jaxpost.config import load_config
  from jaxpost.train import Checkpointer
  from jaxpost.train.trainer import TrainingError, train

  recipe = tmp_path / "recipe.yaml"
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", steps=40))
  good = load_config(recipe, ["checkpoint.every=5", "checkpoint.async_save=false"])
  train(good)  # 40 good steps, checkpoints up to 40
  # Continue with an absurd learning rate: parameters blow up, losses turn NaN.
  bad = load_config(recipe, ["train.steps=80", "optim.lr=1e30", "train.max_bad_steps=3",
                             "checkpoint.every=5"])
  with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
    train(bad)
  ck = Checkpointer(tmp_path / "run" / "checkpoints", save_every=5)
  assert ck.latest_step() is not None and ck.latest_step() < 80
  ck.close()


def test_quickstart_recipe_runs_and_prints_its_summary(tmp_path):
  """The README's main job, shortened: same recipe, fewer steps and questions."""
  root = Path(__file__).resolve().parent.parent
  proc = subprocess.run(
      _cmd(root / "configs" / "quickstart.yaml", f"run_dir={tmp_path}", "train.steps=6",
           "train.eval_every=3", "checkpoint.every=3", "task.num_eval=8",
           "optim.warmup_steps=2"),
      env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  import re
  assert re.fullmatch(r"quickstart: exact-match before=\d\.\d{3} after=\d\.\d{3}", last), last
  for f in ("metrics.jsonl", "final/model.safetensors", "final/tokenizer.model", "plots/loss.png",
            "config.yaml"):
    assert (tmp_path / f).exists(), f


def test_lora_run_trains_adapters_only_and_exports_the_merged_model(tmp_path):
  import jax
  import numpy as np
  from jaxpost.config import load_config
  from jaxpost.models import load_hf
  from jaxpost.train.trainer import train

  recipe = tmp_path / "recipe.yaml"
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", steps=12))
  cfg = load_config(recipe, ["lora.rank=4", "lora.targets=q,v,down", "checkpoint.every=6",
                             "optim.lr=1e-2"])
  summary = train(cfg)
  losses = [float(line.split('"train/loss": ')[1].split(",")[0])
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in line]
  assert losses[-1] < losses[0]
  _, base = load_hf(tmp_path / "run" / "model")
  _, final = load_hf(summary["final_model"])
  changed = {name for name in ("q", "k", "v", "o")
             if not np.array_equal(base["layers"]["attn"][name], final["layers"]["attn"][name])}
  assert changed == {"q", "v"}  # only adapted weights moved; everything else is the base
  np.testing.assert_array_equal(base["embed"], final["embed"])
  ckpt = tmp_path / "run" / "checkpoints" / "12"
  state_bytes = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
  base_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))
  assert state_bytes < base_bytes  # adapters and their optimizer state only

  # The adapters are also written in PEFT's format, and a run can start from them.
  from jaxpost.peft import load_peft_adapter, merge_lora
  config, _ = load_hf(tmp_path / "run" / "model")
  lora, adapters = load_peft_adapter(config, tmp_path / "run" / "adapter")
  assert lora.targets == ("q", "v", "down") and lora.rank == 4
  merged = merge_lora(base, adapters, lora)
  np.testing.assert_allclose(merged["layers"]["attn"]["q"], final["layers"]["attn"]["q"],
                             atol=1e-6)
  again = load_config(recipe, [f"run_dir={tmp_path / 'again'}", "train.steps=2",
                               f"lora.init_from={tmp_path / 'run' / 'adapter'}",
                               "model.tiny=false", f"model.path={tmp_path / 'run' / 'model'}",
                               "optim.warmup_steps=0", "train.eval_every=0"])
  assert train(again)["steps"] == 2

  # `jaxpost export` rebuilds the run from its step-6 checkpoint: merged HF model and adapter,
  # whose logits (merged weights) equal the adapter model's (factored) within 1e-5.
  import jax.numpy as jnp
  from jaxpost.cli import main
  from jaxpost.models import forward
  from jaxpost.peft import attach_lora
  assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported"),
               "--step", "6"]) == 0
  _, merged6 = load_hf(tmp_path / "exported" / "final")
  lora6, adapters6 = load_peft_adapter(config, tmp_path / "exported" / "adapter")
  tokens = jnp.arange(20)[None] % config.vocab_size
  want = forward(config, attach_lora(base, adapters6, lora6), tokens).logits
  got = forward(config, merged6, tokens).logits
  assert float(jnp.abs(got - want).max()) < 1e-5
  assert not np.array_equal(merged6["layers"]["attn"]["q"], final["layers"]["attn"]["q"])
  assert (tmp_path / "exported" / "final" / "tokenizer.model").exists()
