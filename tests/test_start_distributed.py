"""scripts/start_distributed.sh as a user runs it: engine plus N servers up, URLs printed,
requests served through every server, and Ctrl-C or SIGTERM stopping everything it started."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from procs import REPO, children_of, free_port, pid_alive

SCRIPT = REPO / "scripts" / "start_distributed.sh"


def read_until(proc: subprocess.Popen, marker: str, output: str, timeout_s: float) -> str:
    """`output` and the script's further lines, up to the one that holds `marker`."""
    deadline = time.monotonic() + timeout_s
    while marker not in output:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, f"the script exited early:\n{output}"
        output += line
        assert time.monotonic() < deadline, output
    return output


def two_free_ports() -> int:
    """A free port whose successor is free too (the script numbers its servers' ports up)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def kill_everything(proc: subprocess.Popen, descendants: list[int]) -> None:
    """After a test, whatever happened: the script's process group, then any child left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in descendants:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_start_distributed_serves_through_n_servers_and_stops_everything(
    tiny_checkpoint: Path, tmp_path: Path, how: str
) -> None:
    port = two_free_ports()
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            "bash",
            str(SCRIPT),
            "--model",
            str(tiny_checkpoint),
            "--servers",
            "2",
            "--port",
            str(port),
            "--run-dir",
            str(run_dir),
            "--served-model-name",
            "tiny",
            "--tool-call-parser",  # a server flag: the script passes it to every server
            "llama3_json",
            "--device",
            "cpu",
            "--kv-cache-gb",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group, like a shell job: Ctrl-C reaches the whole group
    )
    output = ""
    descendants: list[int] = []
    try:
        output = read_until(proc, "Ctrl-C stops everything", output, timeout_s=90)
        assert f"http://127.0.0.1:{port}/v1" in output and f"http://127.0.0.1:{port + 1}/v1" in output
        assert "curl http://" in output
        assert f"chat page (in a browser): http://127.0.0.1:{port}/, http://127.0.0.1:{port + 1}/" in output
        assert httpx.get(f"http://127.0.0.1:{port}/").headers["content-type"].startswith("text/html")
        engine_pid = int(re.search(r"engine \(pid (\d+)\)", output).group(1))
        for p in (port, port + 1):
            r = httpx.post(
                f"http://127.0.0.1:{p}/v1/completions",
                json={"model": "tiny", "prompt": "Hi", "max_tokens": 3},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        descendants = children_of(proc.pid)
        assert engine_pid in descendants and len(descendants) >= 3
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "error" not in rest.lower(), rest
        time.sleep(0.5)
        assert [pid for pid in descendants if pid_alive(pid)] == [], "orphans left running"
        assert {p.name for p in run_dir.iterdir()} >= {"engine-0.log", f"server-{port}.log", f"server-{port + 1}.log"}
        assert "stopped" in (run_dir / "engine-0.log").read_text()
    finally:
        kill_everything(proc, descendants)


def test_start_distributed_help_documents_every_flag() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in (
        "--model",
        "--servers",
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--engine-address",
        "--run-dir",
        "--config",
        "[[engines]]",
        "served_model_name",
        "--help",
        "--device",
        "--num-kv-blocks",
        "--no-web-ui",
        "web_ui",
    ):
        assert flag in out


def test_a_fleet_from_toml_two_models_one_twice_behind_two_servers(make_checkpoint, tmp_path: Path) -> None:
    from conftest import FAMILIES

    llama, qwen = make_checkpoint(*FAMILIES["llama"]), make_checkpoint(*FAMILIES["qwen2"])
    port = two_free_ports()
    engine_args = '["--kv-cache-gb", "0.05", "--dtype", "float32"]'
    config = tmp_path / "fleet.toml"
    config.write_text(
        f"""
[servers]
count = 2
port = {port}
args = ["--routing", "least-loaded"]
web_ui = false

[[engines]]
model = "{llama}"
served_model_name = "alpha"
device = "cpu"
args = {engine_args}

[[engines]]
model = "{llama}"
served_model_name = "alpha"
device = "cpu"
args = {engine_args}

[[engines]]
model = "{qwen}"
served_model_name = "beta"
device = "cpu"
args = {engine_args}
"""
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--config", str(config), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    output = ""
    descendants: list[int] = []
    try:
        output = read_until(proc, "Ctrl-C stops everything", output, timeout_s=120)
        assert "3 engines (pids" in output and "models: alpha, beta" in output
        assert "chat page" not in output and httpx.get(f"http://127.0.0.1:{port}/").status_code == 404
        for p in (port, port + 1):
            models = httpx.get(f"http://127.0.0.1:{p}/v1/models").json()["data"]
            assert sorted(m["id"] for m in models) == ["alpha", "beta"]
            health = httpx.get(f"http://127.0.0.1:{p}/health").json()
            assert health["models"] == {"alpha": 2, "beta": 1}
        # An engine killed is started again; the servers carry on and pick it up.
        beta_pid = int(re.search(r"3 engines \(pids \d+, \d+, (\d+)\)", output).group(1))
        os.kill(beta_pid, signal.SIGKILL)
        output = read_until(proc, "engine 2 (pid", output, timeout_s=60)
        assert "restarting it" in output
        for p in (port, port + 1):
            deadline_back = time.monotonic() + 60
            while httpx.get(f"http://127.0.0.1:{p}/health").json()["models"] != {"alpha": 2, "beta": 1}:
                assert time.monotonic() < deadline_back, "beta did not come back"
                time.sleep(0.2)
        descendants = children_of(proc.pid)
        assert len(descendants) >= 5 and beta_pid not in descendants
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert proc.returncode == 0  # a stop that was asked for
        time.sleep(0.5)
        assert [pid for pid in descendants if pid_alive(pid)] == [], "orphans left running"
        assert all("stopped" in (run_dir / f"engine-{i}.log").read_text() for i in range(3))
    finally:
        kill_everything(proc, descendants)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[servers]\ncount = 1\n", "at least one [[engines]]"),
        ("[[engines]]\nmodle = 'x'\n", "unknown key(s) modle"),
        ("[[engines]]\nmodel = 'x'\nargs = '--a'\n", "'args' must be a list"),
        ("[servers]\nport = 0\n[[engines]]\nmodel = 'x'\n", "port must be a port number"),
        ("[serverz]\n", "unknown key(s) serverz"),
        ("restart_engines = 1\n[[engines]]\nmodel = 'x'\n", "'restart_engines' must be true or false"),
        ("[servers]\nweb_ui = 'no'\n[[engines]]\nmodel = 'x'\n", "web_ui must be true or false"),
        ("[[engines]\n", "fleet.toml"),
    ],
)
def test_bad_fleet_files_are_refused_naming_what_is_wrong(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(toml)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--config", str(config)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
