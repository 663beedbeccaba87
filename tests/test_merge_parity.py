"""`jaxpost merge` against mergekit 0.1.5's own `run_merge` on tiny Llama folders, tensor by
tensor, on the same YAML; DARE (random) seeded and checked statistically; the in-memory API
against the streaming merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from hf_models import make_hf_model  # noqa: E402
from jaxpost.cli import main  # noqa: E402
from jaxpost.models.safetensors_io import SafetensorsFile  # noqa: E402

TOL = 1e-6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A tiny random Llama (2 layers, width 64) and three fine-tunes of it (+ 0.01 noise)."""
  root = tmp_path_factory.mktemp("merge_models")
  make_hf_model("llama", 0).save_pretrained(root / "base")
  for k, name in enumerate(["ft1", "ft2", "ft3"]):
    model = make_hf_model("llama", 0)
    gen = torch.Generator().manual_seed(10 + k)
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / name)
  return {name: str(root / name) for name in ("base", "ft1", "ft2", "ft3")}


def tensors(folder) -> dict[str, np.ndarray]:
  f = SafetensorsFile(Path(folder) / "model.safetensors")
  return {k: f.read(k) for k in f.keys()}


# Each case is a mergekit config over the fixture's models ({base}, {ft1}, ...).
CASES = {
    "linear": """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: [0.5, 1.0]}}      # a gradient over the layers
  - model: {ft3}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.6}}]
""",
    "slerp": """
slices:                                     # the canonical SLERP config, as mergekit's README
  - sources:
      - model: {ft1}
        layer_range: [0, 2]
      - model: {ft2}
        layer_range: [0, 2]
merge_method: slerp
base_model: {ft1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "slerp_bfloat16": """
merge_method: slerp
base_model: {ft2}
models: [{{model: {ft1}}}, {{model: {ft2}}}]
parameters: {{t: 0.3}}
dtype: bfloat16                             # inputs cast first; computed in float32 by both
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.7}}
  - model: {ft2}
    parameters: {{weight: [0.2, 0.5]}}
parameters: {{normalize: true, lambda: 0.9}}
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {base}                           # mergekit README style: the base listed, no parameters
  - model: {ft1}
    parameters: {{weight: 1.0, density: [1, 0.7, 0.1]}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft3}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{value: 0.2}}]
      density: 0.33
parameters: {{normalize: true, int8_mask: true}}
""",
    "ties_rescaled": """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0, density: 0.4}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.6}}
parameters: {{normalize: false, rescale: true, lambda: 1.3}}
""",
    # DARE at density 1 drops nothing: its weighting, sign election and defaults are exact
    "dare_ties_density_1": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.8, density: 1.0}}
""",
    "dare_linear_density_1": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.8, density: 1.0}}
parameters: {{normalize: true}}
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
  - model: {ft3}
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models: [{{model: {ft1}}}, {{model: {ft2}}}, {{model: {ft3}}}]
parameters: {{filter_wise: true}}
""",
}


def run_mergekit(config: dict, out: Path) -> None:
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions
  run_merge(MergeConfiguration.model_validate(config), str(out),
            MergeOptions(device="cpu", copy_tokenizer=False, quiet=True, write_model_card=False))


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_mergekit(case, models, tmp_path, capsys):
  text = CASES[case].format(**models)
  (tmp_path / "merge.yaml").write_text(text)
  run_mergekit(yaml.safe_load(text), tmp_path / "mergekit")
  assert main(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "jaxpost")]) == 0
  theirs, ours = tensors(tmp_path / "mergekit"), tensors(tmp_path / "jaxpost")
  assert theirs.keys() == ours.keys()
  assert all(theirs[k].dtype == ours[k].dtype for k in ours)
  diff = {k: np.abs(theirs[k].astype(np.float64) - ours[k].astype(np.float64)) for k in ours}
  err = max(float(d.max()) for d in diff.values())
  off = sum(int((d > 0).sum()) for d in diff.values()) / sum(d.size for d in diff.values())
  changed = max(float(np.abs(ours[k].astype(np.float32) - tensors(models["ft1"])[k]).max())
                for k in ours)
  with capsys.disabled():
    print(f"\n{case}: max |jaxpost - mergekit| = {err:.2e} over {len(ours)} tensors "
          f"({off:.2%} of entries not bit-equal)")
  assert changed > 1e-3  # not a copy of an input
  if "bfloat16" in case:  # float32 results differing in the last bit may round apart
    assert all((d <= 2.0**-7 * np.abs(ours[k].astype(np.float64))).all() for k, d in diff.items())
  else:
    assert err <= TOL


def test_dare_drops_at_the_density_and_keeps_the_l1_norm(models, tmp_path):
  """dare_linear of one fine-tune with weight 1: out - base is its task vector, each entry kept
  with probability density, rescaled to the task vector's L1 norm; seeded."""
  config = {"merge_method": "dare_linear", "base_model": models["base"],
            "models": [{"model": models["ft1"], "parameters": {"weight": 1.0, "density": 0.3}}]}
  (tmp_path / "dare.yaml").write_text(yaml.safe_dump(config))
  outs = {}
  for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
    assert main(["merge", str(tmp_path / "dare.yaml"), "--out", str(tmp_path / name),
                 "--seed", seed]) == 0
    outs[name] = tensors(tmp_path / name)
  base, ft = tensors(models["base"]), tensors(models["ft1"])
  kept = total = l1_all = l1_kept = 0
  for k in base:
    delta, merged = ft[k] - base[k], outs["a"][k] - base[k]
    on = np.abs(merged) > 1e-6 * np.abs(delta).max()
    kept, total = kept + on.sum(), total + on.size
    l1_all, l1_kept = l1_all + np.abs(delta).sum(), l1_kept + np.abs(delta[on]).sum()
    np.testing.assert_allclose(np.abs(merged).sum(), np.abs(delta).sum(), rtol=1e-4)
    # the kept entries are the task vector's, times one factor: L1(delta) / L1(kept delta)
    np.testing.assert_allclose(merged[on] / delta[on],
                               np.abs(delta).sum() / np.abs(delta[on]).sum(), rtol=2e-3)
  rate = kept / total                      # ~26k entries: sd 0.003
  assert abs(rate - 0.3) < 0.015, rate
  assert abs(l1_all / l1_kept * 0.3 - 1) < 0.05  # the factor is 1 / density on average
  assert all(np.array_equal(outs["a"][k], outs["b"][k]) for k in base)
  assert not all(np.array_equal(outs["a"][k], outs["c"][k]) for k in base)


def test_in_memory_api_equals_the_streaming_merge(models, tmp_path):
  """`jaxpost.merge.slerp` / `ties` on load_hf pytrees (stacked layers, jaxpost's layout) equal
  the streaming merge of the same folders, read back."""
  import jax
  from jaxpost import merge
  from jaxpost.models import load_hf
  _, base = load_hf(models["base"])
  _, a = load_hf(models["ft1"])
  config, b = load_hf(models["ft2"])
  for name, text, merged in [
      ("slerp", f"merge_method: slerp\nbase_model: {models['ft1']}\nmodels: [{{model: "
                f"{models['ft1']}}}, {{model: {models['ft2']}}}]\nparameters: {{t: 0.3}}\n",
       merge.slerp(a, b, 0.3)),
      ("ties", f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
               f"  - {{model: {models['ft1']}, parameters: {{weight: 0.7, density: 0.4}}}}\n"
               f"  - {{model: {models['ft2']}, parameters: {{weight: 0.3, density: 0.6}}}}\n",
       merge.ties(base, [a, b], [0.7, 0.3], density=[0.4, 0.6]))]:
    (tmp_path / f"{name}.yaml").write_text(text)
    assert main(["merge", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
    _, streamed = load_hf(tmp_path / name)
    err = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), merged,
                                           streamed)))
    assert err <= TOL, (name, err)
