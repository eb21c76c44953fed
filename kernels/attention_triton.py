"""Triton flash attention for prefill: fresh packed sequences, or new tokens over a paged cache.

One kernel serves both: with PAGED the keys are read through each sequence's block
table and the queries are its last positions; without, keys are the packed fresh K/V.
Online softmax in base 2, fp32 accumulators, GQA by mapping query head h to KV head
h // group (K/V are never repeated). Grid: (query blocks, query heads, sequences).
With SLIDING (a sliding window W, causal only), the query at position p sees keys
p - W < j <= p: a program starts at the first key tile its first query can see, so a long
context under a small window costs what the window costs. Without it the binary is the
plain causal one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitinfer.kernels.attention import check_window

LOG2E = 1.4426950408889634


# The block-table width changes from step to step, and the metadata pointers of a mixed step's
# prefill rows are slices (`TritonBackend.paged_attention`) whose 16-byte alignment depends on
# how many decode rows precede them: specialising on either would compile new binaries mid-serving.
# The window is one value per layer, but its divisibility by 16 would buy nothing: not a key either.
@triton.jit(
    do_not_specialize=["stride_bt", "window"],
    do_not_specialize_on_alignment=["cu_seqlens_q_ptr", "seq_lens_ptr", "block_tables_ptr"],
)
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,  # per token and head; for PAGED, per cache slot within a block
    stride_kb,
    stride_vb,
    stride_bt,  # PAGED only: per cache block, per block-table row
    block_size,
    qk_scale,
    group,
    head_dim,
    window,  # SLIDING only
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLIDING: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
    num_q = (tl.load(cu_seqlens_q_ptr + seq + 1) - q_start).to(tl.int32)
    if m_block * BLOCK_M >= num_q:
        return
    if PAGED:
        kv_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    else:
        kv_len = num_q
    kv_head = head // group
    # Query i of this sequence sits at absolute position kv_len - num_q + i.
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = kv_len - num_q + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < head_dim
    row_mask = offs_m[:, None] < num_q

    q_rows = (q_start + offs_m[:, None]) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows + offs_d[None, :], mask=row_mask & d_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        kv_end = tl.minimum(kv_len, kv_len - num_q + (m_block + 1) * BLOCK_M)
    else:
        kv_end = kv_len
    if SLIDING:
        # Later rows see later keys: the tile holding the first row's first visible key starts the loop.
        kv_start = tl.maximum(kv_len - num_q + m_block * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        kv_start = 0
    for n_start in range(kv_start, kv_end, BLOCK_N):
        cols = n_start + offs_n
        col_mask = cols < kv_len
        if PAGED:
            block = tl.load(block_tables_ptr + seq * stride_bt + cols // block_size, mask=col_mask, other=0).to(
                tl.int64
            )
            k_rows = block * stride_kb + (cols % block_size) * stride_kt + kv_head * stride_kh
            v_rows = block * stride_vb + (cols % block_size) * stride_vt + kv_head * stride_vh
        else:
            k_rows = (q_start + cols) * stride_kt + kv_head * stride_kh
            v_rows = (q_start + cols) * stride_vt + kv_head * stride_vh
        kv_mask = col_mask[:, None] & d_mask
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        valid = col_mask[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= q_pos[:, None])
        if SLIDING:
            valid = valid & (cols[None, :] > q_pos[:, None] - window)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if SLIDING:
            # A row whose window starts past this tile has seen no key yet (m_new = -inf): measured
            # from 0 instead, its alpha and p are 0, not the NaN of -inf - -inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            # Every row sees key 0 in the first block, so m_new is finite and alpha well defined.
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if SLIDING:
        # The rows past the last query (never stored) may see no key at all: 0 / 0 would be NaN.
        l_i = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_i[:, None]
    o_rows = (q_start + offs_m[:, None]) * stride_ot + head * stride_oh
    tl.store(o_ptr + o_rows + offs_d[None, :], acc.to(o_ptr.dtype.element_ty), mask=row_mask & d_mask)


def _tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): starting points from public FA2 kernels for sm80/sm90.

    fp32 tiles are halved so Q plus the pipelined K/V stages stay well under 227 KB of shared memory.
    """
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        # Not 128x64 at 4 warps: on sm_90 that took 252-254 of the 255 registers a thread may have
        # (one change from spilling). 64x64 takes 132-145, which lets three CTAs share an SM.
        return 64, 64, 4, 3
    return 128, 64, 8, 2


def block_d(head_dim: int) -> int:
    """The head-dim tile: a power of two, and at least 16 because it is the K of `q @ k^T`, which
    `tl.dot` needs >= 16 on the GPU (the interpreter accepts less); `head_dim` masks the padding."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands would run as TF32 on the GPU by default; keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, name: str) -> None:
    if q.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"{name} expects q [T, Hq, D] and K/V with unit stride in D")
    if q.shape[1] % k.shape[-2]:
        raise ValueError(f"{name}: {q.shape[1]} query heads are not a multiple of {k.shape[-2]} KV heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q head_dim {q.shape[-1]} != K/V head_dim {k.shape[-1]}")


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
) -> None:
    """Shape and layout checks shared by the paged prefill and decode launchers."""
    _check_qkv(q, k_cache, "paged_attention")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"paged_attention expects caches [N, block, Hkv, D]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    batch = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [{batch}, max_blocks] with dense rows, got {tuple(block_tables.shape)}")
    if cu_seqlens_q.shape != (batch + 1,):
        raise ValueError(f"cu_seqlens_q must have {batch + 1} entries, got {tuple(cu_seqlens_q.shape)}")


def flash_attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Same contract as `flash_attention_varlen_reference` (`window`: a sliding window, causal
    only); writes into `out` when given."""
    _check_qkv(q, k, "flash_attention_varlen")
    check_window(window, causal)
    if k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match and have q's {q.shape[0]} tokens")
    out = q.new_empty(q.shape) if out is None else out  # dense, whatever q's strides
    num_seqs = cu_seqlens.shape[0] - 1
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_m, block_n, warps, stages = _tiles(q.shape[-1], q.dtype)
    grid = (triton.cdiv(max_seqlen, block_m), q.shape[1], num_seqs)
    _attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_seqlens,
        cu_seqlens,
        cu_seqlens,  # seq_lens and block tables are unused without PAGED
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        0,
        0,
        0,
        1,
        scale * LOG2E,
        q.shape[1] // k.shape[1],
        q.shape[-1],
        window or 0,
        PAGED=False,
        CAUSAL=causal,
        SLIDING=window is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d(q.shape[-1]),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Several new tokens per sequence over its paged context (prefill after a cached prefix, chunked prefill);
    with a sliding `window`, each query over its last `window` positions only."""
    check_window(window)
    out = q.new_empty(q.shape) if out is None else out  # dense, whatever q's strides
    block_m, block_n, warps, stages = _tiles(q.shape[-1], q.dtype)
    grid = (triton.cdiv(max_seqlen_q, block_m), q.shape[1], seq_lens.shape[0])
    _attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
        k_cache.stride(0),
        v_cache.stride(0),
        block_tables.stride(0),
        k_cache.shape[1],
        scale * LOG2E,
        q.shape[1] // k_cache.shape[2],
        q.shape[-1],
        window or 0,
        PAGED=True,
        CAUSAL=True,
        SLIDING=window is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d(q.shape[-1]),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    return out
