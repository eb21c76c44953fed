"""Write the new tokens' keys and values into the paged KV cache."""

from __future__ import annotations

import torch


def store_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy k, v [T, Hkv, D] to the caches [num_blocks, block_size, Hkv, D] at the flat slots [T].

    A slot of -1 marks a padding row (CUDA-graph batches are padded) and writes nothing.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[valid].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[valid].to(v_cache.dtype))
