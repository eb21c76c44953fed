"""Real processes for end-to-end tests: start them, wait until they are ready, always stop them."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before {text!r}:\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"no {text!r} within {timeout_s} s:\n{log.read_text(errors='replace')}")


ENGINE = (PYTHON, "-m", "splitinfer.engine")


def spawn_engine(
    checkpoint: Path, address: str, log: Path, *extra: str, launcher: tuple[str, ...] = ENGINE
) -> subprocess.Popen:
    """`python -m splitinfer.engine` (or another `launcher` taking its arguments) on CPU,
    logging to `log`; returned at once."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *launcher,
                "--model",
                str(checkpoint),
                "--address",
                address,
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--kv-cache-gb",
                "0.05",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def start_engine(
    checkpoint: Path, address: str, log: Path, *extra: str, launcher: tuple[str, ...] = ENGINE
) -> subprocess.Popen:
    """`spawn_engine`, returned once the engine has logged `ready`."""
    proc = spawn_engine(checkpoint, address, log, *extra, launcher=launcher)
    try:
        wait_for_log(proc, log, "ready on")
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Worker:
    """`tests/engine_worker.py` as a separate client process, fed its requests on stdin. A
    thread reads its stdout, so events can be awaited one by one and none is lost."""

    def __init__(self, address: str, client_id: str, requests: list[dict]) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(REPO / "tests" / "engine_worker.py"), address, client_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.proc.stdin.write(json.dumps(requests))
        self.proc.stdin.close()
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self._events.put(json.loads(line))
        self._events.put(None)  # end of output

    def next_event(self, timeout_s: float = 60.0) -> dict:
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"worker printed nothing in {timeout_s} s") from None
        if event is None:
            raise RuntimeError(f"worker exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        return event

    def wait_for(self, event: str, timeout_s: float = 60.0) -> dict:
        while True:
            message = self.next_event(timeout_s)
            if message["event"] == event:
                return message

    def results(self, timeout_s: float = 120.0) -> dict[str, dict]:
        """Every finished request by id, once the worker has exited successfully."""
        done: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self._events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"worker did not finish within {timeout_s} s") from None
            if event is None:
                break
            if event["event"] == "done":
                done[event["id"]] = event
        if self.proc.wait() != 0:
            raise RuntimeError(f"worker failed ({self.proc.returncode}): {self.proc.stderr.read()}")
        return done

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def children_of(pid: int) -> list[int]:
    """Every descendant pid of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [child for child, p in parents.items() if p == parent]
        found += kids
        frontier += kids
    return found


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, log: Path, port: int, timeout_s: float = 30.0) -> float:
    """Poll GET /health until 200; returns the seconds it took."""
    import urllib.error
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"server on port {port} not healthy within {timeout_s} s:\n{log.read_text(errors='replace')}")


SERVER = (PYTHON, "-m", "splitinfer.server")


def start_server(
    address: str, port: int, log: Path, *extra: str, wait: bool = True, launcher: tuple[str, ...] = SERVER
) -> subprocess.Popen:
    """`python -m splitinfer.server` (or another `launcher` taking its arguments) on
    127.0.0.1:port, returned once /health answers 200."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*launcher, "--engine", address, "--port", str(port), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    if wait:
        try:
            wait_for_health(proc, log, port)
        except BaseException:
            stop(proc)
            raise
    return proc
