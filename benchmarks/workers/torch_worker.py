"""PyTorch side of `benchmarks/run.py`: Hugging Face `LlamaForCausalLM`, float32, on the CPU.

Runs in the project's venv (torch and transformers are installed there), one workload per
process, with `torch.set_num_threads(os.cpu_count())`.

* **sft**: one step is `zero_grad`, `model(input_ids, labels=input_ids)` (the shifted
  next-token loss over T - 1 tokens, full logits, the model's default attention
  implementation, `sdpa` here, recorded in the result), `loss.backward()` and
  `torch.optim.AdamW.step()`. PyTorch runs eagerly, so the step has ended when `.item()` of
  the loss returns after the optimizer step.
* **sft_chat**: `bench_chat` (an epoch of conversations padded to the longest per step);
  **long_context_*k**: the sft step on one long row.
* **generate**: `model.generate(..., do_sample=False, max_new_tokens=N, min_new_tokens=N)`
  (greedy, KV cache, no end token) under `torch.inference_mode()`.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

PACKAGES = ("torch", "transformers", "numpy")  # whose versions a result records


def make_model(spec: dict):
  """A randomly initialised float32 `LlamaForCausalLM` at the benchmark shape."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  m = spec["model"]
  config = LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
      intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_layers"],
      num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
      head_dim=m["head_dim"], rms_norm_eps=m["norm_eps"],
      rope_parameters={"rope_type": "default", "rope_theta": float(m["rope_theta"])},
      tie_word_embeddings=m["tie_embeddings"],
      max_position_embeddings=max(4096, spec["train"]["seq_len"]),
      initializer_range=0.02, pad_token_id=0, bos_token_id=None, eos_token_id=None)
  torch.manual_seed(spec["seed"])
  return LlamaForCausalLM(config).to(torch.float32)


def bench_sft(spec: dict) -> dict:
  """Full-parameter SFT steps with `torch.optim.AdamW`."""
  import torch

  model = make_model(spec)
  model.train()
  o = spec["optim"]
  opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                          eps=o["eps"], weight_decay=o["weight_decay"])
  tokens = common.sft_tokens(spec)
  ids = torch.from_numpy(tokens).long()
  losses = []

  def one():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    losses.append(loss.item())
    return loss

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  n_params = sum(p.numel() for p in model.parameters())
  return dict(timing, data_digest=common.digest(tokens), losses=losses,
              trainable_params=n_params, attn_implementation=model.config._attn_implementation)


def bench_chat(spec: dict) -> dict:
  """One epoch of SFT over the chat conversations: `chat.batch` per step, padded to the longest
  of the step (what `DataCollatorForSeq2Seq` / `DataCollatorWithPadding` do), `attention_mask`
  0 on padding, labels -100 on the prompt and the padding (loss on the responses)."""
  import numpy as np
  import torch

  c = spec["chat"]
  model = make_model(spec)
  model.train()
  o = spec["optim"]
  opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                          eps=o["eps"], weight_decay=o["weight_decay"])
  convs = common.chat_examples(spec)
  batches = []
  for tokens, trained in common.padded_batches(convs, c["batch"], None):
    ids = torch.from_numpy(tokens).long()
    labels = torch.where(torch.from_numpy(trained), ids, torch.full_like(ids, -100))
    batches.append((ids, (ids != 0).long(), labels))
  losses = []

  def epoch():
    loss = None
    for ids, mask, labels in batches:
      opt.zero_grad(set_to_none=True)
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
      loss.backward()
      opt.step()
    losses.append(loss.item())
    return loss

  timing = common.time_steps(epoch, c["warmup_epochs"], c["epochs"])
  real = sum(len(t) for t, _ in convs)
  slots = sum(b[0].numel() for b in batches)
  return dict(timing, data_digest=common.digest(np.concatenate([t for t, _ in convs])),
              losses=losses, steps_per_epoch=len(batches), real_tokens=real, token_slots=slots,
              padding_share=1 - real / slots,
              layout=f"{c['batch']} conversations per step, padded to the longest of the step",
              trainable_params=sum(p.numel() for p in model.parameters()),
              attn_implementation=model.config._attn_implementation)


def bench_generate(spec: dict) -> dict:
  """Greedy `model.generate` on the prompt batch."""
  import torch

  g = spec["generate"]
  model = make_model(spec)
  model.eval()
  prompt = common.prompts(spec)
  ids = torch.from_numpy(prompt).long()
  lengths = []

  def one():
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=g["new_tokens"], min_new_tokens=g["new_tokens"])
    lengths.append(out.shape[1] - ids.shape[1])
    return out

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  # every row of the output has the same width: one count stands for all
  return common.generation_result("torch", timing, prompt, [lengths[-1]], g["new_tokens"])


def main() -> None:
  """Runs the spec's workload and prints the result line."""
  spec = common.read_spec()
  start = time.perf_counter()
  import torch

  torch.set_num_threads(os.cpu_count())
  common.log(f"torch worker: {spec['workload']} ({torch.get_num_threads()} threads)")
  w = spec["workload"]
  if w == "sft" or w.startswith("long_context_"):  # long_context: `spec["train"]` is long
    result = bench_sft(spec)
  elif w == "sft_chat":
    result = bench_chat(spec)
  elif w == "generate":
    result = bench_generate(spec)
  else:
    raise SystemExit(f"torch worker: no workload {w!r}")
  result.update(framework="pytorch", workload=w, versions=common.package_versions(PACKAGES),
                threads=torch.get_num_threads(), wall_s=time.perf_counter() - start)
  common.emit(result)


if __name__ == "__main__":
  main()
