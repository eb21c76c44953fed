"""The OpenAI-compatible servers end to end: a real engine and two real servers (CPU, tiny
checkpoint), driven by the official `openai` SDK and by raw httpx. Expected text comes from
the offline engine on the prompt that transformers' own chat template and tokenizer build."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from procs import free_port, start_engine, start_server, stop, wait_for_health

from splitinfer.engine import LLM, SamplingParams

API_KEY = "sk-test-key"
BODY_LIMIT = 65536
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@dataclass
class Stack:
    address: str
    engine: subprocess.Popen
    engine_log: Path
    keyed_port: int  # --api-key API_KEY --max-request-bytes BODY_LIMIT
    open_port: int  # no key
    servers: dict[int, subprocess.Popen]
    tmp: Path

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def dtype(request: pytest.FixtureRequest) -> str:
    """Every test of the stack runs against an engine in each dtype it serves on CPU, and
    compares with the offline engine in the same dtype."""
    return request.param


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, dtype: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(tiny_checkpoint, address, tmp / "engine.log", "--served-model-name", "tiny", "--dtype", dtype)
    servers: dict[int, subprocess.Popen] = {}
    try:
        keyed, open_ = free_port(), free_port()
        servers[keyed] = start_server(
            address, keyed, tmp / "keyed.log", "--api-key", API_KEY, "--max-request-bytes", str(BODY_LIMIT)
        )
        servers[open_] = start_server(address, open_, tmp / "open.log")
        yield Stack(address, engine, tmp / "engine.log", keyed, open_, servers, tmp)
    finally:
        for proc in servers.values():
            stop(proc)
        stop(engine)


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path, dtype: str) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def sdk(stack: Stack, port: int | None = None) -> openai.OpenAI:
    port = port or stack.keyed_port
    return openai.OpenAI(
        base_url=f"{stack.url(port)}/v1",
        api_key=API_KEY if port == stack.keyed_port else "none",
        max_retries=0,
        timeout=60,
    )


def chat_ids(hf_tokenizer, messages: list[dict]) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def expected(
    offline: LLM, hf_tokenizer, prompt_ids: list[int], max_tokens: int, **params
) -> tuple[str, list[int], str]:
    out = offline.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))[0]
    return hf_tokenizer.decode(out.token_ids, skip_special_tokens=True), out.token_ids, out.finish_reason


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response, checking the `\\n\\n` separators."""
    raw = response.read().decode()
    assert raw.endswith("\n\n") and "\r" not in raw
    events = [block for block in raw.split("\n\n") if block.strip()]
    payloads = []
    for block in events:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if lines:
            assert all(line.startswith("data: ") for line in lines), block
            payloads.append("\n".join(line[6:] for line in lines))
    return payloads


# Correctness ---------------------------------------------------------------------------


def test_chat_greedy_text_and_usage_equal_the_offline_engine(stack: Stack, offline: LLM, hf_tokenizer) -> None:
    prompt = chat_ids(hf_tokenizer, MESSAGES)
    text, tokens, finish = expected(offline, hf_tokenizer, prompt, 24)
    for port in (stack.keyed_port, stack.open_port):
        reply = sdk(stack, port).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
        assert reply.object == "chat.completion" and reply.model == "tiny"
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].message.content == text
        assert reply.choices[0].finish_reason == finish
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(tokens))
        assert reply.usage.total_tokens == len(prompt) + len(tokens)


def test_completions_streamed_and_not_equal_the_offline_engine(stack: Stack, offline: LLM, hf_tokenizer) -> None:
    prompt = "Once upon a time"
    ids = hf_tokenizer(prompt)["input_ids"]
    text, tokens, _ = expected(offline, hf_tokenizer, ids, 20, ignore_eos=True)
    client = sdk(stack)
    whole = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.object == "text_completion" and whole.choices[0].text == text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20
    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    by_ids = client.completions.create(
        model="tiny", prompt=ids, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == text


def test_chat_stream_shape_role_finish_usage_and_done(stack: Stack, offline: LLM, hf_tokenizer) -> None:
    text, tokens, _ = expected(offline, hf_tokenizer, chat_ids(hf_tokenizer, MESSAGES), 16, ignore_eos=True)
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "n": 2,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{stack.url(stack.open_port)}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 32
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert all("role" not in c["delta"] for c in mine[1:])
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
        assert "".join(c["delta"].get("content", "") for c in mine) == text
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_strings_end_the_text_before_them_streamed_or_not(stack: Stack, offline: LLM, hf_tokenizer) -> None:
    free, _, _ = expected(offline, hf_tokenizer, chat_ids(hf_tokenizer, MESSAGES), 40, ignore_eos=True)
    stop = free[10:13]  # a stop string from the middle of the text, likely spanning tokens
    assert stop and stop in free
    client = sdk(stack)
    common = dict(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    whole = client.chat.completions.create(**common)
    assert whole.choices[0].message.content == free[: free.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **common))
    assert streamed == free[: free.index(stop)] and stop not in streamed


def test_n_choices_with_a_seed_are_reproducible(stack: Stack) -> None:
    client = sdk(stack)
    ask = lambda: client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=12,
        temperature=1.0,  # noqa: E731
        n=2,
        seed=42,
        extra_body={"ignore_eos": True},
    )
    first, second = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in second.choices]
    assert texts[0] != texts[1], "the two choices drew the same tokens: seeds per choice are not distinct"
    assert first.usage.completion_tokens == 24


def test_logprobs_for_chat_and_completions(stack: Stack) -> None:
    client = sdk(stack)
    chat = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content), "greedy = top-1"
    completion = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_models_health_and_metrics(stack: Stack) -> None:
    models = sdk(stack).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert sdk(stack).models.retrieve("tiny").id == "tiny"
    assert httpx.get(f"{stack.url(stack.open_port)}/health").status_code == 200
    metrics = httpx.get(f"{stack.url(stack.open_port)}/metrics").text
    for name in (
        "splitinfer_requests_total",
        "splitinfer_time_to_first_token_seconds_bucket",
        "splitinfer_inter_token_latency_seconds_bucket",
        "splitinfer_e2e_request_latency_seconds_bucket",
        "splitinfer_prompt_tokens_total",
        "splitinfer_generation_tokens_total",
        "splitinfer_engine_waiting_requests",
        "splitinfer_engine_running_requests",
        "splitinfer_engine_kv_cache_usage",
    ):
        assert name in metrics


# Errors -------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"stop": [1, 2]}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
        ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v),
)
def test_invalid_parameters_are_400_with_the_param(stack: Stack, body: dict, param: str | None) -> None:
    full = {"model": "tiny", "messages": MESSAGES, **body}
    for stream in (False, True):  # a streamed request gets its 4xx before any event
        r = httpx.post(f"{stack.url(stack.open_port)}/v1/chat/completions", json={**full, "stream": stream})
        assert_error(r, 400, param)
        assert r.headers["content-type"].startswith("application/json")


def test_the_engine_judges_what_depends_on_the_model_and_the_server_names_the_clients_field(
    stack: Stack, tiny_checkpoint: Path
) -> None:
    """The context length is the engine's rule (one owner); the server passes its refusal on as
    a 400 naming the request's own field (`messages`, `prompt`, `max_tokens`)."""
    base = stack.url(stack.open_port)
    model = httpx.get(f"{base}/v1/models").json()["data"][0]
    vocab, context = json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"], model["max_model_len"]
    for ids in ([1, vocab], [1, 2**40], [1, -1]):  # the server's tokenizer must read them, so it checks too
        assert_error(httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": ids}), 400, "prompt")
    too_long = {"model": "tiny", "prompt": [1] * context}
    error = assert_error(httpx.post(f"{base}/v1/completions", json=too_long), 400, "prompt")
    assert error["code"] == "context_length_exceeded" and f"max_model_len={context}" in error["message"]
    too_much = {"model": "tiny", "messages": MESSAGES, "max_tokens": context}
    error = assert_error(httpx.post(f"{base}/v1/chat/completions", json=too_much), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded"


def test_every_error_status_in_openai_shape(stack: Stack) -> None:
    base, keyed = stack.url(stack.open_port), stack.url(stack.keyed_port)
    chat = "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(httpx.post(base + chat, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(base + chat, json=[1, 2]), 400)
    too_long = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 3000}]}
    assert assert_error(httpx.post(base + chat, json=too_long), 400, "messages")["code"] == "context_length_exceeded"
    assert (
        assert_error(httpx.post(base + chat, json={"model": "gpt-9", "messages": MESSAGES}), 404, "model")["code"]
        == "model_not_found"
    )
    assert_error(httpx.get(base + "/v1/nowhere"), 404)
    assert_error(httpx.get(base + chat), 405)
    assert_error(httpx.post(keyed + chat, json={"model": "tiny", "messages": MESSAGES}), 401)
    assert_error(
        httpx.post(
            keyed + chat, json={"model": "tiny", "messages": MESSAGES}, headers={"Authorization": "Bearer wrong"}
        ),
        401,
    )
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 * BODY_LIMIT)}]}
    assert_error(httpx.post(keyed + chat, json=huge, headers=auth), 413)
    with pytest.raises(openai.BadRequestError):
        sdk(stack).chat.completions.create(model="tiny", messages=MESSAGES, temperature=-3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0).models.list()


def test_503_while_the_engine_is_unavailable(stack: Stack) -> None:
    port = free_port()
    orphan = start_server(f"ipc://{stack.tmp}/nobody.sock", port, stack.tmp / "orphan.log", wait=False)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert_error(health, 503)
        assert_error(
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES}),
            503,
        )
    finally:
        stop(orphan)


# Load, disconnects, restarts ------------------------------------------------------------


def test_32_concurrent_mixed_requests_through_both_servers_equal_their_sequential_results(stack: Stack) -> None:
    requests = []
    for i in range(32):
        port = (stack.keyed_port, stack.open_port)[i % 2]
        if i % 3 == 0:
            requests.append(
                (
                    port,
                    "/v1/completions",
                    {
                        "model": "tiny",
                        "prompt": f"Story {i}:",
                        "max_tokens": 8 + i,
                        "temperature": 0,
                        "ignore_eos": True,
                        "stream": i % 2 == 0,
                    },
                )
            )
        else:
            messages = [{"role": "user", "content": f"Question number {i}?" * (1 + i % 4)}]
            requests.append(
                (
                    port,
                    "/v1/chat/completions",
                    {
                        "model": "tiny",
                        "messages": messages,
                        "max_tokens": 4 + i,
                        "temperature": 0,
                        "stream": i % 4 == 1,
                    },
                )
            )

    async def one(client: httpx.AsyncClient, port: int, path: str, body: dict) -> str:
        headers = {"Authorization": f"Bearer {API_KEY}"} if port == stack.keyed_port else {}
        url = f"http://127.0.0.1:{port}{path}"
        if not body["stream"]:
            r = await client.post(url, json=body, headers=headers)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return choice.get("text") if "text" in choice else choice["message"]["content"]
        text = ""
        async with client.stream("POST", url, json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        return text

    async def run(concurrent: bool) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            if concurrent:
                return await asyncio.gather(*(one(client, *r) for r in requests))
            return [await one(client, *r) for r in requests]

    sequential = asyncio.run(run(False))
    assert asyncio.run(run(True)) == sequential


def engine_stats(stack: Stack) -> dict[str, float]:
    text = httpx.get(f"{stack.url(stack.open_port)}/metrics").text
    return {
        name: float(re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M).group(1))
        for name in ("splitinfer_engine_running_requests", "splitinfer_engine_kv_cache_usage")
    }


def test_a_client_that_disconnects_after_3_chunks_frees_its_kv_blocks(stack: Stack) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.url(stack.open_port)}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = 0
        while seen < 3:
            if next(lines).startswith("data: "):
                seen += 1
        assert engine_stats(stack)["splitinfer_engine_running_requests"] == 1
    deadline = time.monotonic() + 5
    while engine_stats(stack) != {"splitinfer_engine_running_requests": 0, "splitinfer_engine_kv_cache_usage": 0}:
        assert time.monotonic() < deadline, f"still held after disconnect: {engine_stats(stack)}"
        time.sleep(0.05)


def test_a_server_killed_mid_stream_restarts_in_under_2_s_without_an_engine_reload(stack: Stack) -> None:
    port = stack.open_port
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.url(port)}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        stack.servers[port].send_signal(signal.SIGKILL)
        stack.servers[port].wait()
    engine_pid = stack.engine.pid
    started = time.monotonic()
    stack.servers[port] = start_server(stack.address, port, stack.tmp / "restarted.log", wait=False)
    wait_for_health(stack.servers[port], stack.tmp / "restarted.log", port, timeout_s=10)
    reply = sdk(stack, port).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    took = time.monotonic() - started
    assert reply.choices[0].message.content is not None
    assert took < 2.0, f"the restarted server answered after {took:.2f} s"
    assert stack.engine.poll() is None and stack.engine.pid == engine_pid
    assert stack.engine_log.read_text().count("engine ready in") == 1
    deadline = time.monotonic() + 10  # the killed server's request goes once the engine notices
    while engine_stats(stack)["splitinfer_engine_running_requests"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_non_streamed_request_is_aborted_when_its_client_disconnects(stack: Stack) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 1900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url(stack.open_port)}/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 5
    while engine_stats(stack) != {"splitinfer_engine_running_requests": 0, "splitinfer_engine_kv_cache_usage": 0}:
        assert time.monotonic() < deadline, f"still running after the client left: {engine_stats(stack)}"
        time.sleep(0.05)


def test_an_engine_failure_mid_stream_sends_an_error_event_then_done(tiny_checkpoint: Path, tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/engine.sock"
    engine = start_engine(
        tiny_checkpoint, address, tmp_path / "engine.log", "--lease", "1", "--served-model-name", "tiny"
    )
    port = free_port()
    server = start_server(address, port, tmp_path / "server.log")
    try:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1900, "stream": True, "ignore_eos": True}
        payloads = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payloads.append(line[6:])
                    if len(payloads) == 2:
                        engine.kill()  # kill -9: the server notices within the lease
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert all("choices" in json.loads(p) for p in payloads[:-2])
        assert_error(httpx.get(f"http://127.0.0.1:{port}/health"), 503)
    finally:
        stop(server)
        stop(engine)
