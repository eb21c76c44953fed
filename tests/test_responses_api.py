"""The Responses API (`POST /v1/responses`) through the official `openai` SDK against real
processes: plain text, instructions, a function tool under `tool_choice: required` (and
named), a JSON schema format, conversations carried as items; each streamed form's events
reassemble to the whole response, and a request equals the chat request it amounts to
(same prompt tokens, same greedy reply). Stateful features and unsupported items are 400s
naming the field. One engine (Qwen2: ChatML, Hermes tool calls) and one server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import FAMILIES
from procs import free_port, start_engine, start_server, stop

from splitinfer.server.errors import APIError
from splitinfer.server.responses_api import OutputItems, ResponsesAPIFormat
from splitinfer.server.tool_calls import ArgumentsDelta, CallStart, ContentDelta

MODEL = "tiny"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather.", "parameters": WEATHER_SCHEMA}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
FORM = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0)


@dataclass(frozen=True)
class Served:
    client: openai.OpenAI
    http: httpx.Client


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory) -> Iterator[Served]:
    path = make_checkpoint(*FAMILIES["qwen2"])
    tmp = tmp_path_factory.mktemp("responses")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(path, address, tmp / "engine.log", "--max-num-seqs", "8")
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log", "--served-model-name", MODEL)
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        with httpx.Client(base_url=base, timeout=120) as http:
            yield Served(client, http)
    finally:
        if server is not None:
            stop(server)
        stop(engine)


def create(served: Served, **params: object):
    return served.client.responses.create(model=MODEL, temperature=0, **params)


def reassembled(served: Served, **params: object) -> dict:
    """A streamed response rebuilt from its events alone: the items as added, their text and
    arguments from the deltas; checked against each `.done` event and the final response."""
    events = list(served.client.responses.create(model=MODEL, temperature=0, stream=True, **params))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    items: dict[int, dict] = {}
    for event in events[2:-1]:
        if event.type == "response.output_item.added":
            items[event.output_index] = event.item.model_dump(exclude_none=True) | {"text": "", "arguments": ""}
        elif event.type == "response.output_text.delta":
            items[event.output_index]["text"] += event.delta
        elif event.type == "response.output_text.done":
            assert event.text == items[event.output_index]["text"]
        elif event.type == "response.function_call_arguments.delta":
            items[event.output_index]["arguments"] += event.delta
        elif event.type == "response.function_call_arguments.done":
            assert event.arguments == items[event.output_index]["arguments"]
        elif event.type == "response.output_item.done":
            item = items[event.output_index]
            done = event.item.model_dump(exclude_none=True)
            if item["type"] == "message":
                assert done["content"][0]["text"] == item["text"]
            else:
                assert done["arguments"] == item["arguments"]
            items[event.output_index] = done
        else:
            assert event.type == "response.content_part.added" or event.type == "response.content_part.done"
    final = last.response.model_dump(exclude_none=True)
    assert final["output"] == [items[i] for i in range(len(items))]
    return final


def same_reply(whole, streamed: dict) -> None:
    """A whole response and a reassembled stream agree on everything but the ids."""

    def strip(item: dict) -> dict:
        return {k: v for k, v in item.items() if k not in ("id", "call_id")}

    whole = whole.model_dump(exclude_none=True)
    assert [strip(i) for i in whole["output"]] == [strip(i) for i in streamed["output"]]
    for key in ("status", "incomplete_details", "model", "tools", "tool_choice", "text", "instructions"):
        assert whole.get(key) == streamed.get(key), key
    # The second of the two found the prompt in the prefix cache: all but cached_tokens agree.
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert whole["usage"][key] == streamed["usage"][key]


def test_plain_text_equals_chat_and_its_stream(served: Served) -> None:
    out = create(served, input="Tell me a story.", max_output_tokens=24)
    assert out.object == "response" and out.id.startswith("resp_") and out.model == MODEL
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert out.usage.output_tokens == 24 and out.usage.total_tokens == out.usage.input_tokens + 24
    assert out.store is False and out.previous_response_id is None
    chat = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24, temperature=0
    )
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    same_reply(out, reassembled(served, input="Tell me a story.", max_output_tokens=24))


def test_instructions_are_the_system_message(served: Served) -> None:
    out = create(served, input="Hi", instructions="Answer in French.", max_output_tokens=8)
    chat = served.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
    )
    assert out.instructions == "Answer in French."
    assert (out.output_text, out.usage.input_tokens) == (chat.choices[0].message.content, chat.usage.prompt_tokens)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_a_required_function_call_is_made_and_streams_as_it_is_returned(served: Served, tool_choice) -> None:
    params = dict(
        input="What is the weather in Lima?",
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_output_tokens=300,
    )
    out = create(served, **params)
    assert out.status == "completed"
    [call] = out.output
    assert call.type == "function_call" and call.status == "completed" and call.call_id.startswith("call_")
    assert call.name == ("get_time" if isinstance(tool_choice, dict) else call.name)
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.name]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    assert out.tool_choice == tool_choice or out.tool_choice.model_dump() == tool_choice
    same_reply(out, reassembled(served, **params))
    # The SDK's own accumulator reads our events into the same response.
    with served.client.responses.stream(model=MODEL, temperature=0, **params) as stream:
        final = stream.get_final_response()
    same_reply(out, final.model_dump(exclude_none=True))


def test_parallel_calls_and_a_function_call_round_trip(served: Served) -> None:
    out = create(
        served, input="Weather in Paris and Oslo?", tools=[WEATHER], tool_choice="required", max_output_tokens=400
    )
    calls = [item for item in out.output if item.type == "function_call"]
    assert calls and all(c.name == "get_weather" for c in calls)
    # The calls and their results go back as items, as the Agents SDK sends them.
    items = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        *[{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
        *[{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 20 C"} for c in calls],
    ]
    follow_up = create(served, input=items, tools=[WEATHER], max_output_tokens=10)
    assert follow_up.status in ("completed", "incomplete")
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ],
        },
        *[{"role": "tool", "tool_call_id": c.call_id, "content": "Sunny, 20 C"} for c in calls],
    ]
    chat = served.client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        max_tokens=10,
        temperature=0,
    )
    assert follow_up.usage.input_tokens == chat.usage.prompt_tokens
    message = chat.choices[0].message
    assert follow_up.output_text == (message.content or "")
    assert len([i for i in follow_up.output if i.type == "function_call"]) == len(message.tool_calls or [])


def test_a_json_schema_format_is_enforced(served: Served) -> None:
    fmt = {"type": "json_schema", "name": "person", "schema": FORM, "strict": True}
    params = dict(input="Who are you?", text={"format": fmt}, max_output_tokens=200)
    out = create(served, **params)
    assert out.status == "completed" and out.text.format.type == "json_schema"
    jsonschema.validate(json.loads(out.output_text), FORM)
    same_reply(out, reassembled(served, **params))
    json_object = create(served, input="JSON please", text={"format": {"type": "json_object"}}, max_output_tokens=200)
    assert isinstance(json.loads(json_object.output_text), dict)
    # The SDK's pydantic helpers: the schema comes from the model, the answer is parsed into it.
    parsed = served.client.responses.parse(model=MODEL, input="Who?", text_format=Person, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, Person)
    with served.client.responses.stream(model=MODEL, input="Who?", text_format=Person, max_output_tokens=200) as s:
        assert isinstance(s.get_final_response().output_parsed, Person)


def test_input_items_with_parts_and_roles(served: Served) -> None:
    items = [
        {"role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "One"}, {"type": "input_text", "text": "Two"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Yes.", "annotations": []}],
        },
        {"role": "user", "content": "Three"},
    ]
    out = create(served, input=items, max_output_tokens=6)
    chat = served.client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "One\nTwo"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Three"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert (out.output_text, out.usage.input_tokens) == (chat.choices[0].message.content, chat.usage.prompt_tokens)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "background": True}, "background"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": ""}, "input"),
        ({"input": 5}, "input"),
        ({}, "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}]},
            "tools[0].parameters",
        ),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "temperature": -1}, "temperature"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "f"}}}, "text.format"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "f", "schema": {"type": 3}}}},
            "text.format",
        ),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include[0]"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"input": "x", "store": "yes"}, "store"),
    ],
)
def test_bad_or_unsupported_input_is_a_400_naming_the_field(served: Served, body: dict, param: str) -> None:
    reply = served.http.post("/v1/responses", json={"model": MODEL, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


def test_stored_responses_are_refused_saying_why(served: Served) -> None:
    for method, path in [
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ]:
        reply = served.http.request(method, path)
        assert reply.status_code == 400 and "keeps no responses" in reply.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        served.client.responses.retrieve("resp_1")
    # store is accepted, and the response says it was not stored; metadata comes back.
    out = create(served, input="x", store=True, metadata={"run": "7"}, max_output_tokens=2)
    assert out.store is False and out.metadata == {"run": "7"}


def test_unknown_model_and_streamed_errors(served: Served) -> None:
    reply = served.http.post("/v1/responses", json={"model": "other", "input": "x"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    too_long = served.http.post("/v1/responses", json={"model": MODEL, "input": "word " * 5000, "stream": True})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"


def test_a_failing_stream_ends_with_an_error_event_in_sequence() -> None:
    fmt = ResponsesAPIFormat(echoed={})
    head = fmt.head(MODEL)
    assert fmt._event({"type": "response.created"})["sequence_number"] == 0
    event = fmt.sse(fmt.error_chunk(APIError(503, "the engine is unavailable: gone", code="engine_unavailable")))
    assert event["event"] == "error" and head.id.startswith("resp_")
    assert json.loads(event["data"]) == {
        "type": "error",
        "code": "engine_unavailable",
        "message": "the engine is unavailable: gone",
        "param": None,
        "sequence_number": 1,
    }
    assert not fmt.ends_with_done


def test_text_between_calls_becomes_its_own_message_items_in_order() -> None:
    builder = OutputItems()
    events = builder.apply(
        [
            ContentDelta("Let me check."),
            CallStart(0, "call_a", "get_time"),
            ArgumentsDelta(0, '{"zone": '),
            ArgumentsDelta(0, '"UTC"}'),
            ContentDelta("And then"),
            ContentDelta(" more."),
        ]
    )
    events += builder.close("incomplete")
    assert [(i["type"], i["status"]) for i in builder.items] == [
        ("message", "completed"),
        ("function_call", "completed"),
        ("message", "incomplete"),
    ]
    assert (
        builder.items[1]["arguments"] == '{"zone": "UTC"}'
        and builder.items[2]["content"][0]["text"] == "And then more."
    )
    assert [e["type"] for e in events].count("response.output_item.done") == 3
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
