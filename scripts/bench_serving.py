#!/usr/bin/env python3
"""Load an OpenAI-compatible server (ours or any other) and report throughput and latency.

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1 --concurrency 1,8,32
    python scripts/bench_serving.py --request-rate 4 --num-requests 200 --prompt-tokens 32-512 --output-tokens 16-256
    python scripts/bench_serving.py --base-url URL1 --base-url URL2 --concurrency 32 --duration 30

Every request streams (with usage), so the client sees each token arrive: TTFT is the time
to the first text, inter-token latency the gaps between text chunks, end-to-end the time to
the last byte. For each concurrency level (or request rate) it prints requests/s, output
tokens/s and TTFT, inter-token and end-to-end latency at p50, p90 and p99, as a table and
(with --json) as JSON; with --plot (needs matplotlib, the `bench` extra) a PNG of latency
against throughput. With several --base-url, requests go to them in turn (one
engine behind several servers); with --duration, each level keeps its concurrency busy
for that many seconds instead of running --num-requests.

Prompts are token ids on /v1/completions by default (exact lengths; vLLM, SGLang and
splitinfer accept them); --prompt-mode text sends words instead, for servers that take
only text. Output lengths are forced with `ignore_eos` and `min_tokens` (vLLM's extension
fields; servers that do not know them stop at eos).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    error: str = ""


@dataclass
class Summary:
    label: str
    requests: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]


def span(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '32-512' -> (32, 512)."""
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def lengths(spec: str, count: int, rng: random.Random) -> list[int]:
    """'128' -> all 128; '32-512' -> uniform in [32, 512]."""
    return [rng.randint(*span(spec)) for _ in range(count)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1e3  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


class Progress:
    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled, self.done = total, label, enabled and sys.stderr.isatty(), 0

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            print(
                f"\r{self.label}: [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        urls = [args.base_url] if isinstance(args.base_url, str) else args.base_url
        self.clients = [
            httpx.AsyncClient(
                base_url=url.rstrip("/"),
                headers=headers,
                timeout=httpx.Timeout(args.timeout),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )
            for url in urls
        ]
        self.client = self.clients[0]
        self._sent = 0
        self.model = args.model
        self.rng = random.Random(args.seed)

    async def resolve_model(self) -> None:
        if self.model is None:
            r = await self.client.get("/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]

    def body(self, prompt_tokens: int, output_tokens: int) -> tuple[str, dict]:
        a = self.args
        extra = {"ignore_eos": True, "min_tokens": output_tokens} if a.ignore_eos else {}
        common = {
            "model": self.model,
            "max_tokens": output_tokens,
            "temperature": a.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **extra,
        }
        if a.prompt_mode == "ids":
            prompt = [self.rng.randrange(100, a.vocab_limit) for _ in range(prompt_tokens)]
            return "/completions", {**common, "prompt": prompt}
        words = " ".join(self.rng.choice(WORDS) for _ in range(prompt_tokens))
        if a.endpoint == "chat":
            return "/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}
        return "/completions", {**common, "prompt": words}

    async def one(self, path: str, body: dict) -> Result:
        result = Result(ok=False)
        start = time.perf_counter()
        last = None
        client = self.clients[self._sent % len(self.clients)]  # the servers in turn
        self._sent += 1
        try:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                    return result
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result.error = chunk["error"].get("message", "error event")
                        return result
                    if chunk.get("usage"):
                        result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        text = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if text:
                            now = time.perf_counter()
                            if result.ttft is None:
                                result.ttft = now - start
                            elif last is not None:
                                result.itl.append(now - last)
                            last = now
            result.ok = True
        except httpx.HTTPError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            result.e2e = time.perf_counter() - start
        return result

    def workload(self, count: int) -> list[tuple[str, dict]]:
        prompts = lengths(self.args.prompt_tokens, count, self.rng)
        outputs = lengths(self.args.output_tokens, count, self.rng)
        return [self.body(p, o) for p, o in zip(prompts, outputs)]

    async def run_level(self, label: str, concurrency: int | None, rate: float | None) -> Summary:
        duration = getattr(self.args, "duration", None)
        work = [] if duration else self.workload(self.args.num_requests)
        progress = Progress(len(work), label, not self.args.no_progress and not duration)
        results: list[Result] = []

        async def run(path: str, body: dict) -> None:
            results.append(await self.one(path, body))
            progress.step()

        start = time.perf_counter()
        if duration:  # `concurrency` workers, each starting requests until the time is up

            async def worker() -> None:
                while time.perf_counter() - start < duration:
                    await run(*self.workload(1)[0])

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        elif rate is None:
            gate = asyncio.Semaphore(concurrency)

            async def gated(path: str, body: dict) -> None:
                async with gate:
                    await run(path, body)

            await asyncio.gather(*(gated(p, b) for p, b in work))
        else:  # Poisson arrivals at `rate` requests per second
            tasks = []
            for path, body in work:
                tasks.append(asyncio.create_task(run(path, body)))
                await asyncio.sleep(self.rng.expovariate(rate))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        progress.close()
        ok = [r for r in results if r.ok]
        for r in results:
            if not r.ok:
                print(f"  failed: {r.error}", file=sys.stderr)
        output = sum(r.output_tokens for r in ok)
        return Summary(
            label=label,
            requests=len(results),
            failed=len(results) - len(ok),
            duration_s=duration,
            requests_per_s=len(ok) / duration,
            output_tokens_per_s=output / duration,
            total_tokens_per_s=(output + sum(r.prompt_tokens for r in ok)) / duration,
            ttft_ms=percentiles([r.ttft for r in ok if r.ttft is not None]),
            itl_ms=percentiles([g for r in ok for g in r.itl]),
            e2e_ms=percentiles([r.e2e for r in ok]),
        )

    async def main(self) -> list[Summary]:
        await self.resolve_model()
        if self.args.warmup:
            await asyncio.gather(*(self.one(p, b) for p, b in self.workload(self.args.warmup)))
        levels = (
            [(f"rate {r}/s", None, float(r)) for r in self.args.request_rate.split(",")]
            if self.args.request_rate
            else [(f"concurrency {c}", int(c), None) for c in self.args.concurrency.split(",")]
        )
        summaries = [await self.run_level(*level) for level in levels]
        for client in self.clients:
            await client.aclose()
        return summaries


def print_table(summaries: list[Summary]) -> None:
    head = (
        f"{'level':<16} {'req/s':>7} {'out tok/s':>10} {'fail':>5} | {'TTFT ms p50/p90/p99':>22} | "
        f"{'ITL ms p50/p90/p99':>20} | {'E2E ms p50/p90/p99':>24}"
    )
    print(head)
    print("-" * len(head))
    trio = lambda d: f"{d['p50']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"  # noqa: E731
    for s in summaries:
        print(
            f"{s.label:<16} {s.requests_per_s:>7.2f} {s.output_tokens_per_s:>10.1f} {s.failed:>5} | "
            f"{trio(s.ttft_ms):>22} | {trio(s.itl_ms):>20} | {trio(s.e2e_ms):>24}"
        )


def plot(summaries: list[Summary], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return
    x = [s.output_tokens_per_s for s in summaries]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, name in (("e2e_ms", "end-to-end p50"), ("ttft_ms", "TTFT p50"), ("itl_ms", "inter-token p50")):
        ax.plot(x, [getattr(s, key)["p50"] for s in summaries], marker="o", label=name)
    for s, xi in zip(summaries, x):
        ax.annotate(s.label, (xi, s.e2e_ms["p50"]), fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


WORDS = (
    "the of and to in is was for on that with as by at from his her an which or are be this had not but "
    "what all were when we there can one have more said so some time very may first new people"
).split()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base-url",
        action="append",
        default=None,
        help="The API's base URL; repeat it to send requests to several servers in turn "
        "(default: http://127.0.0.1:8000/v1).",
    )
    p.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    p.add_argument("--model", default=None, help="Model name (default: the first of GET /models).")
    p.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="Which API to load with text prompts (default: %(default)s; ids always use completions).",
    )
    p.add_argument(
        "--prompt-mode",
        choices=["ids", "text"],
        default="ids",
        help="Token-id prompts of exact length, or random words (default: %(default)s).",
    )
    p.add_argument(
        "--vocab-limit",
        type=int,
        default=500,
        help="Token ids for id prompts are drawn below this (default: %(default)s).",
    )
    p.add_argument("--num-requests", type=int, default=64, help="Requests per level (default: %(default)s).")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="Seconds each concurrency level runs, starting new requests as others finish (instead of "
        "--num-requests; requests in flight at the end are waited for and counted).",
    )
    p.add_argument("--concurrency", default="1,8,32", help="Comma-separated concurrency levels (default: %(default)s).")
    p.add_argument(
        "--request-rate",
        default=None,
        help="Comma-separated Poisson request rates (req/s) instead of concurrency levels.",
    )
    p.add_argument("--prompt-tokens", default="128", help="Prompt length: N or MIN-MAX (default: %(default)s).")
    p.add_argument("--output-tokens", default="128", help="Output length: N or MIN-MAX (default: %(default)s).")
    p.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (default: %(default)s).")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="Let requests stop at eos instead of forcing the output length.",
    )
    p.add_argument("--warmup", type=int, default=4, help="Warm-up requests before measuring (default: %(default)s).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the prompt and length draws (default: %(default)s).")
    p.add_argument("--timeout", type=float, default=600, help="Per-request timeout in seconds (default: %(default)s).")
    p.add_argument("--json", type=Path, default=None, help="Write the summaries as JSON to this file.")
    p.add_argument("--plot", type=Path, default=None, help="Write a PNG of latency against throughput (matplotlib).")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    args = p.parse_args()
    args.base_url = args.base_url or ["http://127.0.0.1:8000/v1"]
    if args.duration is not None and (args.duration <= 0 or args.request_rate):
        p.error("--duration must be positive and goes with --concurrency, not --request-rate")
    summaries = asyncio.run(Bench(args).main())
    print_table(summaries)
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in summaries], indent=2))
    if args.plot:
        plot(summaries, args.plot)


if __name__ == "__main__":
    main()
