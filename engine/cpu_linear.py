"""Matmuls of a few rows on CPU with oneDNN-prepacked weights.

A decode step multiplies a handful of rows (one per running request) by every weight
matrix. For 4 to 64 rows, oneDNN on weights reordered once into its blocked layout runs
the model's linears 1.3-1.7x faster than torch's default sgemm on the same weights
(measured on the bench model, 2 cores, fp32); for 1 to 3 rows the default is faster, so
those keep the original weight. Both copies are kept: prepacking doubles the weights'
memory, which is why `EngineConfig.cpu_weight_prepack` can turn it off and why it is
skipped, with a warning, when free memory cannot hold the copy twice over.

Half precision has a second problem: where the CPU has no fast bf16/fp16 matmul (x86 without
AVX512-BF16 or AMX: oneDNN refuses those types and torch falls back to a plain loop), a
half-precision matmul of many rows runs 4-8x slower than fp32 (a 512-token prefill of the
bench model: 104 tok/s in bf16, 591 in fp32; `bench_engine.py --compare-dtypes`). One row
(batch-1 decode) is the exception: it reads half the bytes and runs about twice as fast. So
on such a CPU (`half_matmul_is_slow`, measured at start) inputs of `UPCAST_MIN_ROWS` rows or
more multiply in fp32 (`Upcast`): the half weight is copied into an fp32 scratch a chunk of
rows at a time and multiplied there, which costs a copy of the weight per matmul but runs at
fp32 speed. The weights stay half precision in memory.

The ops are the ones torch's own inductor emits for frozen CPU linears
(`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`); where they are missing
or give a wrong result in the check at start, matmuls stay on the default path.

A packed weight serves only a fixed, small set of row counts (`PackedWeight.row_counts`:
the decode batch buckets, which the decode path pads every step to, its lm_head included). oneDNN keeps native
state for every input shape it has seen and never gives it back: with prefill chunks of
any length going through it, an engine's memory grew with every distinct row count
(about 0.6 MB per row count and weight shape; 1.75 GB after 6,000 mixed requests on the
bench model, still growing). Every other row count takes the default path: 1 to 3 rows,
where it is faster, and prefill (hundreds of rows), where it is about as fast.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Fewer rows than this go through torch's default matmul (faster there); more through oneDNN.
MIN_PACKED_ROWS = 4
# The packed layout is chosen for this many rows, a typical decode batch.
PACK_FOR_ROWS = 32
# Half-precision matmuls of at least this many rows run in fp32 where half ones are slow: the
# crossover measured on an AVX2 CPU (bench model's shapes, 2 cores) lies between 8 and 16 rows
# for its layer matrices and near 32 for its lm_head.
UPCAST_MIN_ROWS = 16
# fp32 elements of the scratch an upcast weight chunk is copied into (16 MB): big enough that
# each chunk is a real matmul, small enough that a large vocabulary costs no large buffer.
UPCAST_CHUNK = 1 << 22


def prepack_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """A weight in oneDNN's blocked layout, and the only row counts it is used for."""

    tensor: torch.Tensor
    row_counts: frozenset[int]


def packed_row_counts(batch_sizes: Iterable[int]) -> frozenset[int]:
    """The row counts worth a packed weight among the batch sizes a forward is padded to."""
    return frozenset(n for n in batch_sizes if n >= MIN_PACKED_ROWS)


def prepack(weight: torch.Tensor, row_counts: frozenset[int]) -> PackedWeight:
    """`weight` [out, in] in oneDNN's blocked layout, for inputs of `row_counts` rows."""
    return PackedWeight(_reorder(weight), row_counts)


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_FOR_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Upcast:
    """Matmuls of half-precision weights done in fp32, for inputs of `min_rows` rows or more.
    One per model: its scratch serves every matmul, one after the other."""

    __slots__ = ("min_rows", "_scratch")

    def __init__(self, min_rows: int = UPCAST_MIN_ROWS, chunk: int = UPCAST_CHUNK) -> None:
        self.min_rows = min_rows
        self._scratch = torch.empty(chunk, dtype=torch.float32)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x W^T + b` in fp32, rounded to x's dtype once at the end."""
        x32 = x.float()
        rows = max(1, self._scratch.numel() // weight.shape[1])
        parts = []
        for start in range(0, weight.shape[0], rows):
            chunk = weight[start : start + rows]
            # copy_ into a kept buffer: `chunk.float()` would allocate (and fault in) fresh pages
            # every call, which costs more than the conversion itself.
            chunk32 = self._scratch[: chunk.numel()].view(chunk.shape).copy_(chunk)
            parts.append(x32 @ chunk32.t())
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if bias is not None:
            out += bias
        return out.to(x.dtype)


# bf16 is `auto`'s CPU dtype only where its matmuls run at least this much faster than fp32's
# (native bf16 matmuls, e.g. AMX, run several times faster; an AVX2 CPU measured 0.27x): a margin
# wide enough that a noisy measurement cannot flip the choice between two starts.
HALF_DEFAULT_SPEEDUP = 1.5


@functools.cache
def half_matmul_speedup(dtype: torch.dtype) -> float:
    """How many times faster a layer-sized matmul of many rows runs in `dtype` than in fp32 on
    this CPU (best of three each); measured once per process."""
    if dtype == torch.float32:
        return 1.0
    weight = torch.randn(1024, 1024)
    x = torch.randn(2 * UPCAST_MIN_ROWS, 1024)
    half_weight, half_x = weight.to(dtype), x.to(dtype)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return best(lambda: F.linear(x, weight)) / best(lambda: F.linear(half_x, half_weight))


def half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Whether matmuls of many rows in `dtype` run at under half fp32's speed here (then
    `Upcast` runs them in fp32)."""
    return half_matmul_speedup(dtype) < 0.5


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: PackedWeight | None,
    upcast: Upcast | None = None,
) -> torch.Tensor:
    """`x W^T + b`, through the packed weight when there is one for x's row count, else in
    fp32 when `upcast` covers x's row count."""
    if packed is not None and x.dim() == 2 and x.shape[0] in packed.row_counts:
        return packed_linear(x, packed.tensor, bias)
    if upcast is not None and x.dim() == 2 and x.shape[0] >= upcast.min_rows:
        return upcast.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def check_prepack(dtype: torch.dtype) -> str | None:
    """Why prepacked matmuls cannot be used here (None if they can): missing ops, or a result
    that differs from F.linear's on a random input."""
    if not prepack_available():
        return "this torch build has no oneDNN linear ops"
    try:
        weight = torch.randn(96, 80).to(dtype)
        x = torch.randn(MIN_PACKED_ROWS + 3, 80).to(dtype)
        got = packed_linear(x, _reorder(weight), None).float()
    except RuntimeError as exc:
        return f"oneDNN linear failed: {exc}"
    expected = F.linear(x, weight).float()
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tolerance, atol=tolerance):
        return "oneDNN linear gave a result different from F.linear"
    return None


def enough_memory_for(extra_bytes: int) -> bool:
    """Whether a copy of `extra_bytes` leaves at least as much again free (unknown: assume so)."""
    available = available_memory_bytes()
    return available is None or available > 2 * extra_bytes
