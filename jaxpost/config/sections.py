"""The run configuration: a tree of frozen dataclasses, one per section of a recipe.

A recipe is YAML whose top-level keys are the fields of `RunConfig`; each section is a
`Section` dataclass. The loader (`jaxpost.config.loader`) walks this tree generically through
`dataclasses.fields` and the type hints, so adding a section is adding a dataclass field here:

    @dataclasses.dataclass(frozen=True)
    class LoraSection(Section):
      rank: int = 8
      def validate(self, prefix: str) -> None:
        _require(self.rank >= 1, f"{prefix}rank must be >= 1, got {self.rank}")

    class RunConfig:  ...
      lora: LoraSection | None = None     # absent from the YAML -> None

Types are enforced from the annotations: `int`, `float` (ints accepted), `bool`, `str`,
`typing.Literal[...]` choices, `X | None`, and nested `Section` dataclasses. Value checks that
need only one section live in its `validate(prefix)`; checks across sections live in
`RunConfig.validate()`. Every config is hashable and compares by value.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpost.config.continual import ContinualSection, Overrides, ReplaySection, check_continual
from jaxpost.config.whitebox import DriftSection, EditSection
from jaxpost.config.scale import DistributedSection, MeshSection
from jaxpost.config.curriculum import CurriculumSection
from jaxpost.config.distill import DistillSection
from jaxpost.config.eval import EvalSection
from jaxpost.config.rl import RLSection
from jaxpost.config.sections_base import ConfigError, Section, _require  # noqa: F401 (re-exported)


Algorithm = Literal["sft", "reward", "dpo", "kto", "grpo", "online_dpo", "ppo", "distill"]
PreferenceLoss = Literal["sigmoid", "hinge", "ipo", "cdpo", "robust", "simpo", "orpo"]
Dtype = Literal["float32", "bfloat16"]
DataFormat = Literal["auto", "messages", "prompt_completion", "text"]
OnBadRow = Literal["error", "skip"]
Optimizer = Literal["adamw", "adam", "sgd", "adafactor", "lion"]
Schedule = Literal["constant", "linear", "cosine", "warmup_cosine"]
Mode = Literal["min", "max"]


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
  """The model to train: a Hugging Face folder (`path`) or a tiny one built on the spot.

  `dtype` is the parameter dtype; `compute_dtype` the activation dtype (None: same as
  `dtype`). `remat` chooses what each layer keeps for the backward pass, the rest being
  recomputed: false ("none"), true ("full": only the layer's input), "dots" (every matmul
  output), "dots_no_batch" (the projections' outputs; attention is recomputed) or
  "qkv_attn_out" (q, k, v and the attention block's output). `attention` is "auto" (dense
  below 1024 x 1024 query-key pairs, blockwise above), "dense", "blockwise" (memory linear in
  the sequence length) or "cudnn" (cuDNN's fused kernel on GPU; blockwise where it cannot run).
  """

  path: str | None = None
  tiny: bool = False
  preset: str | None = None  # a named architecture, shapes only (`jaxpost compile`)
  tiny_hidden_size: int = 128
  tiny_num_layers: int = 2
  dtype: Dtype = "float32"
  compute_dtype: Dtype | None = None
  remat: bool | Literal["none", "full", "dots", "dots_no_batch", "qkv_attn_out"] = False
  attention: Literal["auto", "dense", "blockwise", "cudnn"] = "auto"

  def validate(self, prefix: str) -> None:
    _require(self.path is not None or self.tiny or self.preset is not None,
             f"missing required key '{prefix}path' (or set {prefix}tiny=true)")
    _require((self.path is not None) + self.tiny + (self.preset is not None) <= 1,
             f"{prefix}path, {prefix}tiny=true and {prefix}preset are exclusive; set only one")
    _require(self.path != "", f"{prefix}path must not be empty")
    _require(self.tiny_hidden_size >= 8 and self.tiny_hidden_size % 4 == 0,
             f"{prefix}tiny_hidden_size must be a multiple of 4 and >= 8, "
             f"got {self.tiny_hidden_size}")
    _require(self.tiny_num_layers >= 1,
             f"{prefix}tiny_num_layers must be >= 1, got {self.tiny_num_layers}")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
  """Training data: a JSONL (or HF `datasets`) path per split and how rows become batches.

  `seq_len` is the length of a packed (or padded) row; `max_length` truncates one example
  before packing (None: `seq_len`); `max_prompt_length` keeps only each prompt's last tokens
  (preference data, as TRL); `on_bad_row` raises or skips a malformed row; `train_on`
  selects which tokens carry the loss (None: the format's default); `curriculum` orders the
  training stream easy first (`CurriculumSection`); `replay` mixes earlier data into it.
  `shards` > 1 splits the training rows into that many shards (row i in shard i % shards),
  each batched on its own into batch_size / shards rows of every batch: a process reads and
  tokenises only the shards its devices' rows come from, and the batches are the same for any
  number of processes (`jaxpost.data.ShardedBatches`, docs/multihost.md).
  """

  train: str | None = None
  eval: str | None = None
  format: DataFormat = "auto"
  seq_len: int = 256
  pack: bool = True
  max_length: int | None = None
  max_prompt_length: int | None = None
  shuffle: bool = True
  on_bad_row: OnBadRow = "error"
  train_on: str | None = None
  curriculum: CurriculumSection | None = None
  replay: ReplaySection | None = None
  shards: int = 1

  def validate(self, prefix: str) -> None:
    _require(self.seq_len >= 1, f"{prefix}seq_len must be >= 1, got {self.seq_len}")
    _require(self.shards >= 1, f"{prefix}shards must be >= 1, got {self.shards}")
    _require(self.shards == 1 or (self.curriculum is None and self.replay is None),
             f"{prefix}shards={self.shards} does not combine with {prefix}curriculum or "
             f"{prefix}replay yet (they order the whole data set); set {prefix}shards=1")
    _require(self.max_length is None or self.max_length >= 1,
             f"{prefix}max_length must be >= 1 or null, got {self.max_length}")
    _require(self.max_prompt_length is None or self.max_prompt_length >= 1,
             f"{prefix}max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
    _require(self.train != "", f"{prefix}train must not be empty")
    if self.curriculum is not None:
      self.curriculum.validate(f"{prefix}curriculum.")
    if self.replay is not None:
      self.replay.validate(f"{prefix}replay.")


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
  """The optimizer and its learning-rate schedule.

  `schedule`: "constant"; "linear" decay to 0; "cosine" decay to 0; "warmup_cosine" linear
  warm-up over `warmup_steps` then cosine decay (the other schedules also warm up when
  `warmup_steps` > 0). `grad_clip` is the global-norm clip (None: no clipping). `offload`
  keeps the optimizer state in host memory (JAX's `pinned_host`), moved to the device inside
  the step only while the update runs: AdamW's two moments leave the accelerator's HBM.
  """

  name: Optimizer = "adamw"
  lr: float = 1e-3
  schedule: Schedule = "cosine"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float | None = 1.0
  offload: bool = False

  def validate(self, prefix: str) -> None:
    _require(self.lr > 0, f"{prefix}lr must be > 0, got {self.lr}")
    _require(self.warmup_steps >= 0,
             f"{prefix}warmup_steps must be >= 0, got {self.warmup_steps}")
    _require(self.weight_decay >= 0,
             f"{prefix}weight_decay must be >= 0, got {self.weight_decay}")
    for name in ("b1", "b2"):
      value = getattr(self, name)
      _require(0 <= value < 1, f"{prefix}{name} must be in [0, 1), got {value}")
    _require(self.eps > 0, f"{prefix}eps must be > 0, got {self.eps}")
    _require(self.grad_clip is None or self.grad_clip > 0,
             f"{prefix}grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TrainSection(Section):
  """The loop: `steps` optimizer steps on a global batch of `batch_size` rows, accumulated
  over `micro_batches`. `eval_every` 0 never evaluates mid-run; `max_bad_steps` is how many
  consecutive non-finite losses are skipped before the run stops."""

  steps: int
  batch_size: int
  micro_batches: int = 1
  seed: int = 0
  eval_every: int = 0
  log_every: int = 10
  max_bad_steps: int = 5

  def validate(self, prefix: str) -> None:
    _require(self.steps >= 1, f"{prefix}steps must be >= 1, got {self.steps}")
    _require(self.batch_size >= 1, f"{prefix}batch_size must be >= 1, got {self.batch_size}")
    _require(self.micro_batches >= 1,
             f"{prefix}micro_batches must be >= 1, got {self.micro_batches}")
    _require(self.batch_size % self.micro_batches == 0,
             f"{prefix}batch_size={self.batch_size} is not divisible by "
             f"{prefix}micro_batches={self.micro_batches}")
    _require(self.eval_every >= 0, f"{prefix}eval_every must be >= 0, got {self.eval_every}")
    _require(self.log_every >= 1, f"{prefix}log_every must be >= 1, got {self.log_every}")
    _require(self.max_bad_steps >= 0,
             f"{prefix}max_bad_steps must be >= 0, got {self.max_bad_steps}")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
  """Checkpoints in `run_dir`: every `every` steps (0: only at the end), the last `keep_last`
  kept, plus the `keep_best` best by `best_metric` (`best_mode` "min" or "max").

  Each array's checksum is saved with its step and verified at restore. A latest checkpoint
  that cannot be read (or fails its checksums) is, with `fallback_on_corrupt` (the default),
  renamed `<step>.corrupt` and the run resumes from the previous one, with a warning that says
  which steps are trained again (resume stays exact: the data position and the RNG come with
  that checkpoint); without it, the run stops with an error naming the step.
  """

  every: int = 0
  keep_last: int = 2
  keep_best: int = 0
  best_metric: str = "eval/loss"
  best_mode: Mode = "min"
  async_save: bool = True
  fallback_on_corrupt: bool = True
  resume: bool = True

  def validate(self, prefix: str) -> None:
    _require(self.every >= 0, f"{prefix}every must be >= 0, got {self.every}")
    _require(self.keep_last >= 1, f"{prefix}keep_last must be >= 1, got {self.keep_last}")
    _require(self.keep_best >= 0, f"{prefix}keep_best must be >= 0, got {self.keep_best}")
    _require(bool(self.best_metric), f"{prefix}best_metric must not be empty")


@dataclasses.dataclass(frozen=True)
class TaskSection(Section):
  """A task generated by the package itself (`jaxpost.tasks`), instead of `data.train`.

  `arithmetic`: "What is a + b?" for a, b < `max_operand`, `num_eval` questions held out;
  `op` "sub" asks a - b and "mul" a * b over the same pairs and split. With `exact_match`, the
  held-out accuracy of greedy answers is measured before and after training.
  """
  name: Literal["arithmetic"] = "arithmetic"
  op: Literal["add", "sub", "mul"] = "add"
  max_operand: int = 50
  num_eval: int = 200
  exact_match: bool = True
  max_new_tokens: int = 8

  def validate(self, prefix: str) -> None:
    _require(self.max_operand >= 2, f"{prefix}max_operand must be >= 2, got {self.max_operand}")
    _require(1 <= self.num_eval < self.max_operand ** 2,
             f"{prefix}num_eval must be in [1, {self.max_operand ** 2}), got {self.num_eval}")
    _require(self.max_new_tokens >= 1,
             f"{prefix}max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class LoraSection(Section):
  """LoRA adapters (`jaxpost.peft`): only they train; the base model stays frozen.

  `targets` is a comma-separated list of q, k, v, o, gate, up, down, embed, lm_head; `rslora`
  scales by alpha / sqrt(rank) instead of alpha / rank; `dropout` drops the adapter input while
  training; `dora` adds DoRA's magnitude vectors; `quantize` stores the frozen base in NF4 or
  int8 (QLoRA); `init_from` continues from a PEFT-format adapter. A run writes its adapters in
  PEFT's format to `run_dir/adapter`.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: str = "q,k,v,o,gate,up,down"
  rslora: bool = False
  dropout: float = 0.0
  dora: bool = False
  quantize: Literal["none", "nf4", "int8"] = "none"
  init_from: str | None = None  # a PEFT adapter folder to start from (its r/alpha/targets win)

  def target_tuple(self) -> tuple[str, ...]:
    return tuple(t.strip() for t in self.targets.split(",") if t.strip())

  def validate(self, prefix: str) -> None:
    _require(self.rank >= 1, f"{prefix}rank must be >= 1, got {self.rank}")
    _require(self.alpha > 0, f"{prefix}alpha must be > 0, got {self.alpha}")
    _require(0 <= self.dropout < 1, f"{prefix}dropout must be in [0, 1), got {self.dropout}")
    allowed = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")
    bad = [t for t in self.target_tuple() if t not in allowed]
    _require(not bad and bool(self.target_tuple()),
             f"{prefix}targets has {bad[0] if bad else 'nothing'!r}; use a comma-separated list "
             f"of {', '.join(allowed)}")
    _require(not (self.dora and "embed" in self.target_tuple()),
             f"{prefix}dora=true adapts linear layers only; remove 'embed' from {prefix}targets")


@dataclasses.dataclass(frozen=True)
class PromptSection(Section):
  """Prompt tuning (`kind: prompt`, learned input embeddings) or prefix tuning (`kind:
  prefix`, learned per-layer keys and values) of `num_tokens` virtual tokens over a frozen
  model. `init_text` starts them from that text's tokens (default: random vocabulary ids).
  The run writes them in PEFT's format to `run_dir/adapter`."""
  kind: Literal["prompt", "prefix"] = "prompt"
  num_tokens: int = 16
  init_text: str | None = None

  def validate(self, prefix: str) -> None:
    _require(self.num_tokens >= 1, f"{prefix}num_tokens must be >= 1, got {self.num_tokens}")


@dataclasses.dataclass(frozen=True)
class DPOSection(Section):
  """The DPO family (`algorithm: dpo`; `jaxpost.losses.preference_loss`).

  `loss_type` sigmoid (DPO), hinge, ipo, cdpo, robust, simpo, orpo (the last two need no
  reference model); `beta`; `label_smoothing` (cdpo, robust); `gamma` (SimPO's margin);
  `length_normalize` averages log-probs per token for every loss type; `sft_weight` adds the
  chosen answers' NLL (RPO; TRL's rpo_alpha). `shared_prompt` lays each pair out as one row
  `prompt, chosen, rejected` (`data.seq_len` long) that scores the prompt once
  (`jaxpost.data.shared_prompt`); the log-probs, and so the loss, are the same.
  """
  loss_type: PreferenceLoss = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  gamma: float = 0.0
  length_normalize: bool = False
  sft_weight: float = 0.0
  shared_prompt: bool = False

  @property
  def needs_reference(self) -> bool:
    return self.loss_type not in ("simpo", "orpo")

  def validate(self, prefix: str) -> None:
    _require(self.beta > 0, f"{prefix}beta must be > 0, got {self.beta}")
    _require(0 <= self.label_smoothing < 0.5,
             f"{prefix}label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    _require(self.sft_weight >= 0, f"{prefix}sft_weight must be >= 0, got {self.sft_weight}")


@dataclasses.dataclass(frozen=True)
class KTOSection(Section):
  """KTO (`algorithm: kto`; `jaxpost.losses.kto_objective`) on unpaired rows: `beta` and the
  weights of desirable and undesirable rows."""
  beta: float = 0.1
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0

  def validate(self, prefix: str) -> None:
    _require(self.beta > 0, f"{prefix}beta must be > 0, got {self.beta}")
    for name in ("desirable_weight", "undesirable_weight"):
      value = getattr(self, name)
      _require(value > 0, f"{prefix}{name} must be > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class RewardSection(Section):
  """Bradley-Terry reward models (`algorithm: reward`; `jaxpost.reward.reward_loss`): a
  constant `margin` and reward centering's `center_coefficient`."""
  margin: float = 0.0
  center_coefficient: float = 0.0

  def validate(self, prefix: str) -> None:
    _require(self.center_coefficient >= 0,
             f"{prefix}center_coefficient must be >= 0, got {self.center_coefficient}")


@dataclasses.dataclass(frozen=True)
class ReferenceSection(Section):
  """The reference model of algorithms that have one (DPO, KTO): the model training starts
  from, frozen (under LoRA or prompt tuning: the base model, adapters off).

  `mode: in_step` computes its log-probs inside the compiled step; `precomputed` computes them
  once over the data before training. `sync_every` > 0 (TR-DPO) moves the reference towards the
  policy every N steps: ref <- sync_alpha * policy + (1 - sync_alpha) * ref.
  """
  mode: Literal["in_step", "precomputed"] = "in_step"
  sync_every: int = 0
  sync_alpha: float = 1.0

  def validate(self, prefix: str) -> None:
    _require(self.sync_every >= 0, f"{prefix}sync_every must be >= 0, got {self.sync_every}")
    _require(0 < self.sync_alpha <= 1,
             f"{prefix}sync_alpha must be in (0, 1], got {self.sync_alpha}")
    _require(not (self.sync_every and self.mode == "precomputed"),
             f"{prefix}sync_every needs {prefix}mode=in_step (a precomputed reference "
             "cannot move)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """A whole run: the algorithm, its output folder and one field per section.

  A section field whose type is a `Section` defaults to that section's defaults when the
  recipe leaves it out (or, when its type is `X | None`, to None). Fields are keyword-only,
  so their order is the order of a saved recipe.
  """

  algorithm: Algorithm = "sft"
  run_dir: str
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  optim: OptimSection = dataclasses.field(default_factory=OptimSection)
  train: TrainSection
  mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
  distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
  checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
  task: TaskSection | None = None
  lora: LoraSection | None = None
  prompt: PromptSection | None = None
  dpo: DPOSection = dataclasses.field(default_factory=DPOSection)
  kto: KTOSection = dataclasses.field(default_factory=KTOSection)
  reward: RewardSection = dataclasses.field(default_factory=RewardSection)
  reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
  rl: RLSection = dataclasses.field(default_factory=RLSection)
  distill: DistillSection = dataclasses.field(default_factory=DistillSection)
  eval: EvalSection | None = None  # suites run in the loop (jaxpost.eval)
  continual: ContinualSection = dataclasses.field(default_factory=ContinualSection)
  drift: DriftSection = dataclasses.field(default_factory=DriftSection)
  edit: EditSection | None = None  # train only an edit at one site
  stages: tuple[Overrides, ...] = ()  # a task sequence: each stage's overrides (continual)
  # JAX's persistent compilation cache (`jaxpost.compile_cache`): true = the default folder
  # (~/.cache/jaxpost/xla), a folder, or false = off
  compile_cache: bool | str = True

  def makes_own_data(self) -> bool:
    """Whether the run builds its own training data (so `data.train` is not required): a
    generated `task`."""
    return self.task is not None

  def validate(self) -> None:
    """Validates every section, then the constraints between sections."""
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Section):
        value.validate(f"{f.name}.")
    _require(bool(self.run_dir), "run_dir must not be empty")
    if not self.makes_own_data():
      _require(self.data.train is not None, "missing required key 'data.train'")
      _require(self.train.eval_every == 0 or self.data.eval is not None,
               f"train.eval_every={self.train.eval_every} needs data.eval (or set "
               "train.eval_every=0)")
    shards = self.mesh.batch_shards
    t = self.train
    _require(t.batch_size % shards == 0,
             f"train.batch_size={t.batch_size} is not divisible by the batch shards "
             f"mesh.data x mesh.fsdp = {self.mesh.data} x {self.mesh.fsdp} = {shards}")
    _require(t.batch_size % self.data.shards == 0,
             f"train.batch_size={t.batch_size} is not divisible by data.shards="
             f"{self.data.shards}")
    _require(self.data.shards == 1 or self.reference.mode == "in_step",
             f"data.shards={self.data.shards} needs reference.mode=in_step (a precomputed "
             "reference is a table over the whole data set)")
    _require(self.data.shards == 1 or self.algorithm != "distill"
             or (self.distill.cache_top_k == 0 and self.distill.lambda_on_policy == 0),
             f"data.shards={self.data.shards} does not combine with distill.cache_top_k or "
             "distill.lambda_on_policy yet; set data.shards=1")
    micro = t.batch_size // t.micro_batches
    _require(micro % shards == 0,
             f"the micro-batch train.batch_size / train.micro_batches = {t.batch_size} / "
             f"{t.micro_batches} = {micro} is not divisible by the batch shards "
             f"mesh.data x mesh.fsdp = {shards}")
    _require(self.optim.warmup_steps <= t.steps,
             f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={t.steps}")
    _require(self.lora is None or self.prompt is None,
             "lora and prompt are exclusive; keep one of the two sections")
    _require(self.edit is None or (self.lora is None and self.prompt is None),
             "edit, lora and prompt are exclusive; keep one of the sections")
    _require(not self.dpo.shared_prompt or self.algorithm == "dpo",
             f"dpo.shared_prompt lays out offline pairs for algorithm=dpo, not "
             f"algorithm={self.algorithm}")
    _require(not (self.algorithm == "kto" and self.reference.mode == "precomputed"),
             "reference.mode=precomputed is for paired data; KTO's KL rows change with "
             "every batch, so use reference.mode=in_step")
    _require(self.algorithm != "reward" or (self.lora is None and self.prompt is None),
             "algorithm=reward trains the whole model and its score head; remove the lora / "
             "prompt section")
    _require(self.algorithm != "kto" or t.batch_size >= 2,
             "algorithm=kto needs train.batch_size >= 2 (its KL rows pair different rows)")
    if self.algorithm in ("grpo", "ppo"):
      rl = self.rl
      _require(t.batch_size * rl.mini_batches % rl.num_generations == 0,
               f"a rollout batch is train.batch_size x rl.mini_batches = {t.batch_size} x "
               f"{rl.mini_batches} completions, which must be a multiple of "
               f"rl.num_generations={rl.num_generations} (whole groups)")
      _require(self.reference.mode == "in_step" and self.reference.sync_every == 0,
               f"algorithm={self.algorithm} scores its reference once per rollout; leave the "
               "reference: section at its defaults")
    if self.algorithm == "grpo":
      self.rl.validate_advantage("rl.")
    _require(self.algorithm != "distill" or self.distill.teacher is not None,
             "algorithm=distill needs distill.teacher (a Hugging Face folder or a run folder)")
    if self.algorithm == "ppo":
      rl = self.rl
      _require(self.prompt is None,
               "algorithm=ppo's critic needs the model's weights to train (full fine-tuning, or "
               "LoRA: a LoRA critic on the same base); prompt / prefix tuning has none: remove "
               "the prompt section or use lora")
      _require(self.lora is None or rl.critic_from == "policy",
               f"algorithm=ppo under LoRA trains a LoRA critic on the policy's own base; "
               f"rl.critic_from={rl.critic_from} (a reward model) would be a second base in "
               "memory: use rl.critic_from=policy, or full fine-tuning")
      _require(rl.beta == 0,
               f"algorithm=ppo puts the KL penalty in the reward (rl.kl_coef); rl.beta={rl.beta} "
               "is GRPO's KL loss term: leave it 0")
      _require(rl.aggregation in ("dapo", "bnpo", "token_mean"),
               f"algorithm=ppo averages its policy and value losses over tokens; "
               f"rl.aggregation={rl.aggregation} is not a token mean (use token_mean)")
      _require(rl.importance_level == "token",
               "algorithm=ppo has per-token advantages: rl.importance_level must be token")
      _require(rl.value_warmup_steps < t.steps,
               f"rl.value_warmup_steps={rl.value_warmup_steps} leaves no step of train.steps="
               f"{t.steps} for the policy")
    if self.algorithm == "online_dpo":
      _require(self.rl.num_generations >= 2,
               "algorithm=online_dpo pairs the best and worst of rl.num_generations samples per "
               f"prompt: it needs rl.num_generations >= 2, got {self.rl.num_generations}")
      _require(self.reference.mode == "in_step",
               "algorithm=online_dpo samples new pairs every step: use reference.mode=in_step")
    check_continual(self)  # data.replay against the batch; every stage a valid run
    ckpt = self.checkpoint
    _require(ckpt.keep_best == 0 or not ckpt.best_metric.startswith("eval/")
             or t.eval_every > 0,
             f"checkpoint.keep_best={ckpt.keep_best} ranks by '{ckpt.best_metric}', which "
             "needs train.eval_every > 0")
