"""Kernel benchmark suite: correctness first, then speed against torch and the hardware.

    python -m splitinfer.kernels.bench [--kernel NAME] [--quick] [--csv PATH]

On CUDA, for shapes of Llama-3.2-1B and Llama-3.1-8B plus an attention context sweep,
each case is checked against its torch reference and then timed with
`triton.testing.do_bench` (median, p20, p80; the L2 cache is flushed before every run).
Each row gives our time, the eager torch baseline (SDPA for attention) and
`torch.compile` of the reference where it compiles, the speedup over the best torch
time, the achieved GB/s or TFLOP/s, and the percent of the peak this GPU reaches on a
large device-to-device copy (bandwidth) or bf16 matmul (compute), measured at start.

On CPU there is no GPU to time: the suite runs the same cases at small sizes under
the Triton interpreter as a correctness sweep, and says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must precede the first import of triton (dispatch imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from splitinfer.kernels import activation, attention, kv_store, norm, rope  # noqa: E402


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS = (
    ModelShape("llama-3.2-1b", 2048, 8192, 32, 8, 64),
    ModelShape("llama-3.1-8b", 4096, 14336, 32, 8, 128),
)
KERNELS = ("rms_norm", "silu_and_mul", "rope", "store_kv", "flash_attention_varlen", "paged_prefill", "paged_decode")


@dataclass(slots=True)
class Case:
    """One benchmark row: our kernel, its torch baselines, and the work it does."""

    kernel: str
    shape: str
    ours: Callable[[], object]
    eager: Callable[[], object]
    check: Callable[[], None]
    nbytes: int = 0  # memory-bound kernels: bytes moved
    flops: int = 0  # compute-bound kernels: floating-point operations
    compile_target: Callable[[], object] | None = None


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2)
    )


def _close(actual: torch.Tensor, expected: torch.Tensor) -> Callable[[], None]:
    return lambda: torch.testing.assert_close(actual.float(), expected.float(), **_tol(actual.dtype))


class Builder:
    """Makes the cases of each kernel for one device, dtype and size regime."""

    def __init__(self, device: str, dtype: torch.dtype, small: bool, quick: bool) -> None:
        self.device, self.dtype, self.small, self.quick = device, dtype, small, quick
        from splitinfer.kernels import dispatch

        self.triton = dispatch._triton

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).to(self.dtype)

    def token_counts(self) -> list[int]:
        if self.small:
            return [37]
        return [4096] if self.quick else [1, 64, 4096, 16384]

    def rms_norm(self, model: ModelShape, t: int) -> Case:
        x, r, w = self.randn(t, model.hidden), self.randn(t, model.hidden), self.randn(model.hidden)
        ours = lambda: self.triton("norm_triton").rms_norm_triton(x, w, 1e-5, r)
        ref = lambda: norm.rms_norm_reference(x, w, 1e-5, r)
        check = lambda: _close(ours()[0], ref()[0])()
        return Case(
            "rms_norm",
            f"{model.name} T={t} H={model.hidden} +residual",
            ours,
            ref,
            check,
            nbytes=4 * t * model.hidden * self.dtype.itemsize,
            compile_target=ref,
        )

    def silu_and_mul(self, model: ModelShape, t: int) -> Case:
        g = self.randn(t, 2 * model.intermediate)
        ours = lambda: self.triton("activation_triton").silu_and_mul_triton(g)
        ref = lambda: activation.silu_and_mul_reference(g)
        return Case(
            "silu_and_mul",
            f"{model.name} T={t} I={model.intermediate}",
            ours,
            ref,
            lambda: _close(ours(), ref())(),
            nbytes=3 * t * model.intermediate * self.dtype.itemsize,
            compile_target=ref,
        )

    def rope(self, model: ModelShape, t: int) -> Case:
        cache = rope.rope_cos_sin_cache(model.head_dim, 8192, 500000.0).to(self.device)
        q, k = self.randn(t, model.heads, model.head_dim), self.randn(t, model.kv_heads, model.head_dim)
        pos = torch.randint(0, 8192, (t,), device=self.device)
        ours = lambda: self.triton("rope_triton").apply_rope_triton_(q, k, pos, cache)
        ref = lambda: rope.apply_rope_reference_(q, k, pos, cache)

        def check() -> None:
            q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
            self.triton("rope_triton").apply_rope_triton_(q1, k1, pos, cache)
            rope.apply_rope_reference_(q2, k2, pos, cache)
            _close(q1, q2)()
            _close(k1, k2)()

        nbytes = 2 * t * (model.heads + model.kv_heads) * model.head_dim * self.dtype.itemsize
        return Case(
            "rope",
            f"{model.name} T={t} Hq={model.heads} Hkv={model.kv_heads} D={model.head_dim}",
            ours,
            ref,
            check,
            nbytes=nbytes,
            compile_target=ref,
        )

    def store_kv(self, model: ModelShape, t: int) -> Case:
        block = 16
        blocks = -(-t // block) * 2
        k, v = self.randn(t, model.kv_heads, model.head_dim), self.randn(t, model.kv_heads, model.head_dim)
        kc = self.randn(blocks, block, model.kv_heads, model.head_dim)
        vc, kc2, vc2 = kc.clone(), kc.clone(), kc.clone()
        slots = torch.randperm(blocks * block, device=self.device)[:t]
        ours = lambda: self.triton("kv_store_triton").store_kv_triton(k, v, kc, vc, slots)
        ref = lambda: kv_store.store_kv_reference(k, v, kc2, vc2, slots)

        def check() -> None:
            ours()
            ref()
            _close(kc, kc2)()
            _close(vc, vc2)()

        return Case(
            "store_kv",
            f"{model.name} T={t} Hkv={model.kv_heads} D={model.head_dim}",
            ours,
            ref,
            check,
            nbytes=4 * t * model.kv_heads * model.head_dim * self.dtype.itemsize,
        )

    def flash_sweep(self) -> list[list[int]]:
        if self.small:
            return [[37, 20]]
        return [[8192]] if self.quick else [[1024], [4096], [8192], [2048] * 4]

    def flash_attention_varlen(self, model: ModelShape, lengths: list[int]) -> Case:
        t = sum(lengths)
        q = self.randn(t, model.heads, model.head_dim)
        k, v = self.randn(t, model.kv_heads, model.head_dim), self.randn(t, model.kv_heads, model.head_dim)
        cu = torch.tensor([0, *lengths], device=self.device).cumsum(0).to(torch.int32)
        ours = lambda: self.triton("attention_triton").flash_attention_varlen_triton(q, k, v, cu, max(lengths))

        def sdpa() -> torch.Tensor:
            # The baseline runs SDPA sequence by sequence (it has no varlen API).
            outs, start = [], 0
            for n in lengths:
                s = slice(start, start + n)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[s].transpose(0, 1),
                        k[s].transpose(0, 1),
                        v[s].transpose(0, 1),
                        is_causal=True,
                        enable_gqa=True,
                    ).transpose(0, 1)
                )
                start += n
            return torch.cat(outs)

        expected = lambda: attention.flash_attention_varlen_reference(q.float(), k.float(), v.float(), cu, max(lengths))
        flops = sum(2 * n * n * model.heads * model.head_dim for n in lengths)  # causal: half of 4*n^2*H*D
        return Case(
            "flash_attention_varlen",
            f"{model.name} seqs={lengths} causal",
            ours,
            sdpa,
            lambda: _close(ours(), expected())(),
            flops=flops,
        )

    def paged_sweep(self, kernel: str) -> list[tuple[int, int]]:
        """(batch, context) pairs."""
        if kernel == "paged_decode":
            if self.small:
                return [(3, 70)]
            return [(16, 4096)] if self.quick else [(1, 4096), (16, 4096), (64, 4096), (16, 16384), (1, 32768)]
        if self.small:
            return [(2, 70)]
        return [(4, 4096)] if self.quick else [(4, 4096), (1, 16384)]

    def paged(self, kernel: str, model: ModelShape, batch: int, ctx: int) -> Case:
        """Decode (one new token) or prefill of a chunk of new tokens, over `ctx` cached tokens per sequence."""
        block = 16
        decode = kernel == "paged_decode"
        n_q = 1 if decode else (20 if self.small else min(512, ctx // 2))
        per_seq = -(-ctx // block)
        kc = self.randn(batch * per_seq, block, model.kv_heads, model.head_dim)
        vc = self.randn(batch * per_seq, block, model.kv_heads, model.head_dim)
        tables = torch.randperm(batch * per_seq, device=self.device).view(batch, per_seq).to(torch.int32)
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
        cu = (torch.arange(batch + 1, device=self.device) * n_q).to(torch.int32)
        q = self.randn(batch * n_q, model.heads, model.head_dim)
        scale = model.head_dim**-0.5
        if decode:
            ours = lambda: self.triton("paged_decode_triton").paged_decode_attention_triton(
                q, kc, vc, tables, seq_lens, cu, scale
            )
        else:
            ours = lambda: self.triton("attention_triton").paged_prefill_attention_triton(
                q, kc, vc, tables, seq_lens, cu, n_q, scale
            )

        # The baseline: SDPA over K/V already dense per sequence, its best case (no block-table gather).
        def dense(cache: torch.Tensor) -> torch.Tensor:
            flat = cache[tables.long()].view(batch, per_seq * block, model.kv_heads, model.head_dim)
            return flat[:, :ctx].transpose(1, 2).contiguous()

        dense_k, dense_v = dense(kc), dense(vc)
        qb = q.view(batch, n_q, model.heads, model.head_dim).transpose(1, 2)
        mask = (
            torch.arange(ctx, device=self.device)[None, :] <= torch.arange(ctx - n_q, ctx, device=self.device)[:, None]
        )
        eager = lambda: F.scaled_dot_product_attention(qb, dense_k, dense_v, attn_mask=mask, enable_gqa=True)
        expected = lambda: attention.paged_attention_reference(q.float(), kc.float(), vc.float(), tables, seq_lens, cu)
        kv_bytes = 2 * batch * ctx * model.kv_heads * model.head_dim * self.dtype.itemsize
        return Case(
            kernel,
            f"{model.name} batch={batch} ctx={ctx} new={n_q}",
            ours,
            eager,
            lambda: _close(ours(), expected())(),
            nbytes=kv_bytes if decode else 0,
            flops=0 if decode else 4 * batch * n_q * ctx * model.heads * model.head_dim,
        )

    def cases(self, kernel: str) -> list[Case]:
        out: list[Case] = []
        for model in MODELS:
            if kernel in ("rms_norm", "silu_and_mul", "rope", "store_kv"):
                out += [getattr(self, kernel)(model, t) for t in self.token_counts()]
            elif kernel == "flash_attention_varlen":
                out += [self.flash_attention_varlen(model, lengths) for lengths in self.flash_sweep()]
            else:
                out += [self.paged(kernel, model, batch, ctx) for batch, ctx in self.paged_sweep(kernel)]
        return out


def _copy_bandwidth(do_bench: Callable[..., float]) -> float:
    """GB/s of a 1 GiB device-to-device copy (each byte read once and written once)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def measure_peaks(quick: bool) -> tuple[float, float]:
    """(GB/s of a large device-to-device copy, TFLOP/s of a large bf16 matmul) on this GPU."""
    from triton.testing import do_bench

    bandwidth = _copy_bandwidth(do_bench)  # its 2 GiB of buffers are freed on return
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return bandwidth, 2 * n**3 / (ms * 1e-3) / 1e12


def _compiled(fn: Callable[[], object]) -> Callable[[], object] | None:
    try:
        compiled = torch.compile(fn, dynamic=False)
        compiled()
        return compiled
    except Exception:  # noqa: BLE001 - "where it works": any compile failure means no column
        return None


def run_gpu(cases: list[Case], quick: bool, torch_compile: bool = True) -> list[dict[str, object]]:
    from triton.testing import do_bench

    bandwidth, tflops = measure_peaks(quick)
    print(f"measured peaks: {bandwidth:.0f} GB/s device copy, {tflops:.0f} TFLOP/s bf16 matmul", file=sys.stderr)
    rows = []
    for case in cases:
        row: dict[str, object] = {"kernel": case.kernel, "shape": case.shape}
        try:
            case.check()
            row["correct"] = "ok"
        except AssertionError as exc:
            row["correct"] = "FAIL"
            print(f"{case.kernel} {case.shape}: MISMATCH {str(exc).splitlines()[0]}", file=sys.stderr)
        p50, p20, p80 = do_bench(case.ours, quantiles=[0.5, 0.2, 0.8])
        eager = do_bench(case.eager)
        compiled = _compiled(case.compile_target) if case.compile_target and torch_compile else None
        compile_ms = do_bench(compiled) if compiled else None
        best_torch = min(t for t in (eager, compile_ms) if t is not None)
        row.update(
            ours_us=p50 * 1e3,
            p20_us=p20 * 1e3,
            p80_us=p80 * 1e3,
            torch_us=eager * 1e3,
            compile_us=compile_ms * 1e3 if compile_ms else None,
            speedup=best_torch / p50,
        )
        if case.flops:
            achieved = case.flops / (p50 * 1e-3) / 1e12
            row.update(achieved=f"{achieved:.1f} TFLOP/s", pct_peak=100 * achieved / tflops)
        else:
            achieved = case.nbytes / (p50 * 1e-3) / 1e9
            row.update(achieved=f"{achieved:.0f} GB/s", pct_peak=100 * achieved / bandwidth)
        rows.append(row)
        print(_format_row(row), file=sys.stderr)
    return rows


def run_interpreter(cases: list[Case]) -> list[dict[str, object]]:
    rows = []
    for case in cases:
        try:
            case.check()
            correct = "ok"
        except AssertionError as exc:
            correct = "FAIL"
            print(f"{case.kernel} {case.shape}: MISMATCH {str(exc).splitlines()[0]}", file=sys.stderr)
        rows.append({"kernel": case.kernel, "shape": case.shape, "correct": correct})
    return rows


COLUMNS = (
    "kernel",
    "shape",
    "correct",
    "ours_us",
    "p20_us",
    "p80_us",
    "torch_us",
    "compile_us",
    "speedup",
    "achieved",
    "pct_peak",
)


def _format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _format_row(row: dict[str, object]) -> str:
    return " | ".join(_format_value(row.get(c)) for c in COLUMNS if c in row)


def print_table(rows: list[dict[str, object]]) -> None:
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    cells = [[_format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def environment() -> dict[str, str]:
    import triton

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    device = (
        torch.cuda.get_device_name()
        if CUDA
        else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    )
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__, "git_sha": sha}


def write_csv(path: Path, rows: list[dict[str, object]], env: dict[str, str]) -> None:
    fields = [c for c in COLUMNS if any(c in row for row in rows)] + list(env)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: _format_value(row.get(k)) for k in fields if k not in env}, **env})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitinfer.kernels.bench",
        description="Check every Triton kernel against its torch reference, then time it against torch and the "
        "GPU's measured peaks. Without CUDA, runs the correctness sweep under the Triton interpreter only.",
    )
    parser.add_argument(
        "--kernel", choices=KERNELS, action="append", help="benchmark only this kernel (repeatable); default: all"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one shape per model and kernel, and a smaller matmul peak"
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baseline (its compiles take most of a quick run)",
    )
    parser.add_argument(
        "--csv", type=Path, help="also write the rows, with GPU name, versions and git sha, to this CSV file"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="activation dtype (default: bfloat16 on CUDA, float32 under the interpreter)",
    )
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if CUDA else torch.float32)
    if not CUDA and dtype == torch.bfloat16:
        parser.error("bfloat16 needs CUDA: the Triton interpreter's bf16 tl.dot is wrong")
    builder = Builder("cuda" if CUDA else "cpu", dtype, small=not CUDA, quick=args.quick)
    cases = [case for kernel in (args.kernel or KERNELS) for case in builder.cases(kernel)]
    env = environment()
    if CUDA:
        rows = run_gpu(cases, args.quick, torch_compile=not args.no_compile)
    else:
        print(
            "No CUDA device: running the correctness sweep under the Triton interpreter at small sizes. "
            "These runs say nothing about GPU speed, so no timings are shown.",
            file=sys.stderr,
        )
        rows = run_interpreter(cases)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | git {env['git_sha']} | {dtype}")
    print_table(rows)
    if args.csv:
        write_csv(args.csv, rows, env)
    return 1 if any(row["correct"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
