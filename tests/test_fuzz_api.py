"""The API fuzzed with hostile requests against a real engine and a real server process.

Requests are built from the OpenAI chat, completions and Responses schemas (and vLLM's
tokenizer endpoints), then up to four fields
are replaced by hostile values: integers at and past 64 bits, huge and tiny floats, the
NaN and Infinity tokens, numbers past a double (`1e400`), lone surrogates, control and
bidi characters, nesting deeper than any parser should follow, wrong types, empty and huge
strings and lists. Whatever arrives, the server must never answer 5xx, every error must be
OpenAI's error JSON, a stream must end with `[DONE]`, and afterwards the engine must be
the same process, answer a normal request, and hold no KV block. A second test sends the
same kind of sampling values straight into the engine's socket, as a client that bypasses
the servers would.

CI runs a fixed set of examples (SPLITINFER_FUZZ_EXAMPLES, default 300 per test, derandomized);
`scripts/fuzz_api.sh` runs many more with fresh randomness.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from procs import free_port, start_engine, start_server, stop
from test_engine_process import Peer

from splitinfer.protocol import PROTOCOL_VERSION, Error, ErrorCode, Outputs, SamplingParams

EXAMPLES = int(os.environ.get("SPLITINFER_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("SPLITINFER_FUZZ_RANDOM") == "1"
FUZZ = settings(
    max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
MAX_MODEL_LEN = 64  # every accepted request is cheap: prompt and output within 64 tokens


@dataclass
class Stack:
    engine: subprocess.Popen
    engine_log: Path
    address: str
    url: str


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fuzz")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(
        tiny_checkpoint,
        address,
        tmp / "engine.log",
        "--served-model-name",
        "tiny",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--lease",
        "60",
    )
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log")
        yield Stack(engine, tmp / "engine.log", address, f"http://127.0.0.1:{port}")
    finally:
        if server is not None:
            stop(server)
        stop(engine)


# Hostile values ----------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is (numbers Python would not write, nesting it could not)."""

    text: str


def dump(value: object) -> str:
    """JSON text of a value holding Raw parts; strings with lone surrogates are written as
    escapes, NaN and infinities as the tokens Python's json writes."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


BIG_INTS = [
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**30,
    10**400,
    -(10**400),
]
ints = st.integers(-5, 300) | st.sampled_from(BIG_INTS)
floats = st.floats() | st.sampled_from([1e308, -1e308, 5e-324, 1e-300, -0.0, 0.5, 2.0])
raw_numbers = st.sampled_from(
    ["1e400", "-1e400", "1E+999", "0e-999999", "123456789012345678901234567890.5", "-0", "1.0e-400"]
).map(Raw)
numbers = ints | floats | raw_numbers
characters = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = (
    st.text(max_size=12)
    | st.text(characters, max_size=8)
    | st.sampled_from(["", "x" * 60_000, "\x00", "\u202e\u2066", "🙂" * 500, "\ud800", "a\udcffb"])
)
deep = st.sampled_from([129, 500, 5_000, 60_000]).map(lambda d: Raw("[" * d + "]" * d))
scalars = st.none() | st.booleans() | numbers | texts
junk = (
    st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=8
    )
    | deep
    | st.just(list(range(5_000)))
)
token_lists = st.lists(ints, min_size=0, max_size=6)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | junk,
        "content": texts
        | st.lists(st.fixed_dictionaries({"type": st.just("text") | junk, "text": texts}), max_size=3)
        | junk,
    }
)
# The extremes each numeric field accepts: half the time a field gets one, so hostile
# requests also reach the sampler's edges, not only the validators.
EDGES = {
    "max_tokens": [1, 2, 60],
    "max_completion_tokens": [1, 60],
    "n": [1, 3],
    "temperature": [0, 1e-300, 0.01, 100],
    "top_p": [5e-324, 1e-9, 1],
    "min_p": [0, 1],
    "top_k": [-1, 0, 1, 2**63 - 1],
    "presence_penalty": [-2, 2],
    "frequency_penalty": [-2.0, 2],
    "repetition_penalty": [0.01, 100],
    "seed": [-(2**63), 2**63 - 1, 0],
    "min_tokens": [0, 2],
    "logprobs": [0, 20],
    "top_logprobs": [0, 20],
}


def numeric(field: str) -> st.SearchStrategy:
    return st.sampled_from(EDGES[field]) | numbers | junk


FIELD_VALUES = {
    "model": texts | junk,
    "messages": st.lists(message, max_size=3) | junk,
    "prompt": texts | st.lists(texts, max_size=3) | token_lists | st.lists(token_lists, max_size=3) | junk,
    **{name: numeric(name) for name in EDGES if name != "logprobs"},
    "logprobs": st.booleans() | numeric("logprobs"),
    "logit_bias": st.dictionaries(
        texts | st.sampled_from(["5", "-1", "1e3", "\u0665", " 5", "5_0", "99999999999999999999"]),
        numbers | junk,
        max_size=4,
    )
    | junk,
    "stop": texts | st.lists(texts, max_size=5) | junk,
    "stop_token_ids": token_lists | junk,
    "ignore_eos": st.booleans() | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
    "user": texts | junk,
    "echo": st.booleans() | junk,
    "suffix": texts | junk,
    "best_of": numbers | junk,
    "tools": junk,
    "response_format": junk,
    "tool_choice": junk,
}
CHAT_FIELDS = sorted(set(FIELD_VALUES) - {"prompt", "echo", "suffix", "best_of"})
COMPLETION_FIELDS = sorted(
    set(FIELD_VALUES) - {"messages", "max_completion_tokens", "top_logprobs", "tools", "response_format", "tool_choice"}
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    chat = draw(st.booleans())
    body: dict = {"model": "tiny", "max_tokens": 3}
    body |= {"messages": [{"role": "user", "content": "Hello"}]} if chat else {"prompt": "Hello"}
    for field in draw(st.lists(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), max_size=4, unique=True)):
        body[field] = draw(FIELD_VALUES[field])
    return ("/v1/chat/completions" if chat else "/v1/completions"), dump(body)


# Checks ------------------------------------------------------------------------------


def assert_openai_error(error: object) -> None:
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]


def check_response(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert_openai_error(response.json()["error"])
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:
                assert_openai_error(chunk["error"])
                assert chunk["error"]["type"] != "server_error", chunk
    else:
        assert "choices" in response.json()


def assert_engine_healthy(stack: Stack) -> None:
    assert stack.engine.poll() is None, "the engine died"
    reply = httpx.post(
        stack.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    peer = Peer(stack.address)
    try:
        peer.hello()
        stats = peer.stats()
        assert (stats.running, stats.waiting, stats.kv_used_blocks) == (0, 0, 0), stats
    finally:
        peer.close()
    assert "Traceback" not in stack.engine_log.read_text()


# The tests ---------------------------------------------------------------------------


def fuzz_http(stack: Stack, strategy: st.SearchStrategy, check) -> None:
    """Send every request `strategy` draws, `check` each response, then the engine must be well."""
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=120, headers={"content-type": "application/json"}) as client:

        @FUZZ
        @given(strategy)
        def one(request: tuple[str, str]) -> None:
            path, body = request
            response = client.post(stack.url + path, content=body.encode("utf-8"))
            check(response)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        one()
    print(f"{sum(statuses.values())} fuzzed requests, by status: {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, "the fuzzer reaches both outcomes"
    assert_engine_healthy(stack)


def test_fuzzed_openai_requests_never_get_a_5xx(stack: Stack) -> None:
    fuzz_http(stack, requests(), check_response)


# The Responses API and the tokenizer endpoints ------------------------------------------

input_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "refusal", "input_image"]) | junk, "text": texts}
)
input_item = (
    message
    | st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.sampled_from(["user", "assistant"]) | junk,
            "content": st.lists(input_part, max_size=2) | junk,
        }
    )
    | st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": texts | junk,
            "name": texts | junk,
            "arguments": st.sampled_from(['{"a": 1}', "{}", "[]", "{"]) | texts | junk,
        }
    )
    | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": texts | junk, "output": texts | junk})
    | st.fixed_dictionaries({"type": st.sampled_from(["reasoning", "item_reference", "web_search_call"]) | junk})
)
flat_tool = st.fixed_dictionaries(
    {
        "type": st.just("function") | junk,
        "name": st.sampled_from(["f", "get_weather"]) | texts | junk,
        "parameters": st.just({"type": "object", "properties": {"a": {"type": "integer"}}}) | junk,
    }
)
RESPONSES_VALUES = {
    "model": texts | junk,
    "input": texts | st.lists(input_item, max_size=4) | junk,
    "instructions": texts | junk,
    "max_output_tokens": numeric("max_tokens"),
    "temperature": numeric("temperature"),
    "top_p": numeric("top_p"),
    "tools": st.lists(flat_tool, max_size=2) | junk,
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function", "name": "f"}]) | junk,
    "parallel_tool_calls": st.booleans() | junk,
    "text": st.fixed_dictionaries(
        {"format": st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "name": "x"}]) | junk}
    )
    | junk,
    "stream": st.booleans() | junk,
    "store": st.booleans() | junk,
    "metadata": st.dictionaries(texts, texts | junk, max_size=3) | junk,
    "previous_response_id": st.none() | texts | junk,
    "include": st.lists(texts, max_size=2) | junk,
    "reasoning": st.none() | junk,
    "truncation": st.sampled_from(["auto", "disabled"]) | junk,
}
TOKENIZE_VALUES = {
    "model": texts | junk,
    "prompt": texts | junk,
    "messages": st.lists(message, max_size=3) | junk,
    "add_special_tokens": st.booleans() | junk,
    "add_generation_prompt": st.booleans() | junk,
    "continue_final_message": st.booleans() | junk,
    "return_token_strs": st.booleans() | junk,
    "tools": junk,
    "tokens": token_lists | junk,
}


@st.composite
def other_requests(draw: st.DrawFn) -> tuple[str, str]:
    """A /v1/responses, /tokenize or /detokenize request with up to four hostile fields."""
    path = draw(st.sampled_from(["/v1/responses", "/tokenize", "/detokenize"]))
    if path == "/v1/responses":
        body: dict = {"model": "tiny", "input": "Hello", "max_output_tokens": 3}
        values = RESPONSES_VALUES
    else:
        body = {"prompt": "Hello"} if path == "/tokenize" else {"tokens": [1, 2, 3]}
        values = TOKENIZE_VALUES
    for field in draw(st.lists(st.sampled_from(sorted(values)), max_size=4, unique=True)):
        body[field] = draw(values[field])
    return path, dump(body)


def check_other_response(response: httpx.Response) -> None:
    """As `check_response`; a Responses stream is typed events, the last a terminal one."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert_openai_error(response.json()["error"])
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: ")]
        assert [e["sequence_number"] for e in events] == list(range(len(events))), response.text[-300:]
        assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
    else:
        assert isinstance(response.json(), dict)


def test_fuzzed_responses_and_tokenizer_requests_never_get_a_5xx(stack: Stack) -> None:
    fuzz_http(stack, other_requests(), check_other_response)


PARAM_VALUES = {name: getattr(SamplingParams(), name) for name in SamplingParams.__struct_fields__}


@st.composite
def generate_frames(draw: st.DrawFn) -> tuple[str, bytes]:
    params = dict(PARAM_VALUES, max_tokens=3, logit_bias={}, stop_token_ids=[])
    hostile = (
        st.none()
        | st.booleans()
        | ints
        | floats
        | st.text(max_size=6)
        | st.lists(ints, max_size=3)
        | st.dictionaries(ints, numbers.filter(lambda v: not isinstance(v, Raw)), max_size=3)
    )
    for name in draw(st.lists(st.sampled_from(sorted(params)), min_size=1, max_size=4, unique=True)):
        params[name] = draw(st.sampled_from(EDGES.get(name, [PARAM_VALUES[name]])) | hostile)
    rid = uuid.uuid4().hex
    prompt = draw(st.lists(ints, min_size=1, max_size=8) | st.just([1, 2, 3]))
    wire = {"type": "generate", "v": PROTOCOL_VERSION, "request_id": rid, "prompt_token_ids": prompt, "params": params}
    try:
        return rid, msgpack.packb(wire, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        assume(False)  # msgpack cannot carry it (past 64 bits): no client can send it either


def test_hostile_sampling_values_straight_into_the_engine_socket(stack: Stack) -> None:
    peer = Peer(stack.address)
    outcomes: dict[str, int] = {}
    try:
        peer.hello()

        @FUZZ
        @given(generate_frames())
        def one(frame: tuple[str, bytes]) -> None:
            rid, data = frame
            peer.socket.send(data)
            while True:  # until this request's Error, or its last output
                reply = peer.receive(timeout_s=60)
                if isinstance(reply, Error) and reply.request_id == rid:
                    # The client's fault, never ours (context_length_exceeded: an invalid request, named).
                    refusals = (ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED, ErrorCode.BAD_MESSAGE)
                    assert reply.code in refusals, reply
                    outcomes[reply.code.value] = outcomes.get(reply.code.value, 0) + 1
                    return
                if isinstance(reply, Outputs) and any(o.request_id == rid and o.finish_reason for o in reply.outputs):
                    outcomes["served"] = outcomes.get("served", 0) + 1
                    return
                assert isinstance(reply, Outputs), reply

        one()
    finally:
        peer.close()
    print(f"{sum(outcomes.values())} fuzzed Generate frames, by outcome: {outcomes}")
    assert outcomes.get("invalid_request", 0) > 0 and outcomes.get("served", 0) > 0, outcomes
    assert_engine_healthy(stack)
