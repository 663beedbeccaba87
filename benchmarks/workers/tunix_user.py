"""Tunix side of the workloads as users have them (`tunix_worker.py` dispatches here).

* **sft_chat**: `PeftTrainer` on the chat conversations as Tunix's own SFT example prepares
  data (`tunix/examples/data/translation_dataset.py`: prompt + response concatenated, the
  response as `input_mask`, every example padded to a fixed `max_seq_len`, `grain.Batch`),
  here `chat.batch` conversations per step padded to `chat.max_len`, and the model inputs
  as its PEFT example builds them (positions and a causal mask from the non-padding tokens,
  `build_positions_from_mask`, `make_causal_attn_mask`). Tunix has no packing for SFT: every
  step computes `chat.batch x chat.max_len` slots. Its default loss is the cross-entropy over
  `input_mask[:, 1:]`, i.e. on the response tokens. One timed "step" is one epoch: each batch
  through `_prepare_inputs`, `shard_input` and the jitted train step, then
  `block_until_ready` on the parameters.
* **dpo_shared_prompt**: Tunix's `DPOTrainer` has no shared-prompt layout (it concatenates the
  prompt with each response and runs both rows, `compute_logps`) and no precomputed
  reference (`_prepare_inputs` runs the reference model every step), so its row is the `dpo`
  workload's step on the same pairs: what a Tunix user runs for this data.
* **long_context_*k**: the `sft` step (`bench_peft`) on `spec["train"]`'s batch of one long row.
"""

from __future__ import annotations

import common


def bench_chat(spec: dict, mesh, make_model, make_optimizer, count_params) -> dict:
  """One epoch of PeftTrainer SFT steps over the fixed-length padded conversations."""
  import jax
  import numpy as np
  from flax import nnx
  from tunix.sft import peft_trainer, sharding_utils, utils

  c = spec["chat"]
  model = make_model(spec, mesh)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=None,
                                       pbar_description=None)
  trainer = peft_trainer.PeftTrainer(model, make_optimizer(spec), config)

  def gen_model_input_fn(x: peft_trainer.TrainingInput):
    real = x.input_tokens != 0  # pad id 0
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": utils.build_positions_from_mask(real),
            "attention_mask": utils.make_causal_attn_mask(real)}

  trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
  convs = common.chat_examples(spec)
  batches = [peft_trainer.TrainingInput(input_tokens=tokens, input_mask=trained.astype(np.int32))
             for tokens, trained in common.padded_batches(convs, c["batch"], c["max_len"])]
  train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  losses = []

  def epoch():
    loss = None
    for example in batches:
      inputs = sharding_utils.shard_input(trainer._prepare_inputs(example),  # pylint: disable=protected-access
                                          config.data_sharding_axis)
      loss, _, _ = train_step(inputs)
    jax.block_until_ready((loss, nnx.state(trainer.model, nnx.Param)))
    losses.append(float(loss))
    return loss

  timing = common.time_steps(epoch, c["warmup_epochs"], c["epochs"])
  real = sum(len(t) for t, _ in convs)
  slots = sum(b.input_tokens.size for b in batches)
  return dict(timing, data_digest=common.digest(np.concatenate([t for t, _ in convs])),
              losses=losses, steps_per_epoch=len(batches), real_tokens=real, token_slots=slots,
              padding_share=1 - real / slots,
              layout=f"{c['batch']} conversations per step, each padded to {c['max_len']}",
              trainable_params=count_params(trainer.model, nnx.Param))
