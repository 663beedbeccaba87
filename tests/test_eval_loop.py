"""`jaxpost eval` end to end: one model, the sidecar beside a real training process (killed and
resumed: every checkpoint evaluated exactly once, in step order), the in-loop `eval:` section
under the same metric names, and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from jaxpost.config import ConfigError, EvalConfig, load_config
from jaxpost.eval import command
from jaxpost.metrics import MetricWriter

RECIPE = """\
algorithm: sft
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 40, pack: true}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 4, log_every: 1}}
checkpoint: {{every: {every}, keep_last: {keep}}}
"""

SUITES = """\
suites:
  arith: {kind: generation, data: "@eval", max_new_tokens: 4, scorer: numeric}
  heldout: {kind: likelihood, data: "@eval"}
  drift: {kind: drift, data: "@eval", limit: 6, temperature: 1.0, max_new_tokens: 4}
"""


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _cli(*args, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxpost.cli", *args], env=_env(),
                        capture_output=True, text=True, timeout=600, **kw)


def _ledger(out: Path) -> list[dict]:
  return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 6-step run with checkpoints at 2, 4, 6 (all kept) and its eval config."""
  tmp = tmp_path_factory.mktemp("evalrun")
  recipe = tmp / "run.yaml"
  recipe.write_text(RECIPE.format(run_dir=tmp / "run", steps=6, every=2, keep=5))
  proc = _cli("train", str(recipe))
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = tmp / "eval.yaml"
  ev.write_text(f"model: {tmp / 'run'}\nreference: base\nbatch_size: 8\n" + SUITES)
  return tmp, ev


def test_eval_one_model_writes_reference_and_checkpoint(trained):
  tmp, ev = trained
  proc = _cli("eval", str(ev), f"out_dir={tmp / 'one'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _ledger(tmp / "one")
  assert [r["step"] for r in lines] == [0, 6]
  ref, last = lines
  assert ref["eval/drift/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference against itself
  assert last["eval/drift/kl"] > 0
  assert last["eval/heldout/perplexity"] < ref["eval/heldout/perplexity"]
  for key in ("eval/arith/numeric_match", "eval/heldout/nll", "eval/examples_per_s"):
    assert key in last
  report = (tmp / "one" / "report.md").read_text()
  assert "| numeric_match |" in report and "step 6" in report
  # a checkpoint by path; the ledger is reused: step 0 is not evaluated again
  proc = _cli("eval", str(ev), f"model={tmp / 'run' / 'checkpoints' / '4'}",
              f"out_dir={tmp / 'one'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["step"] for r in _ledger(tmp / "one")] == [0, 6, 4]


def test_eval_hf_folder_and_reference_folder(trained):
  tmp, ev = trained
  data = tmp / "run" / "data" / "eval.jsonl"  # a folder has no run splits: the same file
  proc = _cli("eval", str(ev), f"model={tmp / 'run' / 'final'}",
              f"reference={tmp / 'run' / 'model'}", f"out_dir={tmp / 'hf'}",
              *(f"suites.{name}.data={data}" for name in ("arith", "heldout", "drift")))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [r["step"] for r in _ledger(tmp / "hf")] == [0, 1]  # reference, then the folder
  # the final model equals checkpoint 6: same numbers as evaluating the run
  run = _ledger(tmp / "one")[1] if (tmp / "one").exists() else None
  hf = _ledger(tmp / "hf")[1]
  if run is not None:
    assert hf["eval/heldout/nll"] == pytest.approx(run["eval/heldout/nll"], abs=1e-5)


def test_eval_errors_name_the_problem(trained, tmp_path):
  tmp, ev = trained
  proc = _cli("eval", str(ev), f"model={tmp_path / 'nowhere'}")
  assert proc.returncode == 2 and "does not exist" in proc.stderr
  proc = _cli("eval", str(ev), "suites.arith.kk=3")
  assert proc.returncode == 2 and "did you mean 'suites.arith.k'" in proc.stderr
  with pytest.raises(ConfigError, match="exactly one of model"):
    load_config(ev, [f"follow={tmp}"], root=EvalConfig)
  proc = _cli("eval", str(ev), f"model={tmp / 'run' / 'final'}", "reference=null",
              "suites.arith.data=@eval", f"out_dir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "not a run folder" in proc.stderr


class _FakeTarget:
  """Checkpoints that appear over polls; one is deleted before it can be read."""

  def __init__(self, polls, gone=()):
    self.polls, self.gone, self.run_dir = list(polls), set(gone), "run"

  def steps(self):
    return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]

  def params(self, step):
    if step in self.gone:
      raise FileNotFoundError(step)
    return {"step": step}

  def final_step(self):
    return 8


def _fake_session(tmp_path, target, **cfg):
  writer = MetricWriter(tmp_path, tensorboard=False)
  said = []

  def evaluate(step, params, is_reference=False):
    del is_reference
    writer.write(step, {"eval/x/value": params["step"], "eval/seconds": 0.0})

  cfg = SimpleNamespace(follow="run", idle_timeout=0, poll_seconds=0.0, **cfg)
  return SimpleNamespace(cfg=cfg, target=target, out_dir=tmp_path, log=said.append,
                         evaluate=evaluate, reference_results=lambda done: None), said


def test_follow_skips_deleted_checkpoints_and_resumes_exactly_once(tmp_path):
  target = _FakeTarget([[], [2], [2, 4], [6, 8]], gone={4})
  session, said = _fake_session(tmp_path, target)
  out = command.follow(session, sleep=lambda s: None)
  assert out["steps"] == [2, 6, 8] and out["skipped"] == [4]
  assert any("checkpoint 4 was deleted" in m for m in said)
  # killed mid-write: a partial last line is dropped and redone, nothing twice
  text = (tmp_path / "metrics.jsonl").read_text()
  (tmp_path / "metrics.jsonl").write_text(text.rsplit("\n", 2)[0] + "\n" + '{"step": 8, "ti')
  assert command.done_steps(tmp_path) == {2, 6}
  session, _ = _fake_session(tmp_path, _FakeTarget([[2, 6, 8]]))
  out = command.follow(session, sleep=lambda s: None)
  assert out["steps"] == [8]
  assert [r["step"] for r in _ledger(tmp_path)] == [2, 6, 8]


@pytest.mark.slow
def test_sidecar_follows_a_training_process_killed_and_resumed(tmp_path):
  """The sidecar starts with the trainer, is SIGKILLed after its first checkpoint, restarts,
  and ends when the run's last step is evaluated: each step in the ledger once, ascending,
  no step evaluated by both sidecar processes."""
  recipe = tmp_path / "run.yaml"
  run_dir = tmp_path / "run"
  recipe.write_text(RECIPE.format(run_dir=run_dir, steps=40, every=4, keep=2))
  ev = tmp_path / "eval.yaml"
  ev.write_text("follow: " + str(run_dir) + "\nmodel: null\nbatch_size: 8\npoll_seconds: 0.2\n"
                "idle_timeout: 300\n" + SUITES)
  out = run_dir / "eval"
  trainer = subprocess.Popen([sys.executable, "-m", "jaxpost.cli", "train", str(recipe)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  args = [sys.executable, "-m", "jaxpost.cli", "eval", str(ev)]
  first = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    if (out / "metrics.jsonl").exists() and len(_ledger(out)) >= 2:
      break
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first_log = first.communicate()[0]
  before = {r["step"] for r in _ledger(out)}
  assert 0 in before and len(before) >= 2, first_log[-3000:]
  second = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
  trainer_log = trainer.communicate(timeout=600)[0]
  assert trainer.returncode == 0, trainer_log[-3000:]
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  steps = [r["step"] for r in _ledger(out)]
  assert steps == sorted(set(steps)), steps  # once each, in step order
  assert steps[0] == 0 and steps[-1] == 40
  assert all(s % 4 == 0 for s in steps)
  again = [int(line.split()[2]) for line in second.stdout.splitlines()
           if line.startswith("eval step ")]
  assert not set(again) & before  # the restarted sidecar evaluated nothing twice
  missing = set(range(4, 41, 4)) - set(steps)
  for s in missing:  # deleted by the trainer (keep_last=2) before the sidecar got to them
    assert f"checkpoint {s}" in second.stdout + first_log or s < min(set(steps) - {0})
  assert (out / "report.md").exists()


def test_in_loop_eval_section_uses_the_same_names(trained, tmp_path):
  tmp, _ = trained
  recipe = tmp_path / "run.yaml"
  suites = SUITES.replace("suites:", "eval:\n  every: 3\n  batch_size: 8\n  suites:")
  suites = suites.replace("\n  arith", "\n    arith").replace("\n  heldout", "\n    heldout")
  suites = suites.replace("\n  drift", "\n    drift")
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", steps=6, every=6, keep=1) + suites)
  proc = _cli("train", str(recipe))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _ledger(tmp_path / "run" / "eval")
  assert [r["step"] for r in lines] == [0, 3, 6]
  sidecar = _ledger(tmp / "one") if (tmp / "one").exists() else None
  names = {k for k in lines[-1] if k.startswith("eval/")}
  assert {"eval/arith/numeric_match", "eval/heldout/perplexity", "eval/drift/kl"} <= names
  if sidecar is not None:
    assert names == {k for k in sidecar[-1] if k.startswith("eval/")}
  assert (tmp_path / "run" / "eval" / "report.md").exists()


DOC_SUITE = '''
def my_suite(model, reference, rows, section, cache):    # model: jaxpost.eval.EvalModel
  outs = model.generate([model.tokenizer.encode(r["prompt"], add_bos=True) for r in rows],
                        max_new_tokens=section.max_new_tokens)
  return {"polite": sum("please" in g[0].text for g in outs) / len(outs)}
'''


def test_custom_suite_of_the_docs_and_lm_eval_section(trained, tmp_path):
  """docs/architecture.md's custom suite runs as written; an `lm_eval:` section runs a local
  lm-eval task through the same Evaluator, under eval/lm_eval/<task>/<metric>."""
  import jax.numpy as jnp
  from jaxpost.config import EvalSection, LmEvalSection, SuiteSection
  from jaxpost.eval import Evaluator, EvalModel
  from jaxpost.models import load_hf
  from jaxpost.tokenizer import load_tokenizer

  tmp, _ = trained
  doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
  assert DOC_SUITE.strip().splitlines()[0] in doc and "please" in doc
  (tmp_path / "my_metrics.py").write_text(DOC_SUITE)
  (tmp_path / "prompts.jsonl").write_text(
      "".join(json.dumps({"prompt": p}) + "\n" for p in ("please say", "what is 1 + 2")))
  folder = tmp / "run" / "final"
  config, params = load_hf(folder, dtype=jnp.float32)
  tok = load_tokenizer(folder)
  lm_eval_section = None
  tasks = tmp_path / "tasks"
  if _has_lm_eval():
    tasks.mkdir()
    rows = [{"question": f"what is {a} + 1", "choices": [str(a + 1), str(a + 2)], "label": 0}
            for a in range(4)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n"
        f"  data_files: {tasks / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    lm_eval_section = LmEvalSection(tasks="tiny_mc", include_path=str(tasks))
  section = EvalSection(
      batch_size=4, lm_eval=lm_eval_section,
      suites={"polite": SuiteSection(kind="custom", function=f"{tmp_path}/my_metrics.py:my_suite",
                                     data=str(tmp_path / "prompts.jsonl"), max_new_tokens=4)})
  out = Evaluator(section, config, tok).evaluate(params)
  outs = EvalModel(config, params, tok, batch_size=4).generate(
      [tok.encode(p, add_bos=True) for p in ("please say", "what is 1 + 2")], max_new_tokens=4)
  assert out["eval/polite/polite"] == sum("please" in g[0].text for g in outs) / 2
  if lm_eval_section is not None:
    from jaxpost.eval.lm_eval_adapter import run_lm_eval
    direct = run_lm_eval(EvalModel(config, params, tok, batch_size=4), ["tiny_mc"],
                         include_path=str(tasks))
    assert out["eval/lm_eval/tiny_mc/acc"] == direct["tiny_mc/acc"]


def _has_lm_eval() -> bool:
  try:
    import lm_eval  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


@pytest.mark.slow
def test_eval_on_its_own_mesh_matches_one_device(trained):
  """A run trained on 1 device, evaluated on 8 (data 2 x fsdp 4; checkpoints restored onto
  the evaluation's shardings): the same numbers as on 1 device."""
  tmp, ev = trained
  outs = {}
  for name, env, mesh in (("d1", {}, []), ("d8", {"XLA_FLAGS":
                          "--xla_force_host_platform_device_count=8"},
                          ["mesh_data=2", "mesh_fsdp=4"])):
    proc = subprocess.run([sys.executable, "-m", "jaxpost.cli", "eval", str(ev),
                           f"out_dir={tmp / name}", *mesh], env=_env() | env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs[name] = _ledger(tmp / name)
  for a, b in zip(outs["d1"], outs["d8"], strict=True):
    assert a["step"] == b["step"]
    for k, v in a.items():
      if k.startswith("eval/") and not k.endswith(("seconds", "examples_per_s")):
        assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("peft", [["lora.rank=4", "lora.dora=true", "lora.quantize=int8"],
                                  ["prompt.kind=prefix", "prompt.num_tokens=4"]])
def test_eval_peft_runs_with_their_adapters_attached(trained, tmp_path, peft):
  """A DoRA-over-int8 (QLoRA) / prefix run is evaluated with its trained adapters attached to
  the base (not merged), against the base with the adapters off: the checkpoint's numbers
  differ from the base's; for LoRA they equal those of the merged export (`final/`) within the
  int8 dequantisation's rounding."""
  from jaxpost.eval.command import run_eval
  from jaxpost.train.trainer import train
  tmp, ev = trained
  recipe = tmp_path / "run.yaml"
  base = tmp / "run" / "final"
  recipe.write_text(RECIPE.format(run_dir=tmp_path / "run", steps=4, every=4, keep=1)
                    .replace("model: {tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}",
                             f"model: {{path: {base}}}")
                    .replace("lr: 3.0e-3", "lr: 3.0e-2"))
  train(load_config(recipe, peft))
  run_eval(load_config(ev, [f"model={tmp_path / 'run'}", f"out_dir={tmp_path / 'e'}"],
                       root=EvalConfig), log=lambda m: None)
  ref, ckpt = _ledger(tmp_path / "e")
  assert ref["step"] == 0 and ckpt["step"] == 4
  assert ckpt["eval/heldout/nll"] != pytest.approx(ref["eval/heldout/nll"], abs=1e-4)
  assert ckpt["eval/drift/kl"] > 0
  if peft[0].startswith("lora"):
    data = tmp_path / "run" / "data" / "eval.jsonl"
    merged = tmp_path / "merged.yaml"
    merged.write_text(f"model: {tmp_path / 'run' / 'final'}\nreference: null\nbatch_size: 8\n"
                      f"suites:\n  heldout: {{kind: likelihood, data: {data}}}\n")
    run_eval(load_config(merged, [f"out_dir={tmp_path / 'm'}"], root=EvalConfig),
             log=lambda m: None)
    (m,) = _ledger(tmp_path / "m")
    # merging dequantises the int8 base once (in float32), attaching does it per layer
    assert m["eval/heldout/nll"] == pytest.approx(ckpt["eval/heldout/nll"], abs=1e-3)
