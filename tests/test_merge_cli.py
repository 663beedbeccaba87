"""`jaxpost merge` end to end: the output folder (transformers loads it, the base's tokenizer),
overrides, PEFT adapters and run folders as inputs, and one clear line for each bad input (the
shipped recipes are loaded by tests/test_config.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_models import make_hf_model  # noqa: E402
from jaxpost import merge  # noqa: E402
from jaxpost.cli import main  # noqa: E402
from jaxpost.merge import load_merge_config  # noqa: E402
from jaxpost.merge.config import tensor_parameters  # noqa: E402
from jaxpost.models.safetensors_io import SafetensorsFile  # noqa: E402

def _tokenizer(folder: Path, words: list[str]) -> None:
  vocab = {w: i for i, w in enumerate(words)}
  (folder / "tokenizer.json").write_text(json.dumps(
      {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": words[0]},
       "added_tokens": []}))
  (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X"}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A tiny Llama base (with a tokenizer), a fine-tune of it, and misfits."""
  root = tmp_path_factory.mktemp("merge_cli")
  base = make_hf_model("llama", 0)
  base.save_pretrained(root / "base")
  _tokenizer(root / "base", ["<unk>", "a", "b"])
  with torch.no_grad():
    for p in base.parameters():
      p.add_(0.01)
  base.save_pretrained(root / "ft")
  _tokenizer(root / "ft", ["<unk>", "a", "b"])
  shutil.copytree(root / "ft", root / "other_tokenizer")
  _tokenizer(root / "other_tokenizer", ["<unk>", "b", "a"])
  wide = transformers.AutoConfig.for_model("llama", vocab_size=128, hidden_size=64,
                                           intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)
  transformers.AutoModelForCausalLM.from_config(wide).save_pretrained(root / "wider_mlp")
  shutil.copytree(root / "ft", root / "no_bias_tensor")
  f = SafetensorsFile(root / "ft" / "model.safetensors")
  from jaxpost.models.safetensors_io import save_file
  save_file({k: f.read(k) for k in f.keys() if k != "model.norm.weight"},
            root / "no_bias_tensor" / "model.safetensors")
  return root


def _write(tmp_path: Path, config: dict, name="merge.yaml") -> str:
  path = tmp_path / name
  path.write_text(yaml.safe_dump(config, sort_keys=False))
  return str(path)


def _slerp(models, t=0.5) -> dict:
  return {"merge_method": "slerp", "base_model": str(models / "base"),
          "models": [{"model": str(models / "base")}, {"model": str(models / "ft")}],
          "parameters": {"t": t}}


def test_output_is_a_transformers_model_with_the_bases_tokenizer(models, tmp_path, capsys):
  out = tmp_path / "out"
  assert main(["merge", _write(tmp_path, _slerp(models)), "--out", str(out),
               "--max-shard-size", "100KB"]) == 0
  printed = capsys.readouterr().out
  assert "merged 2 models by slerp" in printed and "peak memory" in printed
  assert (out / "model.safetensors.index.json").is_file()      # sharded at 100 KB
  assert (out / "tokenizer.json").read_bytes() == (models / "base" / "tokenizer.json").read_bytes()
  assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "slerp"
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  base = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
  ft = transformers.AutoModelForCausalLM.from_pretrained(models / "ft")
  q = "model.layers.1.self_attn.q_proj.weight"
  got, a, b = (m.state_dict()[q].numpy() for m in (model, base, ft))
  np.testing.assert_allclose(got, merge.slerp(a, b, 0.5), atol=1e-6)
  with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3]])).logits
  assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


def test_overrides_reach_the_parameters(models, tmp_path):
  cfg = load_merge_config(_write(tmp_path, {
      "merge_method": "ties", "base_model": str(models / "base"),
      "models": [{"model": str(models / "ft"), "parameters": {"weight": 1.0, "density": 0.5}}]}),
      ["parameters.lambda=0.5", "models.0.parameters.weight=0.7", "models[0].parameters.density"
       "=[0.2, 0.8]", "dtype=bfloat16"])
  shared, per_input = tensor_parameters(cfg, "model.layers.1.mlp.up_proj.weight", 1.0)
  assert shared["lambda"] == 0.5 and cfg.dtype == "bfloat16"
  assert per_input[0] == {"weight": 0.7, "density": 0.8} and per_input[1] == {}  # base last
  assert tensor_parameters(cfg, "model.embed_tokens.weight", 0.0)[1][0]["density"] == 0.2


def test_peft_adapters_are_applied_first_as_peft_merges_them(models, tmp_path):
  """BASE+ADAPTER (LoRA on attention, MLP, embeddings; and DoRA) read through `jaxpost merge`
  equals PEFT's own merge_and_unload."""
  peft = pytest.importorskip("peft")
  for name, kwargs in [("lora", dict(target_modules=["q_proj", "down_proj", "embed_tokens"],
                                     use_rslora=True)),
                       ("dora", dict(target_modules=["v_proj", "up_proj"], use_dora=True))]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
    torch.manual_seed(0)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    **kwargs))
    with torch.no_grad():
      for n, p in model.named_parameters():
        if "lora_magnitude_vector" in n:
          p.mul_(1 + 0.1 * torch.rand_like(p))
    model.save_pretrained(tmp_path / name)
    want = model.merge_and_unload().state_dict()
    out = tmp_path / f"out_{name}"
    config = {"merge_method": "linear", "models": [
        {"model": f"{models / 'base'}+{tmp_path / name}", "parameters": {"weight": 1.0}}]}
    assert main(["merge", _write(tmp_path, config), "--out", str(out)]) == 0
    got = SafetensorsFile(out / "model.safetensors")
    err = max(float(np.abs(got.read(k) - want[k].numpy()).max()) for k in got.keys())
    assert err < 1e-5, (name, err)
    changed = ("model.layers.0.self_attn.q_proj.weight" if name == "lora"
               else "model.layers.0.mlp.up_proj.weight")
    before = SafetensorsFile(models / "base" / "model.safetensors").read(changed)
    assert np.abs(got.read(changed) - before).max() > 1e-3   # the adapter did change it
  # an adapter folder alone: its base is adapter_config.json's base_model_name_or_path
  config["models"][0]["model"] = str(tmp_path / "dora")
  assert main(["merge", _write(tmp_path, config), "--out", str(tmp_path / "alone")]) == 0
  alone = SafetensorsFile(tmp_path / "alone" / "model.safetensors")
  assert all(np.array_equal(alone.read(k), got.read(k)) for k in got.keys())


def test_tensors_are_read_merged_and_written_one_at_a_time(models, tmp_path, monkeypatch):
  """The streaming order: between two writes, each model's tensor is read once, so no more
  than one tensor per model is in memory (the peak is measured in docs/architecture.md)."""
  from jaxpost.merge import inputs
  from jaxpost.models import safetensors_io
  events = []
  read, write = inputs.FolderSource.read, safetensors_io.SafetensorsWriter.write
  monkeypatch.setattr(inputs.FolderSource, "read",
                      lambda self, name: events.append(("read", name)) or read(self, name))
  monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write",
                      lambda self, name, a: events.append(("write", name)) or write(self, name, a))
  # mergekit's form, `mergekit-yaml CONFIG OUT`, works too
  assert main(["merge", _write(tmp_path, _slerp(models)), str(tmp_path / "o")]) == 0
  names = [n for kind, n in events if kind == "write"]
  assert len(names) == 21 and events == [e for n in names for e in
                                         [("read", n), ("read", n), ("write", n)]]


def test_run_folders_use_final_or_export_a_checkpoint(models, tmp_path, monkeypatch):
  """A run with final/ is read from it; a run without one, or RUN/checkpoints/N, is exported
  first (by `export_run`, stubbed here: it is tested with the trainer)."""
  from jaxpost.train import trainer
  run = tmp_path / "run"
  (run / "checkpoints" / "7").mkdir(parents=True)
  (run / "config.yaml").write_text("{}")
  exported = []

  def fake_export(run_dir, out_dir, step=None):
    exported.append((Path(run_dir), step))
    shutil.copytree(models / "ft", Path(out_dir) / "final")

  monkeypatch.setattr(trainer, "export_run", fake_export)
  for model, want in [(run, (run, None)), (run / "checkpoints" / "7", (run, 7))]:
    config = {"merge_method": "linear", "parameters": {"weight": 0.5},
              "models": [{"model": str(model)}, {"model": str(models / "base")}]}
    assert main(["merge", _write(tmp_path, config), "--out", str(tmp_path / "o")]) == 0
    assert exported[-1] == want
  shutil.copytree(models / "ft", run / "final")
  config["models"][0]["model"] = str(run)
  assert main(["merge", _write(tmp_path, config), "--out", str(tmp_path / "o")]) == 0
  assert len(exported) == 2   # final/ used, nothing exported


def _bad(models):
  base, ft = str(models / "base"), str(models / "ft")
  slerp = _slerp(models)
  ties = {"merge_method": "ties", "base_model": base,
          "models": [{"model": ft, "parameters": {"weight": 1.0}}]}
  return {
      "unknown key": (dict(slerp, merge_methd="x"), "unknown key 'merge_methd'; did you mean "
                      "'merge_method'?"),
      "mergekit-only key": (dict(slerp, tokenizer={"source": "union"}), "key 'tokenizer'"),
      "unsupported method": (dict(slerp, merge_method="della"), "merge_method 'della' is not "
                             "supported (supported: linear, slerp"),
      "unknown parameter": (dict(ties, parameters={"desnity": 0.5}), "takes no parameter "
                            "'desnity'; did you mean 'density'?"),
      "missing weight": (dict(ties, models=[{"model": ft}]), "'models[0]' (" + ft + ") has no "
                         "'weight'"),
      "t outside [0, 1]": (_slerp(models, t=1.5), "'parameters.t' must be in [0, 1]"),
      "three models for slerp": (dict(slerp, models=slerp["models"] + [
          {"model": str(models / "wider_mlp")}]), "takes exactly 2 models"),
      "no base for ties": ({k: v for k, v in ties.items() if k != "base_model"},
                           "merge_method ties needs a base_model"),
      "frankenmerge": (dict({k: v for k, v in slerp.items() if k != "models"}, slices=[
          {"sources": [{"model": base, "layer_range": [0, 1]}, {"model": ft,
                                                                 "layer_range": [0, 1]}]}]),
          "'slices[0].sources[0].layer_range' is [0, 1] but the model has 2 layers"),
      "missing folder": (dict(slerp, models=[{"model": base}, {"model": base + "_nope"}]),
                         f"models[1]: model '{base}_nope' does not exist"),
      "another architecture": (dict(slerp, models=[{"model": base}, {"model": str(
          models / "wider_mlp")}]), "are different architectures: config.json "
          "'intermediate_size' is 128 vs 96"),
      "a tensor missing": (dict(slerp, models=[{"model": base}, {"model": str(
          models / "no_bias_tensor")}]), "tensor 'model.norm.weight' of " + base + " is missing"),
      "other tokenizer": (dict(slerp, models=[{"model": base}, {"model": str(
          models / "other_tokenizer")}]), "have different tokenizers"),
      "weights summing to 0": ({"merge_method": "linear", "models": [
          {"model": base, "parameters": {"weight": 1.0}},
          {"model": ft, "parameters": {"weight": -1.0}}]}, "sum to 0, so they cannot be "
          "normalised"),
      "bad override": (slerp, "'models.5' is not an entry of a list of 2"),
  }


@pytest.mark.parametrize("case", ["unknown key", "mergekit-only key", "unsupported method",
                                  "unknown parameter", "missing weight", "t outside [0, 1]",
                                  "three models for slerp", "no base for ties", "frankenmerge",
                                  "missing folder", "another architecture", "a tensor missing",
                                  "other tokenizer", "weights summing to 0", "bad override"])
def test_bad_merges_are_one_clear_line(case, models, tmp_path, capsys):
  config, expected = _bad(models)[case]
  extra = ["models.5.parameters.weight=1"] if case == "bad override" else []
  assert main(["merge", _write(tmp_path, config), *extra, "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxpost: error:") and err.count("\n") == 1, err
  assert expected in err, err
  assert not (tmp_path / "o" / "model.safetensors").exists()
