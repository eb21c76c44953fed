#!/usr/bin/env python3
"""What the protocol costs per engine step, in one process (no sockets): building and
encoding one step's `Outputs` for N requests on the engine side, decoding it on a
server; building, encoding and decoding one `Generate`.

    python scripts/bench_codec.py                  # N = 256, a 512-token prompt
    python scripts/bench_codec.py --requests 64 --json

Only the public protocol API is used (and, where the tree has it, the engine service's
`for_client`, for the engine's whole per-step path), so the same script measures any version
of the protocol: run it against another tree through PYTHONPATH to read both side by side.
`scripts/bench_ipc.py` prints these numbers beside its round trips.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

from splitinfer.protocol import Generate, Outputs, RequestOutput, SamplingParams, TokenLogprobs, decode, encode
from splitinfer.protocol.codec import Limits

try:  # the service's renaming of an entry for its client; older trees copied instead
    from splitinfer.engine.service import for_client
except ImportError:
    for_client = None

# A server's receive limits with room for any frame built here.
LIMITS = Limits(max_frame_bytes=2**30)


def _best_of(fn: Callable[[], object], repeats: int = 7, min_time_s: float = 0.05) -> float:
    """Seconds per call: the best of `repeats` timed loops, each long enough to be read."""
    fn()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if time.perf_counter() - start >= min_time_s:
            break
        loops *= 2
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - start) / loops)
    return min(times)


def step_values(requests: int, logprobs: int | None) -> list[tuple]:
    """One decode step's news as plain values (what the engine has at hand): one new token
    per request, with its logprobs if asked."""
    rows = []
    for i in range(requests):
        token = 1000 + i
        top = tuple((token + k, -0.5 - k) for k in range(logprobs)) if logprobs is not None else None
        rows.append((f"chatcmpl-{i:024x}-0", (token,), top, 500, i + 1))
    return rows


def build_outputs(rows: list[tuple]) -> Outputs:
    """The protocol's part of an engine step: one entry per request, one message."""
    return Outputs(
        outputs=[
            RequestOutput(
                request_id,
                tokens,
                None,
                None if top is None else (TokenLogprobs(tokens[0], -0.5, top),),
                prompt,
                output,
                0,
            )
            for request_id, tokens, top, prompt, output in rows
        ]
    )


def engine_step(rows: list[tuple]) -> bytes:
    """All the engine does per step for one client: the core's entries (under the engine's own
    ids), each renamed for the client by the service's `for_client`, one Outputs, encoded."""
    entries = [
        RequestOutput(str(i), tokens, None, None, prompt, output, 0)
        for i, (_, tokens, _, prompt, output) in enumerate(rows)
    ]
    return encode(Outputs(outputs=[for_client(entry, row[0]) for entry, row in zip(entries, rows)]))


def measure(requests: int, prompt_tokens: int, repeats: int = 7) -> dict[str, float]:
    """Microseconds per operation (the best of `repeats` timed loops)."""
    results = {}
    best_of = functools.partial(_best_of, repeats=repeats)
    for label, logprobs in (("", None), (" with logprobs=5", 5)):
        rows = step_values(requests, logprobs)
        message = build_outputs(rows)
        frame = encode(message)
        results[f"Outputs x{requests}{label}: build"] = best_of(lambda: build_outputs(rows))
        results[f"Outputs x{requests}{label}: encode"] = best_of(lambda: encode(message))
        results[f"Outputs x{requests}{label}: decode"] = best_of(lambda: decode(frame, LIMITS))
    if for_client is not None:
        rows = step_values(requests, None)
        results[f"engine step x{requests}: entries, renamed, Outputs, encode"] = best_of(lambda: engine_step(rows))
    prompt = list(range(prompt_tokens))
    params = SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, seed=1)
    build = lambda: Generate(request_id="chatcmpl-0123456789abcdef-0", prompt_token_ids=prompt, params=params)  # noqa: E731
    generate = build()
    frame = encode(generate)
    results[f"Generate ({prompt_tokens} tokens): build"] = best_of(build)
    results[f"Generate ({prompt_tokens} tokens): encode"] = best_of(lambda: encode(generate))
    results[f"Generate ({prompt_tokens} tokens): decode"] = best_of(lambda: decode(frame, LIMITS))
    results["SamplingParams: build"] = best_of(
        lambda: SamplingParams(max_tokens=256, temperature=0.7, top_p=0.9, seed=1)
    )
    return {name: seconds * 1e6 for name, seconds in results.items()}


def print_table(results: dict[str, float]) -> None:
    print(f"{'protocol operation':<44} {'us':>9}")
    for name, us in results.items():
        print(f"{name:<44} {us:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256, help="Requests in the step's Outputs (default: %(default)s).")
    p.add_argument(
        "--prompt-tokens", type=int, default=512, help="Prompt length of the Generate (default: %(default)s)."
    )
    p.add_argument(
        "--repeats", type=int, default=7, help="Timed loops per operation; the best counts (default: %(default)s)."
    )
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    args = p.parse_args()
    results = measure(args.requests, args.prompt_tokens, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
