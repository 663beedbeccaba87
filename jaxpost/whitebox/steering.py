"""Steering vectors by contrastive activation addition (CAA; Rimsky et al. 2024, "Steering
Llama 2 via Contrastive Activation Addition"; Turner et al. 2023, activation addition).

From N pairs of prompts (positive_i, negative_i) that differ in one property, the vector at
layer l is the mean difference of a site's activation (default the residual stream after the
layer) at each prompt's last token:

    v_l = (1 / N) sum_i [ a_l(positive_i)[-1] - a_l(negative_i)[-1] ]

Generation is then steered by adding c * v_l at that site and layer at the last prompt token
and every generated token (CAA steers the positions after the prompt: `add_from_slot`), or at
every position (`AddVector`); c is traced, so a sweep over c reuses one compiled sampler.

    v_LxD = steering_vector(cfg, params, positives, negatives, layers=(1,))   # [1, D]
    out = generate(cfg, params, prompts, max_new_tokens=8, temperature=0.0,
                   interventions=[AddVector("resid_post", v_LxD[0], coef=4.0, layers=(1,))])

`jaxpost steer STEER.yaml` builds one from a JSON lines file of pairs, saves it, and measures
its effect on held-out prompts at coefficients -k..k (`jaxpost.whitebox.steer_command`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxpost.models import ModelConfig
from jaxpost.models.sites import Fn
from jaxpost.whitebox.activations import last_token_activations
from jaxpost.whitebox.interventions import AddVector


def contrastive_vector(positive_LxNxD, negative_LxNxD) -> jnp.ndarray:
  """[L, D]: the mean over the N pairs of positive - negative (pairs in the same order)."""
  positive_LxNxD, negative_LxNxD = jnp.asarray(positive_LxNxD), jnp.asarray(negative_LxNxD)
  if positive_LxNxD.shape != negative_LxNxD.shape:
    raise ValueError(f"positive {positive_LxNxD.shape} and negative {negative_LxNxD.shape} "
                     "activations must have one shape [L, N, D]")
  return jnp.mean(positive_LxNxD.astype(jnp.float32) - negative_LxNxD.astype(jnp.float32),
                  axis=1)


def steering_vector(config: ModelConfig, params: dict, positives: Sequence[Sequence[int]],
                    negatives: Sequence[Sequence[int]], *, site: str = "resid_post",
                    layers: tuple[int, ...] | None = None, batch_size: int = 32,
                    pad_id: int = 0) -> np.ndarray:
  """[L, D] CAA vectors at `layers` (None: every layer) from token-id prompts paired in order;
  positives and negatives are read in one pass (2N prompts, padded batches)."""
  if len(positives) != len(negatives) or not positives:
    raise ValueError(f"need as many positive as negative prompts (at least one), got "
                     f"{len(positives)} and {len(negatives)}")
  acts = last_token_activations(config, params, [*positives, *negatives], site=site,
                                layers=layers, batch_size=batch_size, pad_id=pad_id)
  n = len(positives)
  return np.asarray(contrastive_vector(acts[:, :n], acts[:, n:]))


def steered_generations(config: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                        vector_D, coefs: Sequence[float], *, layer: int,
                        site: str = "resid_post", max_new_tokens: int = 16,
                        temperature: float = 0.0, seed: int = 0,
                        stop_tokens: Sequence[int] = (), pad_id: int = 0,
                        batch_size: int = 32, positions: str = "answer",
                        prompt_bucket: int = 64) -> list[list[list[int]]]:
  """Completions (token ids, stop token cut) [coef][prompt] with c * vector added at `site`,
  `layer`: at the prompt's last token and every generated token (`positions="answer"`, CAA's
  "after the prompt"), or at every token (`"all"`, `AddVector`). Batches are padded to
  `batch_size` rows, so every coefficient and batch runs the same compiled sampler."""
  from jaxpost.sampling import generate, pad_prompts  # pylint: disable=import-outside-toplevel

  if positions not in ("answer", "all"):
    raise ValueError(f"positions must be answer or all, got {positions!r}")
  vector = jnp.asarray(vector_D, jnp.float32)
  out = []
  for coef in coefs:
    rows: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
      batch = list(prompts[start:start + batch_size])
      filler = [batch[0]] * (batch_size - len(batch))
      if positions == "all":
        steer = AddVector(site, vector, coef=jnp.float32(coef), layers=(layer,))
      else:  # generate left-pads every prompt to end at slot P - 1
        width = pad_prompts(batch, pad_id, prompt_bucket)[0].shape[1]
        steer = add_from_slot(site, vector, coef, width - 1, layer)
      res = generate(config, params, batch + filler, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed, stop_tokens=stop_tokens,
                     pad_id=pad_id, prompt_bucket=prompt_bucket, interventions=[steer])
      tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
      for i in range(len(batch)):
        ids = [int(t) for t in tokens[i, :lengths[i]]]
        rows.append([t for t in ids if t not in stop_tokens])
    out.append(rows)
  return out


def _add_from(x, layer, context, data):
  del layer
  vector_D, coef, start = data
  on = (context.slots >= start)[None, :, None]
  added = x.astype(jnp.float32) + coef * vector_D.astype(jnp.float32)[None, None]
  return jnp.where(on, added.astype(x.dtype), x)


def add_from_slot(site: str, vector_D, coef, start: int, layer: int) -> Fn:
  """x + coef * vector at the tokens whose slot (row index, or KV-cache slot) is >= `start`:
  with left-padded prompts ending at slot P - 1, `start=P - 1` steers the last prompt token
  and every generated one. `vector_D`, `coef` and `start` are traced."""
  return Fn(site, _add_from, layers=(layer,),
            data=(jnp.asarray(vector_D, jnp.float32), jnp.float32(coef), jnp.int32(start)))


# -- measuring the effect ---------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text: str) -> float | None:
  """The first number written in `text`, or None."""
  found = _NUMBER.search(text)
  return None if found is None else float(found.group())


def number_metric(completion: str, row: dict) -> float | None:
  """`metric: number`: the completion's first number (None: no number)."""
  del row
  return first_number(completion)


def length_metric(completion: str, row: dict) -> float | None:
  """`metric: length`: the completion's length in characters."""
  del row
  return float(len(completion))


BUILTIN_METRICS: dict[str, Callable[[str, dict], float | None]] = {
    "number": number_metric, "length": length_metric}


def summarize(values: Sequence[float | None], threshold: float | None = None
              ) -> dict[str, float]:
  """{"mean", "median": of the scored values, "scored": the fraction scored (not None),
  and with a `threshold` "above": the fraction of all values >= it}."""
  scored = [v for v in values if v is not None]
  out = {"mean": float(np.mean(scored)) if scored else float("nan"),
         "median": float(np.median(scored)) if scored else float("nan"),
         "scored": len(scored) / max(len(values), 1)}
  if threshold is not None:
    out["above"] = sum(v >= threshold for v in scored) / max(len(values), 1)
  return out
