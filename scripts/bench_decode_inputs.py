"""Host cost of loading one decode step's inputs into the graph runner's static buffers.

`DecodeGraphRunner.load_step` (token ids, positions, slots, lengths, block tables) runs on the
host before every decode replay, and the GPU waits for it. This times it in a steady state:
n sequences of about `blocks` blocks each, every one gaining a block one step in 16 (a
block of 16 tokens). No model runs; on CUDA the device is synchronized after each step,
outside the timed part, as the engine's sampler does.

    python scripts/bench_decode_inputs.py [--sizes 1x16,64x256,256x256,256x2048] [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

import torch

from splitinfer.engine.cuda_graph import DecodeGraphRunner, DecodeStep


def time_steps(n: int, blocks: int, steps: int, device: torch.device) -> list[float]:
    config = SimpleNamespace(num_heads=8, head_dim=64)
    model = SimpleNamespace(rope_cache=torch.empty(0, device=device), config=config, shard=config, driver=None)
    width = blocks + steps
    runner = DecodeGraphRunner(model, n, width, use_cuda_graphs=False)
    rng = random.Random(0)
    tables = [list(range(i * width, i * width + blocks)) for i in range(n)]
    step = DecodeStep([1] * n, [blocks * 16 - 1] * n, [5] * n, [blocks * 16] * n, tables)
    runner.load_step(step)  # the first step sends every table whole
    times = []
    for _ in range(steps):
        for table in tables:
            if rng.random() < 1 / 16:
                table.append(table[-1] + 1)
        start = time.perf_counter()
        runner.load_step(step)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    runner.check_block_tables(tables)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1x16,64x256,256x256,256x2048", help="comma-separated SEQSxBLOCKS (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"load_step host time per decode step on {device} ({args.steps} steps)")
    print(f"{'seqs':>5} {'blocks':>7} {'median ms':>10} {'mean ms':>9}")
    for size in args.sizes.split(","):
        n, blocks = (int(part) for part in size.split("x"))
        times = time_steps(n, blocks, args.steps, device)
        print(f"{n:>5} {blocks:>7} {statistics.median(times) * 1e3:>10.3f} {statistics.fmean(times) * 1e3:>9.3f}")


if __name__ == "__main__":
    main()
