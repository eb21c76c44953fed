#!/usr/bin/env python3
"""What routing over several engines costs and what a second replica gives.

    python scripts/bench_routing.py                      # a tiny random checkpoint, on CPU
    python scripts/bench_routing.py --preset bench --concurrency 8 --requests 32 --output-tokens 16
    python scripts/bench_routing.py --model DIR --device cuda:0 --second-device cuda:1

1. The routing decision alone, in process: `Router.choose` for prompts of --prompt-tokens
   with the prefix index full (its bound of chunks, from earlier prompts), over 2 and 8
   replicas: p50 and p99 per request. This is all the routing layer adds to a request.
2. End to end, taking turns: one server over one engine, then one server over two replicas
   of it (the first engine and a second, started alike), each loaded by --concurrency
   clients sending --requests completions (distinct prompts, --output-tokens each). Reports
   per-request latency p50/p99, requests/s and output tokens/s, and the ratio of the two.

On a machine with few cores the replicas share them: set --engine-threads (each engine's
torch threads) so that the engines together use at most the cores there are, and read the
ratio with that in mind; the summary prints the core count and the threads of each engine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from splitinfer.server.router import MAX_ENTRIES  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# 1. The decision ---------------------------------------------------------------------


def bench_choose(prompt_tokens: int, block_size: int, repeats: int, entries: int) -> dict[int, tuple[float, float]]:
    from splitinfer.server.router import Candidate, PrefixIndex, Router

    rng = random.Random(0)
    results = {}
    for replicas in (2, 8):
        router = Router(PrefixIndex(max_entries=entries))
        candidates = [Candidate(f"engine-{i}", rng.randrange(8), 0.5) for i in range(replicas)]
        # Fill the index to its bound with earlier prompts, as a long-running server's is.
        while len(router.index) < entries:
            router.choose(candidates, [rng.randrange(32000) for _ in range(prompt_tokens)], block_size)
        prompts = [[rng.randrange(32000) for _ in range(prompt_tokens)] for _ in range(repeats)]
        # Half the prompts repeat an earlier prefix: lookups that match, as well as ones that do not.
        prompts = [
            p if i % 2 else prompts[i - 1][: prompt_tokens // 2] + p[prompt_tokens // 2 :]
            for i, p in enumerate(prompts)
        ]
        times = []
        for prompt in prompts:
            start = time.perf_counter()
            router.choose(candidates, prompt, block_size)
            times.append(time.perf_counter() - start)
        results[replicas] = (percentile(times, 0.5) * 1e6, percentile(times, 0.99) * 1e6)
    return results


# 2. End to end -----------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(proc: subprocess.Popen, log: Path, check, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None:
            sys.exit(f"{what} exited:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            sys.exit(f"{what} not ready within {timeout_s} s")
        time.sleep(0.1)


def start_engine(args: argparse.Namespace, address: str, device: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.engine_threads)}
    cmd = [PYTHON, "-m", "splitinfer.engine", "--model", str(args.model), "--address", address]
    cmd += ["--device", device, "--served-model-name", "bench", *args.engine_args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wait_for(proc, log, lambda: "ready on" in log.read_text(errors="replace"), f"the engine at {address}")
    return proc


def start_server(addresses: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "splitinfer.server", "--port", str(port), "--log-level", "WARNING"]
    for address in addresses:
        cmd += ["--engine", address]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)

    def up() -> bool:
        try:
            models = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("models", {})
            return models.get("bench") == len(addresses)
        except httpx.HTTPError:
            return False

    wait_for(proc, log, up, f"the server on port {port}")
    return proc


async def load(url: str, args: argparse.Namespace, seed: int) -> tuple[list[float], float, int]:
    """--requests completions from --concurrency clients: latencies, wall time, output tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.output_tokens, "ignore_eos": True}
            start = time.perf_counter()
            reply = await http.post("/v1/completions", json=body)
            latencies.append(time.perf_counter() - start)
            reply.raise_for_status()
            tokens += reply.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
        return latencies, time.perf_counter() - started, tokens


def summarize(label: str, runs: list[tuple[list[float], float, int]]) -> dict:
    latencies = [x for run in runs for x in run[0]]
    wall = sum(run[1] for run in runs)
    requests = sum(len(run[0]) for run in runs)
    tokens = sum(run[2] for run in runs)
    return {
        "label": label,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "requests_per_s": requests / wall,
        "tokens_per_s": tokens / wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Checkpoint (default: a random one of --preset: tiny, built in a temporary directory, or bench, "
        "the ~100M-parameter one of bench_engine.py under .cache/bench-model).",
    )
    p.add_argument("--preset", choices=["tiny", "bench"], default="tiny", help="See --model (default: tiny).")
    p.add_argument("--device", default="cpu", help="The first engine's device (default: %(default)s).")
    p.add_argument("--second-device", default=None, help="The second replica's device (default: --device).")
    p.add_argument("--engine-threads", type=int, default=1, help="Torch threads per engine (default: %(default)s).")
    p.add_argument("--concurrency", type=int, default=16, help="Clients at once (default: %(default)s).")
    p.add_argument("--requests", type=int, default=128, help="Requests per turn (default: %(default)s).")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Prompt length (default: %(default)s).")
    p.add_argument("--output-tokens", type=int, default=32, help="Tokens per completion (default: %(default)s).")
    p.add_argument("--repeats", type=int, default=2, help="Turns of each setup, alternating (default: %(default)s).")
    p.add_argument("--choose-prompt-tokens", type=int, default=1024, help="Prompt length of part 1 (default: 1024).")
    p.add_argument(
        "--index-entries", type=int, default=MAX_ENTRIES, help="Prefix-index size in part 1 (default: its bound)."
    )
    p.add_argument(
        "engine_args", nargs="*", help="More engine flags after --, e.g. -- --dtype float32 --kv-cache-gb 0.5."
    )
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} cores; each engine runs {args.engine_threads} torch thread(s)\n")

    choose = bench_choose(args.choose_prompt_tokens, 16, 2000, args.index_entries)
    print(f"1. Router.choose, {args.choose_prompt_tokens}-token prompts, prefix index full:")
    for replicas, (p50, p99) in choose.items():
        print(f"   {replicas} replicas: p50 {p50:.1f} us, p99 {p99:.1f} us")

    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp_dir:
        tmp = Path(tmp_dir)
        if args.model is None and args.preset == "bench":
            from bench_engine import build_bench_checkpoint

            args.model = Path(build_bench_checkpoint())
        elif args.model is None:
            args.model = tmp / "model"
            subprocess.run([PYTHON, str(REPO / "scripts" / "make_tiny_model.py"), str(args.model)], check=True)
        if not args.engine_args and args.device == "cpu":
            args.engine_args = ["--dtype", "float32", "--kv-cache-gb", "0.2"]
        addresses = [f"ipc://{tmp}/e1.sock", f"ipc://{tmp}/e2.sock"]
        procs = []
        try:
            procs.append(start_engine(args, addresses[0], args.device, tmp / "e1.log"))
            procs.append(start_engine(args, addresses[1], args.second_device or args.device, tmp / "e2.log"))
            ports = [free_port(), free_port()]
            procs.append(start_server(addresses[:1], ports[0], tmp / "s1.log"))
            procs.append(start_server(addresses, ports[1], tmp / "s2.log"))
            urls = {"1 engine": f"http://127.0.0.1:{ports[0]}", "2 replicas": f"http://127.0.0.1:{ports[1]}"}
            for url in urls.values():  # warm-up
                asyncio.run(load(url, argparse.Namespace(**{**vars(args), "requests": 8}), seed=-1))
            runs: dict[str, list] = {label: [] for label in urls}
            for turn in range(args.repeats):
                for label, url in urls.items():
                    runs[label].append(asyncio.run(load(url, args, seed=turn)))
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    results = [summarize(label, r) for label, r in runs.items()]
    print(
        f"\n2. {args.requests} completions x {args.repeats} turns, {args.concurrency} concurrent, "
        f"{args.prompt_tokens}-token prompts, {args.output_tokens} tokens each, one server:"
    )
    print(f"   {'setup':<12} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'tok/s':>8}")
    for r in results:
        row = f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['requests_per_s']:8.2f} {r['tokens_per_s']:8.1f}"
        print(f"   {r['label']:<12} {row}")
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"   throughput, 2 replicas / 1 engine: {ratio:.2f}x")


if __name__ == "__main__":
    main()
