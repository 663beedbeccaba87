"""Bad inputs through the real command line: one clear message, no traceback, no damage.

Every case runs `python -m jaxpost.cli ...` in a subprocess and asserts: a non-zero exit; a
stderr whose error is one line `jaxpost: error: ...` naming the key, file, row or step (a
regular expression per case); no Python traceback. The cases that point at a good run's folder
(a re-run with a mistake, an export of the wrong thing) must leave it as it was: afterwards it
still exports and resumes.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tokenizer_fixtures

GOOD = """\
algorithm: {algorithm}
run_dir: {run_dir}
task: {{name: arithmetic, max_operand: 10, num_eval: 12, exact_match: false}}
model: {{tiny: true, tiny_hidden_size: 32, tiny_num_layers: 2}}
data: {{seq_len: 40, pack: true}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: 4, batch_size: 4, log_every: 1}}
checkpoint: {{every: 2, async_save: false}}
"""

FILES = """\
run_dir: {run_dir}
model: {{path: {model}}}
data: {{train: {train}, seq_len: 40}}
train: {{steps: 2, batch_size: 2}}
"""


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def jaxpost(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxpost.cli", *map(str, args)], env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def assert_one_clear_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxpost: error:")]
  assert len(errors) == 1, proc.stderr[-4000:]
  assert re.search(pattern, errors[0]), (pattern, errors[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A good run (4 steps, checkpoints at 2 and 4), a good model folder and data, and the bad
  files the cases point at."""
  root = tmp_path_factory.mktemp("bad")
  w = {"root": root}
  recipe = root / "good.yaml"
  recipe.write_text(GOOD.format(algorithm="sft", run_dir=root / "run"))
  proc = jaxpost("train", recipe)
  assert proc.returncode == 0, proc.stderr[-3000:]
  w["recipe"], w["run"] = recipe, root / "run"
  w["config_bytes"] = (root / "run" / "config.yaml").read_bytes()
  model = root / "run" / "model"
  w["model"] = model

  rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                        {"role": "assistant", "content": str(a + 1)}]} for a in range(40)]

  def write(name, text):
    (root / name).write_text(text)
    return root / name

  w["train"] = write("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  w["empty"] = write("empty.jsonl", "")
  w["badjson"] = write("badjson.jsonl", json.dumps(rows[0]) + "\n{not json\n")
  w["firstbad"] = write("firstbad.jsonl", "{not json\n" + json.dumps(rows[0]) + "\n")
  w["nofield"] = write("nofield.jsonl", '{"question": "a", "reply": "b"}\n' * 4)
  w["badrole"] = write("badrole.jsonl", json.dumps(
      {"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
  (root / "latin1.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n" +
                                      b'{"text": "caf\xe9"}\n')
  w["latin1"] = root / "latin1.jsonl"
  w["tiny_data"] = write("tiny.jsonl", json.dumps(rows[0]) + "\n")
  w["pairs_missing"] = write("pairs_missing.jsonl", '{"prompt": "a?", "chosen": "b"}\n')
  w["pairs_same"] = write("pairs_same.jsonl", '{"prompt": "a?", "chosen": "b", "rejected": "b"}\n')
  w["kto_label"] = write("kto_label.jsonl",
                         '{"prompt": "a?", "completion": "b", "label": "yes"}\n' * 4)
  w["list_yaml"] = write("list.yaml", "- a\n- b\n")
  w["bad_yaml"] = write("bad.yaml", "train: {steps: 3\n")
  w["dup_yaml"] = write("dup.yaml", "run_dir: a\nrun_dir: b\ntrain: {steps: 1, batch_size: 1}\n")
  (root / "latin1.yaml").write_bytes(b"run_dir: caf\xe9\n")
  w["latin1_yaml"] = root / "latin1.yaml"
  w["old_pref"] = write("old_pref.yaml", GOOD.format(algorithm="dpo", run_dir=root / "x")
                        + "preference: {beta: 0.2}\ndpo: {beta: 0.3}\n")
  w["a_file"] = write("a_file", "not a folder\n")
  (root / "no_ckpt").mkdir()
  (root / "no_ckpt" / "config.yaml").write_bytes((root / "run" / "config.yaml").read_bytes())
  for name, text in (("ad_list", "[1]"), ("ad_nokey", '{"peft_type": "LORA", "r": 4}')):
    (root / name).mkdir()
    (root / name / "adapter_config.json").write_text(text)
    w[name] = root / name

  def model_variant(name, change):
    folder = root / name
    shutil.copytree(model, folder)
    change(folder)
    return folder

  def rewrite_config(f, fn):
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps(fn(cfg)))

  w["m_noconfig"] = model_variant("m_noconfig", lambda f: (f / "config.json").unlink())
  w["m_badjson"] = model_variant("m_badjson", lambda f: (f / "config.json").write_text("{oops"))
  w["m_list"] = model_variant("m_list", lambda f: (f / "config.json").write_text("[1, 2]"))
  w["m_nokey"] = model_variant("m_nokey", lambda f: rewrite_config(
      f, lambda c: {k: v for k, v in c.items() if k != "hidden_size"}))
  w["m_type"] = model_variant("m_type", lambda f: rewrite_config(
      f, lambda c: {**c, "model_type": "gpt_banana"}))
  w["m_noweights"] = model_variant("m_noweights", lambda f: (f / "model.safetensors").unlink())

  def pickle_only(f):
    (f / "model.safetensors").unlink()
    (f / "pytorch_model.bin").write_bytes(b"\x80\x04not really")

  w["m_pickle"] = model_variant("m_pickle", pickle_only)

  def truncate(f):
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[:len(data) // 2])

  w["m_truncated"] = model_variant("m_truncated", truncate)
  w["m_garbage"] = model_variant(
      "m_garbage", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64))
  w["m_notok"] = model_variant("m_notok", lambda f: [
      (f / n).unlink() for n in ("tokenizer.model", "tokenizer.json") if (f / n).exists()])

  w["m_notemplate"] = model_variant("m_notemplate", tokenizer_fixtures.remove_chat_template)

  def files(name, **kw):
    path = root / f"{name}.yaml"
    args = dict(run_dir=root / f"runs/{name}", model=model, train=w["train"]) | kw
    path.write_text(FILES.format(**args))
    return path

  w["files"] = files
  return w


# (name, argv(world) -> list, pattern in the one error line)
CONFIG_CASES = [
    ("missing recipe", lambda w: ["train", w["root"] / "nope.yaml"], r"config file not found: .*nope\.yaml"),
    ("recipe is a folder", lambda w: ["train", w["root"]], r"cannot read config file"),
    ("invalid yaml", lambda w: ["train", w["bad_yaml"]], r"invalid YAML in .*bad\.yaml at line"),
    ("yaml list", lambda w: ["train", w["list_yaml"]], r"list\.yaml must hold a mapping"),
    ("duplicate key", lambda w: ["train", w["dup_yaml"]], r"duplicate key 'run_dir'"),
    ("non-utf8 yaml", lambda w: ["train", w["latin1_yaml"]], r"cannot read config file .*latin1\.yaml"),
    ("unknown top key", lambda w: ["train", w["recipe"], "optimizer.lr=1"], r"unknown key 'optimizer'"),
    ("unknown key suggestion", lambda w: ["train", w["recipe"], "optim.learning_rate=1e-3"],
     r"unknown key 'optim.learning_rate'.*did you mean 'optim.lr'"),
    ("key in wrong section", lambda w: ["train", w["recipe"], "train.lr=1e-3"],
     r"unknown key 'train.lr'.*'optim.lr'"),
    ("wrong type", lambda w: ["train", w["recipe"], "train.steps=ten"], r"wrong type for 'train.steps'"),
    ("bad choice", lambda w: ["train", w["recipe"], "optim.name=adamx"],
     r"invalid value 'adamx' for 'optim.name'.*choose one of"),
    ("lr inf", lambda w: ["train", w["recipe"], "optim.lr=1e999"], r"'optim.lr'.*finite"),
    ("lr nan", lambda w: ["train", w["recipe"], "optim.lr=.nan"], r"'optim.lr'.*finite"),
    ("lr negative", lambda w: ["train", w["recipe"], "optim.lr=-1"], r"optim.lr must be > 0"),
    ("beta zero", lambda w: ["train", w["recipe"], "dpo.beta=0"], r"dpo.beta must be > 0"),
    ("micro batches", lambda w: ["train", w["recipe"], "train.micro_batches=3"],
     r"train.batch_size=4 is not divisible by train.micro_batches=3"),
    ("mesh", lambda w: ["train", w["recipe"], "mesh.data=3"], r"not divisible by the batch shards"),
    ("override syntax", lambda w: ["train", w["recipe"], "train.steps"], r"invalid override 'train.steps'"),
    ("override into value", lambda w: ["train", w["recipe"], "run_dir.x=1"], r"'run_dir' is a value"),
    ("path and tiny", lambda w: ["train", w["recipe"], "model.path=/x"],
     r"model.path, model.tiny=true and model.preset are exclusive"),
    ("no model", lambda w: ["train", w["recipe"], "model.tiny=false"], r"missing required key 'model.path'"),
    ("no data", lambda w: ["train", w["files"]("nodata", train="null")], r"missing required key 'data.train'"),
    ("eval without data", lambda w: ["train", w["files"]("noeval"), "train.eval_every=5"],
     r"train.eval_every=5 needs data.eval"),
    ("kto precomputed", lambda w: ["train", w["recipe"], "algorithm=kto", "reference.mode=precomputed"],
     r"reference.mode=precomputed is for paired data"),
    ("reward with lora", lambda w: ["train", w["recipe"], "algorithm=reward", "lora.rank=4"],
     r"algorithm=reward trains the whole model"),
    ("lora and prompt", lambda w: ["train", w["recipe"], "lora.rank=4", "prompt.num_tokens=4"],
     r"lora and prompt are exclusive"),
    ("lora targets", lambda w: ["train", w["recipe"], "lora.targets=q,attn"], r"lora.targets has 'attn'"),
    ("warmup", lambda w: ["train", w["recipe"], "optim.warmup_steps=50"],
     r"optim.warmup_steps=50 exceeds train.steps=4"),
    ("keep best", lambda w: ["train", w["recipe"], "checkpoint.keep_best=1"],
     r"checkpoint.keep_best=1 ranks by 'eval/loss'.*train.eval_every > 0"),
    ("sync precomputed", lambda w: ["train", w["recipe"], "reference.sync_every=2",
                                    "reference.mode=precomputed"], r"reference.sync_every needs"),
    ("old and new key", lambda w: ["train", w["old_pref"]],
     r"both 'preference.beta' and 'dpo.beta'.*keep only 'dpo.beta'"),
    ("old unknown key", lambda w: ["train", w["recipe"], "preference.betta=1"],
     r"unknown key 'preference.betta'"),
    ("unknown algorithm", lambda w: ["train", w["recipe"], "algorithm=a2c"],
     r"invalid value 'a2c' for 'algorithm'"),
    ("max length", lambda w: ["train", w["recipe"], "data.max_length=0"], r"data.max_length must be >= 1"),
]

MODEL_CASES = [
    ("model path missing", lambda w: ["train", w["files"]("m0", model=w["root"] / "nowhere")],
     r"model.path '.*nowhere' does not exist"),
    ("model path is a file", lambda w: ["train", w["files"]("m1", model=w["a_file"])], r"a_file"),
    ("no config.json", lambda w: ["train", w["files"]("m2", model=w["m_noconfig"])],
     r"m_noconfig.*config\.json"),
    ("config.json invalid", lambda w: ["train", w["files"]("m3", model=w["m_badjson"])],
     r"m_badjson/config\.json"),
    ("config.json list", lambda w: ["train", w["files"]("m4", model=w["m_list"])],
     r"m_list/config\.json.*(object|mapping)"),
    ("config.json key missing", lambda w: ["train", w["files"]("m5", model=w["m_nokey"])],
     r"hidden_size"),
    ("unknown model type", lambda w: ["train", w["files"]("m6", model=w["m_type"])], r"gpt_banana"),
    ("no weights", lambda w: ["train", w["files"]("m7", model=w["m_noweights"])],
     r"m_noweights.*safetensors"),
    ("pickle only", lambda w: ["train", w["files"]("m8", model=w["m_pickle"])],
     r"m_pickle.*(pickle|safetensors)"),
    ("truncated weights", lambda w: ["train", w["files"]("m9", model=w["m_truncated"])],
     r"m_truncated.*model\.safetensors"),
    ("garbage weights", lambda w: ["train", w["files"]("m10", model=w["m_garbage"])],
     r"m_garbage.*model\.safetensors"),
    ("no tokenizer", lambda w: ["train", w["files"]("m11", model=w["m_notok"])], r"m_notok.*tokenizer"),
    ("no chat template", lambda w: ["train", w["files"]("m12", model=w["m_notemplate"])],
     r"m_notemplate.*chat template"),
    ("adapter config a list", lambda w: ["train", w["recipe"], f"lora.init_from={w['ad_list']}",
                                         f"run_dir={w['root'] / 'a1'}"],
     r"ad_list/adapter_config\.json must hold a JSON object"),
    ("adapter config key missing", lambda w: ["train", w["recipe"], f"run_dir={w['root'] / 'a2'}",
                                              f"lora.init_from={w['ad_nokey']}"],
     r"ad_nokey/adapter_config\.json: required key 'target_modules'"),
    ("adapter folder missing", lambda w: ["train", w["recipe"], f"run_dir={w['root'] / 'a3'}",
                                          f"lora.init_from={w['root'] / 'noadapter'}"],
     r"noadapter: no adapter_config\.json"),
    ("generate on a non-model", lambda w: ["generate", w["root"], "--prompt", "hi"], r"config\.json"),
]

DATA_CASES = [
    ("train file missing", lambda w: ["train", w["files"]("d0", train=w["root"] / "none.jsonl")],
     r"none\.jsonl"),
    ("empty file", lambda w: ["train", w["files"]("d1", train=w["empty"])], r"empty\.jsonl"),
    ("invalid json row", lambda w: ["train", w["files"]("d2", train=w["badjson"])],
     r"badjson\.jsonl.*(row|line) 2"),
    ("invalid first row", lambda w: ["train", w["files"]("d3", train=w["firstbad"])],
     r"firstbad\.jsonl.*(row|line) 1"),
    ("no known field", lambda w: ["train", w["files"]("d4", train=w["nofield"])],
     r"nofield\.jsonl.*(question|fields)"),
    ("bad role", lambda w: ["train", w["files"]("d5", train=w["badrole"])], r"badrole\.jsonl.*role"),
    ("not utf-8", lambda w: ["train", w["files"]("d6", train=w["latin1"])],
     r"latin1\.jsonl.*(row|line) 2.*UTF-8"),
    ("too little data", lambda w: ["train", w["files"]("d7", train=w["tiny_data"])], r"batch_size"),
    ("pair missing side", lambda w: ["train", w["files"]("d8", train=w["pairs_missing"]),
                                     "algorithm=dpo"], r"pairs_missing\.jsonl row 1.*rejected"),
    ("pair identical", lambda w: ["train", w["files"]("d9", train=w["pairs_same"]),
                                  "algorithm=dpo"], r"pairs_same\.jsonl row 1.*identical"),
    ("kto label", lambda w: ["train", w["files"]("d10", train=w["kto_label"]), "algorithm=kto"],
     r"kto_label\.jsonl row 1.*label"),
    ("bad eval file", lambda w: ["train", w["files"]("d11"), f"data.eval={w['firstbad']}",
                                 "train.eval_every=1"], r"firstbad\.jsonl.*(row|line) 1"),
    ("skip leaves nothing", lambda w: ["train", w["files"]("d12", train=w["badrole"]),
                                       "data.on_bad_row=skip"], r"(No examples|every row)"),
]

RUN_CASES = [
    ("run_dir is a file", lambda w: ["train", w["recipe"], f"run_dir={w['a_file']}"], r"a_file"),
    ("run_dir under a file", lambda w: ["train", w["recipe"], f"run_dir={w['a_file']}/run"],
     r"a_file"),
    ("export a non-run", lambda w: ["export", w["root"]], r"no config\.yaml"),
    ("export a missing folder", lambda w: ["export", w["root"] / "nowhere"], r"nowhere"),
    ("export a run without checkpoints", lambda w: ["export", w["root"] / "no_ckpt"],
     r"no finalised checkpoint in .*checkpoints to export"),
    ("export missing step", lambda w: ["export", w["run"], "--step", "3", "--out",
                                       w["root"] / "out3"], r"step 3 is not a finalised checkpoint"),
    ("plot without metrics", lambda w: ["plot", w["root"]], r"metrics"),
    # Mistyped re-runs of the good run: they must fail before touching it.
    ("rerun with lora added", lambda w: ["train", w["recipe"], "train.steps=6", "lora.rank=4"],
     r"checkpoint"),
    ("rerun with another optimizer", lambda w: ["train", w["recipe"], "train.steps=6",
                                                "optim.name=sgd"], r"checkpoint"),
    ("rerun with other data", lambda w: ["train", w["recipe"], "train.steps=6",
                                         "task.max_operand=11"], r"(fingerprint|other data)"),
    ("rerun with a bad model path", lambda w: ["train", w["recipe"], "model.tiny=false",
                                               "model.path=/nowhere"], r"/nowhere"),
]

CASES = CONFIG_CASES + MODEL_CASES + DATA_CASES + RUN_CASES


def test_there_are_at_least_sixty_distinct_cases():
  names = [c[0] for c in CASES]
  assert len(set(names)) == len(names) >= 60


@pytest.mark.parametrize("name,argv,pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(world, name, argv, pattern):
  assert_one_clear_error(jaxpost(*argv(world)), pattern)


@pytest.fixture(scope="module")
def separate_runs(world):
  """The model and data cases, three at a time: each has its own run folder, and most of a
  case is starting Python and JAX, so they overlap well on two cores."""
  cases = MODEL_CASES + DATA_CASES
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    done = pool.map(lambda case: jaxpost(*case[1](world)), cases)
    return dict(zip((c[0] for c in cases), done))


@pytest.mark.slow
@pytest.mark.parametrize("name,pattern", [(c[0], c[2]) for c in MODEL_CASES + DATA_CASES],
                         ids=[c[0] for c in MODEL_CASES + DATA_CASES])
def test_model_and_data_errors(separate_runs, name, pattern):
  assert_one_clear_error(separate_runs[name], pattern)


@pytest.mark.slow
@pytest.mark.parametrize("name,argv,pattern", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_folder_errors(world, name, argv, pattern):
  """One at a time: several of them point at the same good run."""
  assert_one_clear_error(jaxpost(*argv(world)), pattern)


@pytest.mark.slow
def test_the_good_run_survives_every_bad_command(world):
  """Runs after the cases above (pytest keeps file order): the run's config is untouched, it
  exports, and it resumes from its last checkpoint."""
  run = world["run"]
  assert (run / "config.yaml").read_bytes() == world["config_bytes"]
  out = world["root"] / "exported"
  listing = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))  # noqa: E731
  before = listing()
  proc = jaxpost("export", run, "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / "final" / "model.safetensors").exists()
  assert listing() == before  # export reads the run and writes only into --out
  proc = jaxpost("train", world["recipe"], "train.steps=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and "at step 4" in proc.stdout


@pytest.mark.slow
def test_non_finite_final_steps_fail_the_run(world, tmp_path):
  """A run whose last steps were all skipped does not say it trained."""
  recipe = tmp_path / "nan.yaml"
  recipe.write_text(GOOD.format(algorithm="sft", run_dir=tmp_path / "run"))
  proc = jaxpost("train", recipe, "optim.lr=1e30", "optim.schedule=constant",
                 "train.max_bad_steps=0")
  assert_one_clear_error(proc, r"the last \d+ of 4 steps had a non-finite loss.*not applied")
  assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
def test_truncation_is_reported_with_rows_and_counted(tmp_path):
  recipe = tmp_path / "cut.yaml"
  recipe.write_text(GOOD.format(algorithm="sft", run_dir=tmp_path / "run"))
  proc = jaxpost("train", recipe, "data.seq_len=19", "data.pack=false", "train.steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"warning: \d+ of \d+ examples were longer than data.seq_len=19 tokens and "
                   r"were cut.*train\.jsonl row \d+", proc.stdout), proc.stdout[-3000:]
  first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["data/truncated_examples"] > 0 and first["data/dropped_examples"] == 0


def _flip_middle_of_largest_file(step_dir: Path) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  largest.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_loudly_or_stops_by_name(world, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(world["run"], copy)
  steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
  previous, latest = steps[-2:]  # the good run keeps its last two checkpoints
  _flip_middle_of_largest_file(copy / "checkpoints" / str(latest))
  more = f"train.steps={latest + 2}"
  strict = jaxpost("train", world["recipe"], f"run_dir={copy}", more,
                   "checkpoint.fallback_on_corrupt=false")
  assert_one_clear_error(strict, rf"checkpoint.*\b{latest}\b")
  assert (copy / "checkpoints" / str(latest)).exists()  # nothing renamed without the fallback
  proc = jaxpost("train", world["recipe"], f"run_dir={copy}", more)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and f"at step {previous}" in proc.stdout
  assert (f"warning: the checkpoints after step {previous} (up to step {latest}) could not be "
          "read") in proc.stdout
  assert (copy / "checkpoints" / f"{latest}.corrupt").exists()


def _small_tmpfs(folder: Path, options: str) -> None:
  folder.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")


@pytest.mark.slow
def test_a_full_disk_is_one_message(tmp_path):
  """The run folder on a 700 KiB tmpfs: the first checkpoint cannot be written."""
  mount = tmp_path / "small"
  _small_tmpfs(mount, "size=700k")
  try:
    recipe = tmp_path / "full.yaml"
    recipe.write_text(GOOD.format(algorithm="sft", run_dir=mount / "run"))
    proc = jaxpost("train", recipe, "checkpoint.every=1")
    assert_one_clear_error(proc, r"step 1 was not saved.*No space left on device.*free disk space")
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # at most orbax's one line
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_run_folder_is_one_message(tmp_path):
  mount = tmp_path / "ro"
  _small_tmpfs(mount, "ro,size=1m")
  try:
    recipe = tmp_path / "ro.yaml"
    recipe.write_text(GOOD.format(algorithm="sft", run_dir=mount / "run"))
    assert_one_clear_error(jaxpost("train", recipe), r"Read-only file system: .*ro/run.*run_dir")
  finally:
    subprocess.run(["umount", str(mount)], check=False)
