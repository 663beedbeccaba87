"""Typed run configuration: a YAML recipe -> a validated tree of frozen dataclasses.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=100", "optim.lr=3e-4"])
    cfg.optim.lr, cfg.train.batch_size, cfg.mesh.batch_shards
    save_config(cfg, Path(cfg.run_dir) / "config.yaml")

Sections and their checks live in `sections.py`; reading, overrides and type checking in
`loader.py`. Every problem is a `ConfigError` (a `ValueError`) with a one-line message.
"""

from jaxpost.config.continual import ContinualSection, ReplaySection
from jaxpost.config.eval import EvalConfig, EvalSection, LmEvalSection, SuiteSection
from jaxpost.config.loader import (apply_overrides, config_from_dict, config_to_dict,
                                   load_config, parse_value, read_yaml, save_config,
                                   suggest_key, valid_keys)
from jaxpost.config.sections import (CheckpointSection, ConfigError, DataSection,
                                     DistributedSection, DPOSection, KTOSection, LoraSection,
                                     MeshSection, ModelSection, OptimSection, PromptSection,
                                     ReferenceSection, RewardSection, RunConfig, Section,
                                     TaskSection, TrainSection)

__all__ = [
    "CheckpointSection", "ConfigError", "ContinualSection", "ReplaySection", "DPOSection", "DataSection", "DistributedSection",
    "EvalConfig", "EvalSection", "LmEvalSection", "SuiteSection",
    "KTOSection", "LoraSection", "MeshSection", "ModelSection", "OptimSection", "PromptSection",
    "ReferenceSection", "RewardSection", "RunConfig", "Section", "TaskSection", "TrainSection",
    "apply_overrides", "config_from_dict", "config_to_dict", "load_config", "parse_value",
    "read_yaml", "save_config", "suggest_key", "valid_keys",
]
