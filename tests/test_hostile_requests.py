"""Requests built to break the service, against a real engine and a real server process:
numbers past what the engine can represent in every sampling field, JSON that Python
accepts but JSON does not, lone surrogates, deep nesting, bad API keys, and bugs injected
into the server (tests/faulty_server.py). None may get a 5xx it did not earn, disturb the
engine, or cost a client its keep-alive connection."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from faulty_server import SECRET, TRIGGER
from procs import PYTHON, REPO, free_port, start_engine, start_server, stop
from test_server_e2e import assert_error

API_KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = [{"role": "user", "content": "Say something."}]


@dataclass
class Stack:
    engine: subprocess.Popen
    engine_log: Path
    server_log: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, raw: bytes | str, headers: dict | None = None) -> httpx.Response:
        return httpx.post(self.url + path, content=raw, headers=headers or AUTH, timeout=60)

    def engine_id(self) -> str:
        return httpx.get(self.url + "/health").json()["engines"][0]["engine_id"]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(tiny_checkpoint, address, tmp / "engine.log", "--served-model-name", "tiny")
    server = None
    try:
        port = free_port()
        server = start_server(
            address,
            port,
            tmp / "server.log",
            "--api-key",
            API_KEY,
            launcher=(PYTHON, str(REPO / "tests" / "faulty_server.py")),
        )
        yield Stack(engine, tmp / "engine.log", tmp / "server.log", port)
    finally:
        if server is not None:
            stop(server)
        stop(engine)


def with_field(path: str, field: str, literal: str) -> str:
    """A valid request body with `"field": literal` spliced in as raw JSON text."""
    base = {"model": "tiny", "max_tokens": 2}
    base |= {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    base.pop(field, None)
    return json.dumps(base)[:-1] + f', "{field}": {literal}}}'


def assert_engine_untouched(stack: Stack, engine_id: str) -> None:
    assert stack.engine.poll() is None, "the engine process died"
    assert stack.engine_id() == engine_id, "the engine restarted"
    assert "Traceback" not in stack.engine_log.read_text()
    reply = stack.post(
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0, "ignore_eos": True}),
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_the_one_line_request_that_killed_the_engine_is_a_400_naming_temperature(stack: Stack) -> None:
    engine_id = stack.engine_id()
    body = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 9223372036854775808}'
    error = assert_error(stack.post("/v1/completions", body), 400, "temperature")
    assert "temperature must be in [0, 100]" in error["message"]
    assert_engine_untouched(stack, engine_id)


SAMPLING_FIELDS = [
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "top_k",
    "seed",
    "min_tokens",
    "max_tokens",
    "n",
]
HUGE = ["9223372036854775808", "18446744073709551616", "1" + "0" * 400, "-" + "9" * 30]


@pytest.mark.parametrize(
    "path, extra",
    [("/v1/completions", "logprobs"), ("/v1/chat/completions", "top_logprobs")],
    ids=["completions", "chat"],
)
def test_every_sampling_field_past_64_bits_is_a_400_naming_it(stack: Stack, path: str, extra: str) -> None:
    engine_id = stack.engine_id()
    for field in SAMPLING_FIELDS + [extra]:
        for literal in HUGE:
            body = with_field(path, field, literal)
            if field == "top_logprobs":
                body = body[:-1] + ', "logprobs": true}'
            assert_error(stack.post(path, body), 400, field)
    for field, literal in (
        ("stop_token_ids", "[9223372036854775808]"),
        ("stop_token_ids", "[4294967296]"),
        ("logit_bias", '{"99999999999999999999": 1}'),
        ("logit_bias", '{"5": 1' + "0" * 400 + "}"),
        ("logit_bias", '{"\u0665": 1}'),
        ("logit_bias", '{" 5": 1}'),
    ):
        assert_error(stack.post(path, with_field(path, field, literal)), 400, field)
    assert_engine_untouched(stack, engine_id)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_numbers_json_does_not_have_are_400s(stack: Stack, literal: str) -> None:
    for stream in ("false", "true"):
        body = with_field("/v1/completions", "temperature", literal)[:-1] + f', "stream": {stream}}}'
        error = assert_error(stack.post("/v1/completions", body), 400)
        assert error["code"] == "invalid_json"


@pytest.mark.parametrize(
    "path, field, literal, param",
    [
        ("/v1/completions", "prompt", '"hi \\udcff"', "prompt"),
        ("/v1/completions", "prompt", '["fine", "\\ud800"]', "prompt[1]"),
        ("/v1/completions", "stop", '["\\udfff"]', "stop[0]"),
        ("/v1/chat/completions", "messages", '[{"role": "user", "content": "x\\udcffy"}]', "messages[0].content"),
        (
            "/v1/chat/completions",
            "messages",
            '[{"role": "user", "content": [{"type": "text", "text": "\\udc80"}]}]',
            "messages[0].content[0].text",
        ),
        ("/v1/chat/completions", "user", '"\\ud83d"', "user"),
        ("/v1/completions", "logit_bias", '{"caf\u00e9": {"\\udcff": 1}}', "logit_bias.caf\u00e9.\\udcff"),
    ],
    ids=["prompt", "prompt-list", "stop", "chat-content", "chat-part", "user", "non-ascii-keys"],
)
def test_a_lone_surrogate_is_a_400_naming_where_it_is(
    stack: Stack, path: str, field: str, literal: str, param: str
) -> None:
    error = assert_error(stack.post(path, with_field(path, field, literal)), 400, param)
    assert error["code"] == "invalid_value" and "lone surrogate" in error["message"]


def test_a_real_surrogate_pair_is_one_character_and_welcome(stack: Stack) -> None:
    body = with_field("/v1/completions", "prompt", '"a smile \\ud83d\\ude00"')
    assert stack.post("/v1/completions", body).status_code == 200


@pytest.mark.parametrize("depth", [129, 50_000])
def test_deeply_nested_json_is_a_400(stack: Stack, depth: int) -> None:
    body = '{"model": "tiny", "prompt": ' + "[" * depth + "]" * depth + "}"
    assert assert_error(stack.post("/v1/completions", body), 400)["code"] == "invalid_json"


def test_errors_keep_the_keep_alive_connection_and_leak_nothing(stack: Stack) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    conn.connect()
    sock = conn.sock

    def request(body: dict | str) -> tuple[int, dict]:
        conn.request("POST", "/v1/completions", body if isinstance(body, str) else json.dumps(body), AUTH)
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert conn.sock is sock, "the server closed the connection"
        return response.status, payload

    try:
        normal = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        assert request('{"model": "tiny", "prompt": "hi", "temperature": 9223372036854775808}')[0] == 400
        status, internal = request({"model": "tiny", "prompt": TRIGGER})
        assert status == 500 and set(internal["error"]) == {"message", "type", "param", "code"}
        assert internal["error"]["code"] == "internal_error" and internal["error"]["type"] == "server_error"
        text = json.dumps(internal)
        assert SECRET not in text and "Traceback" not in text and "RuntimeError" not in text
        assert request(normal)[0] == 200
        assert request('{"model": "tiny", "prompt": "\\udcff"}')[0] == 400
        assert request(normal)[0] == 200
    finally:
        conn.close()
    incident = internal["error"]["message"].split("incident ")[1].split(")")[0]
    log = stack.server_log.read_text()
    assert f"internal error {incident}" in log and SECRET in log and "Traceback" in log


def test_a_bug_mid_stream_ends_it_with_an_error_event_and_done(stack: Stack) -> None:
    body = {
        "model": "tiny",
        "prompt": "hi",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if "choices" in c) >= 1, "the tokens came before the failure"
    assert chunks[-1]["error"]["code"] == "internal_error" and SECRET not in events[-2]


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer \xe9\xff",
        b"Bearer " + API_KEY.encode()[:-1],
        b"Bearer",
        b"Basic " + API_KEY.encode(),
        b"Bearer " + API_KEY.encode() + b"x",
    ],
)
def test_a_wrong_or_undecodable_api_key_is_a_401(stack: Stack, header: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.putrequest("GET", "/v1/models")
        conn.putheader("Authorization", header)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 401, response.read()
        assert json.loads(response.read())["error"]["code"] == "invalid_api_key"
    finally:
        conn.close()
    assert httpx.get(stack.url + "/v1/models", headers=AUTH).status_code == 200


def test_n_seeded_choices_at_the_largest_seed_wrap_and_repeat(stack: Stack) -> None:
    # seed + index for choices 1 and 2 would leave int64: they wrap to -2**63 and -2**63 + 1.
    body = json.dumps(
        {
            "model": "tiny",
            "prompt": "hi",
            "max_tokens": 6,
            "n": 3,
            "temperature": 1.0,
            "ignore_eos": True,
            "seed": 2**63 - 1,
        }
    )
    first, again = (stack.post("/v1/completions", body) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    texts = [c["text"] for c in sorted(first.json()["choices"], key=lambda c: c["index"])]
    assert texts == [c["text"] for c in sorted(again.json()["choices"], key=lambda c: c["index"])]
    assert len(texts) == 3
