"""The white-box commands: `jaxpost steer`, `jaxpost probe`, `jaxpost heads`.

Each reads its config (`jaxpost.config.whitebox_tools`), the model, its rows, and writes into the
output folder a `report.md` (printed too), a `summary.json` of the measured numbers, and its
arrays and PNGs:

    steer: vector.npy (+ vector.json, its provenance), generations.jsonl, report.md
    probe: accuracy.png, report.md
    heads: effect.npy ([L, H]), heads.png, report.md
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxpost.config.whitebox_tools import HeadsConfig, ProbeConfig, SteerConfig
from jaxpost.whitebox import inputs


def _log(message: str) -> None:
  print(message, flush=True)


def _sha256(path: str | Path) -> str:
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _finish(out: Path, report: str, summary: dict, log) -> dict:
  (out / "report.md").write_text(report, encoding="utf-8")
  inputs.write_json(out / "summary.json", summary)
  log(report)
  log(f"report: {out / 'report.md'}")
  return summary


def _pad_id(tokenizer) -> int:
  from jaxpost.data import pad_id_of  # pylint: disable=import-outside-toplevel
  return pad_id_of(tokenizer)


# -- steer ------------------------------------------------------------------------------------


def _steer_metric(cfg: SteerConfig) -> Callable[[str, dict], float | None]:
  from jaxpost.whitebox import steering  # pylint: disable=import-outside-toplevel
  if cfg.metric in steering.BUILTIN_METRICS:
    return steering.BUILTIN_METRICS[cfg.metric]
  from jaxpost.user_code import import_function  # pylint: disable=import-outside-toplevel
  return import_function(cfg.metric, key="metric")[1]


def run_steer(cfg: SteerConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Builds the CAA vector, saves it, and measures generations at each coefficient."""
  from jaxpost.whitebox import steering  # pylint: disable=import-outside-toplevel
  from jaxpost.whitebox import last_token_activations  # pylint: disable=import-outside-toplevel

  pairs = inputs.read_jsonl(cfg.pairs, {"positive": str, "negative": str}, key="pairs",
                            limit=cfg.limit)
  rows = inputs.read_jsonl(cfg.prompts, {"prompt": str}, key="prompts", limit=cfg.limit)
  metric = _steer_metric(cfg)
  config, params, tok = inputs.open_model(cfg.model)
  layer = config.num_layers // 2 if cfg.layer is None else cfg.layer
  if layer >= config.num_layers:
    raise ValueError(f"layer={layer} is out of range: the model has {config.num_layers} layers")
  out = inputs.out_folder(cfg.out_dir, cfg.model, "steer")
  out.mkdir(parents=True, exist_ok=True)
  pad = _pad_id(tok)
  t0 = time.perf_counter()

  def encode(texts):
    return inputs.encode_prompts(tok, texts, chat=cfg.chat)

  positives = encode([p["positive"] for p in pairs])
  negatives = encode([p["negative"] for p in pairs])
  vector = steering.steering_vector(config, params, positives, negatives, site=cfg.site,
                                    layers=(layer,), batch_size=cfg.batch_size, pad_id=pad)[0]
  acts = last_token_activations(config, params, negatives, site=cfg.site,
                                         layers=(layer,), batch_size=cfg.batch_size,
                                         pad_id=pad)[0]
  np.save(out / "vector.npy", vector)
  provenance = {
      "method": "contrastive activation addition (mean of positive - negative at the last "
                "prompt token)",
      "model": str(inputs.model_folder(cfg.model)), "site": cfg.site, "layer": layer,
      "pairs": str(cfg.pairs), "pairs_sha256": _sha256(cfg.pairs), "num_pairs": len(pairs),
      "chat": cfg.chat, "shape": list(vector.shape), "norm": float(np.linalg.norm(vector)),
      "mean_activation_norm": float(np.linalg.norm(acts, axis=-1).mean()),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  inputs.write_json(out / "vector.json", provenance)
  log(f"steer: vector from {len(pairs)} pairs at {cfg.site} layer {layer}: norm "
      f"{provenance['norm']:.3g} (activations there: {provenance['mean_activation_norm']:.3g}); "
      f"{time.perf_counter() - t0:.1f}s")

  coefs = cfg.coefficients()
  prompts = encode([r["prompt"] for r in rows])
  stops = tuple(tok.eos_ids)
  completions = steering.steered_generations(
      config, params, prompts, vector, coefs, layer=layer, site=cfg.site,
      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
      stop_tokens=stops, pad_id=pad, batch_size=min(cfg.batch_size, len(prompts)),
      positions=cfg.positions)
  has_answer = all("answer" in r for r in rows)
  per_coef, lines = [], []
  for coef, ids in zip(coefs, completions):
    texts = [tok.decode(t, skip_special_tokens=True) for t in ids]
    scores = [metric(t, r) for t, r in zip(texts, rows)]
    stats = steering.summarize(scores, cfg.threshold)
    entry = {"coef": coef, **{f"metric_{k}": v for k, v in stats.items()}}
    if has_answer:
      entry["accuracy"] = float(np.mean([t.strip() == str(r["answer"])
                                         for t, r in zip(texts, rows)]))
    entry["samples"] = texts[:cfg.show]
    per_coef.append(entry)
    lines += [json.dumps({"coef": coef, "prompt": r["prompt"], "completion": t, "score": s})
              for r, t, s in zip(rows, texts, scores)]
  (out / "generations.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

  above = [] if cfg.threshold is None else [f"{cfg.metric} >= {cfg.threshold:g}"]
  header = ["coef", f"mean {cfg.metric}", f"median {cfg.metric}", *above, "scored"]
  header += (["accuracy"] if has_answer else [])
  header += [f"prompt {i + 1}" for i in range(min(cfg.show, len(rows)))]
  table = [[e["coef"], e["metric_mean"], e["metric_median"]]
           + ([e["metric_above"]] if above else []) + [e["metric_scored"]]
           + ([e["accuracy"]] if has_answer else []) + [repr(s) for s in e["samples"]]
           for e in per_coef]
  shown = "".join(f"- prompt {i + 1}: {r['prompt']!r}\n" for i, r in enumerate(rows[:cfg.show]))
  where = ("the last prompt token and every generated token" if cfg.positions == "answer"
           else "every token")
  report = (f"# Steering: {cfg.site} layer {layer}\n\n"
            f"CAA vector from {len(pairs)} pairs ({cfg.pairs}), norm {provenance['norm']:.4g} "
            f"(mean activation norm there {provenance['mean_activation_norm']:.4g}), added at "
            f"{where}; "
            f"{len(rows)} held-out prompts ({cfg.prompts}), "
            f"{'greedy' if cfg.temperature == 0 else f'temperature {cfg.temperature}'} "
            f"completions of up to {cfg.max_new_tokens} tokens scored by `{cfg.metric}` "
            f"(mean over the completions it scores; `scored`: their fraction).\n\n"
            + inputs.markdown_table(header, table) + "\n" + shown)
  summary = {"out_dir": str(out), "layer": layer, "site": cfg.site, "coefs": per_coef,
             "vector_norm": provenance["norm"], "seconds": time.perf_counter() - t0}
  return _finish(out, report, summary, log)


# -- probe ------------------------------------------------------------------------------------


def run_probe(cfg: ProbeConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Linear probes per layer on the last token's activations; a table and a PNG."""
  from jaxpost.whitebox import probes  # pylint: disable=import-outside-toplevel
  from jaxpost.whitebox import last_token_activations  # pylint: disable=import-outside-toplevel

  if cfg.data is not None:
    rows = inputs.read_jsonl(cfg.data, {"text": str, "label": (str, int, bool)}, key="data",
                             limit=cfg.limit)
  else:
    rows = inputs.arithmetic_probe_rows(cfg.task, max_operand=cfg.max_operand)[:cfg.limit]
  config, params, tok = inputs.open_model(cfg.model)
  layers = cfg.layers or tuple(range(config.num_layers))
  if max(layers) >= config.num_layers:
    raise ValueError(f"layers: layer {max(layers)} is out of range: the model has "
                     f"{config.num_layers} layers")
  out = inputs.out_folder(cfg.out_dir, cfg.model, "probe")
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  prompts = inputs.encode_prompts(tok, [r["text"] for r in rows], chat=cfg.chat)
  acts = last_token_activations(config, params, prompts, site=cfg.site, layers=layers,
                                batch_size=cfg.batch_size, pad_id=_pad_id(tok))
  train_idx, eval_idx = inputs.split_indices(len(rows), cfg.eval_fraction, cfg.seed)
  result = probes.probe_layers(acts, [r["label"] for r in rows], train_idx, eval_idx,
                               l2=cfg.l2, steps=cfg.steps, seed=cfg.seed)
  what = cfg.task or cfg.data
  png = probes.plot_probe_accuracy(result, out / "accuracy.png", layers=layers,
                                   title=f"probe: {what} from {cfg.site}")
  table = [[l, a, t, c] for l, a, t, c in zip(layers, result.accuracy, result.train_accuracy,
                                              result.control)]
  report = (f"# Linear probes: {what}\n\n"
            f"Logistic regression (L-BFGS, {cfg.steps} steps, l2 {cfg.l2:g}) on `{cfg.site}` at "
            f"the last prompt token; {len(train_idx)} rows trained, {len(eval_idx)} held out; "
            f"{len(result.classes)} classes ({', '.join(map(str, result.classes[:8]))}"
            f"{', ...' if len(result.classes) > 8 else ''}); majority class "
            f"{result.majority:.3f} of the held-out rows. `control`: the mean held-out "
            f"accuracy of 5 probes trained on shuffled labels (chance).\n\n"
            + inputs.markdown_table(["layer", "held-out accuracy", "train accuracy",
                                     "control"], table)
            + f"\n![accuracy per layer]({png.name})\n")
  summary = {"out_dir": str(out), "layers": list(layers),
             "accuracy": [float(a) for a in result.accuracy],
             "train_accuracy": [float(a) for a in result.train_accuracy],
             "control": [float(a) for a in result.control], "majority": result.majority,
             "classes": [str(c) for c in result.classes], "num_train": len(train_idx),
             "num_eval": len(eval_idx), "seconds": time.perf_counter() - t0}
  return _finish(out, report, summary, log)


# -- heads ------------------------------------------------------------------------------------


def _reward_metric(cfg: HeadsConfig, config, params, tok, rows, prompts):
  """metric(interventions): the mean reward of greedy completions under them."""
  from jaxpost.sampling import generate  # pylint: disable=import-outside-toplevel
  from jaxpost.user_code import import_function  # pylint: disable=import-outside-toplevel

  _, fn = import_function(cfg.metric, key="metric")
  texts = [r["prompt"] for r in rows]
  columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt",)}
  stops = tuple(tok.eos_ids)

  def metric(interventions):
    res = generate(config, params, prompts, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                   stop_tokens=stops, pad_id=_pad_id(tok), interventions=interventions)
    ids = [[int(t) for t in row[:n] if int(t) not in stops]
           for row, n in zip(np.asarray(res.tokens), np.asarray(res.lengths))]
    completions = [tok.decode(i, skip_special_tokens=True) for i in ids]
    scores = fn(prompts=texts, completions=completions, completion_ids=ids, **columns)
    scored = [float(s) for s in scores if s is not None]
    if not scored:
      raise ValueError(f"metric={cfg.metric}: the reward function scored no completion")
    return float(np.mean(scored))

  return metric


def run_heads(cfg: HeadsConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """The [L, H] knockout effect of every attention head on the metric; heat map and table."""
  from jaxpost.whitebox import attribution  # pylint: disable=import-outside-toplevel

  if cfg.data is not None:
    rows = inputs.read_jsonl(cfg.data, {"prompt": str, "target": str}, key="data",
                             limit=cfg.limit)
  else:
    rows = inputs.arithmetic_target_rows(max_operand=cfg.max_operand)[:cfg.limit]
  config, params, tok = inputs.open_model(cfg.model)
  out = inputs.out_folder(cfg.out_dir, cfg.model, "heads")
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  pad = _pad_id(tok)
  prompts = inputs.encode_prompts(tok, [r["prompt"] for r in rows], chat=cfg.chat)
  targets = [tok.encode(r["target"], add_bos=False) for r in rows]
  tokens, segments, target_mask = attribution.encode_targets(prompts, targets, pad)
  mean = (attribution.head_means(config, params, tokens, segments)
          if cfg.ablation == "mean" else None)
  L, H = config.num_layers, config.num_heads
  if cfg.metric == "logprob":
    metric = attribution.target_logprob_metric(config, params, tokens, segments, target_mask)
    clean, effect = attribution.head_attribution(metric, L, H, mean_LxHxDh=mean)
    label = "change in target log-prob"
  else:
    metric = _reward_metric(cfg, config, params, tok, rows, prompts)
    clean, effect = attribution.head_attribution_loop(metric, L, H, mean_LxHxDh=mean)
    label = f"change in {cfg.metric}"
  np.save(out / "effect.npy", effect)
  png = attribution.plot_heatmap(effect, out / "heads.png", label=label,
                                 title=f"{cfg.ablation}-ablation of each head: {label}")
  order = np.argsort(effect, axis=None)
  top = [(int(i) // H, int(i) % H, float(effect.flat[i])) for i in order[:min(5, L * H)]]
  table = [[f"layer {l}"] + [float(v) for v in effect[l]] for l in range(L)]
  report = (f"# Head knockout: {label}\n\n"
            f"{len(rows)} rows ({cfg.data or 'the arithmetic task, held out'}); metric "
            f"`{cfg.metric}` {clean:.4g} with every head; each cell is the change when that "
            f"head's output is {cfg.ablation}-ablated (negative: the head helps).\n\n"
            + inputs.markdown_table([""] + [f"head {h}" for h in range(H)], table)
            + "\nLargest drops: " + ", ".join(f"L{l}H{h} {v:+.3g}" for l, h, v in top)
            + f"\n\n![heads]({png.name})\n")
  summary = {"out_dir": str(out), "clean": clean, "effect": effect.tolist(),
             "top": [{"layer": l, "head": h, "effect": v} for l, h, v in top],
             "seconds": time.perf_counter() - t0}
  return _finish(out, report, summary, log)
