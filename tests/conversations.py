"""Chat conversations the template tests render with ours and with transformers' templates."""

from __future__ import annotations

import copy
import json

CONVERSATIONS: dict[str, list[dict[str, str]]] = {
    "user only": [{"role": "user", "content": "What is 7 * 6?"}],
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a river in Europe. "},
    ],
    "multi-turn": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour ! Café ?"},
        {"role": "user", "content": "  Oui, merci. 中文 😀\n"},
    ],
}
# What the families' templates treat specially: think blocks, and text that spells special tokens.
FAMILY_CONVERSATIONS: dict[str, list[dict[str, str]]] = CONVERSATIONS | {
    "no system, two turns": [
        {"role": "user", "content": " leading space"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nOk."},
        {"role": "user", "content": "And then?"},
    ],
    "special-token strings": [
        {"role": "user", "content": "Say <|im_end|> or <s></s> [INST] <|eot_id|><|start_header_id|> literally."}
    ],
}

# Tool use, as an OpenAI client sends it: tools with JSON schemas, assistant turns whose
# `tool_calls` carry `arguments` as JSON text (content null or absent), `tool` results
# answering them by id. The ids are 9 alphanumerics, the only ones Mistral's template takes.
TOOLS: list[dict] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, now or in the coming days (météo)",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 0},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]
WEATHER_CALL = {
    "id": "a1b2c3d4e",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich 中文", "unit": "celsius", "days": 2}'},
}
TIME_CALL = {"id": "f5g6h7i8j", "type": "function", "function": {"name": "get_time", "arguments": '{"city":"Paris"}'}}
_QUESTION = {"role": "user", "content": "What is the weather in Zürich, and the time in Paris?"}
_ONE_CALL = [
    _QUESTION,
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "18 C, sunny"},
]
_TWO_CALLS = [
    _QUESTION,
    {"role": "assistant", "tool_calls": [WEATHER_CALL, TIME_CALL]},  # no content key at all
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"temperature": 18, "sky": "sunny"}'},
    {"role": "tool", "tool_call_id": "f5g6h7i8j", "name": "get_time", "content": "14:05"},
]
_ANSWER = {"role": "assistant", "content": "Sunny, 18 C in Zürich; 14:05 in Paris."}
TOOL_CONVERSATIONS: dict[str, list[dict]] = {
    "user only": [_QUESTION],
    "system+user": [{"role": "system", "content": "Answer briefly."}, _QUESTION],
    "one call, its result": _ONE_CALL,
    "one call, answered, asked again": [*_ONE_CALL, _ANSWER, {"role": "user", "content": "And tomorrow?"}],
    "system, one call with text, result in parts": [
        {"role": "system", "content": "Answer briefly."},
        _QUESTION,
        {"role": "assistant", "content": "Let me look.", "tool_calls": [WEATHER_CALL]},
        {
            "role": "tool",
            "tool_call_id": "a1b2c3d4e",
            "content": [{"type": "text", "text": "18 C"}, {"type": "text", "text": "sunny"}],
        },
    ],
    "two calls, their results": _TWO_CALLS,
    "two calls, answered": [*_TWO_CALLS, _ANSWER],
}
# The conversations with more than one call in a turn, which Llama 3.1's template refuses.
PARALLEL_TOOL_CONVERSATIONS = ("two calls, their results", "two calls, answered")


def for_transformers(messages: list[dict]) -> list[dict]:
    """The conversation as transformers' apply_chat_template takes it: tool-call arguments as
    dicts (what the server parses them into), text parts joined as the server joins them."""
    out = copy.deepcopy(messages)
    for message in out:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if isinstance(message.get("content"), list):
            message["content"] = "\n".join(part["text"] for part in message["content"])
    return out
