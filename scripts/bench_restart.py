#!/usr/bin/env python3
"""Restart without reload: kill -9 an HTTP server in the middle of a stream, start it again,
and time how long it takes to answer, beside the engine's own load time.

    python scripts/bench_restart.py                   # a tiny demo checkpoint on CPU
    python scripts/bench_restart.py --model DIR -- --device cuda --dtype bfloat16

Prints the engine's load time (from its `ready` log line), then for each restart the time
from the new server process's start to its first 200 on /health and to its first
completed chat request, and checks that the engine kept its pid and loaded the model once.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(text: str, log: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r}:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def start_server(address: str, port: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "splitinfer.server", "--engine", address, "--port", str(port)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def first_200(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server never answered 200 on {url}")
        time.sleep(0.005)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint directory (default: build a tiny demo checkpoint).")
    p.add_argument("--restarts", type=int, default=5, help="How many kill -9 / restart rounds (default: %(default)s).")
    p.add_argument("engine_args", nargs="*", help="Flags for the engine, after `--` (e.g. -- --device cuda).")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model
        if model is None:
            model = str(tmp / "tiny")
            subprocess.run(
                [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), model], check=True, capture_output=True
            )
        address, engine_log = f"ipc://{tmp}/engine.sock", tmp / "engine.log"
        spawned = time.perf_counter()
        engine = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "splitinfer.engine",
                "--model",
                model,
                "--address",
                address,
                *(args.engine_args or ["--device", "cpu", "--kv-cache-gb", "0.05"]),
            ],
            stdout=engine_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        server = None
        try:
            wait_for("ready on", engine_log, engine)
            spawn_to_ready_s = time.perf_counter() - spawned
            load_s = float(re.search(r"ready on \S+ in ([\d.]+) s", engine_log.read_text()).group(1))
            port = free_port()
            server = start_server(address, port, tmp / "server.log")
            first_200(f"http://127.0.0.1:{port}/health", server)
            model_name = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            body = {"model": model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
            print(
                f"engine (pid {engine.pid}): process start to ready {spawn_to_ready_s:.2f} s, "
                f"of which loading the model and KV cache {load_s:.2f} s"
            )
            print("server restarts after kill -9 mid-stream, from the new process's start:")
            print(f"{'restart':>8} {'to /health 200':>15} {'to first chat 200':>18}")
            for round_ in range(1, args.restarts + 1):
                stream = {**body, "max_tokens": 1000, "stream": True, "ignore_eos": True}
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=stream, timeout=60) as r:
                    next(line for line in r.iter_lines() if line.startswith("data: "))
                    server.send_signal(signal.SIGKILL)  # mid-stream
                    server.wait()
                start = time.perf_counter()
                server = start_server(address, port, tmp / "server.log")
                first_200(f"http://127.0.0.1:{port}/health", server)
                health_s = time.perf_counter() - start
                chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
                chat_s = time.perf_counter() - start
                assert chat.status_code == 200, chat.text
                print(f"{round_:>8} {health_s:>13.2f} s {chat_s:>16.2f} s")
            loads = engine_log.read_text().count("engine ready in")
            print(f"engine pid unchanged: {engine.poll() is None}; model loads in the engine log: {loads}")
        finally:
            if server is not None and server.poll() is None:
                server.terminate()
                server.wait(10)
            engine.terminate()
            engine.wait(30)


if __name__ == "__main__":
    main()
