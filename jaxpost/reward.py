"""Bradley–Terry reward models: a scalar head on the decoder, the pairwise loss, and scoring.

The reward of a sequence x is a linear head on the decoder's final hidden state (after the final
norm) at the sequence's last token, as in HF's `*ForSequenceClassification`:

    r(x) = w . h(x)[last]                      w: params["score"] [D]

Trained on pairs (x, y_w, y_l), y_w preferred, with the Bradley–Terry model
P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)) (Bradley & Terry 1952; Stiennon et al. 2020,
"Learning to summarize from human feedback"; Ouyang et al. 2022, InstructGPT, eq. 1):

    loss = mean over pairs of  -log sigma(r_w - r_l - m)  +  c * (r_w + r_l)^2

with an optional margin m per pair (Touvron et al. 2023, Llama 2, eq. 2: a larger margin for
more distinct ratings) and reward centering c (Eisenstein et al. 2023, "Helping or Herding?
Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"; TRL's
`center_rewards_coefficient`), which pins the otherwise free offset of r near 0.

    params = with_score_head(config, lm_params, rng)           # decoder (no lm_head) + "score"
    loss_fn = functools.partial(reward_loss, config=config)    # for jaxpost.train.make_train_step
    r_N = score(config, params, tokenizer, ["text", [{"role": "user", ...}, ...]])
    save_reward_model_hf(config, params, "out", pad_token_id=tokenizer.pad_id)

A batch is `jaxpost.data.preference`'s paired layout ([B, 2, T], index 0 chosen, 1 rejected).
Scoring tokenises exactly as those pairs are: a conversation up to and including its last
assistant turn's end-of-turn token, a string as text with BOS and EOS (`reward_input_ids`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.data.formats import check_messages, check_string, prompt_completion_example
from jaxpost.data.pipeline import pad_id_of
from jaxpost.losses.preference import weighted_mean
from jaxpost.models import ModelConfig, forward
from jaxpost.models.hf_reward import (SCORE, load_reward_model_hf, reward_param_specs,
                                      save_reward_model_hf, score_spec)
from jaxpost.models.params import INIT_STD
from jaxpost.tokenizer import Tokenizer

__all__ = [
    "SCORE", "init_score", "last_token_index", "load_reward_model_hf", "reward_input_ids",
    "reward_loss", "reward_param_specs", "rewards", "save_reward_model_hf", "score",
    "score_ids", "score_spec", "with_score_head",
]


# ---------------------------------------------------------------------------------------------
# Parameters and the reward
# ---------------------------------------------------------------------------------------------


def init_score(config: ModelConfig, rng: jax.Array, *, std: float = INIT_STD,
               dtype=jnp.float32) -> jax.Array:
  """The reward head w [D] ~ N(0, std^2) (HF initialises `score` with std 0.02); std=0 gives
  zeros (every reward 0 at the start; the decoder gets gradient from the second step on)."""
  return (std * jax.random.normal(rng, score_spec(config).shape, jnp.float32)).astype(dtype)


def with_score_head(config: ModelConfig, params: dict, rng: jax.Array, *,
                    std: float = INIT_STD, dtype=None) -> dict:
  """Reward params from decoder (LM) params: `lm_head` dropped, `score` [D] added
  (`init_score`, in `dtype`, default the embedding's).

  Adapters in `params` are kept; under LoRA the head must train too (PEFT's
  `modules_to_save=["score"]`).
  """
  dtype = dtype if dtype is not None else params["embed"].dtype
  out = {k: v for k, v in params.items() if k != "lm_head"}
  out[SCORE] = init_score(config, rng, std=std, dtype=dtype)
  return out


def last_token_index(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B] int32: the index of each row's last non-padding token (segment id != 0); 0 for a row
  of padding only. Right or left padding alike; one sequence per row."""
  T = segment_ids_BxT.shape[-1]
  idx_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BxT.shape)
  return jnp.max(jnp.where(segment_ids_BxT != 0, idx_BxT, 0), axis=-1)


def rewards(config: ModelConfig, params: dict, tokens_BxT: jax.Array,
            segment_ids_BxT: jax.Array, positions_BxT: jax.Array | None = None, *,
            compute_dtype=None, remat: bool = False, attention: str = "auto") -> jax.Array:
  """r [B] float32: the head on the final hidden state (after the final norm) at each row's
  last non-padding token.

  Args:
    config, params: the decoder's config and reward params ("score" [D] beside the decoder's).
    tokens_BxT: int token ids, one sequence per row, padded (right or left).
    segment_ids_BxT: 1 on the sequence, 0 on padding (the data pipeline's layout).
    positions_BxT: RoPE positions; default 0, 1, ... along each row's tokens.
    compute_dtype, remat: as `forward`. The head runs in float32.

  A row of padding only gets a finite reward of no meaning (give it weight 0).
  """
  out = forward(config, params, tokens_BxT, positions=positions_BxT, segment_ids=segment_ids_BxT,
                compute_dtype=compute_dtype, remat=remat, attention=attention, compute_logits=False)
  last_B = last_token_index(segment_ids_BxT)
  h_BxD = jnp.take_along_axis(out.final_hidden, last_B[:, None, None], axis=1)[:, 0]
  return jnp.einsum("bd,d->b", h_BxD.astype(jnp.float32), params[SCORE].astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def reward_loss(params: dict, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                config: ModelConfig, margin: float | None = None,
                center_coefficient: float = 0.0, compute_dtype=None,
                remat: bool = False, attention: str = "auto"
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The Bradley–Terry loss over preference pairs, with margin and reward centering.

  With r_w, r_l the rewards of the chosen and rejected sequence of a pair (`rewards`), m its
  margin and c = `center_coefficient`,

      loss = sum_i w_i [-log sigma(r_w,i - r_l,i - m_i) + c (r_w,i + r_l,i)^2] / sum_i w_i,

  w_i = 1 for a real pair, 0 for a padding pair (a side with no token: all segment ids 0).
  Both sides of every pair go through one forward ([B, 2, T] -> [2B, T]).

  Args:
    params: reward params (see `with_score_head`).
    batch: `tokens`, `segment_ids` and optionally `positions`, each [B, 2, T] (axis 1: chosen,
      rejected; `jaxpost.data.preference.pair_batch`), and optionally `margin` [B] (per-pair
      margins, e.g. from rating differences).
    rng: unused.
    config: the decoder's config.
    margin: a constant margin m for every pair (default 0); not together with a `margin` in
      the batch.
    center_coefficient: c, the weight of the centering term (TRL's `center_rewards_coefficient`,
      e.g. 0.01).
    compute_dtype, remat: as `forward`.

  Returns:
    (loss, metrics): `accuracy` (fraction of pairs with r_w > r_l), `margin` (mean r_w - r_l),
    `rewards/chosen`, `rewards/rejected` (mean rewards), all over real pairs, and `weight`,
    the number of real pairs, by which the update step averages micro-batches exactly.
  """
  del rng
  if margin is not None and "margin" in batch:
    raise ValueError("reward_loss got a margin argument and a 'margin' in the batch; give "
                     "per-pair margins in the batch or a constant margin, not both")
  tokens_Bx2xT = batch["tokens"]
  B, sides, T = tokens_Bx2xT.shape
  if sides != 2:
    raise ValueError(f"reward_loss expects pairs [B, 2, T], got tokens of shape "
                     f"{tokens_Bx2xT.shape}")
  flat = lambda x: x.reshape(2 * B, T)  # noqa: E731
  positions = batch.get("positions")
  r_2B = rewards(config, params, flat(tokens_Bx2xT), flat(batch["segment_ids"]),
                 None if positions is None else flat(positions), compute_dtype=compute_dtype,
                 remat=remat, attention=attention)
  r_Bx2 = r_2B.reshape(B, 2)
  chosen_B, rejected_B = r_Bx2[:, 0], r_Bx2[:, 1]
  w_B = jnp.all(jnp.any(batch["segment_ids"] != 0, axis=-1), axis=-1).astype(jnp.float32)

  m = batch["margin"] if "margin" in batch else (0.0 if margin is None else margin)
  m_B = jnp.broadcast_to(jnp.asarray(m, jnp.float32), (B,))
  bt_B = -jax.nn.log_sigmoid(chosen_B - rejected_B - m_B)
  center_B = jnp.square(chosen_B + rejected_B)
  loss = weighted_mean(bt_B + center_coefficient * center_B, w_B)

  c_B, r_B = jax.lax.stop_gradient(chosen_B), jax.lax.stop_gradient(rejected_B)
  metrics = {
      "accuracy": weighted_mean((c_B > r_B).astype(jnp.float32), w_B),
      "margin": weighted_mean(c_B - r_B, w_B),
      "rewards/chosen": weighted_mean(c_B, w_B),
      "rewards/rejected": weighted_mean(r_B, w_B),
      "weight": jnp.sum(w_B),
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def reward_input_ids(tokenizer: Tokenizer, item: str | Sequence[Mapping[str, Any]]) -> list[int]:
  """The token ids a reward is computed on, as the preference pairs are tokenised.

  * A conversation (list of messages) that ends with one or more assistant messages: rendered
    with the chat template, the messages before them as the prompt (with the generation
    prompt), up to and including the last assistant turn's end-of-turn token (EOS appended if
    the template has none): a pair side of `jaxpost.data.preference` exactly.
  * A string: text with the tokenizer's default BOS, and EOS (the data pipeline's `text`
    format). A prompt and response joined in one string may tokenise differently at their
    boundary from a pair's side (where they are tokenised apart).

  Raises:
    ValueError (`DataError`): an empty text, a bad message, a conversation that does not end
      with an assistant message or has nothing before it.
  """
  if isinstance(item, str):
    return tokenizer.encode(check_string(item, "text"), add_eos=tokenizer.eos_id is not None)
  messages = check_messages(list(item), "messages")
  k = len(messages)
  while k > 0 and messages[k - 1]["role"] == "assistant":
    k -= 1
  if k == len(messages):
    raise ValueError(f"a conversation to score should end with an assistant message (the "
                     f"response), this one ends with a {messages[-1]['role']!r} message")
  if k == 0:
    raise ValueError("a conversation to score needs a prompt: it has only assistant messages")
  example = prompt_completion_example({"prompt": messages[:k], "completion": messages[k:]},
                                      tokenizer, "completion", add_eos=True)
  return example.tokens.tolist()


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("compute_dtype",))
def _rewards_jit(config, params, tokens_BxT, segment_ids_BxT, compute_dtype=None):
  return rewards(config, params, tokens_BxT, segment_ids_BxT, compute_dtype=compute_dtype)


def _bucket(n: int, max_length: int | None, minimum: int = 16) -> int:
  """The padded length of a batch whose longest sequence has n tokens: the next power of two
  (at least `minimum`), capped at `max_length`."""
  size = max(minimum, 1 << max(n - 1, 0).bit_length())
  return size if max_length is None else max(n, min(size, max_length))


def score_ids(config: ModelConfig, params: dict, sequences: Sequence[Sequence[int]], *,
              batch_size: int = 8, max_length: int | None = None, pad_id: int = 0,
              compute_dtype=None) -> np.ndarray:
  """Rewards [N] float32 of token-id sequences of any lengths.

  Sequences are sorted by length, batched by `batch_size` (the last batch filled with padding
  rows), right-padded to power-of-two lengths and run through one jitted `rewards` per shape.
  `max_length` keeps each sequence's first tokens (as the pairs' truncation does).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size should be at least 1, got {batch_size}")
  seqs = [np.asarray(s, np.int32).reshape(-1) for s in sequences]
  if max_length is not None:
    seqs = [s[:max_length] for s in seqs]
  empty = [i for i, s in enumerate(seqs) if s.size == 0]
  if empty:
    raise ValueError(f"sequence {empty[0]} has no tokens")
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  out = np.zeros(len(seqs), np.float32)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    T = _bucket(len(seqs[rows[0]]), max_length)
    tokens_BxT = np.full((batch_size, T), pad_id, np.int32)
    segment_ids_BxT = np.zeros((batch_size, T), np.int32)
    for b, i in enumerate(rows):
      tokens_BxT[b, :len(seqs[i])] = seqs[i]
      segment_ids_BxT[b, :len(seqs[i])] = 1
    r_B = _rewards_jit(config, params, tokens_BxT, segment_ids_BxT, compute_dtype=compute_dtype)
    out[rows] = np.asarray(r_B)[:len(rows)]
  return out


def score(config: ModelConfig, params: dict, tokenizer: Tokenizer,
          texts: Sequence[str | Sequence[Mapping[str, Any]]], *, batch_size: int = 8,
          max_length: int | None = None, compute_dtype=None) -> np.ndarray:
  """Rewards [N] float32 of strings and/or conversations (tokenised by `reward_input_ids`).

  Example:
    >>> score(config, params, tokenizer, [[{"role": "user", "content": "2 + 3?"},
    ...                                    {"role": "assistant", "content": "5"}]])
  """
  return score_ids(config, params, [reward_input_ids(tokenizer, t) for t in texts],
                   batch_size=batch_size, max_length=max_length, pad_id=pad_id_of(tokenizer),
                   compute_dtype=compute_dtype)
