"""Tokens and model FLOPs per step of each workload of `benchmarks/run.py`.

Model FLOPs are what the algorithm needs, the same for every framework, counted as
`bench_model.forward_flops_per_token` counts a forward: 2 N + 4 L T H Dh per token (N: matmul
weights incl. the LM head; attention charged for all T keys). A backward is 2 x forward, so a
trained token costs 3 x forward. Every function takes the student's (or only model's)
`jaxpost.models.ModelConfig` and the worker spec (`workloads.make_spec`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

_WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers")
if _WORKERS not in sys.path:  # jaxpost_worker lives with the workers (scripts, not a package)
  sys.path.insert(0, _WORKERS)

import common
from bench_model import forward_flops_per_token, generate_flops, matmul_params
from jaxpost_worker import jaxpost_config


def lora_matmul_params(config, rank: int, targets: Sequence[str]) -> int:
  """Weights of the LoRA adapters: rank * (fan_in + fan_out) per target per layer."""
  c = config
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  dims = {"q": (c.hidden_size, q), "k": (c.hidden_size, kv), "v": (c.hidden_size, kv),
          "o": (q, c.hidden_size), "gate": (c.hidden_size, c.intermediate_size),
          "up": (c.hidden_size, c.intermediate_size),
          "down": (c.intermediate_size, c.hidden_size)}
  return c.num_layers * rank * sum(sum(dims[t]) for t in targets)


def train_tokens(spec: dict) -> int:
  """Tokens of an SFT-shaped batch (sft, lora, distill): batch x seq_len."""
  return spec["train"]["batch"] * spec["train"]["seq_len"]


def sft_flops(config, spec: dict) -> float:
  """3 x forward (backward = 2 x forward), bench_model's count: 6N + 12 L H Dh T per token."""
  t = spec["train"]
  return 3.0 * forward_flops_per_token(config, t["seq_len"]) * t["batch"] * t["seq_len"]


def lora_flops(config, spec: dict) -> float:
  """LoRA over a frozen base, per token: 4N + 3A + 6N_lora.

  Forward 2N + A + 2N_lora; backward 2N (input gradients of every frozen matmul, LM head
  included; no weight gradients) + 2A (attention's backward) + 4N_lora (input and weight
  gradients of the adapters); A = 4 L T H Dh. This is what an unmerged LoRA, x W + s (x A) B,
  needs. An implementation that merges W + s A B would also form the full weight gradient of
  every adapted matrix; jaxpost's executed matmul FLOPs (counted from its traced step) show
  what it does.
  """
  t = spec["train"]
  lo = spec["lora"]
  n_lora = lora_matmul_params(config, lo["rank"], lo["targets"])
  attention = (forward_flops_per_token(config, t["seq_len"])
               - forward_flops_per_token(config, 0))  # A: bench_model's attention term
  per_token = 4.0 * matmul_params(config) + 3.0 * attention + 6.0 * n_lora
  return per_token * t["batch"] * t["seq_len"]


def dpo_tokens(spec: dict) -> int:
  """Tokens of both sides of the DPO pairs: 2P rows of prompt + response."""
  d = spec["dpo"]
  return 2 * d["pairs"] * (d["prompt_len"] + d["response_len"])


def dpo_flops(config, spec: dict) -> float:
  """Policy forward + backward (3F) and reference forward (F) on all 2P rows: 4F per token."""
  d = spec["dpo"]
  seq = d["prompt_len"] + d["response_len"]
  return 4.0 * forward_flops_per_token(config, seq) * 2 * d["pairs"] * seq


def distill_flops(config, spec: dict) -> float:
  """One distillation step on the batch x seq_len rows: per token, the student's forward and
  backward (3 F_s) plus the frozen teacher's forward (F_t), each `forward_flops_per_token` of
  its own shape (the teacher's from `spec["distill"]["teacher"]`) at context seq_len.

      flops = (3 F_s + F_t) * batch * seq_len

  Both LM heads are counted once per token, as any implementation needs them; the
  divergence's softmaxes over the vocabulary are elementwise work and not counted.
  """
  t = spec["train"]
  teacher = jaxpost_config(spec["distill"]["teacher"])
  per_token = (3.0 * forward_flops_per_token(config, t["seq_len"])
               + forward_flops_per_token(teacher, t["seq_len"]))
  return per_token * t["batch"] * t["seq_len"]


def gen_tokens(spec: dict) -> int:
  """New tokens of one generation call: batch x new_tokens."""
  return spec["generate"]["batch"] * spec["generate"]["new_tokens"]


def gen_flops(config, spec: dict) -> float:
  """bench_model's `generate_flops`: the prefill and the one-token steps at their context."""
  g = spec["generate"]
  return generate_flops(config, g["batch"], g["prompt_len"], g["new_tokens"])


def grpo_rollout_flops(config, spec: dict) -> float:
  """Sampling G completions of each prompt: each prompt prefilled once (its cache shared by its
  G samples), then G rows of one-token steps: `generate_flops` with the prefill counted per
  prompt and the decode steps per sample."""
  g = spec["grpo"]
  prefill = generate_flops(config, g["prompts"], g["prompt_len"], 1)
  decode = (generate_flops(config, 1, g["prompt_len"], g["new_tokens"])
            - generate_flops(config, 1, g["prompt_len"], 1))
  return prefill + g["prompts"] * g["group"] * decode


def grpo_update_flops(config, spec: dict) -> float:
  """The update: 3 x forward (as `sft_flops`) over the G x P rows of prompt + completion."""
  g = spec["grpo"]
  seq = g["prompt_len"] + g["new_tokens"]
  return 3.0 * forward_flops_per_token(config, seq) * g["prompts"] * g["group"] * seq


def grpo_flops(config, spec: dict) -> float:
  """One RL step: the rollout's forward FLOPs plus the update's."""
  return grpo_rollout_flops(config, spec) + grpo_update_flops(config, spec)


def grpo_generated_tokens(spec: dict) -> int:
  g = spec["grpo"]
  return g["prompts"] * g["group"] * g["new_tokens"]


def grpo_row_tokens(spec: dict) -> int:
  """Tokens of the rows one RL step samples and trains: G x P rows of prompt + completion."""
  g = spec["grpo"]
  return g["prompts"] * g["group"] * (g["prompt_len"] + g["new_tokens"])


def ppo_row_tokens(spec: dict) -> int:
  """Tokens of the rows one PPO step samples and trains: the prompts' prompt + completion rows."""
  p = spec["ppo"]
  return p["prompts"] * (p["prompt_len"] + p["new_tokens"])


def ppo_generated_tokens(spec: dict) -> int:
  p = spec["ppo"]
  return p["prompts"] * p["new_tokens"]


def _ppo_row_forwards(config, spec: dict) -> tuple[float, float]:
  """(policy, critic) forward FLOPs over the PPO step's rows. The critic is the policy's trunk
  with a value head [D] -> 1 in place of the LM head, so it lacks the LM head's 2 D V per token."""
  p = spec["ppo"]
  seq = p["prompt_len"] + p["new_tokens"]
  tokens = p["prompts"] * seq
  policy = forward_flops_per_token(config, seq) * tokens
  critic = forward_flops_per_token(config, seq, lm_head=False) + 2.0 * config.hidden_size
  return policy, critic * tokens


def ppo_rollout_flops(config, spec: dict) -> float:
  """Sampling one completion of each prompt (`generate_flops`), then three no-grad forwards over
  the rows: the old policy's and the reference's log-probs and the critic's values."""
  p = spec["ppo"]
  policy, critic = _ppo_row_forwards(config, spec)
  return (generate_flops(config, p["prompts"], p["prompt_len"], p["new_tokens"])
          + 2.0 * policy + critic)


def ppo_update_flops(config, spec: dict) -> float:
  """The update: 3 x forward (forward + backward) of the policy and of the critic over the rows."""
  policy, critic = _ppo_row_forwards(config, spec)
  return 3.0 * (policy + critic)


def ppo_flops(config, spec: dict) -> float:
  """One PPO step: the rollout's forward FLOPs plus the update's."""
  return ppo_rollout_flops(config, spec) + ppo_update_flops(config, spec)


# ---------------------------------------------------------------------------------------------
# Workloads as users have them (sft_chat, dpo_shared_prompt, dpo_precomputed_ref, long_context).


def chat_tokens(spec: dict) -> int:
  """Real (non-padding) tokens of one sft_chat epoch: every conversation's prompt + response."""
  prompt, reply = common.chat_lengths(spec)
  return int((prompt + reply).sum())


def chat_flops(config, spec: dict) -> float:
  """One sft_chat epoch: 3 x forward per real token, attention at the conversation's own
  length (what any layout needs: padding and other packed conversations are not counted)."""
  prompt, reply = common.chat_lengths(spec)
  return sum(3.0 * forward_flops_per_token(config, int(n)) * int(n) for n in prompt + reply)


def shared_row_tokens(spec: dict) -> int:
  """Token slots of the dpo_shared_prompt rows: per pair prompt + 1 + 2 x response."""
  d = spec["dpo"]
  return d["pairs"] * (d["prompt_len"] + 1 + 2 * d["response_len"])


def dpo_shared_flops(config, spec: dict) -> float:
  """Policy forward + backward (3F) and reference forward (F) on the shared rows, attention at
  prompt + response (what each token sees)."""
  d = spec["dpo"]
  seq = d["prompt_len"] + d["response_len"]
  return 4.0 * forward_flops_per_token(config, seq) * shared_row_tokens(spec)


def dpo_precomputed_flops(config, spec: dict) -> float:
  """As `dpo_shared_flops` without the reference (its log-probs precomputed once): 3F."""
  return dpo_shared_flops(config, spec) * 3.0 / 4.0
