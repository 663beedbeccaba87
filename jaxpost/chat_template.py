"""Chat templates: render a conversation to a prompt string with Jinja2, as transformers does.

Chat templates are Jinja programs shipped with a model (in `tokenizer_config.json` or a
`chat_template.jinja` file), so they are untrusted code. They run in Jinja's immutable sandbox,
configured exactly as transformers configures it (`transformers/utils/chat_template_utils.py`,
`_compile_jinja_template` and `render_jinja_template`), so a template renders to the same string
in jaxpost and in transformers:

* `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
  `loopcontrols` extension (`{% break %}`, `{% continue %}`) and a `{% generation %}` block
  that marks assistant text (its character spans are returned by
  `render_chat_template_with_spans`);
* a `tojson` filter that does not escape HTML (`json.dumps(..., ensure_ascii=False)`) and
  takes `indent`, `separators`, `sort_keys`;
* globals `raise_exception(message)`, `strftime_now(format)`, a restricted `dict` and a
  `namespace` that refuses underscore-prefixed attributes;
* variables `messages`, `add_generation_prompt`, `tools`, `documents`, the tokenizer's named
  special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) and any extra
  keyword arguments, which override the special tokens.

Messages are prepared as transformers prepares them: keys whose value is None are dropped, every
value the template sees is rebuilt from plain JSON types, and a message's reasoning given as
`reasoning_content`, `thinking` or `reasoning` is visible under `reasoning_content` and
`thinking`. Example:

  >>> render_chat_template(
  ...     "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
  ...     [{"role": "user", "content": "hi"}], special_tokens={"bos_token": "<s>"})
  '<s><user>hi'

A template error (a `raise_exception` call, a syntax error, a sandbox violation) is raised as
`ChatTemplateError`, a `ValueError` that carries the template's message.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np

Message = Mapping[str, Any]

# Names a message's reasoning is passed under; the first is the one chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Older Jinja releases have known sandbox escapes, and chat templates are untrusted code.
_MIN_JINJA = (3, 1, 6)


class ChatTemplateError(ValueError):
  """A chat template failed: it called `raise_exception`, or is invalid or unsafe."""


# ---------------------------------------------------------------------------------------------
# The Jinja environment
# ---------------------------------------------------------------------------------------------

# (rendered blocks so far, generation spans) while `render_chat_template_with_spans` runs.
_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = (
    contextvars.ContextVar("jaxpost_chat_template_tracking", default=None))


class _GenerationExtension(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: renders its body and records its span."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    call = self.call_method("_render_generation")
    return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

  def _render_generation(self, caller: Any) -> str:
    text = caller()
    tracking = _TRACKING.get()
    if tracking is not None:
      blocks, spans = tracking
      start = sum(len(block) for block in blocks)
      spans.append((start, start + len(text)))
    return text


class _TemplateDict:
  """`dict` for templates: calls and `fromkeys` only, no attribute access to the type."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace` for templates: refuses underscore-prefixed attribute names."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # pylint: disable=no-self-argument
    # Same signature trick as Jinja's Namespace, so that `namespace(self=...)` works.
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"Chat templates cannot store underscore-prefixed attributes on a namespace, got "
          f"{name!r}.")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # pylint: disable=redefined-builtin
  return datetime.datetime.now().strftime(format)


def _check_jinja_version() -> None:
  version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
  if version < _MIN_JINJA:
    raise ImportError(f"Chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA))} (older "
                      f"releases have sandbox escapes); found {jinja2.__version__}.")


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
  """Compiles `template` in the sandboxed environment described in the module docstring.

  Compiled templates are cached by their source. Raises `ChatTemplateError` on a syntax error.
  """
  _check_jinja_version()
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationExtension, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"Invalid chat template: {e}") from e


# ---------------------------------------------------------------------------------------------
# Preparing the inputs
# ---------------------------------------------------------------------------------------------


def _to_dicts(value: Any) -> Any:
  """Message objects (dataclasses, pydantic models) and the objects inside them -> dicts."""
  if isinstance(value, Mapping):
    return {key: _to_dicts(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_to_dicts(item) for item in value]
  if isinstance(value, tuple):
    return tuple(_to_dicts(item) for item in value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if callable(getattr(value, "model_dump", None)):
    return _to_dicts(value.model_dump())
  return value


def _plain(value: Any) -> Any:
  """Rebuilds `value` from plain JSON types; anything else becomes an inert "<TypeName>".

  The sandbox does not know which methods of arbitrary objects are dangerous, so templates only
  ever see str, int, float, bool, None, dicts, lists and tuples.
  """
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(key): _plain(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_plain(item) for item in value]
  if isinstance(value, tuple):
    return tuple(_plain(item) for item in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if callable(getattr(value, "model_dump", None)):
    return _plain(value.model_dump())
  return f"<{type(value).__name__}>"


def _prepare_messages(messages: Sequence[Message] | Any) -> list[dict[str, Any]]:
  """Messages -> fresh plain dicts, None-valued keys dropped, reasoning fields aliased."""
  messages = _to_dicts(getattr(messages, "messages", messages))
  prepared = []
  for message in messages:
    if not isinstance(message, dict):
      raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, got "
                      f"{message!r}.")
    message = _plain({key: value for key, value in message.items() if value is not None})
    reasoning = next((message[key] for key in _REASONING_FIELDS
                      if message.get(key) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    prepared.append(message)
  return prepared


def _prepare_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
  if tools is None:
    return None
  for tool in tools:
    if not isinstance(tool, Mapping):
      raise TypeError(f"Tools should be JSON schemas (dicts), got {tool!r}. jaxpost does not "
                      "convert Python functions to schemas.")
  return _plain(list(tools))


def _prepare_documents(documents: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
  if documents is None:
    return None
  for document in documents:
    if not isinstance(document, Mapping):
      raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys.")
  return _plain(list(documents))


def _tag_final_message(messages: list[dict[str, Any]], field: bool | str,
                       template: str) -> tuple[str, list[dict[str, Any]]]:
  """Appends the continue tag to the final message's `field`; returns the untagged text."""
  if not messages:
    raise ValueError("continue_final_message is set but the conversation is empty.")
  field = field if isinstance(field, str) else "content"
  final = messages[-1].get(field)
  if final is None:
    raise ValueError(f'continue_final_message is set but the final message has no "{field}" '
                     "to continue.")
  fields = [field]
  if field in _REASONING_FIELDS:
    fields = [name for name in _REASONING_FIELDS if messages[-1].get(name) == final]
  if not any(name in template for name in fields):
    raise ValueError(f'continue_final_message is set to "{field}" but the chat template does '
                     "not read that field.")
  if isinstance(final, (list, tuple)):
    for block in reversed(final):
      if "text" in block:
        text = block["text"]
        block["text"] = text + _CONTINUE_TAG
        return text, messages
    raise ValueError("continue_final_message is set but the final message has no text block.")
  for name in fields:
    messages[-1][name] = messages[-1][name] + _CONTINUE_TAG
  return final, messages


def _cut_at_tag(rendered: str, final: str) -> str:
  """Cuts the rendering right after the continued message (where the tag was)."""
  tag = _CONTINUE_TAG.strip()
  if final.strip() not in rendered or tag not in rendered:
    raise ValueError("continue_final_message is set but the final message does not appear in "
                     "the rendered chat: the template changes or drops it.")
  at = rendered.rindex(tag)
  if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
    return rendered[:at]
  return rendered[:at].rstrip()  # the template trimmed the message's trailing whitespace


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _track(blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
  token = _TRACKING.set((blocks, spans))
  try:
    yield
  finally:
    _TRACKING.reset(token)


def render_chat_template_with_spans(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **extra: Any,
) -> tuple[str, list[tuple[int, int]]]:
  """Like `render_chat_template`, also returning the `{% generation %}` spans.

  Returns `(text, spans)`: `spans` are `(start, end)` character offsets into `text` of every
  `{% generation %}` block the template rendered (in templates that mark assistant text this
  way, the assistant turns), in order. Spans beyond a continued final message are clipped.
  """
  if continue_final_message and add_generation_prompt:
    raise ValueError("continue_final_message and add_generation_prompt cannot both be set: "
                     "continue the final message, or start a new assistant message.")
  compiled = compile_chat_template(template)
  chat = _prepare_messages(messages)
  final = None
  if continue_final_message:
    final, chat = _tag_final_message(chat, continue_final_message, template)
  variables = _plain({**(special_tokens or {}), **extra})
  blocks: list[str] = []
  spans: list[tuple[int, int]] = []
  try:
    with _track(blocks, spans):
      for block in compiled.generate(
          messages=chat, tools=_prepare_tools(tools), documents=_prepare_documents(documents),
          add_generation_prompt=add_generation_prompt, **variables):
        blocks.append(block)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"Chat template error: {e}") from e
  text = "".join(blocks)
  if final is not None:
    text = _cut_at_tag(text, final)
    spans = [(start, min(end, len(text))) for start, end in spans if start < len(text)]
  return text, spans


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **extra: Any,
) -> str:
  """Renders one conversation with a chat template, exactly as transformers would.

  Args:
    template: the Jinja source of the chat template.
    messages: the conversation: dicts with at least "role" and "content".
    add_generation_prompt: append the header that starts an assistant turn (if the template
      supports it).
    continue_final_message: leave the final message open so the model continues it (prefill):
      the rendering is cut right after that message's text. A string names the field to
      continue (default "content"). Incompatible with `add_generation_prompt`.
    tools: JSON schemas of the tools the model may call.
    documents: documents for retrieval-augmented templates (dicts with "title" and "text").
    special_tokens: the tokenizer's named special tokens as strings, e.g.
      `{"bos_token": "<s>", "eos_token": "</s>"}`.
    **extra: further template variables (e.g. `enable_thinking=False`, `date_string=...`);
      they override `special_tokens` of the same name.

  Returns:
    The rendered prompt.

  Raises:
    ChatTemplateError: the template called `raise_exception` or is invalid.
  """
  text, _ = render_chat_template_with_spans(
      template, messages, add_generation_prompt=add_generation_prompt,
      continue_final_message=continue_final_message, tools=tools, documents=documents,
      special_tokens=special_tokens, **extra)
  return text


def select_chat_template(templates: Mapping[str, str], name: str | None = None, *,
                         has_tools: bool = False) -> str:
  """Picks a template from a model's named templates, as transformers does.

  `name` may name one of `templates` or be a template's source itself. Without a name, the
  "tool_use" template is picked when tools are given and it exists, else "default".
  """
  if name is not None:
    return templates.get(name, name)
  if has_tools and "tool_use" in templates:
    return templates["tool_use"]
  if "default" in templates:
    return templates["default"]
  if not templates:
    raise ValueError("This tokenizer has no chat template (none in tokenizer_config.json or "
                     "chat_template.jinja); pass one as `chat_template=`.")
  raise ValueError(f"This tokenizer has several chat templates and no default; pass one of "
                   f"{sorted(templates)} as `chat_template=`.")
