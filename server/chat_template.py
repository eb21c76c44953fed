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
whose `param` names the field (`messages[2].content`,
`messages[1].tool_calls[0].function.arguments`) instead of as a template crash. Text only: no
images or audio. A list of text parts is joined with "\\n", as vLLM joins them.

Tools are OpenAI's: `render(..., tools=...)` passes the request's `tools` list to the template
as `apply_chat_template(tools=...)` does (None when there are none). An assistant message may
carry `tool_calls` (then its content may be null or absent), and a `tool` message answers one
with its `tool_call_id`. Each message reaches the template as transformers 5 hands it over:
keys whose value is null are left out (so a tool-calling turn without text has no `content`),
and, as vLLM does, each call's `arguments` text is parsed into a dict, since real templates
write it with `| tojson` or walk its items. The legacy `function` role and `function_call`
field are refused.
"""

from __future__ import annotations

import json
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
from splitinfer.server.errors import APIError
from splitinfer.server.json_body import check_values

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

ROLES = frozenset({"system", "user", "assistant", "tool"})
# OpenAI's newer API calls the system role "developer"; the model only knows "system".
ROLE_ALIASES = {"developer": "system"}
# Roles a client might send that no template should see, and what to send instead.
REFUSED_ROLES = {
    "function": "the legacy 'function' role is not supported; send a function's result as a 'tool' message "
    "with the tool_call_id it answers",
    "ipython": "'ipython' is how Llama templates write tool results, not a request's role; send them as 'tool' "
    "messages",
}
TEXT_PART_SEPARATOR = "\n"


class ChatTemplate:
    """A chat template compiled once, rendered once per request."""

    __slots__ = ("source", "_template", "_special_tokens", "_is_fallback")

    def __init__(self, source: str, special_tokens: Mapping[str, str], is_fallback: bool = False) -> None:
        """`source` is the template's text, `special_tokens` the tokenizer's named special tokens
        (`Tokenizer.special_tokens_map`). Raises `ChatTemplateError` (param None) when the
        template does not compile."""
        self.source = source  # the template's text, as /tokenizer_info reports it
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

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        """The prompt text for OpenAI-style chat messages and, if any, the request's `tools`
        (`[{"type": "function", "function": {"name", "description", "parameters"}}]`).

        `continue_final_message`: the text ends inside the last message, right after its
        content, so the model continues it (a reply begun by the client); it excludes
        `add_generation_prompt`, as in transformers.

        Raises `ChatTemplateError` naming the field for invalid or unsupported messages or
        tools, and with param `messages` when the template rejects the conversation (a
        template's `raise_exception`, e.g. roles that do not alternate, or a Mistral tool call
        id that is not 9 characters long) or fails while rendering.
        """
        plain = normalize_messages(messages)
        if continue_final_message and add_generation_prompt:
            _fail(
                "'continue_final_message' and 'add_generation_prompt' cannot both be true: the first continues the "
                "last message, the second starts a new one",
                "continue_final_message",
            )
        try:
            rendered = self._template.render(
                messages=plain,
                # None when there are none, as transformers passes it: templates test
                # `tools is not none`, which an undefined variable would pass.
                tools=normalize_tools(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}", "messages") from None
        return _cut_after_final_message(rendered, plain[-1]) if continue_final_message else rendered


def _cut_after_final_message(rendered: str, final: Mapping[str, Any]) -> str:
    """`rendered` up to the end of the final message's content, as transformers cuts it: at the
    content's last occurrence, keeping its trailing whitespace only where the template did."""
    content = final.get("content") or ""
    if not content.strip() or content.strip() not in rendered:
        _fail(
            "'continue_final_message' needs a final message with text that the chat template writes out",
            "messages",
        )
    stripped = content.strip()
    at = rendered.rindex(stripped)
    keep = len(content) if rendered[at:].strip() == stripped else len(stripped)
    return rendered[: at + keep]


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate OpenAI chat messages and reduce each to what the template may see.

    Every message has its `role` (developer as system) and, but for an assistant turn that
    only calls tools, its `content` as a string. An assistant message may add `tool_calls`
    (`{"id", "type": "function", "function": {"name", "arguments": dict}}` each); a tool
    message adds `tool_call_id` and, if given, `name`. Raises `ChatTemplateError` naming the
    first bad field. Other keys (e.g. a user's `name`) are not shown to the template.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of messages, got {type(messages).__name__}", "messages")
    if not messages:
        raise ChatTemplateError("messages must contain at least one message", "messages")
    return [_normalize_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def normalize_tools(tools: Any) -> list[Any] | None:
    """The request's tools as the template gets them: None when there are none (an empty list
    too, which a template would otherwise announce as an empty tool list), else the list as
    sent, once each entry is checked to be a function tool with a name."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        _fail(f"tools must be a list of tools, got {type(tools).__name__}", "tools")
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            _fail(f"{where} must be an object like {{'type': 'function', 'function': ...}}, got {_show(tool)}", where)
        if tool.get("type") != "function":
            _fail(f"{where}.type must be 'function', got {_show(tool.get('type'))}", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            _fail(f"{where}.function must be an object, got {_show(function)}", f"{where}.function")
        if not isinstance(function.get("name"), str):
            _fail(
                f"{where}.function.name must be a string, got {_show(function.get('name'))}", f"{where}.function.name"
            )
    return list(tools) or None


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        _fail(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}", where)
    role = _role(message.get("role"), f"{where}.role")
    if message.get("function_call") is not None:
        _fail(
            f"{where}.function_call: the legacy function_call is not supported; send the call in tool_calls",
            f"{where}.function_call",
        )
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":  # None and [] mean none, on any message
        _fail(f"{where}.tool_calls: only assistant messages can call tools, not {role!r} ones", f"{where}.tool_calls")
    plain: dict[str, Any] = {"role": role}
    content = message.get("content")
    if content is None and role == "assistant" and not tool_calls:
        _fail(f"{where}.content is missing or null; an assistant message needs text or tool_calls", f"{where}.content")
    if content is not None or role != "assistant":
        plain["content"] = _content(content, f"{where}.content")
    if role == "assistant" and tool_calls is not None:
        if not isinstance(tool_calls, list):
            _fail(f"{where}.tool_calls must be a list of tool calls, got {_show(tool_calls)}", f"{where}.tool_calls")
        if tool_calls:
            plain["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(tool_calls)]
    if role == "tool":
        plain["tool_call_id"] = _string(message.get("tool_call_id"), f"{where}.tool_call_id")
        if message.get("name") is not None:
            plain["name"] = _string(message.get("name"), f"{where}.name")
    return plain


def _role(role: Any, where: str) -> str:
    if not isinstance(role, str):
        _fail(f"{where} must be a string, got {_show(role)}", where)
    role = ROLE_ALIASES.get(role, role)
    if role in REFUSED_ROLES:
        _fail(f"{where}: {REFUSED_ROLES[role]}", where)
    if role not in ROLES:
        _fail(f"{where} must be one of 'system', 'developer', 'user', 'assistant' or 'tool', got {role!r}", where)
    return role


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        _fail(
            f"{where} must be an object like {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
            f"'arguments': ...}}}}, got {_show(call)}",
            where,
        )
    call_id = _string(call.get("id"), f"{where}.id")
    kind = call.get("type", "function")
    if kind != "function":
        _fail(f"{where}.type must be 'function', got {_show(kind)}", f"{where}.type")
    function = call.get("function")
    if not isinstance(function, Mapping):
        _fail(
            f"{where}.function must be an object with 'name' and 'arguments', got {_show(function)}",
            f"{where}.function",
        )
    name = _string(function.get("name"), f"{where}.function.name")
    arguments = _arguments(function.get("arguments"), f"{where}.function.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments(text: Any, where: str) -> dict[str, Any]:
    """A call's arguments, JSON object text as OpenAI sends them, as the dict templates expect."""
    if not isinstance(text, str):
        _fail(f"{where} must be a string holding a JSON object, got {_show(text)}", where)
    try:
        value = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        _fail(f"{where} is nested too deeply to be read", where)
    except ValueError as exc:
        _fail(f"{where} must be a JSON object as text, but it is not JSON: {exc}", where)
    if not isinstance(value, dict):
        _fail(f"{where} must be a JSON object as text, got JSON of type {type(value).__name__}", where)
    try:
        # What the request body is held to (json_body.py): no lone surrogates, which the
        # tokenizer cannot encode, and a bounded depth, which `tojson` can write.
        check_values(value)
    except APIError as exc:
        _fail(f"{where}: {exc.message.replace('the body', 'the JSON it holds')}", where)
    return value


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        _fail(f"{where} must be a string, got {_show(value)}", where)
    return value


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
