"""The `jaxpost` command line end to end."""

from __future__ import annotations

import json

from jaxpost.cli import main
from jaxpost.models import load_hf
from jaxpost.tokenizer import load_tokenizer


def test_demo_builds_a_loadable_checkpoint_and_generates(tmp_path, capsys):
  assert main(["demo", "--run-dir", str(tmp_path), "--max-new-tokens", "8"]) == 0
  out = capsys.readouterr().out
  assert "completion:" in out and "tokens/s" in out and "demo: ok" in out
  config, _ = load_hf(tmp_path / "model")
  tokenizer = load_tokenizer(tmp_path / "model")
  assert config.vocab_size == tokenizer.vocab_size
  assert tokenizer.eos_ids == (1, 5)
  assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "llama"


def test_generate_on_a_wrong_folder_is_one_clear_error(tmp_path, capsys):
  assert main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxpost: error:") and "config.json" in err and "Traceback" not in err
