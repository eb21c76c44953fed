"""Chat messages to prompt text, through the chat template the engine serves.

    template = ChatTemplate.for_model(hello_reply.chat_template, tokenizer)  # None: chat is refused
    prompt = template.render([{"role": "user", "content": "Hi"}])   # then tokenizer.encode_chat_prompt

The template compiles and runs in the environment `protocol/chat_template.py` owns, the
one transformers' `apply_chat_template` uses, with the tokenizer's named special tokens
(`bos_token`, `eos_token`, `pad_token`, ...) as variables, absent ones undefined.

A checkpoint without a template gets Llama 3's format when its tokenizer is recognisably
Llama 3's (the header and eot tokens); any other gets none (`for_model` returns None) and
its chat requests are refused, as a guessed format would only produce garbage.

Messages are validated before rendering, so a bad request fails with a `ChatTemplateError`
whose `param` names the field (`messages[2].content`) instead of as a template crash.
Only text is supported: no tools, no images or audio. A list of text parts is joined with
"\\n", as vLLM joins them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from splitinfer.protocol.chat_template import ChatTemplateError, compile_chat_template
from splitinfer.protocol.errors import show
from splitinfer.protocol.tokenizer import Tokenizer

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

# Tokens only Llama 3's vocabulary has: a checkpoint with all of them speaks the format above.
LLAMA3_FORMAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

ROLES = frozenset({"system", "user", "assistant"})
# OpenAI's newer API calls the system role "developer"; the model only knows "system".
ROLE_ALIASES = {"developer": "system"}
UNSUPPORTED_ROLES = frozenset({"tool", "function", "ipython"})
TEXT_PART_SEPARATOR = "\n"


class ChatTemplate:
    """A chat template compiled once, rendered once per request."""

    __slots__ = ("_template", "_special_tokens", "_is_fallback")

    def __init__(self, source: str, special_tokens: Mapping[str, str], is_fallback: bool = False) -> None:
        """`source` is the template's text, `special_tokens` the tokenizer's named special tokens
        (`Tokenizer.special_tokens_map`). Raises `ChatTemplateError` (param None) when the
        template does not compile."""
        self._template = compile_chat_template(source)
        self._special_tokens = dict(special_tokens)
        self._is_fallback = is_fallback

    @classmethod
    def for_model(cls, source: str | None, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The template to serve: `source` (`HelloReply.chat_template`) if there is one, else
        Llama 3's format for a Llama 3 tokenizer, else None (chat is refused)."""
        if source is not None:
            return cls(source, tokenizer.special_tokens_map)
        if not all(tokenizer.token_to_id(token) is not None for token in LLAMA3_FORMAT_TOKENS):
            logger.warning("the engine serves no chat template and the tokenizer is not Llama 3's: chat is refused")
            return None
        logger.info("the engine serves no chat template; the tokenizer is Llama 3's, so using the Llama 3 format")
        return cls(LLAMA3_CHAT_TEMPLATE, tokenizer.special_tokens_map, is_fallback=True)

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
                # Passed as None, as transformers does: templates test `tools is not none`,
                # which an undefined variable would pass.
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
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
