"""Triton KV store: one program per token copies its K and V heads to their cache slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    block_size,
    heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # int64 before multiplying: slot * stride passes 2^31 in large caches.
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # Padding rows carry slot -1: no head is in range, so they write nothing.
    live_heads = tl.where(slot >= 0, heads, 0)
    mask = (h < live_heads) & (d < head_dim)
    dest = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h * stride_ch + d
    k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as `store_kv_reference`."""
    if k.shape != v.shape or k.dim() != 3 or k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            "store_kv expects k, v [T, Hkv, D] and caches [N, block, Hkv, D]; "
            f"got {tuple(k.shape)}, {tuple(k_cache.shape)}"
        )
    if k_cache.shape[2:] != k.shape[1:] or slot_mapping.shape != (k.shape[0],):
        raise ValueError(
            f"k {tuple(k.shape)} does not fit cache {tuple(k_cache.shape)} / slots {tuple(slot_mapping.shape)}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv needs unit stride in the head dim and identically laid out caches")
    tokens, heads, head_dim = k.shape
    if tokens:
        _store_kv_kernel[(tokens,)](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            k_cache.shape[1],
            heads,
            head_dim,
            BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=4,
        )
