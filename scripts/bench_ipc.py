#!/usr/bin/env python3
"""Round trips between a client process and the engine process: Ping -> Pong, and a trivial
Generate (1 prompt token, 1 output token) -> its first Outputs.

    python scripts/bench_ipc.py                       # starts an engine on a tiny checkpoint
    python scripts/bench_ipc.py --address ipc:///tmp/e.sock   # measures a running engine

Two clients are measured: a bare synchronous DEALER (the protocol and the engine loop
alone) and the asyncio `EngineClient` the HTTP servers use (adds the event loop). Beside
them, the floor: the same DEALER against a bare ROUTER echo in another Python process,
measured in the same run (on a shared machine both move together). Then, in this process,
what the protocol itself costs per step (`bench_codec.py`: building, encoding and decoding
one step's Outputs for 256 requests, and a Generate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zmq

from splitinfer.protocol import Generate, Hello, Outputs, Ping, Pong, SamplingParams, decode, encode
from splitinfer.server.engine_client import ENGINE_REPLY_LIMITS, EngineClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_codec  # noqa: E402 (a sibling script)

REPO = Path(__file__).resolve().parents[1]


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1e6  # noqa: E731
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": statistics.fmean(ordered) * 1e6, "n": len(ordered)}


def bare_dealer(address: str, pings: int, generates: int) -> dict[str, dict[str, float]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)

    def round_trip(message: object, done) -> float:
        start = time.perf_counter()
        sock.send(encode(message))
        while True:
            reply = decode(sock.recv(), ENGINE_REPLY_LIMITS)
            if done(reply):
                return time.perf_counter() - start

    round_trip(
        Hello(client_id=f"bench-{uuid.uuid4().hex[:6]}", nonce=uuid.uuid4().hex, pid=os.getpid()), lambda r: True
    )
    ping = [round_trip(Ping(nonce=i, sent_at=0.0), lambda r: isinstance(r, Pong)) for i in range(pings + 100)][100:]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    first = [
        round_trip(Generate(request_id=f"g{i}", prompt_token_ids=[1], params=params), lambda r: isinstance(r, Outputs))
        for i in range(generates + 20)
    ][20:]
    sock.close()
    return {"ping (bare DEALER)": percentiles(ping), "generate to first output (bare DEALER)": percentiles(first)}


async def asyncio_client(address: str, pings: int, generates: int) -> dict[str, dict[str, float]]:
    client = EngineClient(address)
    await client.start()
    ping = []
    for _ in range(pings + 100):
        start = time.perf_counter()
        await client.ping()
        ping.append(time.perf_counter() - start)
    first = []
    params = SamplingParams(max_tokens=1, temperature=0.0)
    for i in range(generates + 20):
        start = time.perf_counter()
        async for _ in client.generate(f"a{i}", [1], params):
            first.append(time.perf_counter() - start)
            break
    await client.close()
    return {
        "ping (EngineClient)": percentiles(ping[100:]),
        "generate to first output (EngineClient)": percentiles(first[20:]),
    }


def start_engine(workdir: Path) -> tuple[subprocess.Popen, str]:
    checkpoint = workdir / "tiny"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(checkpoint)], check=True, capture_output=True
    )
    address = f"ipc://{workdir}/engine.sock"
    log = (workdir / "engine.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitinfer.engine",
            "--model",
            str(checkpoint),
            "--address",
            address,
            "--device",
            "cpu",
            "--kv-cache-gb",
            "0.05",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while "ready on" not in (workdir / "engine.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((workdir / "engine.log").read_text())
        time.sleep(0.05)
    return proc, address


ECHO_SERVER = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    sock.send_multipart(sock.recv_multipart())
"""


def echo_floor(workdir: Path, pings: int) -> dict[str, dict[str, float]]:
    """Round trips of a 40-byte frame to a ROUTER that sends each message straight back."""
    address = f"ipc://{workdir}/echo.sock"
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, address])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        samples = []
        for _ in range(pings + 100):
            start = time.perf_counter()
            sock.send(b"x" * 40)
            sock.recv()
            samples.append(time.perf_counter() - start)
    finally:
        sock.close()
        proc.kill()
        proc.wait()
    return {"floor: bare DEALER to a bare ROUTER echo": percentiles(samples[100:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="A running engine to measure (default: start one on a tiny checkpoint).")
    p.add_argument("--pings", type=int, default=5000, help="Ping round trips per client (default: %(default)s).")
    p.add_argument("--generates", type=int, default=500, help="Generate round trips per client (default: %(default)s).")
    p.add_argument(
        "--codec-requests",
        type=int,
        default=256,
        help="Requests in the step whose Outputs the codec benchmark builds (default: %(default)s).",
    )
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = (None, args.address) if args.address else start_engine(Path(tmp))
        try:
            results = echo_floor(Path(tmp), args.pings)
            results |= bare_dealer(address, args.pings, args.generates)
            results |= asyncio.run(asyncio_client(address, args.pings, args.generates))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    if args.json:  # the round trips; `bench_codec.py --json` gives the codec's numbers
        print(json.dumps(results, indent=2))
        return
    codec = bench_codec.measure(args.codec_requests, prompt_tokens=512)
    print(f"{'round trip':<42} {'p50 us':>9} {'p99 us':>9} {'mean us':>9} {'n':>6}")
    for name, r in results.items():
        print(f"{name:<42} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['mean_us']:>9.1f} {r['n']:>6}")
    print()
    bench_codec.print_table(codec)


if __name__ == "__main__":
    main()
