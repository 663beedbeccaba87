"""A bad model folder gives one clear error naming the file and the key: config.json, the
safetensors index, the safetensors files themselves."""

from __future__ import annotations

import json
import shutil
import struct

import jax
import numpy as np
import pytest

from jaxpost.models import (CheckpointError, ConfigError, ModelConfig, ParamSpec, config_to_hf,
                            load_hf, param_specs, read_config, save_hf)
from jaxpost.models.safetensors_io import SafetensorsError, SafetensorsFile, save_file

CONFIG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=8, intermediate_size=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A good model folder (random numpy weights: no compilation)."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda spec: rng.normal(0.0, 0.02, spec.shape).astype(np.float32),
                        param_specs(CONFIG), is_leaf=lambda x: isinstance(x, ParamSpec))
  path = tmp_path_factory.mktemp("model") / "m"
  save_hf(CONFIG, params, path)
  assert read_config(path) == CONFIG
  return path


def _copy(saved, tmp_path, name, content):
  """A copy of the model folder whose file `name` holds `content`."""
  folder = tmp_path / "m"
  shutil.copytree(saved, folder)
  (folder / name).write_bytes(content)
  return folder


def _config(**changes):
  d = config_to_hf(CONFIG)
  for key, value in changes.items():
    if value is None:
      d.pop(key)
    else:
      d[key] = value
  return json.dumps(d).encode()


CONFIG_CASES = [  # (config.json bytes, exception, message after the path of config.json)
    (b"[1, 2]", CheckpointError, " must hold a JSON object, got a list; fix it"),
    (b'"llama"', CheckpointError, " must hold a JSON object, got a string"),
    (b"7", CheckpointError, " must hold a JSON object, got a number"),
    (b"{oops", CheckpointError, ": not valid JSON (Expecting property name enclosed in double "
     "quotes at line 1, column 2)"),
    (b'{"model_type": "caf\xe9"}', CheckpointError, " line 1: not valid UTF-8 (byte 0xe9)"),
    (_config(hidden_size=None), ConfigError,
     ": required key 'hidden_size' is missing (a llama config.json has it); fix it, or take "
     "config.json from the original model"),
    (_config(vocab_size=None), ConfigError, ": required key 'vocab_size' is missing"),
    (_config(hidden_size="16"), ConfigError,
     ": hidden_size should be an integer, got string '16'"),
    (_config(num_hidden_layers=2.5), ConfigError,
     ": num_hidden_layers should be an integer, got number 2.5"),
    (_config(rms_norm_eps=[1]), ConfigError, ": rms_norm_eps should be a number, got list [1]"),
    (_config(model_type=None), ConfigError, ": no model_type; jaxpost supports llama"),
    (_config(model_type=["llama"]), ConfigError, ": unknown model_type ['llama']"),
    (_config(rope_scaling="linear"), ConfigError,
     ": rope_scaling should be an object or null, got string 'linear'"),
    (_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), ConfigError,
     ": rope_scaling: rope type 'llama3' needs key 'low_freq_factor', which is missing"),
    (_config(rope_scaling={"rope_type": "linear", "factor": "x"}), ConfigError,
     ": rope_scaling: factor should be a number, got string 'x'"),
    (_config(num_key_value_heads=3), ConfigError,
     ": num_heads (2) must be a multiple of num_kv_heads (3); fix it"),
]


@pytest.mark.parametrize("content, error, message", CONFIG_CASES)
def test_a_bad_config_json_names_file_and_key(saved, tmp_path, content, error, message):
  folder = _copy(saved, tmp_path, "config.json", content)
  for load in (read_config, load_hf):
    with pytest.raises(error) as e:
      load(folder)
    assert str(e.value).startswith(f"{folder / 'config.json'}{message}"), str(e.value)


def test_layer_types_of_the_wrong_kind_or_length(saved, tmp_path):
  d = dict(config_to_hf(CONFIG), model_type="qwen3")
  for layer_types, message in [("full_attention", "layer_types should be a list, got string"),
                               (["full_attention"], "layer_types has 1 entries but "
                                                    "num_hidden_layers is 2"),
                               (["full_attention", 3], "layer_types entry 3 is not supported")]:
    folder = tmp_path / str(len(message))
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(d, layer_types=layer_types)))
    with pytest.raises(ConfigError, match=rf"^{folder / 'config.json'}: {message}"):
      read_config(folder)


def test_a_bad_safetensors_index_names_the_index(saved, tmp_path):
  index = '{"weight_map": {"model.embed_tokens.weight": "model.safetensors"}}'
  for content, message in [
      (b"[]", " must hold a JSON object, got a list"),
      (b"{", ": not valid JSON"),
      (b'{"metadata": {}}', ": 'weight_map' should be an object of tensor name -> shard file "
                            "name in this folder, got null"),
      (b'{"weight_map": ["model.safetensors"]}', ": 'weight_map' should be an object"),
      (index.replace("model.safetensors", "../model.safetensors").encode(),
       ": 'weight_map' should be an object")]:
    folder = _copy(saved, tmp_path / str(len(content)), "model.safetensors.index.json", content)
    with pytest.raises(CheckpointError) as e:
      load_hf(folder)
    assert str(e.value).startswith(f"{folder / 'model.safetensors.index.json'}{message}"), (
        str(e.value))


def test_a_bad_safetensors_file_is_named(saved, tmp_path):
  data = (saved / "model.safetensors").read_bytes()
  (n,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + n])

  def with_header(value):
    blob = json.dumps(value).encode()
    return struct.pack("<Q", len(blob)) + blob

  first = next(k for k in header if k != "__metadata__")
  cases = [
      (data[:len(data) // 2], rf": tensor '.*' ends at byte \d+, but the file has only "
                              rf"{len(data) // 2} bytes: the file is truncated or corrupt"),
      (data[:5], r" is too short to be a safetensors file \(5 bytes\)"),
      (b"\x00" * 64, r" is not a safetensors file, or a truncated one: its first 8 bytes give a "
                     r"header of 0 bytes, but the file has 64 bytes; download or export it again"),
      (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
       r" is a Git LFS pointer, not the weights: fetch them \(`git lfs pull`"),
      (b"<!DOCTYPE html><html>" + b" " * 64, r" is not a safetensors file \(it looks like an HTML"),
      (struct.pack("<Q", 4) + b"\xff\xfe{}", r": its header is not valid JSON"),
      (with_header([1, 2]), r": its header should be a JSON object, got list"),
      (with_header({**header, first: {**header[first], "shape": "big"}}),
       rf": tensor '{first}' has an invalid shape 'big'"),
      (with_header({**header, first: {**header[first], "data_offsets": [5]}}),
       rf": tensor '{first}' has invalid data_offsets \[5\]"),
      (with_header({**header, first: {**header[first], "dtype": "F8_E4M3"}}),
       rf": tensor '{first}' has unsupported dtype 'F8_E4M3'"),
  ]
  for i, (content, message) in enumerate(cases):
    path = tmp_path / f"{i}.safetensors"
    path.write_bytes(content)
    with pytest.raises(SafetensorsError, match=f"^{path}{message}"):
      SafetensorsFile(path)
  folder = _copy(saved, tmp_path / "truncated", "model.safetensors", data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf"^{folder / 'model.safetensors'}: tensor .* the file is "
                     "truncated or corrupt"):
    load_hf(folder)
  save_file({"x": np.ones((2, 3), np.float32)}, tmp_path / "ok.safetensors")
  assert SafetensorsFile(tmp_path / "ok.safetensors").get("x").sum() == 6
