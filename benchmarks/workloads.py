"""What `benchmarks/run.py` compares: the frameworks, the model shape, the workloads and the
spec each worker receives.

Workloads (to add one: a `Workload` in `WORKLOADS`, its counts in `flops.py` and a branch in
each worker that runs it):

* `sft`: a full-parameter SFT update step (AdamW) on batch x seq_len tokens;
* `lora`: the same with rank-16 LoRA adapters on q, k, v, o, gate, up and down, base frozen;
* `dpo`: a DPO step (sigmoid loss, beta 0.1) with a reference model on P pairs, each side a row
  of prompt + response tokens;
* `distill`: a logit-distillation step (forward KL, temperature 1) of the benchmark model
  (the student: forward, backward, AdamW) from a frozen teacher of the same width and vocabulary
  with twice the layers (forward only), both on the same batch x seq_len rows;
* `generate`: greedy generation, batch 16, 128-token prompts, 128 new tokens;
* `grpo`: one GRPO step, rollout (2 prompts x 8 samples at temperature 1, 128 prompt tokens,
  128 new tokens, a reward on the host, group advantages) then one update (beta 0, AdamW) on
  the 16 prompt + completion rows; reported as a whole and split into rollout and update;
* `ppo`: one PPO step with a critic, rollout (16 prompts x 1 sample, the same lengths and
  reward as `grpo`, then the old policy's, the reference's and the critic's no-grad forwards,
  a k1 KL penalty in the per-token rewards, GAE, whitened advantages) then one update of the
  policy (clipped surrogate) and the critic (clipped value loss); split as `grpo`;
* `sft_chat`: one epoch of SFT over conversations with a realistic length distribution
  (`common.chat_lengths`), loss on the responses only; each framework batches them its own
  way, so the measure is real tokens per second of epoch;
* `dpo_shared_prompt`: the `dpo` pairs, each as one row `prompt, chosen, rejected` (jaxpost's
  `dpo.shared_prompt`); `dpo_precomputed_ref`: the same with the reference's log-probs
  precomputed once (jaxpost only; its ratios are against `dpo_shared_prompt`'s peers);
* `long_context_1k` ... `_8k` (`--only long_context`): one SFT step on a batch of one row of
  1024 ... 8192 tokens: time and peak memory against length.

Importing this module puts `benchmarks/` and `benchmarks/workers/` on `sys.path` (the workers
are scripts, not a package), so `common`, `bench_model` and `jaxpost_worker` import as
modules.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers")
REPO = os.path.dirname(HERE)
for _path in (HERE, WORKERS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import common
import flops
import roofline

FRAMEWORKS = ("jaxpost", "tunix", "pytorch")
FRAMEWORK_TITLES = {"jaxpost": "jaxpost", "tunix": "Tunix", "pytorch": "PyTorch"}

# The benchmark shape: Llama-style, GQA (4 query heads per KV head), SwiGLU, tied embeddings.
MODEL = {"vocab_size": 32000, "hidden_size": 512, "num_layers": 8, "num_heads": 8,
         "num_kv_heads": 2, "head_dim": 64, "intermediate_size": 1536, "tie_embeddings": True,
         "rope_theta": 500000, "norm_eps": 1e-5}
TINY_MODEL = dict(MODEL, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768)
OPTIM = {"lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
LORA = {"rank": 16, "alpha": 32.0, "targets": list(common.LORA_TARGETS)}


@dataclasses.dataclass(frozen=True)
class Phase:
  """A part of a workload's step timed on its own (the worker reports `<key>_median_s`)."""

  key: str
  title: str
  tokens_per_step: Callable[[dict], int]
  flops_per_step: Callable[[Any, dict], float]
  unit: str


@dataclasses.dataclass(frozen=True)
class Workload:
  """One row group of the comparison: which frameworks run it and how it is counted."""

  name: str
  title: str
  frameworks: tuple[str, ...]
  tokens_per_step: Callable[[dict], int]
  flops_per_step: Callable[[Any, dict], float]
  unit: str  # what tokens/s counts
  phases: tuple[Phase, ...] = ()  # parts of the step reported separately (GRPO)
  # (config, spec, ceiling GFLOP/s, bandwidth GB/s) -> {"bound_s": the machine's least step
  # time, ...} (`roofline`), for the workloads that have one (generation)
  bound: Callable[[Any, dict, float, float], dict] | None = None
  # the workload whose other frameworks' rows this one's ratios use (a jaxpost-only variant
  # of the same work, e.g. the precomputed reference against Tunix's in-step DPO)
  peers_from: str | None = None


WORKLOADS = {
    w.name: w for w in (
        Workload("sft", "Full SFT step (AdamW)", ("jaxpost", "tunix", "pytorch"),
                 flops.train_tokens, flops.sft_flops, "trained tokens"),
        Workload("lora", "LoRA r=16 SFT step (AdamW)", ("jaxpost", "tunix"),
                 flops.train_tokens, flops.lora_flops, "trained tokens"),
        Workload("dpo", "DPO step with reference (AdamW)", ("jaxpost", "tunix"),
                 flops.dpo_tokens, flops.dpo_flops, "tokens of both sides"),
        Workload("distill", "Distillation step, 2x-depth teacher (AdamW)", ("jaxpost", "tunix"),
                 flops.train_tokens, flops.distill_flops, "trained tokens"),
        Workload("generate", "Greedy generation", ("jaxpost", "tunix", "pytorch"),
                 flops.gen_tokens, flops.gen_flops, "new tokens", bound=roofline.gen_bound),
        Workload("grpo", "GRPO step (rollout + update)", ("jaxpost", "tunix"),
                 flops.grpo_row_tokens, flops.grpo_flops, "row tokens",
                 phases=(Phase("rollout", "rollout", flops.grpo_generated_tokens,
                               flops.grpo_rollout_flops, "generated tokens"),
                         Phase("update", "update", flops.grpo_row_tokens,
                               flops.grpo_update_flops, "trained tokens"))),
        Workload("ppo", "PPO step with critic (rollout + update)", ("jaxpost", "tunix"),
                 flops.ppo_row_tokens, flops.ppo_flops, "row tokens",
                 phases=(Phase("rollout", "rollout", flops.ppo_generated_tokens,
                               flops.ppo_rollout_flops, "generated tokens"),
                         Phase("update", "update", flops.ppo_row_tokens,
                               flops.ppo_update_flops, "trained tokens"))),
        # Workloads as users have them (issue 19).
        Workload("sft_chat", "SFT epoch, chat lengths (ShareGPT fit)",
                 ("jaxpost", "tunix", "pytorch"), flops.chat_tokens, flops.chat_flops,
                 "real tokens"),
        Workload("dpo_shared_prompt", "DPO step, prompt scored once (shared row)",
                 ("jaxpost", "tunix"), flops.dpo_tokens, flops.dpo_shared_flops,
                 "tokens of both sides"),
        Workload("dpo_precomputed_ref", "DPO step, shared row, reference precomputed",
                 ("jaxpost",), flops.dpo_tokens, flops.dpo_precomputed_flops,
                 "tokens of both sides", peers_from="dpo_shared_prompt"),
        *(Workload(f"long_context_{n // 1024}k", f"SFT step at {n // 1024}k tokens",
                   ("jaxpost", "tunix", "pytorch"), flops.train_tokens, flops.sft_flops,
                   "trained tokens") for n in (1024, 2048, 4096, 8192)),
    )
}
LONG_CONTEXT = tuple(name for name in WORKLOADS if name.startswith("long_context_"))
ALIASES = {"long_context": LONG_CONTEXT}  # --only names that stand for several workloads


@dataclasses.dataclass(frozen=True)
class Settings:
  """What one run measures."""

  model: dict
  workloads: tuple[str, ...]
  frameworks: tuple[str, ...]
  rounds: int
  train_warmup: int
  train_steps: int
  gen_warmup: int
  gen_steps: int
  matmul_sizes: tuple[int, ...]
  matmul_reps: int
  tiny: bool
  quick: bool
  starts: bool = False  # time to first step, cold and warm (`starts.py`)
  seed: int = 0
  batch: int = 8
  seq_len: int = 256
  dpo_pairs: int = 8
  dpo_prompt_len: int = 128
  dpo_response_len: int = 128
  dpo_beta: float = 0.1
  distill_teacher_depth: int = 2  # the teacher's layers, in multiples of the student's
  distill_kind: str = "forward_kl"  # the one divergence Tunix's LogitStrategy offers
  distill_temperature: float = 1.0
  gen_batch: int = 16
  gen_prompt_len: int = 128
  gen_new_tokens: int = 128
  grpo_prompts: int = 2
  grpo_group: int = 8
  grpo_prompt_len: int = 128
  grpo_new_tokens: int = 128
  ppo_prompts: int = 16
  ppo_prompt_len: int = 128
  ppo_new_tokens: int = 128
  # sft_chat: conversations with ShareGPT's mean lengths (`common.chat_lengths`), each cut to
  # chat_max_len; jaxpost packs them into chat_rows rows of chat_max_len per step, the peers
  # take chat_batch conversations per step (Tunix padded to chat_max_len, PyTorch to the longest)
  chat_conversations: int = 64
  chat_prompt_mean: float = 161.31
  chat_response_mean: float = 337.99
  chat_sigma: float = 1.0
  chat_max_len: int = 1024
  chat_rows: int = 2
  chat_batch: int = 4
  chat_epochs: int = 2  # timed epochs per worker, after one warm-up epoch
  # long_context_*k: one SFT step on long_context_batch rows of the workload's length
  long_context_batch: int = 1
  attention: str = "auto"  # jaxpost's model.attention for long_context (auto|dense|blockwise)


def teacher_model(s: Settings) -> dict:
  """The distillation teacher's shape: the student's (`s.model`: width, heads, vocabulary)
  with `distill_teacher_depth` times its layers."""
  return dict(s.model, num_layers=s.distill_teacher_depth * s.model["num_layers"])


def make_spec(s: Settings, workload: str) -> dict:
  """The JSON spec a worker receives (see `benchmarks/workers/common.py`)."""
  generating = workload == "generate"
  train = {"batch": s.batch, "seq_len": s.seq_len}
  if workload in LONG_CONTEXT:
    train = {"batch": s.long_context_batch, "seq_len": 1024 * int(workload[13:-1])}
  return {
      "workload": workload,
      "model": s.model,
      "train": train,
      "chat": {"conversations": s.chat_conversations, "prompt_mean": s.chat_prompt_mean,
               "response_mean": s.chat_response_mean, "sigma": s.chat_sigma,
               "max_len": s.chat_max_len, "rows": s.chat_rows, "batch": s.chat_batch,
               "warmup_epochs": 1, "epochs": s.chat_epochs},
      "long_context": dict(train, attention=s.attention),
      "dpo": {"pairs": s.dpo_pairs, "prompt_len": s.dpo_prompt_len,
              "response_len": s.dpo_response_len, "beta": s.dpo_beta},
      "distill": {"teacher": teacher_model(s), "kind": s.distill_kind,
                  "temperature": s.distill_temperature},
      "generate": {"batch": s.gen_batch, "prompt_len": s.gen_prompt_len,
                   "new_tokens": s.gen_new_tokens},
      "grpo": {"prompts": s.grpo_prompts, "group": s.grpo_group,
               "prompt_len": s.grpo_prompt_len, "new_tokens": s.grpo_new_tokens,
               "temperature": 1.0},
      "ppo": {"prompts": s.ppo_prompts, "prompt_len": s.ppo_prompt_len,
              "new_tokens": s.ppo_new_tokens, "temperature": 1.0, "kl_coef": 0.05,
              "gamma": 1.0, "lam": 0.95, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1},
      "lora": LORA,
      "optim": OPTIM,
      "matmul": {"sizes": list(s.matmul_sizes), "reps": s.matmul_reps},
      "warmup": s.gen_warmup if generating else s.train_warmup,
      "steps": s.gen_steps if generating else s.train_steps,
      "seed": s.seed,
  }
