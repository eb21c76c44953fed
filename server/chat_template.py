"""Chat messages to prompt text, through the checkpoint's Jinja chat template.

    template = ChatTemplate(hello_reply.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
    prompt = template.render([{"role": "user", "content": "Hi"}])   # then tokenizer.encode_chat_prompt

The template runs the way `transformers`' `apply_chat_template` runs it, so a checkpoint
renders here exactly as it does there: a sandboxed, immutable Jinja environment with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that
leaves non-ASCII and HTML characters alone, and the globals `raise_exception` and
`strftime_now` (Llama 3.1 templates date their system prompt with it). Templates come
from checkpoints, i.e. from strangers, hence the sandbox.

Messages are validated before rendering, so a bad request fails with a `ChatTemplateError`
whose `param` names the field (`messages[2].content`) instead of as a template crash.
Only text is supported: no tools, no images or audio. A list of text parts is joined with
"\\n", as vLLM joins them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from splitinfer.protocol.errors import show

logger = logging.getLogger(__name__)

# Meta's Llama 3 Instruct template: BOS once, then header, trimmed content and <|eot_id|>
# per message, and an open assistant header when a reply is wanted.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ROLES = frozenset({"system", "user", "assistant"})
# OpenAI's newer API calls the system role "developer"; the model only knows "system".
ROLE_ALIASES = {"developer": "system"}
UNSUPPORTED_ROLES = frozenset({"tool", "function", "ipython"})
TEXT_PART_SEPARATOR = "\n"


class ChatTemplateError(ValueError):
    """A chat request the template cannot render. `param` names the offending field
    (`messages`, `messages[1].role`, `messages[0].content[2].type`); it is None only when the
    checkpoint's template itself does not compile, which is the server's problem, not the
    client's."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class ChatTemplate:
    """A chat template compiled once, rendered once per request."""

    __slots__ = ("_template", "_bos_token", "_eos_token", "_is_fallback")

    def __init__(self, template: str | None, bos_token: str, eos_token: str) -> None:
        """`template` is the checkpoint's (`HelloReply.chat_template`); None selects the Llama 3
        format. Raises `ChatTemplateError` (param None) when the template does not compile."""
        self._is_fallback = template is None
        if template is None:
            logger.info("the checkpoint has no chat template; using the Llama 3 Instruct format")
            template = LLAMA3_CHAT_TEMPLATE
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}", None) from None
        self._bos_token = bos_token
        self._eos_token = eos_token

    @property
    def is_fallback(self) -> bool:
        """True when the checkpoint had no template and the Llama 3 format is used."""
        return self._is_fallback

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for OpenAI-style chat messages.

        Raises `ChatTemplateError` naming the field for invalid or unsupported messages, and
        with param `messages` when the template rejects the conversation (a template's
        `raise_exception`, e.g. roles that do not alternate) or fails while rendering.
        """
        plain = normalize_messages(messages)
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                # Passed as None, as transformers does: templates test `tools is not none`,
                # which an undefined variable would pass.
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}", "messages") from None


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Validate OpenAI chat messages and reduce each to {"role", "content"} with string content.

    Raises `ChatTemplateError` naming the first bad field. Keys other than role and content
    (e.g. `name`) are not shown to the template.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of messages, got {type(messages).__name__}", "messages")
    if not messages:
        raise ChatTemplateError("messages must contain at least one message", "messages")
    return [_normalize_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _normalize_message(message: Any, where: str) -> dict[str, str]:
    if not isinstance(message, Mapping):
        _fail(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}", where)
    role = _role(message.get("role"), f"{where}.role")
    if message.get("tool_calls"):
        _fail(f"{where}.tool_calls: tool calls are not supported by this server", f"{where}.tool_calls")
    return {"role": role, "content": _content(message.get("content"), f"{where}.content")}


def _role(role: Any, where: str) -> str:
    if not isinstance(role, str):
        _fail(f"{where} must be a string, got {_show(role)}", where)
    role = ROLE_ALIASES.get(role, role)
    if role in UNSUPPORTED_ROLES:
        _fail(f"{where}: the role {role!r} is not supported by this server (no tool use)", where)
    if role not in ROLES:
        _fail(f"{where} must be one of 'system', 'user', 'assistant' or 'developer', got {role!r}", where)
    return role


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        _fail(f"{where} is missing or null; every message needs text content", where)
    if not isinstance(content, list):
        _fail(f"{where} must be a string or a list of text parts, got {type(content).__name__}", where)
    return TEXT_PART_SEPARATOR.join(_text_part(part, f"{where}[{j}]") for j, part in enumerate(content))


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, Mapping):
        _fail(f"{where} must be an object like {{'type': 'text', 'text': ...}}, got {type(part).__name__}", where)
    kind = part.get("type")
    if kind != "text":
        if not isinstance(kind, str):
            _fail(f"{where}.type must be a string, got {_show(kind)}", f"{where}.type")
        _fail(
            f"{where}.type: content parts of type {kind!r} are not supported; this model takes text only",
            f"{where}.type",
        )
    text = part.get("text")
    if not isinstance(text, str):
        _fail(f"{where}.text must be a string, got {_show(text)}", f"{where}.text")
    return text


def _fail(message: str, param: str) -> NoReturn:
    raise ChatTemplateError(message, param)


def _show(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {show(value)}"


# The environment ---------------------------------------------------------------------


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as it is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
