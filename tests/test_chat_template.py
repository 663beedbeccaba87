"""Tests of jaxpost.chat_template: real chat templates render exactly as in transformers."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxpost.chat_template import (ChatTemplateError, render_chat_template,
                                   render_chat_template_with_spans, select_chat_template)
from jaxpost.tokenizer import load_tokenizer
import tokenizer_fixtures as fx

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach the network

# name -> (tokenizer folder, template, extra template variables, conversations)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], list[list[dict[str, Any]]]]] = {
    # date_string pins the date the template would otherwise take from strftime_now.
    "llama3.2": ("llama3", fx.LLAMA32_TEMPLATE, {"date_string": "26 Jul 2024"},
                 [fx.SINGLE_TURN, fx.MULTI_TURN_WITH_SYSTEM, fx.FINISHED_WITH_SYSTEM]),
    # Without a system message, Qwen2.5 writes its default one.
    "qwen2.5": ("qwen", fx.QWEN25_TEMPLATE, {},
                [fx.SINGLE_TURN, fx.MULTI_TURN_WITH_SYSTEM, fx.FINISHED_WITH_SYSTEM]),
    # Gemma 3 merges the system message into the first user turn; assistant is "model".
    "gemma3": ("gemma", fx.GEMMA3_TEMPLATE, {},
               [fx.SINGLE_TURN, fx.MULTI_TURN_WITH_SYSTEM, fx.FINISHED_WITH_SYSTEM]),
    # Mistral v0.1 takes no system message (see the error tests).
    "mistral-v0.1": ("mistral", fx.MISTRAL_V01_TEMPLATE, {},
                     [fx.SINGLE_TURN, fx.MULTI_TURN, fx.FINISHED_WITH_SYSTEM[1:]]),
    # Mistral Nemo puts the system message into the last user turn.
    "mistral-nemo": ("mistral", fx.MISTRAL_NEMO_TEMPLATE, {},
                     [fx.SINGLE_TURN, fx.MULTI_TURN_WITH_SYSTEM, fx.FINISHED_WITH_SYSTEM]),
}
CASES = [(family, i, generation_prompt) for family, (_, _, _, chats) in FAMILIES.items()
         for i in range(len(chats)) for generation_prompt in (False, True)]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city <b>now</b>, e.g. \"Zürich\".",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CALL = {"name": "get_weather", "arguments": {"city": "Zürich <ZH>"}}
# Mistral Nemo wants 9-character call ids; Llama 3.2 reads only "function".
TOOL_CALL = {"role": "assistant",
             "tool_calls": [{"id": "call12345", "type": "function", "function": CALL}]}
TOOL_RESULT = {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("chat_tokenizers")
  return {"gemma": fx.make_sentencepiece(root / "gemma", "gemma"),
          "llama3": fx.make_hf_bpe(root / "llama3", "llama3"),
          "qwen": fx.make_hf_bpe(root / "qwen", "qwen"),
          "mistral": fx.make_hf_bpe(root / "mistral", "mistral")}


@pytest.fixture(scope="module")
def ours(folders: dict[str, Path]) -> dict[str, Any]:
  return {name: load_tokenizer(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def theirs(folders: dict[str, Path]) -> dict[str, Any]:
  pytest.importorskip("transformers")
  return {name: fx.transformers_tokenizer(folder) for name, folder in folders.items()}


# ------------------------------------------------------------------------------------------------
# Real templates against transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,chat,add_generation_prompt", CASES)
def test_render_matches_transformers(ours: dict[str, Any], theirs: dict[str, Any], family: str,
                                     chat: int, add_generation_prompt: bool) -> None:
  folder, template, extra, chats = FAMILIES[family]
  messages = chats[chat]
  kwargs = dict(chat_template=template, add_generation_prompt=add_generation_prompt, **extra)
  text = ours[folder].apply_chat_template(messages, **kwargs)
  expected = theirs[folder].apply_chat_template(messages, tokenize=False, **kwargs)
  assert text == expected
  # transformers 5 returns a BatchEncoding (a dict) from tokenize=True by default.
  expected_ids = theirs[folder].apply_chat_template(messages, tokenize=True, **kwargs)
  assert not isinstance(expected_ids, list)
  ids = ours[folder].apply_chat_template(messages, tokenize=True, **kwargs)
  assert ids == expected_ids["input_ids"]
  assert ids == theirs[folder].apply_chat_template(messages, tokenize=True, return_dict=False,
                                                   **kwargs)
  # The template writes BOS itself: tokenizing adds no second one.
  bos = ours[folder].bos_id
  if bos is not None:
    assert ids[0] == bos and ids[1] != bos


def test_render_matches_pretrained_tokenizer_fast(folders: dict[str, Path],
                                                  ours: dict[str, Any]) -> None:
  transformers = pytest.importorskip("transformers")
  ref = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(folders["llama3"] / "tokenizer.json"), chat_template=fx.LLAMA32_TEMPLATE,
      bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
  for add_generation_prompt in (False, True):
    for messages in (fx.SINGLE_TURN, fx.FINISHED_WITH_SYSTEM):
      kwargs = dict(add_generation_prompt=add_generation_prompt, date_string="26 Jul 2024")
      assert ours["llama3"].apply_chat_template(
          messages, chat_template=fx.LLAMA32_TEMPLATE, **kwargs) == ref.apply_chat_template(
              messages, tokenize=False, **kwargs)


def test_expected_shapes(ours: dict[str, Any]) -> None:
  """What the four families' prompts look like (independently of transformers)."""
  def render(folder: str, template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return ours[folder].apply_chat_template(messages, chat_template=template,
                                            add_generation_prompt=True, **kwargs)

  assert render("qwen", fx.QWEN25_TEMPLATE, fx.SINGLE_TURN) == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
      "<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n")
  assert render("gemma", fx.GEMMA3_TEMPLATE, [fx.SYSTEM, *fx.SINGLE_TURN]) == (
      "<bos><start_of_turn>user\nYou are a helpful assistant. Answer in one line.\n\n"
      "Hello, how are you?<end_of_turn>\n<start_of_turn>model\n")
  assert render("llama3", fx.LLAMA32_TEMPLATE, fx.SINGLE_TURN, date_string="1 Jan 2025") == (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
      "December 2023\nToday Date: 1 Jan 2025\n\n<|eot_id|><|start_header_id|>user"
      "<|end_header_id|>\n\nHello, how are you?<|eot_id|><|start_header_id|>assistant"
      "<|end_header_id|>\n\n")
  assert render("mistral", fx.MISTRAL_V01_TEMPLATE, fx.FINISHED_WITH_SYSTEM[1:3]) == (
      "<s>[INST] What is two plus three? [/INST]Two plus three is five.</s>")


def test_tools_and_tool_calls_match_transformers(ours: dict[str, Any],
                                                 theirs: dict[str, Any]) -> None:
  chat = [fx.SYSTEM, {"role": "user", "content": "Weather in Zürich?"}, TOOL_CALL, TOOL_RESULT]
  cases = [("qwen", fx.QWEN25_TEMPLATE, {}), ("mistral", fx.MISTRAL_NEMO_TEMPLATE, {}),
           ("llama3", fx.LLAMA32_TEMPLATE, {"date_string": "26 Jul 2024"})]
  for folder, template, extra in cases:
    kwargs = dict(chat_template=template, tools=TOOLS, add_generation_prompt=True, **extra)
    text = ours[folder].apply_chat_template(chat, **kwargs)
    assert text == theirs[folder].apply_chat_template(chat, tokenize=False, **kwargs)
    assert "Zürich" in text  # tojson keeps non-ASCII and does not escape HTML
  text = ours["llama3"].apply_chat_template(
      fx.SINGLE_TURN, chat_template=fx.LLAMA32_TEMPLATE, tools=TOOLS, date_string="x")
  assert '<b>now</b>' in text and '{\n    "type": "function",' in text  # tojson(indent=4)


def test_messages_are_prepared_as_in_transformers(ours: dict[str, Any],
                                                  theirs: dict[str, Any]) -> None:
  # None-valued keys are dropped: Llama 3.2 tests `'tool_calls' in message`.
  messages = [{"role": "user", "content": "hi", "tool_calls": None},
              {"role": "assistant", "content": "Fine.", "reasoning": "easy", "tool_calls": None}]
  template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.reasoning_content }}|"
              "{{ m.thinking }}|{{ 'tool_calls' in m }};{% endfor %}")
  text = ours["llama3"].apply_chat_template(messages, chat_template=template)
  assert text == theirs["llama3"].apply_chat_template(messages, chat_template=template,
                                                      tokenize=False)
  assert text == "user:hi|||False;assistant:Fine.|easy|easy|False;"
  kwargs = dict(chat_template=fx.LLAMA32_TEMPLATE, date_string="26 Jul 2024")
  assert ours["llama3"].apply_chat_template(messages, **kwargs) == theirs[
      "llama3"].apply_chat_template(messages, tokenize=False, **kwargs)


def test_continue_final_message_matches_transformers(ours: dict[str, Any],
                                                     theirs: dict[str, Any]) -> None:
  messages = [*fx.SINGLE_TURN, {"role": "assistant", "content": "I am fine, and "}]
  # Qwen keeps the trailing space of the open message; Gemma's template trims it.
  for folder, template, end in (
      ("qwen", fx.QWEN25_TEMPLATE, "<|im_start|>assistant\nI am fine, and "),
      ("gemma", fx.GEMMA3_TEMPLATE, "<start_of_turn>model\nI am fine, and")):
    kwargs = dict(chat_template=template, continue_final_message=True)
    text = ours[folder].apply_chat_template(messages, **kwargs)
    assert text == theirs[folder].apply_chat_template(messages, tokenize=False, **kwargs)
    assert text.endswith(end)
  with pytest.raises(ValueError, match="cannot both be set"):
    ours["qwen"].apply_chat_template(messages, continue_final_message=True,
                                     add_generation_prompt=True,
                                     chat_template=fx.QWEN25_TEMPLATE)


# ------------------------------------------------------------------------------------------------
# Template errors
# ------------------------------------------------------------------------------------------------


def test_mistral_raise_exception_is_a_value_error(ours: dict[str, Any],
                                                  theirs: dict[str, Any]) -> None:
  import jinja2  # pylint: disable=import-outside-toplevel

  tok = ours["mistral"]
  with pytest.raises(ValueError, match="Conversation roles must alternate user/assistant"):
    tok.apply_chat_template(fx.MULTI_TURN_WITH_SYSTEM, chat_template=fx.MISTRAL_V01_TEMPLATE)
  with pytest.raises(ChatTemplateError, match="After the optional system message"):
    tok.apply_chat_template([fx.SYSTEM, *fx.SINGLE_TURN, *fx.SINGLE_TURN],
                            chat_template=fx.MISTRAL_NEMO_TEMPLATE)
  with pytest.raises(ValueError, match="Only user and assistant roles are supported"):
    tok.apply_chat_template([*fx.SINGLE_TURN, {"role": "tool", "content": "a"}],
                            chat_template=fx.MISTRAL_V01_TEMPLATE)
  with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
    theirs["mistral"].apply_chat_template(fx.MULTI_TURN_WITH_SYSTEM, tokenize=False,
                                          chat_template=fx.MISTRAL_V01_TEMPLATE)
  with pytest.raises(ChatTemplateError, match="roles must alternate"):
    ours["gemma"].apply_chat_template(fx.SINGLE_TURN * 2, chat_template=fx.GEMMA3_TEMPLATE)


def test_invalid_and_unsafe_templates() -> None:
  with pytest.raises(ChatTemplateError, match="Invalid chat template"):
    render_chat_template("{% for m in messages %}", [])
  with pytest.raises(ChatTemplateError):  # the immutable sandbox refuses mutation
    render_chat_template("{% set x = [] %}{{ x.append(1) }}", [])
  with pytest.raises(ChatTemplateError, match="underscore-prefixed"):
    render_chat_template("{% set ns = namespace(_secret=1) %}", [])
  with pytest.raises(TypeError, match="JSON schemas"):
    render_chat_template("", [], tools=[print])


# ------------------------------------------------------------------------------------------------
# The environment
# ------------------------------------------------------------------------------------------------


def test_environment_features() -> None:
  messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
              {"role": "user", "content": "c"}]
  # trim_blocks / lstrip_blocks, loop controls
  template = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
              "{{ m.content }}\n{% endfor %}")
  assert render_chat_template(template, messages) == "a\nb\n"
  # tojson: no HTML escaping, non-ASCII kept, options
  assert render_chat_template("{{ x | tojson }}", [], x={"k": "<é>"}) == '{"k": "<é>"}'
  assert render_chat_template("{{ x | tojson(indent=2, sort_keys=True) }}", [],
                              x={"b": 1, "a": 2}) == '{\n  "a": 2,\n  "b": 1\n}'
  # strftime_now, dict, namespace
  before = datetime.datetime.now().strftime("%Y-%m-%d")
  today = render_chat_template("{{ strftime_now('%Y-%m-%d') }}", [])
  assert today in (before, datetime.datetime.now().strftime("%Y-%m-%d"))
  assert render_chat_template("{{ dict(a=1)['a'] }}{% set ns = namespace(n=0) %}"
                              "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                              "{{ ns.n }}", messages) == "13"
  # special tokens, overridden by extra variables
  assert render_chat_template("{{ bos_token }}{{ eos_token }}", [],
                              special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
                              eos_token="E") == "<s>E"
  # defaults seen by templates
  assert render_chat_template("{{ tools }} {{ documents }} {{ add_generation_prompt }}",
                              []) == "None None False"
  # only plain data reaches the template
  assert render_chat_template("{{ messages[0].n + 1 }} {{ messages[0].o }}",
                              [{"role": "user", "n": np.int64(3), "o": object()}]) == "4 <object>"


def test_llama_date_comes_from_strftime_now(ours: dict[str, Any]) -> None:
  before = datetime.datetime.now().strftime("%d %b %Y")
  text = ours["llama3"].apply_chat_template(fx.SINGLE_TURN, chat_template=fx.LLAMA32_TEMPLATE)
  after = datetime.datetime.now().strftime("%d %b %Y")
  assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text


GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_generation_spans(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
  messages = fx.FINISHED_WITH_SYSTEM
  text, spans = render_chat_template_with_spans(GENERATION_TEMPLATE, messages)
  assert [text[start:end] for start, end in spans] == [
      "Two plus three is five.<|im_end|>", "That is not a number: <think> no.<|im_end|>"]
  assert text == theirs["qwen"].apply_chat_template(messages, chat_template=GENERATION_TEMPLATE,
                                                    tokenize=False)
  # transformers' assistant mask covers exactly the tokens of those spans.
  out = theirs["qwen"].apply_chat_template(messages, chat_template=GENERATION_TEMPLATE,
                                           return_assistant_tokens_mask=True)
  ids, mask = out["input_ids"], out["assistant_masks"]
  masked = ours["qwen"].decode([i for i, m in zip(ids, mask) if m])
  assert masked == "".join(text[start:end] for start, end in spans)


def test_select_chat_template() -> None:
  templates = {"default": "D", "tool_use": "T"}
  assert select_chat_template(templates) == "D"
  assert select_chat_template(templates, has_tools=True) == "T"
  assert select_chat_template(templates, "tool_use") == "T"
  assert select_chat_template(templates, "{{ 'x' }}") == "{{ 'x' }}"
  assert select_chat_template({"only": "O"}, "only") == "O"
  with pytest.raises(ValueError, match="several chat templates and no default"):
    select_chat_template({"a": "A", "b": "B"})
  with pytest.raises(ValueError, match="no chat template"):
    select_chat_template({})
