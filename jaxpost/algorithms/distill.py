"""Knowledge distillation (`algorithm: distill`, settings in `distill:`): a frozen teacher's
next-token distributions taught to the student on the same rows, in the one update step.

    off-policy (lambda_on_policy 0): the dataset's rows (packed as SFT packs them)
    on-policy  (GKD, Agarwal et al. 2024): with probability lambda per step, the student's own
               completions of the next prompts, scored by the teacher in the step
    seq_kd     (Kim & Rush 2016): the teacher answers every training prompt once (greedy,
               cached under RUN_DIR/distill), then SFT on its answers
    cache_top_k (K > 0): off-policy from the teacher's top K per token, computed once over
               the data and cached under RUN_DIR/distill (`jaxpost.algorithms.distill_cache`):
               no teacher in memory while training; the divergence is over the K ids and
               one bucket for the rest (`jaxpost.losses.topk_divergence`)

The teacher (a Hugging Face folder or a run folder's `final/`; another size or family with the
same vocabulary) is loaded onto the run's mesh by the same rules table, optionally as int8 /
NF4 weight objects, and goes into the step as `Frozen.teacher`: no gradient, never saved in a
checkpoint (with `cache_top_k` it is not in the step at all). A student under LoRA is
`lora.rank=...`, as for every algorithm.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.algorithms.base import Algorithm
from jaxpost.algorithms.sft import perplexity, sft_batches
from jaxpost.config import ConfigError
from jaxpost.losses import distill_batch_loss, distill_topk_batch_loss, sft_loss
from jaxpost.multihost import host_tree


def teacher_folder(path: str) -> Path:
  """The teacher's Hugging Face folder: `path`, or a run folder's `final/`."""
  folder = Path(path)
  if (folder / "config.yaml").is_file() and not (folder / "config.json").is_file():
    folder = folder / "final"
  if not (folder / "config.json").is_file():
    raise ConfigError(f"distill.teacher: {path} is neither a Hugging Face model folder nor a "
                      "finished run folder (no config.json / final/config.json)")
  return folder


def check_same_vocabulary(student_tok, student_name: str, teacher_tok, teacher_name: str,
                          student_vocab: int, teacher_vocab: int) -> None:
  """One clear error, before anything compiles, when the tokenizers differ: the teacher's
  distribution is over its own token ids."""
  problem = None
  if student_vocab != teacher_vocab:
    problem = f"the models' vocabularies differ ({student_vocab} vs {teacher_vocab} rows)"
  elif student_tok.vocab_size != teacher_tok.vocab_size:
    problem = (f"the tokenizers differ in size ({student_tok.vocab_size} vs "
               f"{teacher_tok.vocab_size} tokens)")
  else:
    for i in range(student_tok.vocab_size):
      if student_tok.id_to_token(i) != teacher_tok.id_to_token(i):
        problem = (f"token {i} is {student_tok.id_to_token(i)!r} for the student but "
                   f"{teacher_tok.id_to_token(i)!r} for the teacher")
        break
  if problem:
    raise ConfigError(f"distill.teacher: the student's tokenizer ({student_name}) and the "
                      f"teacher's ({teacher_name}) must be the same: {problem}. Distil from a "
                      "teacher of the same tokenizer family")


def load_teacher(run, section) -> tuple[Any, Any, Any]:
  """(teacher config, params placed on the run's mesh, their shardings)."""
  from jaxpost import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from jaxpost.models import load_hf, param_specs  # pylint: disable=import-outside-toplevel
  from jaxpost.peft.quant import quantize_params  # pylint: disable=import-outside-toplevel
  from jaxpost.tokenizer import load_tokenizer  # pylint: disable=import-outside-toplevel
  folder = teacher_folder(section.teacher)
  config, params = load_hf(folder, dtype=jnp.dtype(run.cfg.model.dtype), mesh=run.mesh)
  check_same_vocabulary(run.tokenizer, str(run.model_dir), load_tokenizer(folder), str(folder),
                        run.config.vocab_size, config.vocab_size)
  shardings = sharding_lib.param_shardings(param_specs(config), run.mesh)
  if section.quantize != "none":
    params = jax.jit(lambda p: quantize_params(p, kind=section.quantize))(params)
    rep = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: rep, params)
    params = jax.device_put(params, shardings)
  return config, params, shardings


class OnPolicy:
  """GKD's batch source: at each step a coin drawn from (seed, step) decides, with
  probability `lambda_on_policy`, between the dataset's next batch and one row per prompt of
  the student's own completion of the next prompts (sampled with the current params; the loss
  is on the completion). The coin, the prompt order and the sampling key all come from the
  step, so `state()` / `restore()` resume exactly."""

  def __init__(self, run, offline, prompts):
    from jaxpost.algorithms.replay import prompt_order  # pylint: disable=import-outside-toplevel
    self.run, self.offline = run, offline
    self.prompts, self.order = prompt_order(
        run, prompts, batch_size=run.cfg.train.batch_size,
        max_prompt_length=run.cfg.data.seq_len - run.cfg.distill.max_new_tokens)
    self.steps = 0
    self.on_policy_batches = 0

  def next(self, policy):
    from jaxpost.data import pad_id_of  # pylint: disable=import-outside-toplevel
    from jaxpost.rl.rollout import completion_rows  # pylint: disable=import-outside-toplevel
    from jaxpost.sampling import generate  # pylint: disable=import-outside-toplevel
    cfg, d = self.run.cfg, self.run.cfg.distill
    step, self.steps = self.steps, self.steps + 1
    if np.random.default_rng([cfg.train.seed, step, 7]).random() >= d.lambda_on_policy:
      return self.offline.next()
    self.on_policy_batches += 1
    ids = [self.prompts[i].ids for i in next(self.order)["index"]]
    out = generate(self.run.config, policy.model_params(), ids, max_new_tokens=d.max_new_tokens,
                   temperature=d.sample_temperature, stop_tokens=self.run.tokenizer.eos_ids,
                   seed=jax.random.fold_in(jax.random.key(cfg.train.seed), step),
                   pad_id=pad_id_of(self.run.tokenizer),
                   compute_dtype=self.run.model_kwargs["compute_dtype"])
    tokens, lengths = host_tree((out.tokens, out.lengths))
    rows = completion_rows(ids, np.asarray(tokens), np.asarray(lengths), 1, cfg.data.seq_len)
    rows["loss_mask"] = rows["loss_mask"].astype(bool)
    return rows

  def host_metrics(self) -> dict[str, float]:
    return {"on_policy_fraction": self.on_policy_batches / max(self.steps, 1)}

  def state(self) -> dict[str, Any]:
    return {"offline": self.offline.state(), "prompts": self.order.state(),
            "steps": self.steps, "on_policy_batches": self.on_policy_batches}

  def restore(self, state) -> None:
    self.offline.restore(state["offline"])
    self.order.restore(state["prompts"])
    self.steps, self.on_policy_batches = state["steps"], state["on_policy_batches"]


def teacher_answers(run, section, log) -> str:
  """seq-KD's data: the training prompts with the teacher's greedy answers, written once to
  RUN_DIR/distill/seq_kd-<fingerprint>.jsonl (the fingerprint covers the teacher folder, the
  data file and the settings) and reused after a restart."""
  from jaxpost.eval.engine import EvalModel  # pylint: disable=import-outside-toplevel
  from jaxpost.eval.generation import prompts_of  # pylint: disable=import-outside-toplevel
  from jaxpost.data import read_rows  # pylint: disable=import-outside-toplevel
  train = run.data.path("sft", "train")
  key = hashlib.sha256(json.dumps([str(Path(section.teacher).resolve()), str(Path(train).resolve()),
                                   Path(train).stat().st_size, section.max_new_tokens,
                                   run.cfg.data.max_prompt_length]).encode()).hexdigest()[:12]
  out = Path(run.run_dir) / "distill" / f"seq_kd-{key}.jsonl"
  if out.exists():
    log(f"seq-KD: the teacher's answers from {out}")
    return str(out)
  config, params, _ = load_teacher(run, section)
  teacher = EvalModel(config, params, run.tokenizer, batch_size=64,
                      max_length=run.cfg.data.max_prompt_length)
  rows = [r.data for r in read_rows(train) if isinstance(r.data, dict)]
  prompts = prompts_of(teacher, rows)
  answers = teacher.generate([p.ids for p in prompts], max_new_tokens=section.max_new_tokens)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for p, g in zip(prompts, answers):
      prompt = p.prompt if isinstance(p.prompt, list) else [{"role": "user", "content": p.prompt}]
      f.write(json.dumps({"messages": [*prompt, {"role": "assistant", "content": g[0].text}]})
              + "\n")
  tmp.replace(out)
  log(f"seq-KD: the teacher answered {len(prompts)} prompts -> {out}")
  return str(out)


def make(run) -> Algorithm:
  """Distillation for a built run (`jaxpost.train.build`); settings from `distill:`."""
  from jaxpost.train.build import log  # pylint: disable=import-outside-toplevel
  d = run.cfg.distill
  if d.seq_kd:
    sft = functools.partial(sft_loss, config=run.config, **run.model_kwargs)

    def seq_batches(split, policy):
      if split == "eval":
        return sft_batches(run, split)
      return sft_batches(run, split, path=teacher_answers(run, d, log), policy=policy)

    return Algorithm(name="distill", loss=lambda p, b, rng, frozen: sft(p, b, rng),
                     batches=seq_batches, eval_metrics=perplexity)

  if d.cache_top_k:
    from jaxpost.algorithms.distill_cache import topk_batches  # pylint: disable=import-outside-toplevel
    topk = functools.partial(distill_topk_batch_loss, config=run.config, kind=d.kind,
                             beta=d.beta, temperature=d.temperature, sft_weight=d.sft_weight,
                             chunk=d.chunk, **run.model_kwargs)
    return Algorithm(name="distill", loss=lambda p, b, rng, frozen: topk(p, b, rng),
                     batches=topk_batches(run, d, log), headline="divergence")

  teacher: dict[str, Any] = {}

  def frozen_teacher():
    config, params, shardings = load_teacher(run, d)
    teacher["config"] = config
    log(f"teacher {d.teacher}: {config.num_layers} layers, width {config.hidden_size}"
        + (f", {d.quantize}" if d.quantize != "none" else ""))
    return params, shardings

  def loss(params, batch, rng, frozen):
    return distill_batch_loss(params, batch, rng, frozen.teacher, config=run.config,
                              teacher_config=teacher["config"], kind=d.kind, beta=d.beta,
                              temperature=d.temperature, sft_weight=d.sft_weight,
                              chunk=d.chunk, **run.model_kwargs)

  def batches(split, policy):
    offline = sft_batches(run, split, policy=policy)
    if split != "train" or d.lambda_on_policy == 0 or offline is None:
      return offline
    from jaxpost.rl.prompts import read_prompts  # pylint: disable=import-outside-toplevel
    if run.cfg.data.seq_len <= d.max_new_tokens:
      raise ConfigError(f"data.seq_len={run.cfg.data.seq_len} leaves no room for a prompt "
                        f"before distill.max_new_tokens={d.max_new_tokens} sampled tokens")
    prompts = read_prompts(run.data.path("sft", "train"), run.tokenizer,
                           max_prompt_length=run.cfg.data.seq_len - d.max_new_tokens,
                           on_bad_row=run.cfg.data.on_bad_row)
    return OnPolicy(run, offline, prompts)

  return Algorithm(name="distill", loss=loss, batches=batches, frozen_teacher=frozen_teacher,
                   headline="divergence")

