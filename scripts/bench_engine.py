#!/usr/bin/env python3
"""The in-process engine against transformers on the same checkpoint, dtype and device.

    python scripts/bench_engine.py                  # the ~100M 'bench' checkpoint on CPU (built on first use)
    python scripts/bench_engine.py --model DIR --device cuda --dtype bfloat16

Measures, for both: batch-1 decode tokens/s; prefill tokens/s at several prompt lengths;
and aggregate output tokens/s for N concurrent requests with mixed prompt lengths (32 to
512 by default) and output lengths (16 to 256): ours continuously batched; transformers one request at
a time and as one padded batched `generate` (which runs to the longest output). Prints the
ratios, the achieved memory bandwidth of batch-1 decode against a measured copy bandwidth,
and the achieved GFLOP/s of the batched runs against a measured matmul peak. On CUDA it also
runs our decode with CUDA graphs off. Greedy decoding throughout; eos is ignored; our prefix
cache is off (the prompts are random, and a repeated run would be served from it). Each
measure runs --repeats times, ours and transformers' taking turns, and the best run counts:
on a shared machine a slow spell then cannot decide a ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_serving import span  # beside this script: one parser of 'N' and 'MIN-MAX' lengths

from splitinfer.engine import EngineConfig, EngineCore, SamplingParams, cpu_linear

REPO = Path(__file__).resolve().parents[1]
MAX_BATCHED_TOKENS = 4096


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(GB/s of a large copy, GFLOP/s of a large matmul) on this device in this dtype."""
    size = (1 << 28) if device.type == "cpu" else (1 << 30)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * size / best / 1e9  # read + write
    del src, dst
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return bandwidth, 2 * n**3 / best / 1e9


def interleaved(repeats: int, *measures: Callable[[], float]) -> list[float]:
    """The best of `repeats` runs of each measure (a rate), runs of the measures taking turns,
    so that a slow spell of a shared machine does not fall on one side only."""
    best = [0.0] * len(measures)
    for _ in range(repeats):
        for i, measure in enumerate(measures):
            best[i] = max(best[i], measure())
    return best


def progress(what: str) -> None:
    print(f"measuring {what} ...", file=sys.stderr, flush=True)


def mixed_workload(
    count: int, vocab: int, seed: int = 0, prompt: tuple[int, int] = (32, 512), output: tuple[int, int] = (16, 256)
) -> list[Request]:
    """`count` requests, prompt and output lengths uniform in the given ranges."""
    rng = random.Random(seed)
    return [
        Request([rng.randrange(vocab) for _ in range(rng.randint(*prompt))], rng.randint(*output)) for _ in range(count)
    ]


PREPACK_POLICIES = {
    "decode": "prepacked matmuls at the decode batch sizes (the default)",
    "every": "prepacked matmuls for every row count >= 4 (the former policy: memory grows with each new length)",
    "off": "no prepacked matmuls",
}


class Ours:
    def __init__(
        self,
        model: str,
        device: str,
        dtype: str,
        enforce_eager: bool,
        max_num_seqs: int,
        prepack: str = "decode",
        gpu_memory_utilization: float = 0.9,
        num_kv_blocks: int | None = None,
    ) -> None:
        # No prefix caching: repeated runs of one workload would be served from the cache.
        self.core = EngineCore(
            EngineConfig(
                model=model,
                device=device,
                dtype=dtype,
                enforce_eager=enforce_eager,
                max_num_seqs=max_num_seqs,
                kv_cache_gb=2.0,
                num_kv_blocks=num_kv_blocks,
                gpu_memory_utilization=gpu_memory_utilization,
                max_num_batched_tokens=MAX_BATCHED_TOKENS,
                enable_prefix_caching=False,
                cpu_weight_prepack=prepack != "off",
            )
        )
        if prepack == "every" and self.core.model.packed_lm_head is not None:
            self.core.model.prepack_cpu_weights(frozenset(range(cpu_linear.MIN_PACKED_ROWS, MAX_BATCHED_TOKENS + 1)))
        self._next = 0

    def run(self, requests: list[Request]) -> float:
        """Seconds to finish every request, all submitted at once."""
        for r in requests:
            self.core.add_request(
                f"b{self._next}", r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True)
            )
            self._next += 1
        sync(self.core.device)
        start = time.perf_counter()
        while self.core.has_unfinished():
            self.core.step()
        sync(self.core.device)
        return time.perf_counter() - start

    def decode_rate(self, tokens: int) -> float:
        """Batch-1 decode tokens/s (the prefill step excluded)."""
        self.core.add_request(
            f"d{self._next}", list(range(1, 17)), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        )
        self._next += 1
        self.core.step()  # prefill and first token
        sync(self.core.device)
        start = time.perf_counter()
        steps = 0
        while self.core.has_unfinished():
            self.core.step()
            steps += 1
        sync(self.core.device)
        return steps / (time.perf_counter() - start)


class Transformers:
    def __init__(self, model: str, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = (
            AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        )

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """One padded (left) batch, greedy, exactly max_new_tokens each."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        self.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    def timed(self, prompts: list[list[int]], max_new_tokens: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.generate(prompts, max_new_tokens)
        sync(self.device)
        return time.perf_counter() - start

    def decode_rate(self, tokens: int) -> float:
        prompt = [list(range(1, 17))]
        one = min(self.timed(prompt, 1) for _ in range(2))
        return (tokens - 1) / (self.timed(prompt, tokens) - one)

    @torch.inference_mode()
    def prefill_seconds(self, length: int, vocab: int) -> float:
        ids = torch.randint(0, vocab, (1, length), device=self.device)
        self.model(ids)
        sync(self.device)
        start = time.perf_counter()
        self.model(ids)
        sync(self.device)
        return time.perf_counter() - start


def build_bench_checkpoint() -> str:
    path = REPO / ".cache" / "bench-model"
    if not (path / "config.json").is_file():
        print(f"building the ~100M-parameter bench checkpoint in {path}", file=sys.stderr)
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_tiny_model.py"), str(path), "--preset", "bench"],
            check=True,
            capture_output=True,
        )
    return str(path)


def add_checkpoint_arguments(p: argparse.ArgumentParser, whose_dtype: str) -> None:
    """--model, --device and --dtype, as every engine bench takes them."""
    p.add_argument("--model", help="Checkpoint directory (default: the 'bench' preset of make_tiny_model.py).")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s).")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help=f"{whose_dtype} dtype (default: %(default)s).",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "Both engines'")
    p.add_argument(
        "--decode-tokens", type=int, default=128, help="Tokens of the batch-1 decode run (default: %(default)s)."
    )
    p.add_argument("--prefill", default="128,512,2048", help="Prompt lengths for prefill (default: %(default)s).")
    p.add_argument("--concurrency", default="1,8,32", help="Concurrent request counts (default: %(default)s).")
    p.add_argument(
        "--prompt-tokens",
        type=span,
        default="32-512",
        help="Prompt lengths of the concurrent requests: N or MIN-MAX (default: %(default)s).",
    )
    p.add_argument(
        "--output-tokens",
        type=span,
        default="16-256",
        help="Output lengths of the concurrent requests: N or MIN-MAX (default: %(default)s).",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Runs of each measure, ours and transformers' taking turns; the best counts (default: %(default)s).",
    )
    p.add_argument(
        "--skip-sequential",
        action="store_true",
        help="Skip transformers one-request-at-a-time for the largest concurrency (slow on CPU).",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.4,
        help="CUDA: the share of the GPU our engine sizes its KV cache to; the rest holds transformers' "
        "model and, with graphs off, a second engine of the same size (default: %(default)s).",
    )
    p.add_argument(
        "--compare-dtypes",
        metavar="D1,D2",
        help="Run the whole comparison in each of these dtypes, one after the other in this process (e.g. "
        "float32,bfloat16), then print every measure side by side with ours in each dtype against ours in "
        "the first; --dtype is then ignored.",
    )
    p.add_argument("--json", type=Path, help="Also write the results as JSON to this file.")
    p.add_argument(
        "--cpu-prepack-ab",
        action="store_true",
        help="CPU: instead of the comparison with transformers, run the concurrent workloads with each "
        "prepacking policy in turn: " + "; ".join(f"'{k}', {v}" for k, v in PREPACK_POLICIES.items()) + ".",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or build_bench_checkpoint()
    if args.cpu_prepack_ab:
        prepack_ab(model, args)
        return
    if not args.compare_dtypes:
        results = compare(model, args, args.dtype)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    dtypes = args.compare_dtypes.split(",")
    runs = {}
    for name in dtypes:
        runs[name] = compare(model, args, name)
        gc.collect()
    print_dtype_table(runs)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=2))


def print_dtype_table(runs: dict[str, dict]) -> None:
    """Each measure in every dtype, ours and transformers', and ours against ours in the first dtype."""
    first, *others = runs
    print(f"\n{'measure':<50} " + " ".join(f"{f'ours {d}':>16} {f'HF {d}':>14}" for d in runs), end="")
    print("".join(f" {f'{d}/{first}':>18}" for d in others))
    for i, row in enumerate(runs[first]["rows"]):
        line = f"{row['measure']:<50} "
        line += " ".join(
            f"{runs[d]['rows'][i]['ours']:>16.1f} {runs[d]['rows'][i]['transformers']:>14.1f}" for d in runs
        )
        line += "".join(f" {runs[d]['rows'][i]['ours'] / row['ours']:>17.2f}x" for d in others)
        print(line)


def compare(model: str, args: argparse.Namespace, dtype_name: str) -> dict:
    """Every measure of ours and transformers' in one dtype; prints its table and returns the results."""
    device, dtype = torch.device(args.device), getattr(torch, dtype_name)
    results: dict = {"model": model, "device": str(device), "dtype": dtype_name, "threads": torch.get_num_threads()}

    bandwidth, matmul = measure_peaks(device, dtype)
    results |= {"copy_gbps": bandwidth, "matmul_gflops": matmul}
    print(
        f"device {device} ({torch.get_num_threads()} threads), {dtype_name}: copy {bandwidth:.1f} GB/s, "
        f"matmul {matmul:.1f} GFLOP/s"
    )
    concurrency = [int(c) for c in args.concurrency.split(",")]
    ours = Ours(
        model,
        args.device,
        dtype_name,
        enforce_eager=False,
        max_num_seqs=max(concurrency),
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    params = sum(t.numel() for t in ours.core.model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in ours.core.model.parameters())
    vocab = ours.core.model_config.vocab_size
    hf = Transformers(model, device, dtype)
    print(f"model: {params / 1e6:.1f}M parameters, {weight_bytes / 1e9:.2f} GB of weights")

    rows = []
    progress("batch-1 decode")
    ours.decode_rate(8)  # warm-up
    ours_decode, hf_decode = interleaved(
        args.repeats, lambda: ours.decode_rate(args.decode_tokens), lambda: hf.decode_rate(args.decode_tokens)
    )
    gbps = lambda rate: weight_bytes * rate / 1e9  # noqa: E731
    roofline = lambda rate: f"{gbps(rate):.1f} GB/s ({100 * gbps(rate) / bandwidth:.0f}%)"  # noqa: E731
    rows.append(
        (
            "batch-1 decode tok/s",
            ours_decode,
            hf_decode,
            f"weights read: {roofline(ours_decode)} vs {roofline(hf_decode)} of a {bandwidth:.1f} GB/s copy",
        )
    )
    if device.type == "cuda":
        eager = Ours(
            model,
            args.device,
            dtype_name,
            enforce_eager=True,
            max_num_seqs=max(concurrency),
            num_kv_blocks=ours.core.block_pool.num_blocks,
        )
        eager.decode_rate(8)
        (eager_decode,) = interleaved(args.repeats, lambda: eager.decode_rate(args.decode_tokens))
        rows.append(("batch-1 decode, graphs off", eager_decode, hf_decode, ""))
        del eager

    for length in (int(n) for n in args.prefill.split(",")):
        progress(f"prefill of {length} tokens")
        rng = random.Random(length)
        fresh = lambda: Request([rng.randrange(vocab) for _ in range(length)], 1)  # noqa: E731
        rates = interleaved(
            args.repeats, lambda: length / ours.run([fresh()]), lambda: length / hf.prefill_seconds(length, vocab)
        )
        rows.append((f"prefill {length} tok/s", *rates, ""))

    for count in concurrency:
        progress(f"{count} concurrent requests")
        work = mixed_workload(count, vocab, seed=count, prompt=args.prompt_tokens, output=args.output_tokens)
        useful = sum(r.max_tokens for r in work)
        computed = sum(len(r.prompt) + r.max_tokens for r in work)
        longest = max(r.max_tokens for r in work)
        ours_rate, batched = interleaved(
            args.repeats, lambda: useful / ours.run(work), lambda: useful / hf.timed([r.prompt for r in work], longest)
        )
        note = f"ours {2 * params * computed * ours_rate / useful / 1e9:.1f} GFLOP/s of {matmul:.1f}"
        rows.append((f"{count} concurrent, output tok/s (HF padded batch)", ours_rate, batched, note))
        if count > 1 and not (args.skip_sequential and count == max(concurrency)):
            progress(f"{count} requests one at a time in transformers")
            sequential = useful / sum(hf.timed([r.prompt], r.max_tokens) for r in work)
            rows.append((f"{count} concurrent, output tok/s (HF one at a time)", ours_rate, sequential, ""))
        gc.collect()

    print(f"\n{'measure':<50} {'ours':>10} {'transformers':>13} {'ratio':>7}  notes")
    for name, a, b, note in rows:
        print(f"{name:<50} {a:>10.1f} {b:>13.1f} {a / b:>6.2f}x  {note}")
    # Batch-1 decode reads every weight once per token: its share of the copy bandwidth.
    roofline_pct = lambda name, rate: 100 * gbps(rate) / bandwidth if name.startswith("batch-1") else None  # noqa: E731
    results["weight_bytes"] = weight_bytes
    results["rows"] = [
        {"measure": n, "ours": a, "transformers": b, "ratio": a / b, "notes": note, "roofline_pct": roofline_pct(n, a)}
        for n, a, b, note in rows
    ]
    return results  # the engines go with this frame, before the next dtype loads its own


def prepack_ab(model: str, args: argparse.Namespace) -> None:
    """Output tok/s of the concurrent workloads under each CPU prepacking policy, interleaved."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    engines = {
        name: Ours(model, "cpu", args.dtype, enforce_eager=True, max_num_seqs=max(concurrency), prepack=name)
        for name in PREPACK_POLICIES
    }
    vocab = engines["decode"].core.model_config.vocab_size
    print(f"\n{'workload':<40} " + " ".join(f"{name:>10}" for name in engines))
    for count in concurrency:
        progress(f"{count} concurrent requests, {len(engines)} policies")
        work = mixed_workload(count, vocab, seed=count)
        useful = sum(r.max_tokens for r in work)
        rates = interleaved(args.repeats, *[lambda e=e: useful / e.run(work) for e in engines.values()])
        print(f"{f'{count} concurrent, output tok/s':<40} " + " ".join(f"{r:>10.1f}" for r in rates), flush=True)
    for name, text in PREPACK_POLICIES.items():
        print(f"  {name}: {text}")


if __name__ == "__main__":
    main()
