"""The single place that picks an implementation for each kernel call.

Triton runs for CUDA tensors; the pure-torch reference runs for CPU tensors. The
environment variable SPLITINFER_KERNELS overrides the choice per call:
`triton` forces Triton (with TRITON_INTERPRET=1 set before triton is imported, the
kernels then run on CPU tensors under the interpreter: that is how the tests prove
them), `torch` forces the references, `auto` (the default) decides by device.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from splitinfer.kernels import activation, attention, kv_store, norm, rope

# Triton ships wheels for Linux x86_64 only; elsewhere the references run. It is
# imported on first use, so that TRITON_INTERPRET may still be set before then
# (the kernel bench does) and CPU-only runs never pay for the import.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _triton(name: str) -> ModuleType:
    """The Triton launcher module `splitinfer.kernels.<name>`, imported on first use."""
    return importlib.import_module(f"splitinfer.kernels.{name}")


BACKEND_ENV = "SPLITINFER_KERNELS"
# Split-K decode cuts a context into at most this many slices (see paged_decode_triton).
MAX_DECODE_SPLITS = 16
BACKENDS = ("auto", "triton", "torch")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a call on `tensor` runs the Triton kernel."""
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        return True
    return tensor.is_cuda and HAS_TRITON


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [T, H] times weight [H], fp32 math; with `residual`, fused
    `residual_out = x + residual` and returns `(rms_norm(residual_out), residual_out)`."""
    if use_triton(x):
        return _triton("norm_triton").rms_norm_triton(x, weight, eps, residual)
    return norm.rms_norm_reference(x, weight, eps, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: [T, 2*I] (gate first) -> silu(gate) * up [T, I]."""
    if use_triton(gate_up):
        return _triton("activation_triton").silu_and_mul_triton(gate_up)
    return activation.silu_and_mul_reference(gate_up)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half layout) by positions [T]."""
    if use_triton(q):
        _triton("rope_triton").apply_rope_triton_(q, k, positions, cos_sin_cache)
    else:
        rope.apply_rope_reference_(q, k, positions, cos_sin_cache)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hkv, D] into the paged caches at flat slots [T]; slot -1 writes nothing."""
    if use_triton(k):
        _triton("kv_store_triton").store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        kv_store.store_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention within each packed sequence (fresh prefill): q [T, Hq, D], k, v [T, Hkv, D]."""
    if use_triton(q):
        return _triton("attention_triton").flash_attention_varlen_triton(q, k, v, cu_seqlens, max_seqlen, scale, causal)
    return attention.flash_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale, causal)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    workspace: torch.Tensor | None = None,
    plan: attention.PagedAttentionPlan | None = None,
    num_decode_seqs: int = 0,
) -> torch.Tensor:
    """Packed queries over each sequence's paged context; sequence b's queries are its last
    `cu_seqlens_q[b+1] - cu_seqlens_q[b]` positions of `seq_lens[b]`, causal.

    `max_seqlen_q` (a host int) sizes the launch grid; 1 selects the split-K decode
    kernel. When None it is read from `cu_seqlens_q`, which syncs with the device.
    `num_decode_seqs` (a host int): how many leading sequences have one query each. In a
    mixed step (decodes packed first, then prefill chunks) those go through the split-K
    decode kernel and the rest through the prefill kernel, into one output; 0 sends every
    sequence of a step with longer queries through the prefill kernel.
    `workspace`: fp32 scratch of at least `decode_workspace_numel(batch, Hq, D)` elements
    for the split-K partial results, so that a decode step allocates nothing; without
    it the decode kernel allocates its scratch per call.
    `plan`: what `plan_paged_attention` made for this batch (the same for every layer).
    """
    if not use_triton(q):
        return attention.paged_attention_torch(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, max_seqlen_q, workspace, plan
        )
    prefill = _triton("attention_triton")
    prefill.check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q)
    decode = _triton("paged_decode_triton").paged_decode_attention_triton
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if seq_lens.numel() else 0
    if max_seqlen_q == 1:
        return decode(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, workspace=workspace)
    batch, n = seq_lens.shape[0], num_decode_seqs
    if not 0 < n < batch:
        return prefill.paged_prefill_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale
        )
    # Both kernels read and write their rows at cu_seqlens_q[seq] (absolute token offsets), so
    # each gets its slice of the metadata and they fill disjoint rows of one output.
    out = q.new_empty(q.shape)
    decode(q, k_cache, v_cache, block_tables[:n], seq_lens[:n], cu_seqlens_q[: n + 1], scale, out=out,
           workspace=workspace)
    prefill.paged_prefill_attention_triton(
        q, k_cache, v_cache, block_tables[n:], seq_lens[n:], cu_seqlens_q[n:], max_seqlen_q, scale, out=out
    )
    return out


def plan_paged_attention(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, block_size: int
) -> attention.PagedAttentionPlan | None:
    """What `paged_attention` can work out once per batch rather than once per layer, as in
    FlashInfer's plan/run split: on CPU, how decode rows are grouped and gathered (host work
    that would otherwise repeat in every layer); None where the kernel needs no plan (Triton,
    which reads lengths and tables on the device, with no host work and no sync)."""
    if use_triton(seq_lens):
        return None
    return attention.plan_paged_attention_torch(block_tables, seq_lens, cu_seqlens_q, block_size)


def decode_workspace_numel(batch: int, num_heads: int, head_dim: int) -> int:
    """fp32 elements of split-K decode scratch for `batch` sequences: each (sequence, query
    head, slice) keeps a partial output of `head_dim` values and its log-sum-exp."""
    return batch * num_heads * MAX_DECODE_SPLITS * (head_dim + 1)


def decode_split_batches(max_batch: int, kv_heads: int, device: torch.device) -> dict[int, int]:
    """Each split count the Triton decode kernel picks for some batch of 1 to `max_batch`
    sequences, with the smallest such batch. The count is a compile-time constant of the
    kernel, so each is one binary to compile before serving (`ModelRunner.warm_up`)."""
    pick = _triton("paged_decode_triton").decode_num_splits
    batches: dict[int, int] = {}
    for batch in range(1, max_batch + 1):
        batches.setdefault(pick(batch, kv_heads, device), batch)
    return batches
