#!/usr/bin/env python3
"""Soak: a mixed workload through a real engine and server for many rounds, watching memory.

    python scripts/soak_engine.py                        # tiny checkpoint on CPU, 12 rounds of 1000 requests
    python scripts/soak_engine.py --rounds 30 --requests-per-round 2000
    python scripts/soak_engine.py --model DIR -- --device cuda --dtype bfloat16   # after --: engine flags

Starts an engine process and one HTTP server, then sends rounds of requests from
--concurrency workers: prompts of 1 to 400 tokens (some sharing prefixes, so the prefix
cache hits and evicts), outputs of 1 to 80 tokens, a mix of greedy, seeded, penalised and
logprob requests, chat and completions, n up to 3, and a share of streams the client cuts
off early. After each round it prints the engine's and the server's resident memory
(VmRSS), the engine's KV blocks in use and the request rate. The verdict compares every
round after --warmup-rounds with the first of them: each process must stay within
--tolerance (10%) of it, and no KV block may be held after a round. Exit status 0 if so, 1 if not.

The rate is what two CPU cores give; the point is the number of requests and of distinct
shapes the engine sees, not its speed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench_restart import first_200, free_port, start_server, wait_for

from splitinfer.server.engine_client import EngineClient

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def build_tiny_checkpoint() -> str:
    path = REPO / ".cache" / "tiny-model"
    if not (path / "config.json").is_file():
        print(f"building the tiny checkpoint in {path}", file=sys.stderr)
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(path)], check=True, capture_output=True
        )
    return str(path)


@dataclass
class Counts:
    done: int = 0
    cut: int = 0
    errors: dict[int, int] = field(default_factory=dict)


class Workload:
    """Random requests of every kind the servers serve, within the model's limits."""

    def __init__(self, vocab: int, max_model_len: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.max_prompt = min(400, max_model_len - 81)
        self.prefixes = [[self.rng.randrange(3, vocab) for _ in range(self.rng.randint(16, 200))] for _ in range(8)]

    def prompt(self) -> list[int]:
        rng = self.rng
        length = rng.randint(1, self.max_prompt)
        if rng.random() < 0.3:  # a shared prefix: prefix-cache hits, and evictions as the pool fills
            prefix = rng.choice(self.prefixes)[:length]
            return prefix + [rng.randrange(3, self.vocab) for _ in range(length - len(prefix))]
        return [rng.randrange(3, self.vocab) for _ in range(length)]

    def request(self) -> tuple[str, dict, int | None]:
        """(path, body, events after which the client hangs up or None)."""
        rng = self.rng
        body: dict = {"model": "soak", "max_tokens": rng.randint(1, 80), "ignore_eos": rng.random() < 0.7}
        kind = rng.random()
        if kind < 0.4:
            body["temperature"] = 0
        elif kind < 0.7:
            body |= {
                "temperature": rng.choice([0.5, 1.0, 1.3]),
                "top_p": rng.choice([0.8, 1.0]),
                "top_k": rng.choice([0, 20]),
                "seed": rng.randrange(2**31),
            }
        else:
            body |= {
                "temperature": 0.8,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.3,
                "repetition_penalty": 1.2,
                "logit_bias": {str(rng.randrange(self.vocab)): -5},
            }
        if rng.random() < 0.15:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.5:
            path = "/v1/completions"
            body["prompt"] = self.prompt()
            if rng.random() < 0.2:
                body["logprobs"] = rng.randint(0, 5)
        else:
            path = "/v1/chat/completions"
            words = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randint(1, self.max_prompt // 4)))
            body["messages"] = [{"role": "user", "content": words}]
            if rng.random() < 0.2:
                body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5)}
        cut = None
        if rng.random() < 0.3:
            body["stream"] = True
            if rng.random() < 0.5:
                cut = rng.randint(1, 4)
        return path, body, cut


async def send(client: httpx.AsyncClient, url: str, path: str, body: dict, cut: int | None, counts: Counts) -> None:
    if not body.get("stream"):
        response = await client.post(url + path, json=body)
        status = response.status_code
    else:
        async with client.stream("POST", url + path, json=body) as response:
            status = response.status_code
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if cut is not None and events >= cut:
                        counts.cut += 1
                        break  # hang up mid-stream: the server must abort it in the engine
    if status == 200:
        counts.done += 1
    else:
        counts.errors[status] = counts.errors.get(status, 0) + 1


async def soak(args: argparse.Namespace, url: str, address: str, engine_pid: int, server_pid: int) -> bool:
    stats_client = EngineClient(address, client_id="soak-stats")
    info = await stats_client.start()
    workload = Workload(info.vocab_size, info.max_model_len, args.seed)
    counts = Counts()
    history: list[tuple[float, float]] = []
    leaked_rounds = 0  # rounds after which the engine still held KV blocks with nothing in flight
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    print(
        f"{'round':>5} {'requests':>9} {'req/s':>6} {'cut':>5} {'errors':>7} {'engine MB':>10} {'server MB':>10} "
        f"{'KV used':>8}",
        flush=True,
    )
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for round_index in range(1, args.rounds + 1):
            queue: asyncio.Queue = asyncio.Queue()
            for _ in range(args.requests_per_round):
                queue.put_nowait(workload.request())

            async def worker() -> None:
                while not queue.empty():
                    path, body, cut = queue.get_nowait()
                    await send(client, url, path, body, cut, counts)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - start
            await asyncio.sleep(0.5)  # let aborts of cut streams land
            stats = await stats_client.stats()
            leaked_rounds += stats.kv_used_blocks > 0 or stats.running > 0
            engine, server = rss_mb(engine_pid), rss_mb(server_pid)
            history.append((engine, server))
            total = round_index * args.requests_per_round
            print(
                f"{round_index:>5} {total:>9} {args.requests_per_round / elapsed:>6.1f} {counts.cut:>5} "
                f"{sum(counts.errors.values()):>7} {engine:>10.1f} {server:>10.1f} {stats.kv_used_blocks:>8}",
                flush=True,
            )
    await stats_client.close()
    return verdict(args, history, counts, leaked_rounds)


def verdict(args: argparse.Namespace, history: list[tuple[float, float]], counts: Counts, leaked_rounds: int) -> bool:
    if counts.errors:
        print(f"non-200 answers: {counts.errors}")
    if leaked_rounds:
        print(f"KV blocks still in use with nothing in flight after {leaked_rounds} round(s): LEAK")
    if len(history) <= args.warmup_rounds:
        print("not enough rounds after the warm-up for a verdict")
        return False
    ok = True
    measured = history[args.warmup_rounds :]
    requests = len(measured) * args.requests_per_round
    for name, column in (("engine", 0), ("server", 1)):
        base = measured[0][column]
        peak = max(row[column] for row in measured)
        within = peak <= base * (1 + args.tolerance)
        ok &= within
        print(
            f"{name}: {base:.1f} MB after warm-up, at most {peak:.1f} MB over the next {requests} requests "
            f"({100 * (peak / base - 1):+.1f}%): {'within' if within else 'OVER'} {100 * args.tolerance:.0f}%"
        )
    return ok and not leaked_rounds and not any(status >= 500 for status in counts.errors)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint directory (default: the tiny demo checkpoint, built on first use).")
    p.add_argument("--rounds", type=int, default=12, help="Rounds of requests (default: %(default)s).")
    p.add_argument("--requests-per-round", type=int, default=1000, help="(default: %(default)s)")
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="Rounds before the memory baseline is taken (default: %(default)s).",
    )
    p.add_argument("--concurrency", type=int, default=32, help="Requests in flight at once (default: %(default)s).")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.10,
        help="Allowed growth over the first post-warm-up round (default: %(default)s).",
    )
    p.add_argument("--seed", type=int, default=0, help="Workload seed (default: %(default)s).")
    p.add_argument("engine_args", nargs="*", help="After --: extra engine flags (default: CPU, float32, 0.2 GB KV).")
    args = p.parse_args()
    model = args.model or build_tiny_checkpoint()
    engine_args = args.engine_args or ["--device", "cpu", "--dtype", "float32", "--kv-cache-gb", "0.2"]
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    address, port = f"ipc://{tmp}/engine.sock", free_port()
    engine_log, server_log = tmp / "engine.log", tmp / "server.log"
    print(f"logs in {tmp}", file=sys.stderr)
    engine = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitinfer.engine",
            "--model",
            model,
            "--address",
            address,
            "--served-model-name",
            "soak",
            *engine_args,
        ],
        stdout=engine_log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = None
    try:
        wait_for("ready on", engine_log, engine)
        server = start_server(address, port, server_log)
        first_200(f"http://127.0.0.1:{port}/health", server)
        ok = asyncio.run(soak(args, f"http://127.0.0.1:{port}", address, engine.pid, server.pid))
    finally:
        for proc in (server, engine):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    warnings = sum(1 for line in engine_log.read_text().splitlines() if " WARNING " in line)
    print(f"engine log: {warnings} warning line(s); exit status {engine.returncode}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
