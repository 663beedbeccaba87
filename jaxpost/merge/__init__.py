"""Model merging: parameters in, parameters out, never inside the training loop.

    from jaxpost import merge
    merged = merge.slerp(params_a, params_b, 0.5)               # pytrees already in memory
    cfg = merge.load_merge_config("configs/merge_slerp.yaml", ["parameters.t=0.3"])
    merge.merge_folders(cfg, "runs/merge_slerp")                 # HF folders, one tensor at a time

`methods`: the methods as pure functions over arrays and pytrees (mergekit 0.1.5's formulas);
`config`: mergekit's YAML schema; `inputs`: Hugging Face folders, jaxpost runs and PEFT
adapters as tensor sources; `stream`: the streaming merge of folders (`jaxpost merge`).
"""

from jaxpost.merge.config import METHODS, MergeConfig, load_merge_config, merge_config_from_dict
from jaxpost.merge.methods import (dare_linear, dare_ties, linear, merge_trees, model_stock,
                                   slerp, task_arithmetic, ties)
from jaxpost.merge.stream import MergeError, merge_folders

__all__ = ["METHODS", "MergeConfig", "MergeError", "dare_linear", "dare_ties", "linear",
           "load_merge_config", "merge_config_from_dict", "merge_folders", "merge_trees",
           "model_stock", "slerp", "task_arithmetic", "ties"]
