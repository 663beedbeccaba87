"""Regenerates tests/golden/llama: a tiny random Llama 3 checkpoint and transformers' logits.

    python tests/golden/make_golden.py

Needs the test extra (transformers, torch). The stored files let `test_golden_llama_without_torch`
check parity where torch is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from hf_models import make_hf_model  # noqa: E402
from jaxpost.models.safetensors_io import save_file  # noqa: E402


def main():
  out = HERE / "llama"
  model = make_hf_model("llama", seed=1234)
  model.save_pretrained(out)
  rng = np.random.default_rng(1234)
  tokens = rng.integers(0, model.config.vocab_size, (2, 24)).astype(np.int32)
  positions = np.stack([1000 + np.arange(24), 2000 + np.arange(24)]).astype(np.int32)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  save_file({"tokens": tokens, "positions": positions, "logits": logits},
            HERE / "llama_expected.safetensors")
  for junk in ("generation_config.json",):
    (out / junk).unlink(missing_ok=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
