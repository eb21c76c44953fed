#!/usr/bin/env python3
"""Tensor parallelism's cost per engine step, at TP=1 and TP=2 (or --sizes), on this machine.

    python scripts/bench_tp.py                       # the ~100M bench checkpoint, on CPU (gloo)
    python scripts/bench_tp.py --model DIR --device cuda --sizes 1,2,4   # a GPU machine (NCCL)

Each size runs the same workload through the offline engine (`LLM`): --requests prompts of
--prompt-tokens, --output-tokens each, greedy, all submitted at once, so most steps are
batched decodes. Rank 0's time in each step is split by timing, in its own process, every
call that crosses ranks: the step's broadcast to the workers (`StepChannel`), the
all-reduces inside the model, and the gather of the logits; what remains is compute
(rank 0's forward, sampling and scheduling). Rank 0's time in a collective includes waiting
for the slowest rank. Each worker runs --threads torch threads, as rank 0 does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


class Clock:
    """Seconds spent inside the wrapped functions."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


def run(size: int, args: argparse.Namespace) -> dict:
    import torch

    from splitinfer.engine import LLM, SamplingParams, parallel, tp_ranks

    clocks = {"broadcast": Clock(), "all-reduce": Clock(), "gather": Clock()}
    # Rank 0's collectives, timed where the engine calls them (this process only).
    originals = (tp_ranks.dist.broadcast, parallel.dist.all_reduce, parallel.dist.gather)
    tp_ranks.dist.broadcast = clocks["broadcast"].wrap(originals[0])
    parallel.dist.all_reduce = clocks["all-reduce"].wrap(originals[1])
    parallel.dist.gather = clocks["gather"].wrap(originals[2])
    try:
        with LLM(
            args.model,
            device=args.device,
            dtype=args.dtype,
            tensor_parallel_size=size,
            kv_cache_gb=args.kv_cache_gb,
            max_num_seqs=max(args.requests, 8),
        ) as llm:
            prompts = [[3 + (i * 7 + j) % 500 for j in range(args.prompt_tokens)] for i in range(args.requests)]
            params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
            llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
            for clock in clocks.values():
                clock.seconds, clock.calls = 0.0, 0
            steps = 0
            original_step = llm.engine.step

            def counted():
                nonlocal steps
                steps += 1
                return original_step()

            llm.engine.step = counted
            start = time.perf_counter()
            llm.generate(prompts, params)
            total = time.perf_counter() - start
            if args.device != "cpu":
                torch.cuda.synchronize()
    finally:
        tp_ranks.dist.broadcast, parallel.dist.all_reduce, parallel.dist.gather = originals
    parts = {name: clock.seconds / steps * 1e3 for name, clock in clocks.items()}
    step_ms = total / steps * 1e3
    return {
        "size": size,
        "steps": steps,
        "step_ms": step_ms,
        "compute_ms": step_ms - sum(parts.values()),
        **{f"{name}_ms": value for name, value in parts.items()},
        "tokens_per_s": args.requests * args.output_tokens / total,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="Checkpoint (default: the bench preset, built once).")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (rank i on GPU i) (default: %(default)s).")
    p.add_argument("--dtype", default="float32", help="Weights and KV dtype (default: %(default)s).")
    p.add_argument("--sizes", default="1,2", help="Tensor-parallel sizes to compare (default: %(default)s).")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per rank (default: %(default)s).")
    p.add_argument("--requests", type=int, default=8, help="Concurrent requests (default: %(default)s).")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Prompt length (default: %(default)s).")
    p.add_argument("--output-tokens", type=int, default=32, help="Tokens per request (default: %(default)s).")
    p.add_argument("--kv-cache-gb", type=float, default=0.5, help="KV cache on CPU (default: %(default)s).")
    args = p.parse_args()
    if args.model is None:
        from bench_engine import build_bench_checkpoint

        args.model = Path(build_bench_checkpoint())
    # Every rank, workers included (they inherit the environment), runs this many threads.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    results = [run(int(size), args) for size in args.sizes.split(",")]
    print(
        f"machine: {os.cpu_count()} cores; {args.threads} torch thread(s) per rank; {args.device}, {args.dtype}; "
        f"{args.requests} requests x {args.output_tokens} tokens after {args.prompt_tokens}-token prompts"
    )
    columns = ("TP", "steps", "step ms", "compute", "broadcast", "all-reduce", "gather", "tok/s")
    widths = (3, 6, 8, 8, 9, 10, 7, 7)
    print(" ".join(f"{name:>{width}}" for name, width in zip(columns, widths)))
    for r in results:
        print(
            f"{r['size']:>3} {r['steps']:>6} {r['step_ms']:8.2f} {r['compute_ms']:8.2f} {r['broadcast_ms']:9.3f} "
            f"{r['all-reduce_ms']:10.3f} {r['gather_ms']:7.3f} {r['tokens_per_s']:7.1f}"
        )


if __name__ == "__main__":
    main()
