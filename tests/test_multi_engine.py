"""Several engines behind the same servers, as real processes: two models (a tiny Llama served
as "alpha" by two replicas, a tiny Qwen2 as "beta"), two servers in front of all three, one
routing with prefix affinity and one by load alone.

Each model is reached by name through the openai SDK; concurrent requests split between the
replicas and equal what a single engine answers; prefix affinity raises the prefix-cache hit
rate over taking replicas in turn (the numbers are printed); a replica killed under load
fails only its own requests and comes back when restarted; stopping a model's only engine
unloads it from every server, and starting it again loads it back.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FAMILIES
from procs import free_port, start_engine, start_server, stop

REPLICAS = ("a1", "a2")


@dataclass
class Fleet:
    tmp: Path
    checkpoints: dict[str, Path]
    addresses: dict[str, str]  # engine name -> address
    engines: dict[str, subprocess.Popen] = field(default_factory=dict)
    servers: dict[str, int] = field(default_factory=dict)  # server name -> port
    server_procs: list[subprocess.Popen] = field(default_factory=list)

    def start_engine(self, name: str) -> None:
        model = "alpha" if name in REPLICAS else "beta"
        self.engines[name] = start_engine(
            self.checkpoints[model],
            self.addresses[name],
            self.tmp / f"engine-{name}.log",
            "--served-model-name",
            model,
        )

    def url(self, server: str) -> str:
        return f"http://127.0.0.1:{self.servers[server]}"

    def sdk(self, server: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(server) + "/v1", api_key="none", max_retries=0, timeout=120)

    def models(self, server: str) -> list[str]:
        return sorted(m.id for m in self.sdk(server).models.list().data)

    def routed(self, server: str) -> dict[str, float]:
        """Requests the server routed to each engine (by engine name), from its /metrics."""
        text = httpx.get(self.url(server) + "/metrics").text
        by_address = {
            m["engine"]: float(m["value"])
            for m in re.finditer(
                r'^splitinfer_routed_requests_total\{engine="(?P<engine>[^"]+)",[^}]*\} (?P<value>\S+)$', text, re.M
            )
        }
        return {name: by_address.get(address, 0.0) for name, address in self.addresses.items()}


def wait_until(condition, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def fleet(make_checkpoint, tmp_path_factory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(
        tmp,
        {"alpha": make_checkpoint(*FAMILIES["llama"]), "beta": make_checkpoint(*FAMILIES["qwen2"])},
        {name: f"ipc://{tmp}/{name}.sock" for name in (*REPLICAS, "b")},
    )
    try:
        for name in fleet.addresses:
            fleet.start_engine(name)
        first, *rest = fleet.addresses.values()
        for server, routing in (("affinity", "prefix-affinity"), ("least-loaded", "least-loaded")):
            port = free_port()
            fleet.server_procs.append(
                start_server(
                    first,
                    port,
                    tmp / f"server-{server}.log",
                    *[flag for address in rest for flag in ("--engine", address)],
                    "--routing",
                    routing,
                )
            )
            fleet.servers[server] = port
        for server in fleet.servers:
            wait_until(lambda s=server: fleet.models(s) == ["alpha", "beta"], what="both models listed")
        yield fleet
    finally:
        for proc in fleet.server_procs:
            stop(proc)
        for proc in fleet.engines.values():
            stop(proc)


def test_every_model_by_name_on_every_server(fleet: Fleet) -> None:
    for server in fleet.servers:
        client = fleet.sdk(server)
        assert fleet.models(server) == ["alpha", "beta"]
        for model in ("alpha", "beta"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
            )
            assert reply.model == model and reply.usage.completion_tokens == 3
            assert client.models.retrieve(model).id == model
        with pytest.raises(openai.NotFoundError, match="'alpha', 'beta'"):
            client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    health = httpx.get(fleet.url("affinity") + "/health").json()
    assert health["status"] == "ok" and health["models"] == {"alpha": 2, "beta": 1}
    assert {e["address"] for e in health["engines"]} == set(fleet.addresses.values())


async def _completions(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        replies = await asyncio.gather(*(client.post("/v1/completions", json=body) for body in bodies))
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [reply.json() for reply in replies]


def test_concurrent_requests_split_evenly_and_equal_a_single_engine(fleet: Fleet) -> None:
    rng = random.Random(7)
    bodies = [
        {"model": "alpha", "prompt": [rng.randrange(3, 500) for _ in range(12)], "max_tokens": 6, "temperature": 0}
        for _ in range(32)
    ]
    before = fleet.routed("affinity")
    together = asyncio.run(_completions(fleet.url("affinity"), bodies))
    after = fleet.routed("affinity")
    split = {name: after[name] - before[name] for name in REPLICAS}
    print(f"32 concurrent requests split between the replicas: {split}")
    assert sum(split.values()) == 32 and all(12 <= count <= 20 for count in split.values()), split
    # The same requests one at a time through a server in front of one replica only.
    port = free_port()
    single = start_server(fleet.addresses["a1"], port, fleet.tmp / "server-single.log")
    try:
        alone = [asyncio.run(_completions(f"http://127.0.0.1:{port}", [body]))[0] for body in bodies]
    finally:
        stop(single)
    assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]


def prefix_hit_rate(fleet: Fleet, server: str, groups: int, seed: int) -> float:
    """Sequential requests in a shuffled order, each a group's 200-token prefix and a suffix of
    its own: the share of prompt tokens the engines served from their prefix caches."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(200)] for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(32 // groups)]
    rng.shuffle(order)
    cached = total = 0
    client = fleet.sdk(server)
    for g in order:
        prompt = prefixes[g] + [rng.randrange(3, 500) for _ in range(8)]
        usage = client.completions.create(model="alpha", prompt=prompt, max_tokens=1).usage
        cached += usage.prompt_tokens_details.cached_tokens
        total += usage.prompt_tokens
    return cached / total


@pytest.mark.parametrize("groups", [1, 8])
def test_prefix_affinity_raises_the_prefix_cache_hit_rate(fleet: Fleet, groups: int) -> None:
    affinity = prefix_hit_rate(fleet, "affinity", groups, seed=100 + groups)
    in_turn = prefix_hit_rate(fleet, "least-loaded", groups, seed=200 + groups)
    print(
        f"32 requests over {groups} shared 200-token prefix(es), 2 replicas: prefix-cache hit rate "
        f"{affinity:.1%} with prefix affinity, {in_turn:.1%} taking replicas in turn"
    )
    # With affinity each prefix is computed once; in turn, once per replica it lands on.
    block = 16  # the engines' block size: a prefix is cached in whole blocks
    one_miss_each = 1 - groups * 208 / (32 * 208) - (32 - groups) * (208 - 200 // block * block) / (32 * 208)
    assert affinity == pytest.approx(one_miss_each, abs=0.01)
    assert affinity > in_turn


def stream_events(url: str, body: dict, started: asyncio.Event, count: list[int]):
    async def run() -> list[str]:
        payloads: list[str] = []
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", url + "/v1/completions", json=body) as reply:
                assert reply.status_code == 200
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        payloads.append(line[6:])
                        if len(payloads) == 2:
                            count[0] += 1
                            if count[0] == 8:
                                started.set()
        return payloads

    return run()


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(fleet: Fleet) -> None:
    url = fleet.url("least-loaded")
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def under_load() -> tuple[list[list[str]], dict[str, float]]:
        started, count = asyncio.Event(), [0]
        tasks = [asyncio.create_task(stream_events(url, body, started, count)) for _ in range(8)]
        await asyncio.wait_for(started.wait(), 60)
        routed = fleet.routed("least-loaded")
        fleet.engines["a2"].kill()  # kill -9 under load
        fleet.engines["a2"].wait()
        return await asyncio.gather(*tasks), routed

    before = fleet.routed("least-loaded")
    streams, routed = asyncio.run(under_load())
    on_a2 = routed["a2"] - before["a2"]
    failed = [s for s in streams if "error" in json.loads(s[-2])]
    assert len(failed) == on_a2 > 0, (len(failed), on_a2)
    for payloads in streams:
        assert payloads[-1] == "[DONE]"
    for payloads in failed:
        assert json.loads(payloads[-2])["error"]["code"] == "engine_unavailable"
    # Every later request succeeds, on the replica left.
    later = asyncio.run(_completions(url, [{**body, "stream": False, "max_tokens": 2}] * 8))
    assert all(r["usage"]["completion_tokens"] == 2 for r in later)
    # Restarted, it is back in rotation with no server touched.
    fleet.start_engine("a2")
    wait_until(lambda: httpx.get(url + "/health").json()["models"].get("alpha") == 2, what="a2 back in the pool")
    before = fleet.routed("least-loaded")
    asyncio.run(_completions(url, [{**body, "stream": False, "max_tokens": 2}] * 8))
    assert fleet.routed("least-loaded")["a2"] - before["a2"] > 0


def test_stopping_a_models_only_engine_unloads_it_and_starting_it_loads_it(fleet: Fleet) -> None:
    stop(fleet.engines["b"])
    for server in fleet.servers:
        wait_until(lambda s=server: fleet.models(s) == ["alpha"], what="beta unloaded")
        health = httpx.get(fleet.url(server) + "/health")
        assert health.status_code == 503 and health.json()["missing_models"] == ["beta"]
        with pytest.raises(openai.InternalServerError, match="beta"):
            fleet.sdk(server).completions.create(model="beta", prompt="Hi", max_tokens=1)
        assert fleet.sdk(server).completions.create(model="alpha", prompt="Hi", max_tokens=1).choices
    fleet.start_engine("b")
    for server in fleet.servers:
        wait_until(lambda s=server: fleet.models(s) == ["alpha", "beta"], what="beta loaded again")
        assert httpx.get(fleet.url(server) + "/health").status_code == 200
        assert fleet.sdk(server).completions.create(model="beta", prompt="Hi", max_tokens=1).choices


def test_a_replica_unlike_its_model_gets_no_requests(fleet: Fleet) -> None:
    """An engine naming the model 'alpha' but serving another checkpoint: the server logs it and
    routes every request to the real replica, whose answers it can read."""
    address = f"ipc://{fleet.tmp}/impostor.sock"
    impostor = start_engine(
        fleet.checkpoints["beta"], address, fleet.tmp / "engine-impostor.log", "--served-model-name", "alpha"
    )
    port = free_port()
    log = fleet.tmp / "server-impostor.log"
    server = start_server(fleet.addresses["a1"], port, log, "--engine", address)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: "unlike that model's other engines" in log.read_text(), what="the impostor logged")
        replies = asyncio.run(
            _completions(url, [{"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}] * 8)
        )
        assert all(r["usage"]["completion_tokens"] == 2 for r in replies)
        routed = re.findall(
            r'^splitinfer_routed_requests_total\{engine="([^"]+)",[^}]*\} (\S+)$',
            httpx.get(url + "/metrics").text,
            re.M,
        )
        assert dict(routed) == {fleet.addresses["a1"]: "8.0"}
        assert httpx.get(url + "/health").json()["models"] == {"alpha": 1}
        assert log.read_text().count("unlike that model's other engines") == 1
    finally:
        stop(server)
        stop(impostor)
