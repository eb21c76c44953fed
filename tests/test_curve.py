"""CURVE on the engine socket, with real processes over tcp://127.0.0.1: a server with an
allowed key is served; one without keys, or with a key the engine does not allow, gets
nothing processed while the engine keeps serving the others and logs each refusal once; a
key added to the allowed directory gets in without an engine restart; an engine asked to
bind a non-loopback address without keys refuses to start unless --insecure."""

from __future__ import annotations

import shutil
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from procs import ENGINE, PYTHON, REPO, free_port, start_engine, start_server, stop, wait_for_log

from splitinfer.protocol.curve import is_loopback, load_key_pair, load_public_key, make_key_pair, require_keys_for


def keys_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "splitinfer.protocol.curve", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_splitinfer_keys_makes_a_private_pair_and_keeps_it(tmp_path: Path) -> None:
    made = keys_cli(str(tmp_path / "keys"), "engine")
    assert made.returncode == 0, made.stderr
    public, secret = tmp_path / "keys" / "engine.key", tmp_path / "keys" / "engine.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pair = load_key_pair(secret)
    assert load_public_key(public) == pair.public and len(pair.secret) == 40
    again = keys_cli(str(tmp_path / "keys"), "engine")
    assert again.returncode == 2 and "--force" in again.stderr
    assert load_key_pair(secret) == pair
    with pytest.raises(ValueError, match="no secret key"):
        load_key_pair(public)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.0.1:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://engine-host:5555", False),
        ("ipc:///tmp/x.sock", True),
    ],
)
def test_which_addresses_need_keys(address: str, loopback: bool) -> None:
    assert is_loopback(address) == loopback
    require_keys_for(address, has_keys=True, insecure=False)
    require_keys_for(address, has_keys=False, insecure=True)
    if not loopback:
        with pytest.raises(ValueError, match="--insecure"):
            require_keys_for(address, has_keys=False, insecure=False)


def engine_refuses(checkpoint: Path, log: Path, *flags: str) -> str:
    """The engine's exit status must be 2, before any model loads; returns its log."""
    with log.open("wb") as out:
        done = subprocess.run(
            [*ENGINE, "--model", str(checkpoint), "--device", "cpu", *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            timeout=60,
        )
    text = log.read_text()
    assert done.returncode == 2, text
    assert "ready on" not in text
    return text


def test_an_engine_reachable_from_other_hosts_needs_keys_or_insecure(tiny_checkpoint: Path, tmp_path: Path) -> None:
    port = free_port()
    text = engine_refuses(tiny_checkpoint, tmp_path / "refused.log", "--address", f"tcp://0.0.0.0:{port}")
    assert "--insecure" in text and "splitinfer-keys" in text
    text = engine_refuses(
        tiny_checkpoint, tmp_path / "half.log", "--address", f"tcp://0.0.0.0:{port}", "--curve-secret-key", "x"
    )
    assert "go together" in text
    engine = start_engine(tiny_checkpoint, f"tcp://0.0.0.0:{port}", tmp_path / "insecure.log", "--insecure")
    stop(engine)


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


def complete(port: int) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"model": "tiny", "prompt": "Hello", "max_tokens": 2},
        timeout=30,
    )


def test_only_servers_with_allowed_keys_are_served(tiny_checkpoint: Path, tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    make_key_pair(keys, "engine")
    make_key_pair(allowed, "server")
    make_key_pair(keys, "rogue")  # a pair the engine does not know
    address = f"tcp://127.0.0.1:{free_port()}"
    engine_log = tmp_path / "engine.log"
    engine = start_engine(
        tiny_checkpoint,
        address,
        engine_log,
        "--served-model-name",
        "tiny",
        "--curve-secret-key",
        str(keys / "engine.key_secret"),
        "--curve-allowed-keys",
        str(allowed),
    )
    servers = []
    try:

        def server(name: str, *flags: str) -> int:
            port = free_port()
            servers.append(start_server(address, port, tmp_path / f"{name}.log", *flags, wait=False))
            return port

        engine_key = ("--curve-engine-key", str(keys / "engine.key"))
        good = server("good", "--curve-secret-key", str(allowed / "server.key_secret"), *engine_key)
        plain = server("plain")
        rogue = server("rogue", "--curve-secret-key", str(keys / "rogue.key_secret"), *engine_key)
        wait_for(lambda: healthy(good))
        time.sleep(3)  # the refused ones have retried a few times by now
        assert complete(good).json()["usage"]["completion_tokens"] == 2
        for port in (plain, rogue):
            assert not healthy(port)
            assert complete(port).status_code == 503
        text = engine_log.read_text()
        rogue_key = load_public_key(keys / "rogue.key").decode()
        assert text.count(f"refused a client with the CURVE key {rogue_key}") == 1
        assert text.count("failed the CURVE handshake") == 1
        assert "refuses this server: it does not allow" in (tmp_path / "rogue.log").read_text()
        assert "if the engine wants CURVE keys, start the server with" in (tmp_path / "plain.log").read_text()
        # Allowing the rogue's key lets it in, with no engine restart.
        shutil.copy(keys / "rogue.key", allowed / "rogue.key")
        wait_for(lambda: healthy(rogue))
        assert complete(rogue).json()["usage"]["completion_tokens"] == 2
        assert complete(good).status_code == 200 and engine.poll() is None
    finally:
        for proc in servers:
            stop(proc)
        stop(engine)
    wait_for_log(engine, engine_log, "stopped", timeout_s=1)


def test_allowed_keys_survive_a_garbled_file_and_follow_removals(tmp_path: Path) -> None:
    from splitinfer.protocol.curve import AllowedKeys

    allowed = tmp_path / "allowed"
    make_key_pair(allowed, "one")
    make_key_pair(allowed, "two")
    one, two = load_public_key(allowed / "one.key"), load_public_key(allowed / "two.key")
    keys = AllowedKeys(allowed)
    assert keys.callback("*", one) and keys.callback("*", two)
    (allowed / "half-copied.key").write_text('metadata\ncurve\n    public-key = "abc')  # not a key
    (allowed / "two.key").unlink()  # revoked
    assert keys.callback("*", one)  # the garbled file is skipped, nothing raised
    assert not keys.callback("*", two)
