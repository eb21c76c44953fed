"""Tensor parallelism through the engine: two ranks (the engine and one gloo worker process)
generate exactly what one rank and transformers generate, with chunked prefill, prefix reuse
and preemption; through the engine process and an HTTP server the openai SDK gets the same
text; a worker killed mid-serving stops the engine with an error naming its rank, the server
answers 503, a restarted engine serves again, and no worker outlives its engine."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FAMILIES, VARIANTS
from hf_oracle import hf_greedy
from procs import children_of, free_port, pid_alive, spawn_engine, start_engine, start_server, stop, wait_for_log

from splitinfer.engine import LLM, EngineConfig, SamplingParams
from splitinfer.engine.errors import ConfigError
from splitinfer.engine.tp_layout import layout_of

CASES = {
    "llama, 2 KV heads split": FAMILIES["llama"],
    "llama, 1 KV head replicated": VARIANTS["gqa4-llama3-tied"],
    "qwen2": FAMILIES["qwen2"],
}
# A small KV cache (20 blocks of 4) and token budget (16): prompts are prefilled in chunks, and
# eight at once cannot all keep their blocks, so the newest are preempted and recomputed.
SETTINGS = dict(
    device="cpu", dtype="float32", num_kv_blocks=20, block_size=4, max_num_batched_tokens=16, max_num_seqs=8
)
NEW_TOKENS = 12


def mixed_prompts(vocab: int) -> list[list[int]]:
    """16 prompts of 3 to 40 tokens; half of them begin with the same 24 tokens (prefix reuse)."""
    rng = random.Random(5)
    shared = [rng.randrange(3, vocab) for _ in range(24)]
    prompts = []
    for i in range(16):
        own = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 17))]
        prompts.append(shared + own if i % 2 else own + [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 24))])
    return prompts


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_generate_what_one_and_transformers_do(make_checkpoint, case: str) -> None:
    path = make_checkpoint(*CASES[case])
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(path, **SETTINGS) as one:
        prompts = mixed_prompts(one.config.vocab_size)
        single = [o.token_ids for o in one.generate(prompts, params)]
    with LLM(path, tensor_parallel_size=2, **SETTINGS) as two:
        split = [o.token_ids for o in two.generate(prompts, params)]
        stats = two.engine.stats()
    assert split == single
    assert stats.num_preemptions > 0 and stats.kv.prefix_hit_tokens > 0, stats
    for prompt, tokens in list(zip(prompts, split))[:6]:
        assert tokens == hf_greedy(path, prompt, NEW_TOKENS)


def test_a_split_the_model_does_not_allow_is_refused_before_loading(make_checkpoint) -> None:
    path = make_checkpoint(*FAMILIES["llama"])  # 4 attention heads
    with pytest.raises(ValueError, match="--tensor-parallel-size 3 does not divide its 4 attention heads"):
        LLM(path, device="cpu", dtype="float32", tensor_parallel_size=3)


def tp_workers(engine_pid: int) -> list[int]:
    """The engine's tensor-parallel workers: its children that multiprocessing spawned (not its
    resource tracker)."""

    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")

    return [pid for pid in children_of(engine_pid) if "spawn_main" in cmdline(pid)]


def wait_until_served(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not reconnect to the engine"
        time.sleep(0.1)


def test_through_the_engine_process_and_a_dead_worker(make_checkpoint, tmp_path: Path) -> None:
    path = make_checkpoint(*FAMILIES["llama"])
    address = f"ipc://{tmp_path}/engine.sock"
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    port = free_port()
    texts = {}
    server = None
    engine = None
    try:
        for size in ("1", "2"):
            log = tmp_path / f"engine-tp{size}.log"
            engine = start_engine(path, address, log, "--served-model-name", "tiny", "--tensor-parallel-size", size)
            if server is None:
                server = start_server(address, port, tmp_path / "server.log")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
            wait_until_served(port)  # the server reconnects to a new engine within its backoff
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
            texts[size] = reply.choices[0].message.content
            if size == "1":
                stop(engine)
        assert texts["2"] == texts["1"] and texts["1"]
        # kill -9 of the worker while a long request runs.
        [worker] = tp_workers(engine.pid)
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            killed = time.monotonic()
            os.kill(worker, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and "engine_unavailable" in rest[-2]
        assert engine.wait(30) == 1
        took = time.monotonic() - killed
        log_text = (tmp_path / "engine-tp2.log").read_text()
        assert re.search(r"tensor-parallel rank 1 \(pid \d+\) exited \(killed by signal 9\)", log_text), log_text[
            -2000:
        ]
        assert took < 15, took
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503
        # Restarted, it serves again through the same server.
        engine = start_engine(
            path, address, tmp_path / "engine-again.log", "--served-model-name", "tiny", "--tensor-parallel-size", "2"
        )
        wait_until_served(port)
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content == texts["1"]
        workers = tp_workers(engine.pid)
        assert len(workers) == 1
    finally:
        if server is not None:
            stop(server)
        if engine is not None:
            stop(engine)
    time.sleep(1)
    assert not [pid for pid in workers if pid_alive(pid)], "a worker outlived its engine"


# When, while the engine starts, its worker is killed: as soon as it exists (it is importing
# torch; rank 0 waits for it to join), or as soon as it says it has joined and loads its
# shard (rank 0 is loading its own; with these tiny checkpoints the kill lands in the
# worker's load or right after it, while rank 0 still loads or waits at the first call).
STARTUP_MOMENTS = {
    "before joining": "tensor parallelism: 2 ranks",
    "while loading": "[rank 1] splitinfer.engine.tp_ranks: tensor-parallel rank 1",
}


@pytest.mark.parametrize("moment", sorted(STARTUP_MOMENTS))
def test_a_worker_killed_while_the_engine_starts_ends_it_naming_the_rank(
    make_checkpoint, tmp_path: Path, moment: str
) -> None:
    path = make_checkpoint(*FAMILIES["llama"])
    log = tmp_path / "engine.log"
    engine = spawn_engine(path, f"ipc://{tmp_path}/engine.sock", log, "--tensor-parallel-size", "2")
    try:
        wait_for_log(engine, log, STARTUP_MOMENTS[moment])
        worker = int(re.search(r"worker pids (\d+)", log.read_text()).group(1))
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        assert engine.wait(30) == 1
        took = time.monotonic() - killed
    finally:
        stop(engine)
    text = log.read_text()
    assert re.search(rf"tensor-parallel rank 1 \(pid {worker}\) exited \(killed by signal 9\)", text), text[-3000:]
    assert "ready on" not in text
    assert took < 10, f"the engine took {took:.1f} s to notice"


def test_two_hosts_meeting_at_master_addr_generate_what_one_rank_does(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Multi-host tensor parallelism on one machine: the same engine command with --nnodes 2,
    host 0 (the engine, rank 0) and host 1 (a process running only rank 1), meeting at
    MASTER_ADDR:MASTER_PORT. The SDK gets rank 0's single-rank text; stopping the engine
    stops host 1's worker, which then exits 0."""
    path = make_checkpoint(*FAMILIES["llama"])
    prompt = [(5 * j + 3) % 500 for j in range(9)]
    with LLM(path, **SETTINGS) as llm:
        [expected] = llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    address = f"ipc://{tmp_path}/engine.sock"
    split = ("--served-model-name", "tiny", "--tensor-parallel-size", "2", "--nnodes", "2")
    host1 = spawn_engine(path, f"ipc://{tmp_path}/unused.sock", tmp_path / "host1.log", *split, "--node-rank", "1")
    engine = server = None
    try:
        engine = start_engine(path, address, tmp_path / "host0.log", *split)
        assert not tp_workers(engine.pid), "host 0 runs rank 0 only: rank 1 is host 1's"
        port = free_port()
        server = start_server(address, port, tmp_path / "server.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.choices[0].text == expected.text
        stop(engine)
        assert host1.wait(15) == 0
        assert "host 1 of 2: tensor-parallel ranks 1-1" in (tmp_path / "host1.log").read_text()
    finally:
        for proc in (server, engine, host1):
            if proc is not None:
                stop(proc)


def test_a_multi_host_layout_is_checked_before_anything_loads() -> None:
    base = dict(model="unused", tensor_parallel_size=4)
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    layout = layout_of(EngineConfig(**base, nnodes=2, node_rank=1), env)
    assert list(layout.local_ranks) == [2, 3] and layout.local_index(3) == 1
    assert (layout.address, layout.port) == ("10.0.0.1", 29500)
    for fields, environ, message in (
        (dict(nnodes=3), env, "--nnodes 3 does not divide --tensor-parallel-size 4"),
        (dict(nnodes=2, node_rank=2), env, "--node-rank 2 is not below --nnodes 2"),
        (dict(nnodes=2), {}, "set MASTER_ADDR and MASTER_PORT"),
        (dict(nnodes=2), {"MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT must be a TCP port"),
    ):
        with pytest.raises(ConfigError, match=message):
            layout_of(EngineConfig(**base, **fields), environ)


def test_a_worker_dying_on_another_host_stops_that_host_and_the_engine(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 cannot watch another host's processes: the host does (it exits 1 naming the
    rank), and rank 0 learns it from its next collective, whose connection is gone."""
    path = make_checkpoint(*FAMILIES["llama"])
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    split = ("--tensor-parallel-size", "2", "--nnodes", "2")
    host1 = spawn_engine(path, f"ipc://{tmp_path}/unused.sock", tmp_path / "host1.log", *split, "--node-rank", "1")
    engine = server = None
    try:
        address = f"ipc://{tmp_path}/engine.sock"
        engine = start_engine(path, address, tmp_path / "host0.log", *split, "--served-model-name", "tiny")
        port = free_port()
        server = start_server(address, port, tmp_path / "server.log")
        [worker] = tp_workers(host1.pid)
        os.kill(worker, signal.SIGKILL)
        assert host1.wait(15) == 1
        host1_log = (tmp_path / "host1.log").read_text()
        assert re.search(r"tensor-parallel rank 1 \(pid \d+\) exited \(killed by signal 9\)", host1_log), host1_log
        # Idle, rank 0 has no collective to fail: a request's first step finds rank 1 gone.
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 8}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_unavailable", reply.text
        assert engine.wait(30) == 1
        assert "stopping: a tensor-parallel rank stopped answering" in (tmp_path / "host0.log").read_text()
    finally:
        for proc in (server, engine, host1):
            if proc is not None:
                stop(proc)
