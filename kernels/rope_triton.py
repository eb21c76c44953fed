"""Triton rotary embedding, in place on q and k, one program per token (all heads)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    ptr, stride_t, stride_h, token, heads, cos, sin, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < heads) & (d < half)
    first = ptr + token * stride_t + h * stride_h + d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    q_heads,
    k_heads,
    half,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d < half, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + half + d, mask=d < half, other=0.0)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, q_heads, cos, sin, half, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, k_heads, cos, sin, half, BLOCK_KH, BLOCK_HALF)


def apply_rope_triton_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Same contract as `apply_rope_reference_`; q, k need unit stride in the head dim."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope expects q [T, Hq, D] and k [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rope needs unit stride in the head dim of q, k and the cache")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.shape[1] != q.shape[2]:
        raise ValueError(f"the cos/sin cache must be fp32 [max_position, {q.shape[2]}]")
    tokens, q_heads, head_dim = q.shape
    if tokens:
        half = head_dim // 2
        _rope_kernel[(tokens,)](
            q,
            k,
            positions,
            cos_sin_cache,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            q_heads,
            k.shape[1],
            half,
            BLOCK_QH=triton.next_power_of_2(q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4,
        )
