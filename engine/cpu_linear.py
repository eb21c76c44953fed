"""Matmuls of a few rows on CPU with oneDNN-prepacked weights.

A decode step multiplies a handful of rows (one per running request) by every weight
matrix. For 4 to 64 rows, oneDNN on weights reordered once into its blocked layout runs
the model's linears 1.3-1.7x faster than torch's default sgemm on the same weights
(measured on the bench model, 2 cores, fp32); for 1 to 3 rows the default is faster, so
those keep the original weight. Both copies are kept: prepacking doubles the weights'
memory, which is why `EngineConfig.cpu_weight_prepack` can turn it off and why it is
skipped, with a warning, when free memory cannot hold the copy twice over.

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

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Fewer rows than this go through torch's default matmul (faster there); more through oneDNN.
MIN_PACKED_ROWS = 4
# The packed layout is chosen for this many rows, a typical decode batch.
PACK_FOR_ROWS = 32


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


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight | None
) -> torch.Tensor:
    """`x W^T + b`, through the packed weight when there is one for x's row count."""
    if packed is not None and x.dim() == 2 and x.shape[0] in packed.row_counts:
        return packed_linear(x, packed.tensor, bias)
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
