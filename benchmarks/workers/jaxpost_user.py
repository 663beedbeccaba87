"""jaxpost side of the workloads as users have them (`jaxpost_worker.py` dispatches here).

* **sft_chat**: the conversations (`common.chat_examples`) through jaxpost's data pipeline,
  `jaxpost.data.BatchIterator(pack=True)`: packed in order (next-fit) into rows of
  `chat.max_len` tokens with segment isolation (each conversation attends only to itself and
  restarts its positions), `chat.rows` rows per step, the last batch completed with padding
  rows; loss on the response tokens only. The batches are built and put on the device before
  timing; one timed "step" is one epoch: every batch through `make_train_step(sft_loss)`,
  then `block_until_ready` on the state. The result has the optimizer steps per epoch and the
  packing efficiency.
* **dpo_shared_prompt**: the `dpo` workload's pairs, each as one row `prompt, chosen,
  rejected` (`jaxpost.data.shared_prompt.shared_pair_batch`, the layout `dpo.shared_prompt:
  true` trains on; [P, prompt + 1 + 2 x response]), `dpo_loss` (sigmoid) with the reference
  parameters frozen and scored inside the step: the step of the `dpo` row, the prompt once.
* **dpo_precomputed_ref**: the same rows, the reference's log-probs computed once before
  training (`jaxpost.losses.dpo.reference_logps`, as `reference.mode: precomputed` does; its
  time is reported as `precompute_s`, outside the step) and passed in the batch
  (`ref_logps`): the step runs the policy only.
"""

from __future__ import annotations

import functools

import common


def time_update_steps(step, state, batch, frozen, spec: dict):
  """`spec["warmup"]` then `spec["steps"]` timed calls of the update step on one batch
  (`common.time_steps`), and the executed matmul FLOPs of one call (from its jaxpr):
  (timing, losses, executed). Shared by the jaxpost worker's training workloads."""
  import jax
  from bench_model import jaxpr_matmul_flops

  holder, losses = [state], []

  def one():
    holder[0], metrics = step(holder[0], batch, frozen)
    jax.block_until_ready((holder[0], metrics))
    losses.append(float(metrics["loss"]))
    return metrics

  timing = common.time_steps(one, spec["warmup"], spec["steps"])
  executed = jaxpr_matmul_flops(lambda s, b, f: step(s, b, f), holder[0], batch, frozen)
  return timing, losses, executed


def _state(trainable, opt):
  import jax

  from jaxpost.train import init_state

  return [init_state(trainable, opt, jax.random.key(0))]


def bench_chat(spec: dict, config, params, opt) -> dict:
  """One epoch of packed SFT over the chat conversations per timed call."""
  import jax
  import numpy as np

  from jaxpost.data import BatchIterator
  from jaxpost.data.formats import Example
  from jaxpost.losses import sft_loss
  from jaxpost.train import make_train_step

  c = spec["chat"]
  convs = common.chat_examples(spec)
  examples = [Example(tokens, trained) for tokens, trained in convs]
  it = BatchIterator(examples, batch_size=c["rows"], seq_len=c["max_len"], pack=True,
                     shuffle=False, drop_remainder=False, epochs=1)
  batches = [jax.device_put(b) for b in it]
  real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  step = make_train_step(functools.partial(sft_loss, config=config), opt)
  holder = _state(params, opt)
  losses = []

  def epoch():
    metrics = None
    for batch in batches:
      holder[0], metrics = step(holder[0], batch, {})
    jax.block_until_ready((holder[0], metrics))
    losses.append(float(metrics["loss"]))
    return metrics

  timing = common.time_steps(epoch, c["warmup_epochs"], c["epochs"])
  slots = len(batches) * c["rows"] * c["max_len"]
  return dict(timing, data_digest=common.digest(np.concatenate([t for t, _ in convs])),
              losses=losses, steps_per_epoch=len(batches), real_tokens=real,
              token_slots=slots, padding_share=1 - real / slots,
              layout=f"packed rows of {c['max_len']} (segment isolation), {c['rows']} per step",
              trainable_params=sum(x.size for x in jax.tree.leaves(params)))


def shared_rows(spec: dict) -> dict:
  """The dpo pairs (`common.dpo_pairs`) as shared-prompt rows [P, Lp + 1 + 2 Lr]."""
  import numpy as np

  from jaxpost.data.formats import Example
  from jaxpost.data.preference import Pair
  from jaxpost.data.shared_prompt import shared_pair_batch

  prompt, chosen, rejected = common.dpo_pairs(spec)
  Lp, Lr = prompt.shape[1], chosen.shape[1]
  mask = np.arange(Lp + Lr) >= Lp
  pairs = [Pair(Example(np.concatenate([p, c]), mask), Example(np.concatenate([p, r]), mask), Lp)
           for p, c, r in zip(prompt, chosen, rejected)]
  return shared_pair_batch(pairs, Lp + 1 + 2 * Lr)


def bench_dpo_shared(spec: dict, config, params, opt) -> dict:
  """DPO steps on shared-prompt rows: reference in the step, or precomputed once."""
  import time

  import jax
  import jax.numpy as jnp

  from jaxpost.losses.dpo import dpo_loss, reference_logps
  from jaxpost.train import make_train_step

  batch = jax.device_put(shared_rows(spec))
  ref_params = jax.tree.map(jnp.copy, params)
  frozen, extra = {"ref_params": ref_params}, {}
  if spec["workload"] == "dpo_precomputed_ref":
    start = time.perf_counter()
    ref = jax.jit(functools.partial(reference_logps, config, kind="dpo"))(ref_params, batch)
    batch = dict(batch, ref_logps=jax.block_until_ready(ref))
    extra["precompute_s"] = time.perf_counter() - start  # compile included: once per run
    frozen = {}
  loss_fn = functools.partial(dpo_loss, config=config, loss_type="sigmoid",
                              beta=spec["dpo"]["beta"])
  step = make_train_step(loss_fn, opt)
  timing, losses, executed = time_update_steps(step, _state(params, opt)[0], batch, frozen,
                                               spec)
  tokens, _ = common.dpo_rows(spec)
  return dict(timing, **extra, data_digest=common.digest(tokens), losses=losses,
              row_shape=list(batch["tokens"].shape), executed_matmul_flops=executed,
              trainable_params=sum(x.size for x in jax.tree.leaves(params)))
