"""Tunix side of `benchmarks/run.py`: one workload per process, in `benchmarks/.tunix-venv`.

Everything here calls Tunix (google-tunix 0.1.7) and its dependencies; nothing of Tunix is
copied. The model is `tunix.models.llama3.model.Llama3` with a `ModelConfig` built at the
benchmark shape, its weights drawn by Tunix's own `create_dummy_model` (normal, std 0.02, like
jaxpost's `init_params`; norm scales then set to one), under a 1 x 1 `("fsdp", "tp")` mesh
whose axes are `AxisType.Auto`: jax >= 0.10's `jax.make_mesh` defaults to Explicit axes, and
Tunix's models fail under them (the embedding lookup raises a `ShardingTypeError`).

What one timed step is, per workload (each step ends when its outputs are ready):

* **sft**: `PeftTrainer` (full-parameter: no LoRA params, so it optimises every `nnx.Param`)
  with its default loss (next-token cross-entropy on the full logits) and a model-input
  function like Tunix's `peft_main` (positions and a causal mask from the input mask). A step
  is one call of the trainer's own jitted step (`trainer.jit_train_and_eval_step()`, the
  function `trainer.train()` calls) on a `TrainingInput`, after the trainer's
  `_prepare_inputs` and `shard_input`, exactly the work of one iteration of its loop minus
  metric logging, the progress bar and checkpointing.
* **lora**: the same on a model that `qwix.apply_lora_to_model` gave rank-16 adapters (alpha
  32) on q, k, v, o, gate, up and down (`qwix.LoraProvider`, as Tunix's cli does); the
  trainer then optimises only the `nnx.LoRAParam`s.
* **dpo**: `DpoTrainer` (beta 0.1, sigmoid loss) with a reference model (a second `Llama3`
  with the same weights). A step is `trainer._prepare_inputs(TrainingInput)` (which runs the
  reference model's jitted log-prob pass) then the jitted train step: the loop's work.
* **distill**: `tunix.distillation.DistillationTrainer` (a `PeftTrainer`) with
  `strategies.LogitStrategy(temperature, alpha=1.0)`, set up as Tunix's
  `examples/logit_distillation.ipynb` does: one forward function for student and teacher
  returning the logits of the first T - 1 positions, one-hot next-token labels, positions and
  a causal mask from the input mask. The student is the `Llama3` above, the teacher a
  `Llama3` of `spec["distill"]["teacher"]`'s shape (seed + 1). `LogitStrategy` computes
  temperature^2 x the token mean of KL(p_teacher || p_student), the only divergence it
  offers; alpha 1 leaves out its cross-entropy term (it still computes the student's and the
  teacher's cross-entropies, for its metrics). A step, as for DPO: `_prepare_inputs` (which
  runs the teacher's jitted forward: full [B, T - 1, V] logits) then the jitted train step.
* **generate**: `tunix.generate.sampler.Sampler` (KV cache of prompt + new tokens), greedy
  (temperature 0), `max_prompt_length` = the prompt length, an end token that is never
  produced (so every row generates all new tokens). A "step" is one `sampler(...)` call,
  tokenising the prompts (a stub tokenizer that maps "12 7 ..." to ids) and decoding the
  outputs included.
* **grpo**: Tunix's own RL loop, `GRPOLearner.train()` (beta 0, so no reference model; one
  iteration per rollout; "token-mean" loss aggregation, which is jaxpost's "dapo"; clip 0.2)
  on an `RLCluster` whose actor is the `Llama3` above, rollout engine "vanilla" (Tunix's
  `Sampler`, temperature 1, top_p 1 and no top_k, i.e. plain sampling from the softmax, an
  end token that is never produced), AdamW, actor and rollout on the same 1 x 1 mesh (so they
  share the weights and nothing is synced). The loop runs warm-up + timed steps over a dataset
  that repeats the 2 prompts (as space-separated ids, through the stub tokenizer); the reward,
  a Python function of the completion text, is `common.grpo_reward` of its ids. Tunix calls
  its own steps, so the worker times them by wrapping three of the learner's methods (timers
  only, the calls go through unchanged): `_run_global_step` (one RL step as `train()` runs it:
  rollout, then the update), `_generate_and_compute_advantage` (the rollout: the G samples of
  each prompt, which Tunix's loop repeats G times before generating, so each of the 16 rows is
  prefilled; rewards; advantages) and, inside it, `RLCluster.generate` (the sampling alone);
  and `RLCluster.update_actor` (the actor trainer's `train()` on the rollout batch: one
  optimizer step). Each phase ends with `jax.block_until_ready` on what it produced.
* **sft_chat**, **dpo_shared_prompt**, **long_context_*k**: see `tunix_user.py`.
* **ppo**: Tunix's `PPOLearner.train()` on an `RLCluster` with actor, reference (a second
  `Llama3`, same weights) and critic (`make_critic`: `tunix.rl.utils.create_critic_model`),
  `PPOConfig(beta=kl_coef, kl_method="kl", gamma, gae_lambda, epsilon, clip_range_value)`,
  16 prompts x 1 sample, one mini-batch, one iteration; timed as grpo, with the update the
  sum of `RLCluster.update_actor` and `RLCluster.update_critic` (each also reported alone).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

# Whose versions a result records.
PACKAGES = ("google-tunix", "jax", "jaxlib", "flax", "optax", "qwix", "numpy")


class IdTokenizer:
  """The tokenizer interface Tunix's sampler needs, over strings of space-separated ids."""

  def encode(self, text: str, **kwargs) -> list[int]:
    del kwargs
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs) -> str:
    del kwargs
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None  # no BOS is prepended

  def eos_id(self) -> int:
    return -1  # never produced: every row runs to max_generation_steps

  def pad_id(self) -> int:
    return 0


def tunix_config(spec: dict):
  """Tunix's Llama 3 `ModelConfig` at the benchmark shape."""
  from tunix.models.llama3 import model as llama3

  m = spec["model"]
  return llama3.ModelConfig(
      num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
      hidden_dim=m["intermediate_size"], num_heads=m["num_heads"], head_dim=m["head_dim"],
      num_kv_heads=m["num_kv_heads"], rope_theta=m["rope_theta"], norm_eps=m["norm_eps"],
      weight_tying=m["tie_embeddings"])


def make_model(spec: dict, mesh):
  """A randomly initialised float32 `Llama3`.

  Tunix's `create_dummy_model` draws every parameter from normal(0, 0.02), the RMSNorm scales
  too, which makes the model's outputs nearly uniform; the norm scales are then reset to one
  (as jaxpost's and Hugging Face's initialisers have them), so that the losses of both sides
  start alike. Neither changes the work of a step.
  """
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models import dummy_model_creator
  from tunix.models.llama3 import model as llama3

  model = dummy_model_creator.create_dummy_model(
      llama3.Llama3, tunix_config(spec), mesh=mesh, dtype=jnp.float32,
      random_seed=spec["seed"], scale=0.02)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, llama3.RMSNorm):
      module.w.set_value(jnp.ones_like(module.w.get_value()))
  return model


def make_optimizer(spec: dict):
  """AdamW with the spec's hyper-parameters (constant learning rate, no clipping)."""
  import optax

  o = spec["optim"]
  return optax.adamw(o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"],
                     weight_decay=o["weight_decay"])


def apply_lora(model, spec: dict):
  """The model with qwix LoRA adapters on every projection (Tunix's cli recipe)."""
  import qwix
  from flax import nnx

  lo = spec["lora"]
  names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
           "up": "up_proj", "down": "down_proj"}
  module_path = "|".join(f".*{names[t]}" for t in lo["targets"])
  provider = qwix.LoraProvider(module_path=module_path, rank=lo["rank"], alpha=lo["alpha"])
  return qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1),
                                  **model.get_model_input())


def count_params(model, param_type) -> int:
  """Number of scalars in the model's variables of `param_type`."""
  import jax
  from flax import nnx

  return sum(x.size for x in jax.tree.leaves(nnx.state(model, param_type)))


def time_trainer_steps(trainer, config, example, spec: dict, wrt) -> tuple[dict, list[float]]:
  """Times the steps of a Tunix trainer (SFT/PEFT, DPO, distillation) as its loop runs them:
  `_prepare_inputs` (the reference's or the teacher's forward, where there is one),
  `shard_input`, the jitted train step; waits for the loss, the metrics and the updated
  `wrt` parameters. Returns (`common.time_steps`' timing, the loss of every step)."""
  import jax
  from flax import nnx
  from tunix.sft import sharding_utils

  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  losses = []

  def one():
    inputs = sharding_utils.shard_input(trainer._prepare_inputs(example),
                                        config.data_sharding_axis)
    loss, aux, grad_norm = train_step(inputs)
    jax.block_until_ready((loss, aux, grad_norm, nnx.state(trainer.model, wrt)))
    losses.append(float(loss))
    return loss

  return common.time_steps(one, spec["warmup"], spec["steps"]), losses


def bench_peft(spec: dict, mesh, lora: bool) -> dict:
  """Full-parameter SFT or LoRA SFT steps with `PeftTrainer`."""
  import numpy as np
  from flax import nnx
  from tunix.sft import peft_trainer, utils

  model = make_model(spec, mesh)
  if lora:
    model = apply_lora(model, spec)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None,
                                       pbar_description=None)
  trainer = peft_trainer.PeftTrainer(model, make_optimizer(spec), config)

  def gen_model_input_fn(x: peft_trainer.TrainingInput):
    mask = x.input_mask.astype(bool)
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(mask),
            "attention_mask": utils.make_causal_attn_mask(mask)}

  trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
  tokens = common.sft_tokens(spec)
  example = peft_trainer.TrainingInput(input_tokens=tokens,
                                       input_mask=np.ones(tokens.shape, np.int32))
  wrt = nnx.LoRAParam if lora else nnx.Param
  timing, losses = time_trainer_steps(trainer, config, example, spec, wrt)
  return dict(timing, data_digest=common.digest(tokens), losses=losses,
              trainable_params=count_params(trainer.model, wrt),
              lora_enabled=utils.is_lora_enabled(trainer.model))


def bench_dpo(spec: dict, mesh) -> dict:
  """DPO steps with `DpoTrainer` and a reference model."""
  import numpy as np
  from flax import nnx
  from tunix.sft.dpo import dpo_trainer

  model = make_model(spec, mesh)
  ref_model = make_model(spec, mesh)  # the same seed: the same weights
  d = spec["dpo"]
  config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=None,
                                         pbar_description=None, beta=d["beta"])
  trainer = dpo_trainer.DPOTrainer(model, ref_model, make_optimizer(spec), config)
  prompt, chosen, rejected = common.dpo_pairs(spec)
  ones = lambda a: np.ones(a.shape, np.int32)
  example = dpo_trainer.TrainingInput(
      prompt_ids=prompt, prompt_mask=ones(prompt), chosen_ids=chosen,
      chosen_mask=ones(chosen), rejected_ids=rejected, rejected_mask=ones(rejected))
  timing, losses = time_trainer_steps(trainer, config, example, spec, nnx.Param)
  tokens, _ = common.dpo_rows(spec)
  return dict(timing, data_digest=common.digest(tokens), losses=losses,
              trainable_params=count_params(trainer.model, nnx.Param))


def bench_distill(spec: dict, mesh) -> dict:
  """Logit-distillation steps with `DistillationTrainer` and `LogitStrategy`."""
  import jax
  import numpy as np
  from flax import nnx
  from tunix.distillation import distillation_trainer, strategies
  from tunix.sft import utils

  d = spec["distill"]
  vocab = spec["model"]["vocab_size"]
  student = make_model(spec, mesh)
  teacher = make_model(dict(spec, model=d["teacher"], seed=spec["seed"] + 1), mesh)

  def forward(model, input_tokens, input_mask, positions, attention_mask):
    del input_mask
    logits, _ = model(input_tokens, positions, None, attention_mask)
    return logits[:, :-1, :]  # the last position has no next token

  def labels(input_tokens, input_mask, **kwargs):
    del kwargs
    return jax.nn.one_hot(input_tokens[:, 1:], vocab) * input_mask[:, 1:, None]

  def gen_model_input_fn(x):
    mask = x.input_mask.astype(bool)
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(mask),
            "attention_mask": utils.make_causal_attn_mask(mask)}

  strategy = strategies.LogitStrategy(student_forward_fn=forward, teacher_forward_fn=forward,
                                      labels_fn=labels, temperature=d["temperature"], alpha=1.0)
  config = distillation_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None,
                                               pbar_description=None)
  trainer = distillation_trainer.DistillationTrainer(
      student_model=student, teacher_model=teacher, strategy=strategy,
      optimizer=make_optimizer(spec), training_config=config,
  ).with_gen_model_input_fn(gen_model_input_fn)
  tokens = common.sft_tokens(spec)
  example = distillation_trainer.TrainingInput(input_tokens=tokens,
                                               input_mask=np.ones(tokens.shape, np.int32))
  timing, losses = time_trainer_steps(trainer, config, example, spec, nnx.Param)
  return dict(timing, data_digest=common.digest(tokens), losses=losses,
              trainable_params=count_params(trainer.model, nnx.Param),
              teacher_params=count_params(trainer.teacher_model, nnx.Param))


def bench_generate(spec: dict, mesh) -> dict:
  """Greedy generation with Tunix's `Sampler`."""
  from tunix.generate import sampler as sampler_lib

  g = spec["generate"]
  m = spec["model"]
  model = make_model(spec, mesh)
  cache = sampler_lib.CacheConfig(cache_size=g["prompt_len"] + g["new_tokens"],
                                  num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"],
                                  head_dim=m["head_dim"])
  sampler = sampler_lib.Sampler(model, IdTokenizer(), cache)
  ids = common.prompts(spec)
  texts = [" ".join(str(int(t)) for t in row) for row in ids]
  lengths = []

  def one():
    out = sampler(texts, max_generation_steps=g["new_tokens"], max_prompt_length=g["prompt_len"],
                  temperature=0.0, eos_tokens=[-1])
    lengths.append([len(t) for t in out.tokens])
    return out

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  return common.generation_result("Tunix", timing, ids, lengths[-1], g["new_tokens"])


def bench_grpo(spec: dict, mesh) -> dict:
  """GRPO steps through `GRPOLearner.train()`, each RL step and its phases timed."""
  import jax
  import numpy as np
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  g = spec["grpo"]
  G, P, N = g["group"], g["prompt_len"], g["new_tokens"]
  total = spec["warmup"] + spec["steps"]
  model = make_model(spec, mesh)
  role = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=make_optimizer(spec), eval_every_n_steps=10**9, max_steps=total,
          pbar_description=None),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N,
          temperature=g["temperature"], top_p=1.0, top_k=None, eos_tokens=[-1]))
  cluster = rl_cluster_lib.RLCluster(actor=model, reference=None, tokenizer=IdTokenizer(),
                                     cluster_config=cluster_config)
  algo_config = grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=0.0,
                                        epsilon=0.2, loss_agg_mode="token-mean")
  rewards_mean, lengths = [], []

  def reward(prompts, completions, **kwargs):
    del prompts, kwargs
    ids = [[int(t) for t in text.split()] for text in completions]
    lengths.append([len(x) for x in ids])
    out = [common.grpo_reward(x) for x in ids]
    rewards_mean.append(float(np.mean(out)))
    return out

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo_config,
                                     reward_fns=reward)
  phases = {"sampling": [], "rollout": [], "update": []}
  times, cpu = [], []

  def timed(fn, name, ready):
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      out = fn(*args, **kwargs)
      ready(out)
      phases[name].append(time.perf_counter() - start)
      return out
    return wrapper

  cluster.generate = timed(cluster.generate, "sampling",
                           lambda out: jax.block_until_ready(out.tokens))
  # pylint: disable=protected-access
  learner._generate_and_compute_advantage = timed(learner._generate_and_compute_advantage,
                                                  "rollout", jax.block_until_ready)
  cluster.update_actor = timed(
      cluster.update_actor, "update",
      lambda _: jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param)))
  run_global_step = learner._run_global_step

  def global_step(*args, **kwargs):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = run_global_step(*args, **kwargs)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    common.log(f"  step {len(times)}/{total}: {times[-1]:.3f} s (rollout "
               f"{phases['rollout'][-1]:.3f} s, update {phases['update'][-1]:.3f} s)")
    return out

  learner._run_global_step = global_step
  # pylint: enable=protected-access
  ids = common.grpo_prompts(spec)
  texts = [" ".join(str(int(t)) for t in row) for row in ids]
  learner.train([{"prompts": np.asarray(texts)} for _ in range(total)])
  if len(times) != total:
    raise RuntimeError(f"Tunix's GRPO loop ran {len(times)} RL steps, expected {total}")
  if any(n != N for n in lengths[-1]):
    raise RuntimeError(f"Tunix generated {lengths[-1]} tokens per row, expected {N} each")
  logger = cluster.actor_trainer.metrics_logger
  losses = ([float(x) for x in logger.get_metric_history("actor", "loss", "train")]
            if logger.metric_exists("actor", "loss", "train") else [])
  return dict(common.step_timing(times, cpu, spec["warmup"]),
              **common.phase_medians(phases, spec["steps"]), phases=phases,
              data_digest=common.digest(ids), losses=losses, rewards_mean=rewards_mean,
              trainable_params=count_params(cluster.actor_trainer.model, nnx.Param),
              generated_lengths=sorted(set(lengths[-1])))


def make_critic(spec: dict, mesh, actor):
  """Tunix's critic for `actor`: `tunix.rl.utils.create_critic_model`, which copies a model and
  replaces its `lm_head` by a `nnx.Linear(D, 1)` value head (the critic then outputs [B, T, 1]).

  With tied embeddings Tunix's `Llama3` has no `lm_head` (its logits are `embedder.decode`), and
  `create_critic_model` would leave the critic decoding through the embedding. So the critic is
  built from an untied `Llama3` (`weight_tying=False`) whose trunk (embedding, layers, final
  norm) is set to the actor's: the same trunk, a value head on its final hidden states.

  Tunix 0.1.7's `rl.common.compute_score` (the critic's forward, in the rollout's values and
  in the value loss) always passes `segment_ids=` (the non-pad mask) besides the causal
  `attention_mask`, which its `Llama3.__call__` does not accept (a `TypeError`), whereas its
  log-prob function checks the model's signature first. The critic is therefore a `Llama3`
  subclass whose `__call__` takes `segment_ids` and drops it: the attention mask passed
  alongside already masks the padding, so the forward and its work are unchanged.
  """
  import dataclasses

  import jax.numpy as jnp
  from flax import nnx
  from tunix.models import dummy_model_creator
  from tunix.models.llama3 import model as llama3
  from tunix.rl import utils as rl_utils

  class CriticLlama3(llama3.Llama3):

    def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
      del segment_ids
      return super().__call__(input_tokens, positions, cache, attention_mask)

  untied = dummy_model_creator.create_dummy_model(
      CriticLlama3, dataclasses.replace(tunix_config(spec), weight_tying=False), mesh=mesh,
      dtype=jnp.float32, random_seed=spec["seed"], scale=0.02)
  nnx.update(untied, nnx.state(actor, nnx.Param))
  return rl_utils.create_critic_model(untied, seed=spec["seed"] + 1)


def bench_ppo(spec: dict, mesh) -> dict:
  """PPO steps through `PPOLearner.train()`, each RL step and its phases timed."""
  import jax
  import numpy as np
  from flax import nnx
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.ppo import ppo_learner
  from tunix.rl.rollout import base_rollout

  p = spec["ppo"]
  P, N = p["prompt_len"], p["new_tokens"]
  total = spec["warmup"] + spec["steps"]
  actor = make_model(spec, mesh)
  reference = make_model(spec, mesh)  # the same seed: the initial policy's weights
  critic = make_critic(spec, mesh, actor)
  role = rl_cluster_lib.Role
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role.ACTOR: mesh, role.REFERENCE: mesh, role.ROLLOUT: mesh,
                    role.CRITIC: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=make_optimizer(spec), critic_optimizer=make_optimizer(spec),
          eval_every_n_steps=10**9, max_steps=total, pbar_description=None),
      rollout_config=base_rollout.RolloutConfig(
          max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N,
          temperature=p["temperature"], top_p=1.0, top_k=None, eos_tokens=[-1]))
  cluster = rl_cluster_lib.RLCluster(actor=actor, critic=critic, reference=reference,
                                     tokenizer=IdTokenizer(), cluster_config=cluster_config)
  algo_config = ppo_learner.PPOConfig(
      num_iterations=1, gamma=p["gamma"], gae_lambda=p["lam"], beta=p["kl_coef"],
      kl_method="kl", epsilon=p["clip"], clip_range_value=p["value_clip"])
  rewards_mean, lengths = [], []

  def reward(prompts, completions, **kwargs):
    del prompts, kwargs
    ids = [[int(t) for t in text.split()] for text in completions]
    lengths.append([len(x) for x in ids])
    out = [common.grpo_reward(x) for x in ids]
    rewards_mean.append(float(np.mean(out)))
    return out

  learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=algo_config,
                                   reward_fns=reward)
  phases = {"sampling": [], "rollout": [], "update_actor": [], "update_critic": []}
  times, cpu = [], []

  def timed(fn, name, ready):
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      out = fn(*args, **kwargs)
      ready(out)
      phases[name].append(time.perf_counter() - start)
      return out
    return wrapper

  cluster.generate = timed(cluster.generate, "sampling",
                           lambda out: jax.block_until_ready(out.tokens))
  # pylint: disable=protected-access
  learner._generate_and_compute_advantage = timed(learner._generate_and_compute_advantage,
                                                  "rollout", jax.block_until_ready)
  cluster.update_actor = timed(
      cluster.update_actor, "update_actor",
      lambda _: jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param)))
  cluster.update_critic = timed(
      cluster.update_critic, "update_critic",
      lambda _: jax.block_until_ready(nnx.state(cluster.critic_trainer.model, nnx.Param)))
  run_global_step = learner._run_global_step

  def global_step(*args, **kwargs):
    start, start_cpu = time.perf_counter(), time.process_time()
    out = run_global_step(*args, **kwargs)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    common.log(f"  step {len(times)}/{total}: {times[-1]:.3f} s (rollout "
               f"{phases['rollout'][-1]:.3f} s, update actor {phases['update_actor'][-1]:.3f}"
               f" s + critic {phases['update_critic'][-1]:.3f} s)")
    return out

  learner._run_global_step = global_step
  # pylint: enable=protected-access
  ids = common.ppo_prompts(spec)
  texts = [" ".join(str(int(t)) for t in row) for row in ids]
  learner.train([{"prompts": np.asarray(texts)} for _ in range(total)])
  if len(times) != total:
    raise RuntimeError(f"Tunix's PPO loop ran {len(times)} RL steps, expected {total}")
  if any(n != N for n in lengths[-1]):
    raise RuntimeError(f"Tunix generated {lengths[-1]} tokens per row, expected {N} each")
  phases["update"] = [a + c for a, c in zip(phases["update_actor"], phases["update_critic"])]
  losses = {}
  for name, trainer in (("actor", cluster.actor_trainer), ("critic", cluster.critic_trainer)):
    logger = trainer.metrics_logger
    losses[name] = ([float(x) for x in logger.get_metric_history(name, "loss", "train")]
                    if logger.metric_exists(name, "loss", "train") else [])
  return dict(common.step_timing(times, cpu, spec["warmup"]),
              **common.phase_medians(phases, spec["steps"]), phases=phases,
              data_digest=common.digest(ids), losses=losses["actor"],
              critic_losses=losses["critic"], rewards_mean=rewards_mean,
              trainable_params=(count_params(cluster.actor_trainer.model, nnx.Param)
                                + count_params(cluster.critic_trainer.model, nnx.Param)),
              generated_lengths=sorted(set(lengths[-1])))


def main() -> None:
  """Runs the spec's workload and prints the result line."""
  spec = common.read_spec()
  start = time.perf_counter()
  import jax

  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))
  common.log(f"tunix worker: {spec['workload']} on {jax.devices()[0].device_kind}")
  # Tunix 0.1.7 reads the mesh from `pxla.thread_resources`, which only the (deprecated in
  # jax 0.10) `with mesh:` sets; `jax.set_mesh` would leave Tunix without a mesh.
  warnings.filterwarnings("ignore", message=".*`with mesh:` context manager",
                          category=DeprecationWarning)
  with mesh:
    w = spec["workload"]
    if w in ("sft", "lora") or w.startswith("long_context_"):
      result = bench_peft(spec, mesh, lora=w == "lora")
    elif w == "sft_chat":
      import tunix_user  # pylint: disable=import-outside-toplevel

      result = tunix_user.bench_chat(spec, mesh, make_model, make_optimizer, count_params)
    elif w in ("dpo", "dpo_shared_prompt"):  # Tunix has no shared-prompt layout (tunix_user)
      result = bench_dpo(spec, mesh)
    elif w == "distill":
      result = bench_distill(spec, mesh)
    elif w == "generate":
      result = bench_generate(spec, mesh)
    elif w == "grpo":
      result = bench_grpo(spec, mesh)
    elif w == "ppo":
      result = bench_ppo(spec, mesh)
    else:
      raise SystemExit(f"tunix worker: no workload {w!r}")
  result.update(framework="tunix", workload=spec["workload"],
                versions=common.package_versions(PACKAGES), wall_s=time.perf_counter() - start)
  common.emit(result)


if __name__ == "__main__":
  main()
