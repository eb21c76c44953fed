"""Faults injected into a real engine process (tests/faulty_engine.py) with other clients'
requests in flight: a request that trips a bug fails alone and the engine keeps serving;
a device that can compute nothing any more stops the engine cleanly with exit status 1."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faulty_engine import POISON
from procs import PYTHON, REPO, start_engine, stop
from test_engine_process import Peer

from splitinfer.engine import LLM
from splitinfer.protocol import ErrorCode, SamplingParams
from splitinfer.server.engine_client import EngineClient, EngineRequestError, EngineUnavailable, Health

FAULTY = (PYTHON, str(REPO / "tests" / "faulty_engine.py"))
GOOD = {
    "greedy": ([3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
    "seeded": (list(range(20, 70)), SamplingParams(max_tokens=40, temperature=0.9, seed=42, ignore_eos=True)),
    "short": ([8, 8, 8], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
}
BAD = ([POISON, 5, 5, 5], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))


@pytest.fixture(scope="module")
def clean(tiny_checkpoint: Path) -> dict[str, list[int]]:
    llm = LLM(tiny_checkpoint, device="cpu", dtype="float32")
    outs = llm.generate([prompt for prompt, _ in GOOD.values()], [params for _, params in GOOD.values()])
    return {rid: out.token_ids for rid, out in zip(GOOD, outs)}


@pytest.fixture
def faulty(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, Path, str]]:
    address, log = f"ipc://{tmp_path}/engine.sock", tmp_path / "engine.log"
    proc = start_engine(tiny_checkpoint, address, log, launcher=(*FAULTY, request.param))
    try:
        yield proc, log, address
    finally:
        stop(proc)


async def run(
    client: EngineClient, rid: str, prompt: list[int], params: SamplingParams, started: asyncio.Event | None = None
) -> list[int] | str | BaseException:
    """The request's tokens if it finished normally; its finish reason if that was "abort";
    the exception if it failed."""
    tokens: list[int] = []
    try:
        async for out in client.generate(rid, prompt, params):
            tokens += out.new_token_ids
            if started is not None and tokens:
                started.set()
            if out.finish_reason == "abort":
                return "abort"
    except (EngineRequestError, EngineUnavailable) as exc:
        return exc
    return tokens


@pytest.mark.parametrize("faulty", ["poison"], indirect=True)
def test_a_request_that_trips_a_bug_fails_alone_and_the_engine_keeps_serving(faulty, clean) -> None:
    proc, log, address = faulty

    async def scenario() -> tuple[dict, list[int]]:
        client = EngineClient(address)
        await client.start()
        try:
            started = asyncio.Event()
            good = {rid: asyncio.create_task(run(client, rid, *GOOD[rid], started)) for rid in GOOD}
            await started.wait()  # the others are decoding when the poisoned request joins
            bad = await run(client, "bad", *BAD)
            results = {rid: await task for rid, task in good.items()} | {"bad": bad}
            after = await run(client, "after", *GOOD["greedy"])
            return results, after
        finally:
            await client.close()

    results, after = asyncio.run(scenario())
    bad = results.pop("bad")
    assert isinstance(bad, EngineRequestError) and bad.code == ErrorCode.INTERNAL
    assert "failed while computing this request (InjectedFault)" in str(bad) and not bad.retryable
    assert results == clean, "the other requests differ from a clean run"
    assert after == clean["greedy"]
    assert proc.poll() is None
    peer = Peer(address)
    try:
        peer.hello()
        stats = peer.stats()
        assert (stats.running, stats.waiting, stats.kv_used_blocks) == (0, 0, 0), "KV blocks leaked"
    finally:
        peer.close()
    text = log.read_text()
    assert text.count("Traceback") == 1, "the failure is logged once with its traceback"
    assert "request" in text and "failed and was ended: InjectedFault" in text


@pytest.mark.parametrize("faulty", ["dead"], indirect=True)
def test_a_dead_device_stops_the_engine_with_status_1_and_tells_the_clients(
    faulty, caplog: pytest.LogCaptureFixture
) -> None:
    proc, log, address = faulty

    async def scenario() -> tuple[object, object]:
        client = EngineClient(address)
        await client.start()
        try:
            started = asyncio.Event()
            survivor = asyncio.create_task(
                run(
                    client, "long", [1] * 30, SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True), started
                )
            )
            await started.wait()
            bad = await run(client, "bad", *BAD)
            result = bad, await survivor
            # The engine's Shutdown follows the aborts on the socket: wait for it to be read
            # rather than closing first (closing first lost the race once in CI).
            deadline = time.monotonic() + 10
            while client.health is not Health.UNAVAILABLE and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return result
        finally:
            monitor = client._monitor  # of the socket it is reconnecting on now
            await client.close()
            # Closed by close() itself, not left to a task that may never have run: a monitor
            # left open once broke the handshake of every later client in the process.
            assert monitor is None or monitor.closed

    with caplog.at_level("WARNING", logger="splitinfer.server.engine_client"):
        bad, survivor = asyncio.run(scenario())
    assert (bad, survivor) == ("abort", "abort"), "in-flight requests end with 'abort', as on SIGTERM"
    assert "the engine failed and is stopping" in caplog.text, "the client is told why"
    assert proc.wait(30) == 1
    text = log.read_text()
    assert "CRITICAL" in text and "forward with no request in it fails too" in text
    assert not Path(address.removeprefix("ipc://")).exists(), "the socket file is removed as on SIGTERM"
