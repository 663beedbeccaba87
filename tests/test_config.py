"""The run configuration: YAML + overrides -> a validated, hashable tree of dataclasses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxpost.config import (ConfigError, OptimSection, RunConfig, Section, config_from_dict,
                            config_to_dict, load_config, save_config, suggest_key, valid_keys)

RECIPE = """\
run_dir: runs/quickstart
model:
  tiny: true
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
optim:
  lr: 3e-4        # a float in YAML 1.2, a string in YAML 1.1
  warmup_steps: 2
train:
  steps: 20
  batch_size: 8
  eval_every: 5
"""


@pytest.fixture
def recipe(tmp_path):
  path = tmp_path / "quickstart.yaml"
  path.write_text(RECIPE)
  return path


def _error(path, overrides=()) -> str:
  with pytest.raises(ConfigError) as info:
    load_config(path, overrides)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_loads_yaml_with_defaults(recipe):
  cfg = load_config(recipe)
  assert cfg.algorithm == "sft" and cfg.run_dir == "runs/quickstart"
  assert cfg.model.tiny and cfg.model.path is None and cfg.model.dtype == "float32"
  assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
  assert cfg.optim == dataclasses.replace(OptimSection(), lr=3e-4, warmup_steps=2)
  assert (cfg.train.steps, cfg.train.batch_size, cfg.train.micro_batches) == (20, 8, 1)
  assert cfg.mesh.batch_shards == 1 and cfg.checkpoint.keep_last == 2
  hash(cfg)  # static under jit


def test_overrides_are_yaml_scalars(recipe):
  cfg = load_config(recipe, ["train.steps=100", "optim.lr=1e-3", "model.dtype=bfloat16",
                             "data.eval=null", "train.eval_every=0", "optim.grad_clip=null",
                             "optim.weight_decay=1", "train.seed=3.0", "mesh.data=2",
                             "distributed.coordinator_address=10.0.0.1:1234"])
  assert cfg.train.steps == 100 and cfg.optim.lr == 1e-3
  assert cfg.model.dtype == "bfloat16" and cfg.data.eval is None
  assert cfg.optim.grad_clip is None
  assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)
  assert cfg.train.seed == 3 and isinstance(cfg.train.seed, int)
  assert cfg.distributed.coordinator_address == "10.0.0.1:1234"
  # An override creates a section the file left out; the last override of a key wins.
  cfg = load_config(recipe, ["checkpoint.every=5", "checkpoint.every=10"])
  assert cfg.checkpoint.every == 10


def test_unknown_key_in_file_suggests_nearest(recipe):
  recipe.write_text(RECIPE.replace("  lr: 3e-4", "  learning_rate: 3e-4"))
  message = _error(recipe)
  assert message == (f"unknown key 'optim.learning_rate' in {recipe}; "
                     "did you mean 'optim.lr'?")


def test_unknown_key_in_override_names_the_override(recipe):
  message = _error(recipe, ["train.stpes=3"])
  assert message == ("unknown key 'train.stpes' in override 'train.stpes=3'; "
                     "did you mean 'train.steps'?")
  assert "did you mean 'optim'?" in _error(recipe, ["optimizer.lr=1"])
  assert "in override 'optimizer.lr=1'" in _error(recipe, ["optimizer.lr=1"])


@pytest.mark.parametrize("key,expected", [
    ("optim.learning_rate", "optim.lr"), ("train.lr", "optim.lr"),
    ("train.batch", "train.batch_size"), ("optimizer", "optim"),
    ("checkpoint.keep", "checkpoint.keep_last"), ("zzz.qqq", None)])
def test_suggestions(key, expected):
  assert suggest_key(key) == expected


def test_valid_keys_cover_the_tree():
  keys = valid_keys()
  assert {"run_dir", "optim", "optim.lr", "mesh.fsdp", "checkpoint.best_mode"} <= set(keys)
  assert len(keys) == len(set(keys))


@pytest.mark.parametrize("override,fragment", [
    ("train.steps=ten", "wrong type for 'train.steps' in override 'train.steps=ten': "
     "expected an integer, got 'ten' (str)"),
    ("train.steps=2.5", "expected an integer, got 2.5 (float)"),
    ("train.steps=true", "expected an integer, got True (bool)"),
    ("optim.lr=fast", "wrong type for 'optim.lr'"),
    ("optim.grad_clip=big", "expected a number or null, got 'big'"),
    ("model.remat=1", "expected a boolean or one of 'none', 'full', 'dots', 'dots_no_batch', "
                       "'qkv_attn_out', got 1 (int)"),
    ("data.train=3", "expected a string or null, got 3 (int)"),
])
def test_wrong_type(recipe, override, fragment):
  assert fragment in _error(recipe, [override])


def test_mapping_where_a_scalar_belongs(recipe):
  recipe.write_text(RECIPE.replace("  steps: 20", "  steps: {value: 20}"))
  assert "wrong type for 'train.steps'" in _error(recipe)
  assert "got {'value': 20} (a mapping)" in _error(recipe)
  recipe.write_text(RECIPE + "mesh: 4\n")
  assert "wrong type for 'mesh'" in _error(recipe)
  assert "expected a mapping (section), got 4 (int)" in _error(recipe)


@pytest.mark.parametrize("override,allowed", [
    ("optim.name=adamx", "'adamw', 'adam', 'sgd', 'adafactor', 'lion'"),
    ("model.dtype=fp16", "'float32', 'bfloat16'"),
    ("model.compute_dtype=fp16", "'float32', 'bfloat16' or null"),
    ("checkpoint.best_mode=lowest", "'min', 'max'"),
    ("algorithm=a2c", "'sft', 'reward', 'dpo', 'kto', 'grpo', 'online_dpo', 'ppo', 'distill'"),
])
def test_bad_choice_lists_allowed_values(recipe, override, allowed):
  key, _, value = override.partition("=")
  message = _error(recipe, [override])
  assert message.startswith(f"invalid value '{value}' for '{key}'")
  assert message.endswith(f"choose one of {allowed}")


@pytest.mark.parametrize("overrides,fragment", [
    (["mesh.data=3"], "train.batch_size=8 is not divisible by the batch shards "
     "mesh.data x mesh.fsdp = 3 x 1 = 3"),
    (["train.micro_batches=3"], "train.batch_size=8 is not divisible by "
     "train.micro_batches=3"),
    (["train.micro_batches=4", "mesh.fsdp=4"], "the micro-batch train.batch_size / "
     "train.micro_batches = 8 / 4 = 2 is not divisible by the batch shards"),
])
def test_batch_divisibility(recipe, overrides, fragment):
  assert fragment in _error(recipe, overrides)


@pytest.mark.parametrize("override,fragment", [
    ("train.steps=0", "train.steps must be >= 1"),
    ("data.seq_len=0", "data.seq_len must be >= 1"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1"),
    ("mesh.tensor=0", "mesh.tensor must be >= 1"),
    ("optim.b2=1", "optim.b2 must be in [0, 1)"),
    ("optim.warmup_steps=50", "optim.warmup_steps=50 exceeds train.steps=20"),
    ("data.eval=null", "train.eval_every=5 needs data.eval"),
    ("checkpoint.keep_best=1", None),
    ("model.path=/models/x", "model.path, model.tiny=true and model.preset are exclusive"),
    ("distributed.process_id=2", None),
])
def test_impossible_values(recipe, override, fragment):
  if fragment is None:
    load_config(recipe, [override])  # valid
  else:
    assert fragment in _error(recipe, [override])


def test_impossible_cross_section_values(recipe):
  assert "needs train.eval_every > 0" in _error(
      recipe, ["checkpoint.keep_best=1", "train.eval_every=0"])
  assert "process_id=2 must be < distributed.num_processes=2" in _error(
      recipe, ["distributed.process_id=2", "distributed.num_processes=2"])


def test_missing_required_keys(recipe):
  recipe.write_text(RECIPE.replace("  train: data/train.jsonl\n", ""))
  assert _error(recipe) == "missing required key 'data.train'"
  recipe.write_text(RECIPE.replace("  batch_size: 8\n", ""))
  assert _error(recipe) == f"missing required key 'train.batch_size' in {recipe}"
  recipe.write_text(RECIPE.replace("run_dir: runs/quickstart\n", ""))
  assert _error(recipe) == f"missing required key 'run_dir' in {recipe}"
  recipe.write_text(RECIPE.replace("model:\n  tiny: true\n", ""))
  assert "missing required key 'model.path' (or set model.tiny=true)" == _error(recipe)
  cut = RECIPE.index("train:\n  steps")
  recipe.write_text(RECIPE[:cut])
  assert _error(recipe) == f"missing required key 'train.steps' in {recipe}"


def test_invalid_yaml_names_file_and_line(recipe):
  recipe.write_text("run_dir: x\ntrain:\n  steps: 1\n   batch_size: [\n")
  message = _error(recipe)
  assert message.startswith(f"invalid YAML in {recipe} at line 4, column")
  recipe.write_text("run_dir: x\ntrain:\n  steps: 1\n  steps: 2\n")
  assert _error(recipe) == f"invalid YAML in {recipe} at line 4, column 3: duplicate key 'steps'"
  recipe.write_text("- a\n- b\n")
  assert _error(recipe).startswith(f"{recipe} must hold a mapping of sections")


def test_bad_override_syntax_and_missing_file(recipe, tmp_path):
  assert "expected key.path=value" in _error(recipe, ["train.steps"])
  assert "expected key.path=value" in _error(recipe, ["train..steps=1"])
  assert "'train.steps' is a value, not a section" in _error(recipe, ["train.steps.x=1"])
  assert _error(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_round_trip_save_load(recipe, tmp_path):
  cfg = load_config(recipe, ["optim.eps=1e-12", "model.compute_dtype=bfloat16",
                             "distributed.num_processes=2", "optim.grad_clip=null"])
  saved = save_config(cfg, tmp_path / "run" / "config.yaml")
  assert load_config(saved) == cfg
  raw = config_to_dict(cfg)
  assert list(raw)[:3] == ["algorithm", "run_dir", "model"]
  assert raw["optim"]["lr"] == 3e-4 and raw["optim"]["grad_clip"] is None
  assert config_from_dict(raw) == cfg


@dataclasses.dataclass(frozen=True)
class LoraSection(Section):
  """A section as a later issue adds it (module level: annotations resolve from here)."""

  rank: int = 8

  def validate(self, prefix: str) -> None:
    if self.rank < 1:
      raise ConfigError(f"{prefix}rank must be >= 1, got {self.rank}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Extended(RunConfig):
  lora: LoraSection | None = None


def test_adding_a_section_is_adding_a_field():
  """A new section (as a later issue adds `lora`) needs no loader change."""
  raw = {"run_dir": "r", "model": {"tiny": True}, "data": {"train": "t"},
         "train": {"steps": 1, "batch_size": 1}}

  def build(raw):
    return config_from_dict(raw, source="test.yaml", root=Extended)

  assert build(raw).lora is None
  assert build({**raw, "lora": {"rank": 4}}).lora == LoraSection(rank=4)
  with pytest.raises(ConfigError, match="lora.rank must be >= 1"):
    build({**raw, "lora": {"rank": 0}})
  with pytest.raises(ConfigError, match=r"wrong type for 'lora.rank' in test.yaml"):
    build({**raw, "lora": {"rank": "big"}})
  with pytest.raises(ConfigError,
                     match=r"unknown key 'lora.rnak' in test.yaml; did you mean 'lora.rank'\?"):
    build({**raw, "lora": {"rnak": 2}})


def test_sections_are_frozen(recipe):
  cfg = load_config(recipe)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.optim.lr = 1.0  # type: ignore[misc]


RECIPES = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
  """Every shipped recipe is a valid config (an evaluation recipe of `jaxpost eval`'s schema)."""
  from jaxpost.config import EvalConfig
  if recipe.name.startswith("merge"):  # `jaxpost merge`: mergekit's schema
    from jaxpost.merge import load_merge_config
    assert load_merge_config(recipe).models
  elif recipe.name.startswith("eval"):
    cfg = load_config(recipe, root=EvalConfig)
    assert cfg.suites
  elif recipe.stem in ("steer", "probe", "heads"):  # `jaxpost steer | probe | heads`
    from jaxpost.config.whitebox_tools import HeadsConfig, ProbeConfig, SteerConfig
    root = {"steer": SteerConfig, "probe": ProbeConfig, "heads": HeadsConfig}[recipe.stem]
    assert load_config(recipe, root=root).model
  else:  # sft.yaml is a template: the user names the model and the data
    overrides = ["model.path=m", "data.train=t.jsonl", "data.eval=e.jsonl"] if recipe.name == "sft.yaml" else []
    cfg = load_config(recipe, overrides)
    assert cfg.train.steps > 0 and cfg.run_dir
