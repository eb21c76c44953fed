"""The engine process with real clients in real processes over real ZeroMQ sockets (CPU, tiny
checkpoint): correctness across clients, leases after kill -9, restarts on both sides,
malformed traffic, and the process's own lifecycle (socket file, refusal, SIGTERM)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from procs import PYTHON, REPO, Worker, start_engine, stop

from splitinfer.engine import LLM
from splitinfer.protocol import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    HelloReply,
    SamplingParams,
    Stats,
    StatsReply,
    decode,
    encode,
)
from splitinfer.server.engine_client import (
    ENGINE_REPLY_LIMITS,
    TRANSPORT_TIMEOUT_S,
    EngineClient,
    EngineUnavailable,
    Health,
)

LEASE_S = 1.0


class Peer:
    """A bare synchronous DEALER speaking the protocol: for fuzzing and for reading stats."""

    def __init__(self, address: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def request(self, message: object, timeout_s: float = 10.0) -> object:
        self.socket.send(encode(message))
        return self.receive(timeout_s)

    def receive(self, timeout_s: float = 10.0) -> object:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError("the engine did not answer")
        return decode(self.socket.recv(), ENGINE_REPLY_LIMITS)

    def hello(self) -> HelloReply:
        reply = self.request(Hello(client_id=f"peer-{uuid.uuid4().hex[:6]}", nonce=uuid.uuid4().hex, pid=os.getpid()))
        assert isinstance(reply, HelloReply)
        return reply

    def stats(self) -> StatsReply:
        """The engine's stats; this peer does not heartbeat, so it says Hello again when the
        engine has expired its lease (as the protocol asks of any client)."""
        reply = self.request(Stats())
        if isinstance(reply, Error) and reply.code == "no_session":
            self.hello()
            reply = self.request(Stats())
        assert isinstance(reply, StatsReply), reply
        return reply

    def close(self) -> None:
        self.socket.close()


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Poll `condition` until true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


@pytest.fixture
def address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/engine.sock"


@pytest.fixture
def engine(tiny_checkpoint: Path, address: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    log = tmp_path / "engine.log"
    proc = start_engine(tiny_checkpoint, address, log, "--lease", str(LEASE_S))
    try:
        yield proc, log
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


def workload(prefix: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": f"{prefix}{i}",
            "prompt": [rng.randrange(500) for _ in range(rng.randint(1, 60))],
            "max_tokens": rng.randint(1, 24),
        }
        for i in range(count)
    ]


def expected_tokens(llm: LLM, requests: list[dict]) -> dict[str, list[int]]:
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True) for r in requests]
    outs = llm.generate([r["prompt"] for r in requests], params)
    return {r["id"]: o.token_ids for r, o in zip(requests, outs)}


def test_two_client_processes_stream_16_requests_equal_to_offline_generate(engine, address: str, offline: LLM) -> None:
    # Both clients use the same request ids: the engine keeps each client's requests apart.
    a, b = workload("r", 8, seed=1), workload("r", 8, seed=2)
    workers = [Worker(address, "client-a", a), Worker(address, "client-b", b)]
    try:
        results = [w.results() for w in workers]
    finally:
        for w in workers:
            w.kill()
    for requests, got in zip((a, b), results):
        expected = expected_tokens(offline, requests)
        assert {rid: r["tokens"] for rid, r in got.items()} == expected
        assert all(r["finish_reason"] == "length" for r in got.values())


def test_kill_9_of_a_client_frees_its_blocks_within_the_lease_and_spares_the_other(
    engine, address: str, offline: LLM
) -> None:
    peer = Peer(address)
    try:
        peer.hello()
        baseline = peer.stats()
        doomed = Worker(
            address, "doomed", [{"id": f"long{i}", "prompt": list(range(1, 100)), "max_tokens": 1800} for i in range(4)]
        )
        survivor_requests = workload("s", 6, seed=3)
        doomed.wait_for("streaming")
        survivor = Worker(address, "survivor", survivor_requests)
        assert peer.stats().kv_used_blocks > baseline.kv_used_blocks
        doomed.kill()  # SIGKILL: no Goodbye, the socket just goes away
        took = wait_until(
            lambda: peer.stats().kv_used_blocks == baseline.kv_used_blocks,
            timeout_s=LEASE_S + 5,
            what="the doomed client's blocks being freed",
        )
        assert took <= LEASE_S + 2
        got = survivor.results()
        assert {rid: r["tokens"] for rid, r in got.items()} == expected_tokens(offline, survivor_requests)
        assert peer.stats().running == 0
    finally:
        peer.close()


def test_a_client_restarting_under_the_same_id_gets_a_clean_session(
    tiny_checkpoint: Path, address: str, tmp_path: Path, offline: LLM
) -> None:
    log = tmp_path / "engine.log"
    # A long lease: what frees the old instance's blocks must be its successor's Hello, not the lease.
    proc = start_engine(tiny_checkpoint, address, log, "--lease", "60")
    peer = Peer(address)
    try:
        peer.hello()
        baseline = peer.stats()
        first = Worker(address, "server-1", [{"id": "x0", "prompt": [5] * 40, "max_tokens": 1900}])
        first.wait_for("streaming")
        # Hung, not dead: its socket stays up, so only the new instance's Hello can free its request.
        first.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        assert peer.stats().running == 1, "with a 60 s lease the hung instance's request keeps running"
        again = workload("x", 3, seed=4)  # the same client id, and "x0" again
        second = Worker(address, "server-1", again)
        got = second.results()
        first.kill()
        assert {rid: r["tokens"] for rid, r in got.items()} == expected_tokens(offline, again)
        wait_until(lambda: peer.stats().kv_used_blocks == baseline.kv_used_blocks, 5, "the orphan's blocks freed")
        assert proc.poll() is None
        text = log.read_text()
        assert text.count("engine ready in") == 1, "the engine loaded the model more than once"
        assert "restarted (new instance): aborting the 1 request(s)" in text
    finally:
        peer.close()
        stop(proc)


def junk_frames(count: int, seed: int) -> list[list[bytes]]:
    """Random bytes, random msgpack values, and valid messages with one thing broken."""
    rng = random.Random(seed)
    valid = [
        msgpack.packb({"type": "ping", "v": PROTOCOL_VERSION, "nonce": 1, "sent_at": 0.5}),
        msgpack.packb(
            {
                "type": "generate",
                "v": PROTOCOL_VERSION,
                "request_id": "g",
                "prompt_token_ids": [1, 2],
                "params": {"max_tokens": 4},
            }
        ),
    ]
    breakers = [
        lambda m: {**m, "v": rng.choice([0, 2, "1", None, -1])},
        lambda m: {**m, "type": rng.choice(["pong!", "", 7, None, "GENERATE"])},
        lambda m: {k: v for k, v in m.items() if k != rng.choice(list(m))},
        lambda m: {
            **m,
            rng.choice(list(m)): rng.choice([True, -5, 2**64 - 1, 1e308, "x" * 300, [], {}, None, b"\xff"]),
        },
        lambda m: {
            **m,
            "params": {
                "max_tokens": 4,
                rng.choice(["top_p", "temperature", "top_k", "logit_bias"]): rng.choice(
                    [-1, 2.5, "x", {"a": 1}, float("nan")]
                ),
            },
        },
    ]
    frames: list[list[bytes]] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            frames.append([rng.randbytes(rng.randint(0, 200))])
        elif kind == 1:
            value = rng.choice([None, 3, -1.5, "text", [1, 2, 3], {"type": 1}, {1: 2}, [[]] * 5, b"raw"])
            frames.append([msgpack.packb(value)])
        elif kind == 2:
            message = msgpack.unpackb(rng.choice(valid), strict_map_key=False)
            frames.append([msgpack.packb(rng.choice(breakers)(message), use_bin_type=True)])
        else:
            frames.append([rng.randbytes(8), msgpack.packb({"type": "stats", "v": PROTOCOL_VERSION})])  # two parts
    return frames


def test_a_thousand_malformed_frames_leave_the_engine_alive_and_correct(engine, address: str, offline: LLM) -> None:
    proc, _ = engine
    fuzzer = Peer(address)
    try:
        frames = junk_frames(1000, seed=5)
        replies = []
        for parts in frames:
            fuzzer.socket.send_multipart(parts)
            replies.append(fuzzer.receive())
        assert all(isinstance(r, Error) for r in replies), "every junk frame gets an Error reply"
        assert {r.code for r in replies} >= {"bad_message", "bad_version", "unknown_type", "no_session"}
        assert proc.poll() is None
        requests = workload("after", 4, seed=6)
        got = Worker(address, "after-fuzz", requests).results()
        assert {rid: r["tokens"] for rid, r in got.items()} == expected_tokens(offline, requests)
    finally:
        fuzzer.close()


def test_a_connected_client_reconnects_by_itself_when_the_engine_restarts(
    tiny_checkpoint: Path, address: str, tmp_path: Path
) -> None:
    log = tmp_path / "engine.log"
    proc = start_engine(tiny_checkpoint, address, log, "--lease", str(LEASE_S))

    async def scenario() -> None:
        nonlocal proc
        client = EngineClient(address, client_id="resilient")
        first = await client.start()
        try:
            stream = client.generate("long", [3] * 20, SamplingParams(max_tokens=1900, ignore_eos=True))
            await stream.__anext__()
            proc.kill()  # kill -9: the socket file stays behind
            proc.wait()
            with pytest.raises(EngineUnavailable):
                async for _ in stream:
                    pass
            assert client.health is Health.UNAVAILABLE
            proc = start_engine(tiny_checkpoint, address, log, "--lease", str(LEASE_S))
            deadline = time.monotonic() + 10
            while client.health is not Health.READY and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert client.health is Health.READY
            assert client.info.engine_id != first.engine_id
            tokens = [
                t
                async for out in client.generate("again", [1, 2, 3], SamplingParams(max_tokens=5))
                for t in out.new_token_ids
            ]
            assert len(tokens) == 5
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        stop(proc)
    assert "removed the stale socket file" in log.read_text()


def test_an_engine_step_longer_than_the_lease_fails_nothing(make_checkpoint, address: str, tmp_path: Path) -> None:
    """A long prefill (a second or more on CPU) keeps the engine's loop from answering for
    several leases; its connection stays up, so the client waits instead of giving up."""
    checkpoint = make_checkpoint(
        "--layers",
        "8",
        "--hidden",
        "512",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--intermediate",
        "2048",
        "--max-position",
        "4096",
    )
    lease = 0.4
    proc = start_engine(
        checkpoint,
        address,
        tmp_path / "engine.log",
        "--lease",
        str(lease),
        "--max-num-batched-tokens",
        "4096",
        "--num-kv-blocks",
        "512",
    )

    async def scenario() -> tuple[float, list[int]]:
        client = EngineClient(address)
        await client.start()
        try:
            start = time.monotonic()
            tokens = []
            async for out in client.generate(
                "long", [i % 500 for i in range(3000)], SamplingParams(max_tokens=4, ignore_eos=True)
            ):
                tokens += out.new_token_ids
                if len(tokens) == 1:
                    first = time.monotonic() - start
            assert client.health is Health.READY
            return first, tokens
        finally:
            await client.close()

    try:
        first, tokens = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        stop(proc)
    assert first > 2 * lease, f"the prefill took {first:.2f} s: too short to test anything"
    assert len(tokens) == 4


def test_a_frozen_engine_is_dropped_within_the_transport_timeout_and_rejoined_when_it_thaws(
    engine, address: str
) -> None:
    """SIGSTOP freezes the engine's I/O thread too: the transport heartbeats go unanswered."""
    proc, _ = engine

    async def scenario() -> float:
        client = EngineClient(address)
        await client.start()
        try:
            stream = client.generate("frozen", [3] * 20, SamplingParams(max_tokens=1900, ignore_eos=True))
            await stream.__anext__()
            proc.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            with pytest.raises(EngineUnavailable):
                async for _ in stream:
                    pass
            noticed = time.monotonic() - frozen
            proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while client.health is not Health.READY and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert client.health is Health.READY
            tokens = [
                t
                async for out in client.generate("thawed", [1, 2, 3], SamplingParams(max_tokens=5))
                for t in out.new_token_ids
            ]
            assert len(tokens) == 5
            return noticed
        finally:
            await client.close()

    try:
        noticed = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        proc.send_signal(signal.SIGCONT)
    assert noticed < TRANSPORT_TIMEOUT_S + 1.5, f"a frozen engine went unnoticed for {noticed:.1f} s"


def test_socket_file_is_private_a_second_engine_refuses_and_sigterm_exits_cleanly(
    engine, address: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    proc, log = engine
    path = Path(address.removeprefix("ipc://"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = subprocess.run(
        [PYTHON, "-m", "splitinfer.engine", "--model", str(tiny_checkpoint), "--address", address, "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert second.returncode == 2 and "already serving" in second.stderr
    assert proc.poll() is None

    async def in_flight() -> list:
        client = EngineClient(address)
        await client.start()
        outputs = []
        stream = client.generate("cut", [9] * 10, SamplingParams(max_tokens=1900, ignore_eos=True))
        outputs.append(await stream.__anext__())
        proc.send_signal(signal.SIGTERM)
        try:
            async for out in stream:
                outputs.append(out)
        except EngineUnavailable:
            outputs.append("unavailable")
        await client.close()
        return outputs

    outputs = asyncio.run(asyncio.wait_for(in_flight(), 30))
    assert outputs[-1] != "unavailable" and outputs[-1].finish_reason == "abort"
    assert proc.wait(10) == 0
    assert not path.exists()
    assert "stopped" in log.read_text()


def test_engine_help_documents_every_flag_also_as_console_script() -> None:
    out = subprocess.run(
        [PYTHON, "-m", "splitinfer.engine", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    script = Path(PYTHON).parent / "splitinfer-engine"
    assert script.exists(), "pip install did not create the splitinfer-engine console script"
    assert subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout == out
    for flag in (
        "--model",
        "--address",
        "--lease",
        "--device",
        "--dtype",
        "--max-model-len",
        "--block-size",
        "--num-kv-blocks",
        "--gpu-memory-utilization",
        "--kv-cache-gb",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--no-prefix-caching",
        "--enforce-eager",
        "--seed",
        "--served-model-name",
        "--max-frame-bytes",
        "--log-level",
    ):
        assert flag in out
