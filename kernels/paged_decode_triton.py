"""Triton paged decode attention (one query per sequence) with split-K (flash-decoding).

Stage 1, grid (sequences, KV heads, splits): each program stacks the query heads of
one KV group on the M dimension of `tl.dot` (padded to 16, masked) and attends over
one slice of the visible keys, read through the block table; it writes the slice's
normalised output and log-sum-exp to fp32 scratch. Stage 2, grid (sequences, query
heads), merges the slices by LSE. With one split, stage 1 writes the output directly.
The visible keys of a sequence of length L are positions [0, L), or with SLIDING (a
sliding window W) [max(0, L - W), L): the splits divide that range, so under a small
window a long context costs what the window costs. Without SLIDING the binaries are the
plain ones.

The grid depends only on the batch size and constants (never on the lengths, which
stay on the device), so a CUDA graph captured for a batch size stays valid: slices
past a sequence's length exit at once, and a padding row (length 0) writes zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitinfer.kernels.attention import check_window
from splitinfer.kernels.attention_triton import LOG2E, block_d, dot_precision
from splitinfer.kernels.dispatch import MAX_DECODE_SPLITS

BLOCK_N = 64


@triton.jit
def _split_bounds(kv_len, window, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """Keys [start, end) of slice `split`: the splits divide the visible keys [first, kv_len).
    Both kernels call it, so the merge reads exactly the slices the split kernel wrote."""
    if SLIDING:
        first = tl.maximum(kv_len - window, 0)
    else:
        first = 0
    # Slices are whole BLOCK_N tiles so every program but the last runs unmasked loads.
    per_split = tl.cdiv(tl.cdiv(kv_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    return start, tl.minimum(start + per_split, kv_len)


# The block-table width changes from step to step outside CUDA graphs: not a specialisation key;
# nor is the window (one value per layer; its divisibility by 16 would buy nothing).
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    o_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    block_size,
    qk_scale,
    group,
    head_dim,
    window,  # SLIDING only
    NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start, end = _split_bounds(kv_len, window, split, NUM_SPLITS, BLOCK_N, SLIDING)

    token = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * group + offs_h
    h_mask = offs_h[:, None] < group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < head_dim
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=h_mask & d_mask, other=0.0
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n_start in range(start, end, BLOCK_N):
        cols = n_start + offs_n
        col_mask = cols < end
        block = tl.load(block_tables_ptr + seq * stride_bt + cols // block_size, mask=col_mask, other=0).to(tl.int64)
        in_block = (cols % block_size).to(tl.int64)
        kv_mask = col_mask[:, None] & d_mask
        k = tl.load(
            k_cache_ptr + (block * stride_kb + in_block * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(col_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + (block * stride_vb + in_block * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty slice (past the end, or a padding row) leaves l_i = 0: write zeros, not NaN.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o = o_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=h_mask & d_mask)
    else:
        row = (seq * tl.num_programs(1) * group + heads) * NUM_SPLITS + split  # part_o is [B, Hq, S, D]
        tl.store(part_o_ptr + row[:, None] * head_dim + offs_d[None, :], out, mask=h_mask & d_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=offs_h < group)


@triton.jit(do_not_specialize=["window"])
def _decode_merge_kernel(
    part_o_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    cu_seqlens_q_ptr,
    o_ptr,
    stride_ot,
    stride_oh,
    head_dim,
    window,  # SLIDING only
    NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    token = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    base = (seq * tl.num_programs(1) + head) * NUM_SPLITS
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in range(NUM_SPLITS):
        start, end = _split_bounds(kv_len, window, split, NUM_SPLITS, BLOCK_N, SLIDING)
        if start < end:  # an empty slice's LSE is -inf: merged while m is -inf too, it would give NaN
            lse = tl.load(part_lse_ptr + base + split)
            part = tl.load(part_o_ptr + (base + split) * head_dim + offs_d, mask=d_mask, other=0.0)
            m_new = tl.maximum(m, lse)
            old_scale = tl.exp2(m - m_new)
            weight = tl.exp2(lse - m_new)
            acc = acc * old_scale + part * weight
            total = total * old_scale + weight
            m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


def decode_num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Split the context when batch x KV heads alone cannot fill the GPU (about two programs per SM).

    Depends on the batch size only, so a CUDA graph per batch size keeps one value.
    """
    if device.type != "cuda":
        return 4  # the interpreter: exercise the split path with a few slices
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = triton.cdiv(2 * sms, max(batch * kv_heads, 1))
    return max(1, min(MAX_DECODE_SPLITS, triton.next_power_of_2(splits)))


def _split_scratch(
    batch: int, num_heads: int, splits: int, head_dim: int, workspace: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense part_o [B, Hq, S, D] and part_lse [B, Hq, S] views, carved from `workspace` when given."""
    o_numel, lse_numel = batch * num_heads * splits * head_dim, batch * num_heads * splits
    if workspace is None:
        workspace = torch.empty(o_numel + lse_numel, dtype=torch.float32, device=device)
    elif workspace.dtype != torch.float32 or not workspace.is_contiguous() or workspace.numel() < o_numel + lse_numel:
        raise ValueError(
            f"the decode workspace must be contiguous fp32 with >= {o_numel + lse_numel} elements for {batch} "
            f"sequences and {splits} splits, got {workspace.dtype} with {workspace.numel()}"
        )
    flat = workspace.view(-1)
    part_o = flat[:o_numel].view(batch, num_heads, splits, head_dim)
    part_lse = flat[o_numel : o_numel + lse_numel].view(batch, num_heads, splits)
    return part_o, part_lse


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its paged context: q [B, Hq, D] -> [B, Hq, D].

    `workspace`: preallocated fp32 scratch (`dispatch.decode_workspace_numel` elements) for the
    split partials; allocated per call when None. `window`: a sliding window W, under which a
    sequence of length L attends to its keys [max(0, L - W), L) only.
    """
    check_window(window)
    batch = seq_lens.shape[0]
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    splits = num_splits or decode_num_splits(batch, kv_heads, q.device)
    if not 1 <= splits <= MAX_DECODE_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_DECODE_SPLITS}], got {splits}")
    out = q.new_empty(q.shape) if out is None else out  # dense, whatever q's strides
    if splits > 1:
        part_o, part_lse = _split_scratch(batch, q.shape[1], splits, head_dim, workspace, q.device)
    else:
        part_o = part_lse = out  # unused
    _decode_split_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        out,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        k_cache.shape[1],
        scale * LOG2E,
        group,
        head_dim,
        window or 0,
        NUM_SPLITS=splits,
        SLIDING=window is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d(head_dim),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if splits > 1:
        _decode_merge_kernel[(batch, q.shape[1])](
            part_o,
            part_lse,
            seq_lens,
            cu_seqlens_q,
            out,
            out.stride(0),
            out.stride(1),
            head_dim,
            window or 0,
            NUM_SPLITS=splits,
            SLIDING=window is not None,
            BLOCK_N=BLOCK_N,
            BLOCK_D=block_d(head_dim),
            num_warps=4,
        )
    return out
