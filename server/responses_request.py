"""A Responses API request (`POST /v1/responses`) as the chat request it amounts to.

The Responses API says what chat says in other words: `input` (a string, or items: messages
with text parts, `function_call` and `function_call_output`) and `instructions` are the
conversation; `max_output_tokens`, flat function `tools`, `tool_choice` and `text.format`
are chat's `max_completion_tokens`, `tools`, `tool_choice` and `response_format`. So a
request is translated into a chat body and validated by `parse_chat`, and it then runs
exactly as a chat request would: the same template, tool-call grammar and parser, and
constraint. An error found on the chat side is renamed to the Responses field
(`responses_error`), so a client reads the parameter it sent.

Our servers keep no state: `previous_response_id`, `conversation`, `background`, stored
prompts and `item_reference` items need responses kept between requests, and are refused
with a 400 that says so. `store` is accepted and the response says `store: false`.
Features our models do not have (reasoning, hosted tools, image and file inputs) are
refused naming the parameter; fields that only steer OpenAI's service (`service_tier`,
`prompt_cache_key`, `safety_identifier`, `user`) are accepted and do nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from splitinfer.protocol.errors import show
from splitinfer.server.errors import APIError, bad_request
from splitinfer.server.openai_params import EXTRA_SAMPLING_FIELDS, ChatRequest, parse_chat, typed_field

STATELESS = (
    "this server keeps no responses: each request must carry the whole conversation in 'input' "
    "(earlier outputs included, as items)"
)
# Fields that need responses kept between requests.
REFUSED_STATEFUL = {
    "previous_response_id": "'previous_response_id' is not supported: " + STATELESS,
    "conversation": "'conversation' is not supported: " + STATELESS,
    "prompt": "'prompt' (a stored prompt template) is not supported: " + STATELESS,
}
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# vLLM's sampling extensions, passed on as chat takes them.
PASSED_THROUGH = (*EXTRA_SAMPLING_FIELDS, "seed", "temperature", "top_p", "parallel_tool_calls", "stream", "user")
# What a chat-side error calls a field, and what the Responses request calls it.
RENAMES = (
    (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
    (re.compile(r"\bresponse_format\b"), "text.format"),
    (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
    (re.compile(r"\btools\[(\d+)\]\.function\b"), r"tools[\1]"),
    (re.compile(r"\bmessages\[\d+\](?:\.[\w]+|\[\d+\])*"), "input"),
    (re.compile(r"\bmessages\b"), "input"),
)
INCLUDABLE = frozenset({"reasoning.encrypted_content"})  # vacuous: no reasoning items are ever produced


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    chat: ChatRequest  # what the request amounts to
    echoed: dict[str, Any]  # the request's settings, as every response object repeats them


def parse_responses(body: dict) -> ResponsesRequest:
    """Validate a Responses request and translate it; a 400 naming the Responses field."""
    for name, why in REFUSED_STATEFUL.items():
        if body.get(name) is not None:
            raise bad_request(why, param=name, code="unsupported_parameter")
    _refuse_unsupported(body)
    instructions = typed_field(body, "instructions", str, "a string")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _messages(body.get("input"))
    chat_body: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    chat_body.update({name: body[name] for name in PASSED_THROUGH if name in body})
    if body.get("max_output_tokens") is not None:
        chat_body["max_completion_tokens"] = body["max_output_tokens"]
    tools = _tools(body.get("tools"))
    if tools:
        chat_body["tools"] = tools
    if body.get("tool_choice") is not None:
        chat_body["tool_choice"] = _tool_choice(body["tool_choice"])
    text = typed_field(body, "text", dict, "an object", {})
    if text.get("format") is not None:
        chat_body["response_format"] = _response_format(text["format"])
    metadata = _metadata(body.get("metadata"))
    try:
        chat = parse_chat(chat_body)
    except APIError as exc:
        raise responses_error(exc) from None
    echoed = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": metadata,
        "parallel_tool_calls": chat.tools.parallel if chat.tools else body.get("parallel_tool_calls") is not False,
        "temperature": chat.common.params.temperature,
        "top_p": chat.common.params.top_p,
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
        "tools": body.get("tools") or [],
        "store": False,
        "truncation": "disabled",
        "previous_response_id": None,
        "reasoning": None,
        "user": body.get("user"),
        "background": False,
        "service_tier": "default",
    }
    return ResponsesRequest(chat, echoed)


def responses_error(exc: APIError) -> APIError:
    """A chat-side error as the Responses request's fields name it."""
    return APIError(exc.status, _renamed(exc.message), _renamed(exc.param) if exc.param else None, exc.code)


def _renamed(text: str) -> str:
    for pattern, replacement in RENAMES:
        text = pattern.sub(replacement, text)
    return text


def _refuse_unsupported(body: dict) -> None:
    if body.get("background"):
        _unsupported("background", "'background' responses are not supported: " + STATELESS)
    reasoning = body.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, Mapping) or any(v is not None for v in reasoning.values())):
        _unsupported("reasoning", "'reasoning' is not supported: this server's models do not reason separately")
    if body.get("truncation") not in (None, "disabled"):
        _unsupported("truncation", "only 'truncation': 'disabled' is supported: an input too long is refused")
    if body.get("max_tool_calls") is not None:
        _unsupported("max_tool_calls", "'max_tool_calls' is not supported; use 'parallel_tool_calls': false")
    if body.get("top_logprobs"):
        _unsupported("top_logprobs", "'top_logprobs' is not supported by /v1/responses; use /v1/chat/completions")
    include = typed_field(body, "include", list, "a list", [])
    for i, name in enumerate(include):
        if not isinstance(name, str) or name not in INCLUDABLE:
            _unsupported(f"include[{i}]", f"'include' of {_show(name)} is not supported by this server")
    typed_field(body, "store", bool, "a boolean")
    for name in ("service_tier", "prompt_cache_key", "safety_identifier", "user"):
        typed_field(body, name, str, "a string")


def _unsupported(param: str, message: str) -> NoReturn:
    raise bad_request(message, param=param, code="unsupported_parameter")


# Input ---------------------------------------------------------------------------------


def _messages(value: object) -> list[dict]:
    """`input` as chat messages: a string is one user message; items become messages, and
    consecutive `function_call` items join the assistant turn before them."""
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' must not be empty", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty list of input items", param="input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise bad_request(f"'{where}' must be an object (an input item)", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": _string(item, "call_id", where),
                    "content": _content(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "item_reference":
            raise bad_request(f"'{where}': an 'item_reference' is not supported: " + STATELESS, param=f"{where}.type")
        else:
            raise bad_request(
                f"'{where}.type': input items of type {_show(kind)} are not supported; this server takes "
                "'message', 'function_call' and 'function_call_output' items",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
    return messages


def _message(item: Mapping, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}", param=f"{where}.role")
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(value: object, where: str) -> str | list[dict]:
    """A string, or text parts as chat's text parts (joined the same way)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(f"'{where}' must be a string or a list of text parts", param=where)
    parts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in TEXT_PARTS:
            raise bad_request(
                f"'{at}.type': content parts of type {_show(kind)} are not supported; this model takes text "
                "('input_text', 'output_text' or 'refusal')",
                param=f"{at}.type",
                code="unsupported_parameter",
            )
        parts.append({"type": "text", "text": _string(part, TEXT_PARTS[kind], at)})
    return parts


def _function_call(item: Mapping, where: str) -> dict:
    arguments = _string(item, "arguments", where)
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise bad_request(f"'{where}.arguments' must be a JSON object as text", param=f"{where}.arguments")
    return {
        "id": _string(item, "call_id", where),
        "type": "function",
        "function": {"name": _string(item, "name", where), "arguments": arguments},
    }


# Tools and formats -----------------------------------------------------------------------


def _tools(value: object) -> list[dict]:
    """Flat function tools (`{type, name, description, parameters, strict}`) in chat's shape."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list of tools", param="tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if kind != "function":
            raise bad_request(
                f"'{where}.type': only 'function' tools are supported, got {_show(kind)} (hosted tools such as "
                "web or file search run on OpenAI's side)",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    raise bad_request(
        "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
        param="tool_choice",
        code="unsupported_parameter",
    )


def _response_format(value: object) -> dict:
    """`text.format` (`{type: json_schema, name, schema, strict, description}`) as chat's
    `response_format`."""
    if not isinstance(value, Mapping):
        raise bad_request("'text.format' must be an object like {'type': 'json_schema', ...}", param="text.format")
    if value.get("type") != "json_schema":
        return dict(value)
    spec = {key: value[key] for key in ("name", "schema", "strict", "description") if key in value}
    return {"type": "json_schema", "json_schema": spec}


def _metadata(value: object) -> dict[str, str]:
    """Up to 16 string pairs (OpenAI's limits), repeated in the response."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or len(value) > 16:
        raise bad_request("'metadata' must be an object of at most 16 string pairs", param="metadata")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            raise bad_request(
                "'metadata' keys must be at most 64 characters and values strings of at most 512", param="metadata"
            )
    return dict(value)


def _string(item: Mapping, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"'{where}.{key}' must be a string, got {_show(value)}", param=f"{where}.{key}")
    return value


def _show(value: object) -> str:
    return "nothing" if value is None else show(value) if isinstance(value, str) else type(value).__name__
