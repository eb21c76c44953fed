"""Attention over ragged (packed) batches: fresh prefill and paged KV-cache reads.

Both take queries packed as [T, Hq, D] with `cu_seqlens` marking where each sequence
starts, and support grouped-query attention (Hq a multiple of Hkv) without repeating
K/V. The references loop over sequences and call torch's SDPA; they are the CPU path
and the oracle the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [Lq, Hq, D] against k, v [Lk, Hkv, D]; the queries are the last Lq positions of the Lk keys."""
    lq, lk = q.shape[0], k.shape[0]
    mask = None
    if causal and lq > 1:
        # Bottom-right aligned: query i sits at absolute position lk - lq + i.
        query_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
        mask = torch.arange(lk, device=q.device)[None, :] <= query_pos
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


def flash_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Self-attention within each packed sequence: q [T, Hq, D], k, v [T, Hkv, D] -> [T, Hq, D]."""
    del max_seqlen  # only the Triton launch grid needs it
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = _attend(q[start:end], k[start:end], v[start:end], scale, causal)
    return out


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, read from `cache` [N, block, Hkv, D] through its block table."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table_row[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed queries q [T, Hq, D] over each sequence's cached context.

    Sequence b owns queries `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, which are its last
    positions out of `seq_lens[b]`; its keys are read through `block_tables[b]`,
    causally by absolute position. The caches must already hold the new tokens.
    """
    del max_seqlen_q, workspace  # only the Triton launch and its scratch need them
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        if length == 0:  # a CUDA-graph padding row attends to nothing
            out[start:end] = 0
            continue
        k = gather_kv(k_cache, block_tables[b], length)
        v = gather_kv(v_cache, block_tables[b], length)
        out[start:end] = _attend(q[start:end], k.to(q.dtype), v.to(q.dtype), scale, causal=True)
    return out
