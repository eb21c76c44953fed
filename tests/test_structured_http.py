"""Structured output and tool calls through real processes: an engine and a server per family,
driven by the official `openai` SDK, as clients written for OpenAI or vLLM send them.

Random weights make enforcement visible: every output that parses and validates does so
because of the grammar. Streamed and non-streamed answers of the same seed must agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from conftest import FAMILIES
from procs import free_port, start_engine, start_server, stop
from schemas import ARITHMETIC_GBNF, ARITHMETIC_LARK, ARITHMETIC_PATTERN, CHOICES, DATE_REGEX, EMAIL_REGEX, SCHEMAS

TEMPERATURES = (0.0, 0.7, 1.0, 1.5)
MESSAGES = [{"role": "user", "content": "Fill in the form, please."}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_table",
        "parameters": {
            "type": "object",
            "properties": {
                "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                "name": {"type": "string", "maxLength": 6},
                "options": {"type": "array", "items": {"enum": ["window", "quiet"]}, "maxItems": 2},
            },
            "required": ["guests", "name"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, BOOK]
SCHEMA_OF = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


class Reservation(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    guests: int = pydantic.Field(ge=1, le=12)
    room: Literal["garden", "hall"]
    vegetarian: bool


def serve(make_checkpoint, tmp_path_factory, family: str) -> Iterator[openai.OpenAI]:
    path: Path = make_checkpoint(*FAMILIES[family])
    tmp = tmp_path_factory.mktemp(f"structured-{family}")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(path, address, tmp / "engine.log", "--max-num-seqs", "24")
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        if server is not None:
            stop(server)
        stop(engine)


@pytest.fixture(scope="module")
def qwen2(make_checkpoint, tmp_path_factory) -> Iterator[openai.OpenAI]:
    yield from serve(make_checkpoint, tmp_path_factory, "qwen2")


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3", "mistral"])
def any_family(request, make_checkpoint, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, int]]:
    """Each family's tool-call format (hermes for qwen2 and qwen3, llama3_json, mistral), with all
    the output tokens its tool prompt leaves in the tiny model's context (Llama's prompt takes
    1807 of 2048): a random model may chain many parallel calls before it closes the list."""
    if request.param == "qwen2":
        clients = iter([request.getfixturevalue("qwen2")])
    else:
        clients = serve(make_checkpoint, tmp_path_factory, request.param)
    for client in clients:
        model = client.models.retrieve(client.models.list().data[0].id)
        probe = client.chat.completions.create(model=model.id, messages=MESSAGES, tools=TOOLS, max_tokens=1)
        yield client, model.max_model_len - probe.usage.prompt_tokens


def chat(client: openai.OpenAI, seed: int, stream: bool, **body: object):
    """One chat completion, streamed chunks gathered into (content, tool calls, finish reason)."""
    params = dict(
        model=client.models.list().data[0].id,
        messages=MESSAGES,
        max_tokens=400,
        seed=seed,
        temperature=TEMPERATURES[seed % len(TEMPERATURES)],
    )
    params.update(body)
    response = client.chat.completions.create(**params, stream=stream)
    if not stream:
        choice = response.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = [], {}, None
    for chunk in response:
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for call in delta.tool_calls or []:
            name, args = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), args + (call.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def both(client: openai.OpenAI, seeds: range, **body: object) -> list[tuple]:
    """Each seed non-streamed and streamed, all at once; asserts the two agree and returns them."""
    jobs = [(seed, stream) for seed in seeds for stream in (False, True)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: chat(client, job[0], job[1], **json.loads(json.dumps(body))), jobs))
    pairs = list(zip(results[::2], results[1::2]))
    for whole, streamed in pairs:
        assert (streamed[0] or None, streamed[1], streamed[2]) == (whole[0] or None, whole[1], whole[2])
    return [whole for whole, _ in pairs]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_response_format_json_schema_validates_for_20_seeds_streamed_and_not(qwen2, name: str) -> None:
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for content, calls, finish in both(qwen2, range(20), response_format=response_format):
        assert finish == "stop" and calls == []
        jsonschema.validate(json.loads(content), schema)


@pytest.mark.parametrize(
    ("extra_body", "pattern"),
    [
        ({"guided_regex": EMAIL_REGEX}, EMAIL_REGEX),
        ({"structured_outputs": {"regex": DATE_REGEX}}, DATE_REGEX),
        ({"guided_choice": list(CHOICES)}, "|".join(CHOICES)),
        ({"structured_outputs": {"choice": list(CHOICES)}}, "|".join(CHOICES)),
        ({"guided_grammar": ARITHMETIC_GBNF}, ARITHMETIC_PATTERN),
        ({"structured_outputs": {"grammar": ARITHMETIC_LARK}}, ARITHMETIC_PATTERN),
    ],
    ids=["guided_regex", "so_regex", "guided_choice", "so_choice", "guided_grammar_gbnf", "so_grammar_lark"],
)
def test_vllm_extra_parameters_constrain_the_output(qwen2, extra_body: dict, pattern: str) -> None:
    for content, _, finish in both(qwen2, range(8), extra_body=extra_body):
        assert finish == "stop" and re.fullmatch(pattern, content), content


def test_json_object_and_guided_json_and_completions(qwen2) -> None:
    for content, _, _ in both(qwen2, range(4), extra_body={"guided_json": SCHEMAS["person"]}):
        jsonschema.validate(json.loads(content), SCHEMAS["person"])
    for content, _, finish in both(qwen2, range(4), response_format={"type": "json_object"}, max_tokens=60):
        assert content.startswith("{") and (finish == "length" or isinstance(json.loads(content), dict))
    completion = qwen2.completions.create(
        model=qwen2.models.list().data[0].id,
        prompt="Choose:",
        max_tokens=20,
        extra_body={"guided_choice": list(CHOICES)},
    )
    assert completion.choices[0].text in CHOICES


def test_sdk_parse_returns_a_pydantic_object(qwen2) -> None:
    for seed in range(4):
        completion = qwen2.chat.completions.parse(
            model=qwen2.models.list().data[0].id,
            messages=MESSAGES,
            response_format=Reservation,
            seed=seed,
            temperature=1.0,
            max_tokens=200,
        )
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Reservation), completion.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}},
                }
            },
            "response_format",
            "if",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
            "response_format",
            "objec",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"extra_body": {"guided_regex": "a("}}, "guided_regex", "regular expression"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice", "non-empty"),
        ({"extra_body": {"guided_grammar": "start: nope"}}, "guided_grammar", "nope"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice", "not several"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs", "exactly one"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}]},
            "tools[0].function.parameters",
            "if",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "twice"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot be combined",
        ),
    ],
)
def test_bad_constraints_and_tools_get_a_400_naming_the_parameter(qwen2, body: dict, param: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        qwen2.chat.completions.create(model=qwen2.models.list().data[0].id, messages=MESSAGES, max_tokens=4, **body)
    error = info.value.body
    assert error["param"] == param and says in error["message"], error


def assert_valid_calls(calls: list[tuple[str, str]], names: set[str], parallel: bool) -> None:
    assert calls and (parallel or len(calls) == 1)
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_always_returns_well_formed_calls(any_family, parallel: bool) -> None:
    client, budget = any_family
    results = both(
        client, range(10), tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel, max_tokens=budget
    )
    for content, calls, finish in results:
        assert finish == "tool_calls" and not content
        assert_valid_calls(calls, set(SCHEMA_OF), parallel)


def test_a_named_function_is_the_one_called(any_family) -> None:
    client, budget = any_family
    choice = {"type": "function", "function": {"name": "book_table"}}
    for content, calls, finish in both(client, range(8), tools=TOOLS, tool_choice=choice, max_tokens=budget):
        assert finish == "tool_calls" and not content
        assert_valid_calls(calls, {"book_table"}, parallel=False)


def test_auto_never_fails_and_malformed_calls_stay_content(any_family) -> None:
    """A random model under `auto` writes noise: it comes back as content (or as calls, if it
    ever wrote a valid one), streamed and not alike; never a 500."""
    for _, calls, finish in both(any_family[0], range(6), tools=TOOLS, max_tokens=40):
        assert finish in ("stop", "length", "tool_calls")
        if calls:
            assert_valid_calls(calls, set(SCHEMA_OF), parallel=True)


def test_sdk_stream_helper_accumulates_the_streamed_tool_calls(any_family) -> None:
    client, budget = any_family
    body = dict(
        model=client.models.list().data[0].id,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        seed=5,
        temperature=1.0,
        max_tokens=budget,
    )
    whole = client.chat.completions.create(**body)
    with client.chat.completions.stream(**body) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    got = [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls]
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert got == expected and final.choices[0].finish_reason == "tool_calls"
    assert all(c.id for c in final.choices[0].message.tool_calls)
