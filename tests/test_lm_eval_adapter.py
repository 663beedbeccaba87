"""lm-eval on jaxpost (`jaxpost.eval.lm_eval_adapter`) against lm-eval's own HF backend (HFLM)
on the same tiny random Llama: raw log-likelihoods, rolling log-likelihoods, greedy
generations and task metrics agree."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tokenizer_fixtures  # noqa: E402
from jaxpost.eval.engine import EvalModel  # noqa: E402
from jaxpost.eval.lm_eval_adapter import JaxpostLM, run_lm_eval  # noqa: E402
from jaxpost.models import load_hf  # noqa: E402
from jaxpost.tokenizer import load_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

MAX_LENGTH = 48  # short, so long rows are cut and texts span several rolling windows
TOL = 1e-4
GEN = 10  # max_gen_toks

MC = [("the quick brown fox", ["jumps", "sleeps", "answer five", "is helpful"], 0),
      ("what is two plus three", [" five", " two", " the dog", " hello"], 0),
      ("hello world ", ["model", "user", "assistant", "system"], 2),
      ("you are", [" helpful", " lazy", " a dog", " fine thanks"], 0),
      ("the lazy dog", [" jumps over", " is", " says hello", " fine"], 1),
      ("chat template", [" jax", " post training", " tokenizer", " what"], 1),
      ("how are you", [" fine thanks", " the fox", " answer", " five"], 0),
      ("a brown", [" fox", " dog", " model", " world"], 0)]
TEXTS = ["the quick brown fox jumps over a lazy dog " * 4,
         "hello world",
         " ".join(tokenizer_fixtures.corpus(12, seed=3))]


def _task_yamls(root):
  data = root / "data"
  data.mkdir()
  with open(data / "mc.jsonl", "w") as f:
    for q, choices, label in MC:
      f.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
  with open(data / "text.jsonl", "w") as f:
    for text in TEXTS:
      f.write(json.dumps({"text": text, "question": text[:30], "answer": "fox"}) + "\n")
  common = "dataset_path: json\ntest_split: train\n"
  (root / "tiny_mc.yaml").write_text(
      f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {data / 'mc.jsonl'}\n"
      "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
      "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  (root / "tiny_ppl.yaml").write_text(
      f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files: {data / 'text.jsonl'}\n"
      "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
      "  - metric: bits_per_byte\n")
  (root / "tiny_gen.yaml").write_text(
      f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files: {data / 'text.jsonl'}\n"
      "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
      f"generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: {GEN}\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")
  return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random transformers Llama (2 layers, width 64) with a Llama 3 style BPE tokenizer
  (BOS added by its post-processor; EOS <|eot_id|>, also stopping at <|end_of_text|>)."""
  path = tokenizer_fixtures.make_hf_bpe(tmp_path_factory.mktemp("lm"), "llama3")
  tok = load_tokenizer(path)
  generation = json.loads((path / "generation_config.json").read_text())
  config = transformers.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
      tie_word_embeddings=False, bos_token_id=tok.bos_id,
      eos_token_id=generation["eos_token_id"], initializer_range=0.1)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).to(torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
  return _task_yamls(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def engine(folder):
  config, params = load_hf(folder)
  return EvalModel(config, params, load_tokenizer(folder), batch_size=8,
                   max_length=MAX_LENGTH + 1)


@pytest.fixture(scope="module")
def ours(engine):
  return JaxpostLM(engine)


@pytest.fixture(scope="module")
def hf(folder):
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel

  return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=8,
              max_length=MAX_LENGTH)


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_ARGS = [
    ("Question: the quick brown fox\nAnswer:", " jumps"),
    ("hello world ", "model"),                      # trailing space moves to the continuation
    ("", "the quick brown fox"),                     # empty context: BOS
    ("<|begin_of_text|>what is", " two plus three"),  # BOS already written: not added again
    ("you are <|eot_id|> the", " answer is five"),   # a special token inside
    (" ".join(TEXTS[:1] * 2), " the lazy dog"),       # longer than max_length: cut on the left
    ("café naïve", " 日本語 🙂"),
]


def test_encoding_matches_hf(ours, hf):
  assert ours.max_length == hf.max_length == MAX_LENGTH
  assert ours.prefix_token_id == hf.prefix_token_id
  assert ours.eot_token_id == hf.eot_token_id
  for context, continuation in LL_ARGS[:2] + LL_ARGS[3:]:
    assert ours._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
  for text in TEXTS + ["<|begin_of_text|>hi"]:
    assert ours.tok_encode(text) == hf.tok_encode(text)


def test_loglikelihood_matches_hf(ours, hf):
  args = LL_ARGS + [(f"Question: {q}\nAnswer:", f" {c.strip()}") for q, cs, _ in MC for c in cs]
  got = ours.loglikelihood(_requests("loglikelihood", args))
  want = hf.loglikelihood(_requests("loglikelihood", args))
  diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
  print(f"max |loglikelihood - HFLM| = {diff:.2e} over {len(args)} requests")
  assert diff < TOL
  assert [g for _, g in got] == [g for _, g in want]


def test_loglikelihood_rolling_matches_hf(ours, hf):
  args = [(t,) for t in TEXTS]
  assert len(ours.tok_encode(TEXTS[2])) > 2 * MAX_LENGTH  # several windows
  got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
  want = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", args))
  diff = max(abs(a - b) for a, b in zip(got, want))
  print(f"max |rolling loglikelihood - HFLM| = {diff:.2e} (totals {want})")
  # Totals near -1000 are float32 sums of windows (both backends), spaced 6e-5 apart: TOL,
  # or 1e-6 of the total where that is more.
  assert got == pytest.approx(want, rel=1e-6, abs=TOL)


def test_generate_until_matches_hf(ours, hf):
  # One generation length throughout the tests: each compiles its own program.
  greedy = {"until": ["."], "max_gen_toks": GEN, "do_sample": False}
  args = [(t[:40], greedy) for t in TEXTS] + [
      ("what is two plus three", {"until": ["\n", " fox"], "max_gen_toks": GEN}),
      ("hello", {"max_gen_toks": GEN, "temperature": 0.0}),
      (" ".join(TEXTS[:1] * 2), {"until": "dog", "max_new_tokens": GEN})]  # cut on the left
  got = ours.generate_until(_requests("generate_until", args))
  want = hf.generate_until(_requests("generate_until", args))
  print("generations:", got)
  assert got == want
  assert any(got)


def test_tasks_match_hf(engine, hf, tasks_dir):
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  tasks = ["tiny_mc", "tiny_ppl", "tiny_gen"]
  got = run_lm_eval(engine, tasks, include_path=str(tasks_dir))
  only_ours = TaskManager(include_path=str(tasks_dir), include_defaults=False)  # fast
  res = lm_eval.simple_evaluate(model=hf, tasks=tasks, bootstrap_iters=0, task_manager=only_ours)
  want = {f"{t}/{k.removesuffix(',none')}": v for t, m in res["results"].items()
          for k, v in m.items() if "_stderr" not in k and k != "sample_len"
          and isinstance(v, (int, float))}
  print("ours:", got, "\nHFLM:", want)
  assert set(got) == set(want) >= {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ppl/word_perplexity",
                                   "tiny_gen/exact_match"}
  for key in ("tiny_mc/acc", "tiny_mc/acc_norm", "tiny_gen/exact_match"):
    assert got[key] == want[key], key
  for key in ("tiny_ppl/word_perplexity", "tiny_ppl/byte_perplexity", "tiny_ppl/bits_per_byte"):
    assert got[key] == pytest.approx(want[key], rel=1e-5), key


@pytest.mark.slow  # lm-eval's CLI indexes all its tasks
def test_registered_for_the_cli(folder, tasks_dir, ours, capsys):
  from lm_eval.api.registry import get_model  # pylint: disable=import-outside-toplevel
  from jaxpost.eval import lm_eval_adapter  # pylint: disable=import-outside-toplevel

  lm = get_model("jaxpost").create_from_arg_string(
      f"pretrained={folder},max_length={MAX_LENGTH}", {"batch_size": 8, "device": None})
  assert isinstance(lm, JaxpostLM) and lm.model.batch_size == 8
  args = _requests("loglikelihood", LL_ARGS[:3])
  assert lm.loglikelihood(args) == ours.loglikelihood(args)  # same model, same programs
  lm_eval_adapter.main(["--model", "jaxpost", "--model_args", f"pretrained={folder},batch_size=8",
                        "--tasks", "tiny_mc", "--include_path", str(tasks_dir), "--limit", "4"])
  assert "tiny_mc" in capsys.readouterr().out
