"""lm-evaluation-harness on jaxpost models: `JaxpostLM` (registered as lm-eval model "jaxpost")
and `run_lm_eval`.

    results = run_lm_eval(EvalModel(config, params, tokenizer), ["hellaswag"], limit=100)
    # {"hellaswag/acc": 0.31, "hellaswag/acc_norm": 0.35, ...}

From the command line (this module registers "jaxpost", then runs lm-eval's CLI):

    python -m jaxpost.eval.lm_eval_adapter --model jaxpost \\
        --model_args pretrained=path/to/hf_folder,batch_size=16 --tasks arc_easy

Requests are encoded, cut and scored as lm-eval's HF backend (`HFLM`) does, so the numbers
are HFLM's on the same checkpoint (the tests compare them): the context's trailing spaces move
to the continuation; the pair is encoded whole and split at the context's length; BOS is added
when the tokenizer adds it by default, not to a text that starts with it; an empty context is
the BOS token (EOS without one); a row keeps its last `max_length + 1` tokens. Scoring and
sampling go through `EvalModel`, batched. lm-eval is optional: `pip install 'jaxpost[lmeval]'`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

try:
  import lm_eval
  import lm_eval.models  # registers lm-eval's own models before ours (see `get_model`)
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import model_registry, register_model
  from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                    postprocess_generated_text)
  from lm_eval.utils import (get_rolling_token_windows, make_disjoint_window,
                             simple_parse_args_string)
except ImportError as e:
  raise ImportError("jaxpost.eval.lm_eval_adapter needs lm-eval: "
                    "pip install 'jaxpost[lmeval]'") from e

from jaxpost.chat_template import ChatTemplateError
from jaxpost.eval.engine import EvalModel
from jaxpost.models import load_hf
from jaxpost.tokenizer import load_tokenizer


class JaxpostLM(TemplateLM):
  """An `EvalModel` as an lm-eval model.

  `max_length` is lm-eval's: the most tokens the model reads per row (rows are cut from the
  left to `max_length + 1` tokens, the last one only a target). Default: the EvalModel's
  `max_length - 1` (so rows fit it), else the config's `max_position_embeddings` (HFLM's
  choice). `max_gen_toks` is the default generation length (HFLM's 256).
  """

  def __init__(self, model: EvalModel, *, max_length: int | None = None,
               max_gen_toks: int = 256) -> None:
    super().__init__()
    self.model = model
    self.tokenizer = model.tokenizer
    if max_length is None:  # HFLM's default is 2048 without max_position_embeddings
      max_length = (model.max_length - 1 if model.max_length else
                    getattr(model.config, "max_position_embeddings", None) or 2048)
    self._max_length = int(max_length)
    self._max_gen_toks = int(max_gen_toks)
    # Rows are cut here (HFLM's way), so the engine's own cut must not apply again.
    self._scorer = dataclasses.replace(model, max_length=None)
    self._prefix_text = self.tokenizer.decode([self.prefix_token_id])

  @classmethod
  def from_pretrained(cls, pretrained: str, *, batch_size: int | str = 32,
                      max_length: int | None = None, max_gen_toks: int = 256,
                      dtype: str | None = None) -> JaxpostLM:
    """Loads an HF model folder (weights and tokenizer) as a `JaxpostLM`."""
    config, params = load_hf(pretrained, dtype=None if dtype is None else jnp.dtype(dtype))
    # lm-eval's --batch_size may be "auto" / "auto:N": a fixed size is used instead.
    size = int(batch_size) if str(batch_size).isdigit() else 32
    model = EvalModel(config, params, load_tokenizer(pretrained), batch_size=size,
                      label=str(pretrained))
    return cls(model, max_length=max_length, max_gen_toks=max_gen_toks)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                          additional_config: dict | None = None) -> JaxpostLM:
    """`--model_args` as a dict: `pretrained` (an HF folder), `batch_size`, `max_length`,
    `max_gen_toks`, `dtype`; lm-eval's `--batch_size` fills in a missing batch size."""
    args = dict(arg_dict)
    if (additional_config or {}).get("batch_size") is not None:
      args.setdefault("batch_size", additional_config["batch_size"])
    return cls.from_pretrained(**args)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: dict | None = None) -> JaxpostLM:
    """`--model_args pretrained=DIR,batch_size=16,max_length=2048`."""
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  # -- what lm-eval asks of a TemplateLM ----------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    """The context of an empty-context request and of the first rolling window: BOS, else
    EOS (as HFLM)."""
    bos = self.tokenizer.bos_id
    return bos if bos is not None else self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return str(self.model.label).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs) -> list[int]:
    """HFLM's: the tokenizer's default special tokens, unless `string` starts with the
    prefix token's text or `add_special_tokens=False`."""
    if add_special_tokens is None:
      add_special_tokens = not string.startswith(self._prefix_text)
    flag = None if add_special_tokens else False  # None: the tokenizer's default
    ids = self.tokenizer.encode(string, add_bos=flag, add_eos=flag)
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def _score(self, contexts: list[list[int]], continuations: list[list[int]]):
    cut = [max(0, len(c) + len(d) - self._max_length - 1)
           for c, d in zip(contexts, continuations)]
    return self._scorer.score([c[k:] for c, k in zip(contexts, cut)], continuations)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """`requests`: ((context, continuation) or None, context ids, continuation ids)."""
    if not requests:
      return []
    scored = self._score([list(r[1]) for r in requests], [list(r[2]) for r in requests])
    out = [(float(lp), bool(g)) for lp, g in zip(scored.logprob, scored.greedy)]
    for (key, _, _), result in zip(requests, out):
      if key is not None:  # None: a rolling window
        self.cache_hook.add_partial("loglikelihood", key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's total log-prob over disjoint windows of `max_length` (HFLM's)."""
    windows = [(i, *make_disjoint_window(w)) for i, r in enumerate(requests)
               for w in get_rolling_token_windows(self.tok_encode(r.args[0]),
                                                  self.prefix_token_id, self._max_length, 1)]
    totals = np.zeros(len(requests))
    if windows:
      owner, contexts, continuations = zip(*windows)
      np.add.at(totals, list(owner), self._score(contexts, continuations).logprob)
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, float(total))
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Completions cut at the first `until` string (EOS's text included); greedy unless the
    request's gen_kwargs set `do_sample` with a temperature > 0. Requests with the same
    gen_kwargs are generated together."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    eos = self.tokenizer.decode([self.eot_token_id])
    out: list[str] = [""] * len(requests)
    for idx in groups.values():
      kw = normalize_gen_kwargs(requests[idx[0]].args[1], self._max_gen_toks)
      until = handle_stop_sequences(kw.pop("until", None), eos=eos)
      new = kw.pop("max_gen_toks")
      if new >= self._max_length:
        raise ValueError(f"max_gen_toks={new} leaves no room for a prompt within "
                         f"max_length={self._max_length}")
      prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self._max_length - new)
                 for i in idx]
      temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
      samples = self.model.generate(prompts, temperature=temperature, max_new_tokens=new,
                                    top_p=kw.get("top_p"), top_k=kw.get("top_k"))
      for i, (sample,) in zip(idx, samples):
        out[i] = postprocess_generated_text(sample.text, until, None)
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    name = chat_template if isinstance(chat_template, str) else "default"
    return self.tokenizer.chat_templates.get(name) if chat_template else None

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """HFLM's: continues the last message unless a generation prompt is asked for; a template
    that rejects the conversation gets it again without system messages."""
    render = functools.partial(self.tokenizer.apply_chat_template,
                               add_generation_prompt=add_generation_prompt,
                               continue_final_message=not add_generation_prompt)
    try:
      return render(chat_history)
    except ChatTemplateError:
      return render([m for m in chat_history if m["role"] != "system"])


if "jaxpost" not in model_registry:  # not twice: `python -m` runs this file as __main__ too
  register_model("jaxpost")(JaxpostLM)


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None):
  """lm-eval's task index (its tasks and those under `include_path`), built once per process:
  indexing lm-eval's thousands of task files takes seconds."""
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  return TaskManager(include_path=include_path)


def run_lm_eval(model: EvalModel, tasks: Sequence[str], *, include_path: str | None = None,
                limit: int | None = None, num_fewshot: int | None = None,
                log_samples: bool = False, **kwargs) -> dict[str, float]:
  """Runs lm-eval `tasks` (names, or task YAMLs found under `include_path`) on `model`.

  Returns every numeric metric as {"<task>/<metric>": value}: lm-eval's ",none" filter
  suffix is dropped (other filters stay, e.g. "gsm8k/exact_match,strict-match"), standard
  errors are not returned (nor computed, unless `bootstrap_iters` is passed); neither is
  lm-eval's "sample_len" count, nor its samples (`log_samples` goes to lm-eval). Other
  keywords go to `lm_eval.simple_evaluate` (e.g. `gen_kwargs`, `apply_chat_template`).
  """
  kwargs.setdefault("bootstrap_iters", 0)
  results = lm_eval.simple_evaluate(
      model=JaxpostLM(model), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      log_samples=log_samples, task_manager=task_manager(include_path), **kwargs)
  return {f"{task}/{key.removesuffix(',none')}": float(value)
          for task, metrics in (results or {}).get("results", {}).items()
          for key, value in metrics.items()
          if "_stderr" not in key and key != "sample_len" and not isinstance(value, bool)
          and isinstance(value, (int, float, np.number))}


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's CLI with the "jaxpost" model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel

  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
