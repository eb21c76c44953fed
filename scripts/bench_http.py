#!/usr/bin/env python3
"""What the HTTP layer costs: one workload run by the in-process engine, then streamed
through one HTTP server in front of an engine process, on the same checkpoint and settings.

    python scripts/bench_http.py                       # the ~100M 'bench' checkpoint on CPU
    python scripts/bench_http.py --model DIR --device cuda --dtype bfloat16 --concurrency 64

The workload is bench_engine.py's: N requests with prompt lengths 32 to 512 and output
lengths 16 to 256 (greedy, eos ignored), all submitted at once. In-process they go
straight to `EngineCore`; over HTTP each is a streamed /v1/completions request with its
token ids as the prompt, all N in flight together (the openai SDK's usual shape, with
usage in the last chunk). Prints both output token rates and their ratio, and the
HTTP run's TTFT, inter-token and end-to-end latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Sibling scripts: the workload, the engine runner and the streaming client are theirs.
from bench_engine import Ours, add_checkpoint_arguments, build_bench_checkpoint, mixed_workload
from bench_restart import first_200, free_port, start_server, wait_for
from bench_serving import Bench, Result, percentiles

ENGINE_KV_CACHE_GB = 2.0  # Ours' settings (prefix caching off too), given to the engine process as flags
ENGINE_MAX_BATCHED_TOKENS = 4096


def in_process_rate(model: str, device: str, dtype: str, work: list, warmup: list, concurrency: int) -> float:
    ours = Ours(model, device, dtype, enforce_eager=False, max_num_seqs=concurrency)
    ours.run(warmup)
    seconds = ours.run(work)
    del ours
    gc.collect()
    return sum(r.max_tokens for r in work) / seconds


async def http_run(base_url: str, work: list, warmup: list) -> tuple[float, list[Result]]:
    args = argparse.Namespace(base_url=base_url, api_key=None, timeout=3600, model=None, seed=0)
    bench = Bench(args)
    await bench.resolve_model()

    def body(r) -> dict:
        return {
            "model": bench.model,
            "prompt": r.prompt,
            "max_tokens": r.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    await asyncio.gather(*(bench.one("/completions", body(r)) for r in warmup))
    start = time.perf_counter()
    results = await asyncio.gather(*(bench.one("/completions", body(r)) for r in work))
    seconds = time.perf_counter() - start
    await bench.client.aclose()
    return seconds, results


def through_http(
    model: str, device: str, dtype: str, work: list, warmup: list, concurrency: int, tmp: Path
) -> tuple[float, list[Result]]:
    address, engine_log, server_log = f"ipc://{tmp}/engine.sock", tmp / "engine.log", tmp / "server.log"
    engine = subprocess_engine(model, address, device, dtype, concurrency, engine_log)
    server = None
    try:
        wait_for("ready on", engine_log, engine)
        port = free_port()
        server = start_server(address, port, server_log)
        first_200(f"http://127.0.0.1:{port}/health", server)
        seconds, results = asyncio.run(http_run(f"http://127.0.0.1:{port}/v1", work, warmup))
    finally:
        for proc in (server, engine):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}\n{server_log.read_text()[-2000:]}")
    return sum(r.output_tokens for r in results) / seconds, results


def subprocess_engine(
    model: str, address: str, device: str, dtype: str, concurrency: int, log: Path
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitinfer.engine",
            "--model",
            model,
            "--address",
            address,
            "--device",
            device,
            "--dtype",
            dtype,
            "--max-num-seqs",
            str(concurrency),
            "--kv-cache-gb",
            str(ENGINE_KV_CACHE_GB),
            "--max-num-batched-tokens",
            str(ENGINE_MAX_BATCHED_TOKENS),
            "--no-prefix-caching",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "The engine's")
    p.add_argument(
        "--concurrency", type=int, default=32, help="Requests, all in flight at once (default: %(default)s)."
    )
    p.add_argument("--seed", type=int, default=32, help="Seed of the workload's draws (default: %(default)s).")
    p.add_argument("--json", type=Path, help="Also write the results as JSON to this file.")
    args = p.parse_args()
    model = args.model or build_bench_checkpoint()
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    work = mixed_workload(args.concurrency, vocab, seed=args.seed)
    warmup = mixed_workload(2, vocab, seed=args.seed + 1)  # other prompts: no prefix-cache hits on `work`

    print(f"measuring {args.concurrency} requests in-process ...", file=sys.stderr, flush=True)
    in_process = in_process_rate(model, args.device, args.dtype, work, warmup, args.concurrency)
    print(f"measuring {args.concurrency} streams through one HTTP server ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        http, results = through_http(model, args.device, args.dtype, work, warmup, args.concurrency, Path(tmp))

    ttft = percentiles([r.ttft for r in results if r.ttft is not None])
    itl = percentiles([gap for r in results for gap in r.itl])
    e2e = percentiles([r.e2e for r in results])
    print(f"{args.concurrency} requests (prompts 32-512, outputs 16-256 tokens), {args.device} {args.dtype}")
    print(f"{'in-process engine, output tok/s':<40} {in_process:>9.1f}")
    print(f"{'through one HTTP server, output tok/s':<40} {http:>9.1f}   ({http / in_process:.0%} of in-process)")
    trio = lambda d: f"{d['p50']:.0f} / {d['p90']:.0f} / {d['p99']:.0f} ms"  # noqa: E731
    print(f"HTTP latency p50 / p90 / p99: TTFT {trio(ttft)}, inter-token {trio(itl)}, end-to-end {trio(e2e)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "in_process_tok_s": in_process,
                    "http_tok_s": http,
                    "ratio": http / in_process,
                    "ttft_ms": ttft,
                    "itl_ms": itl,
                    "e2e_ms": e2e,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
