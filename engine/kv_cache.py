"""The paged KV cache: one preallocated tensor each for keys and values, split into blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVCache:
    """Keys and values of every layer, shaped [layers, num_blocks, block_size, Hkv, D].

    Allocated once for the engine's lifetime (CUDA graphs capture its address);
    a sequence's tokens live in the blocks its block table lists.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # torch.empty, not zeros: every slot is written before it is read.
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block costs across all layers, keys and values."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k, v) caches of one layer, each [num_blocks, block_size, Hkv, D]."""
        return self.k[index], self.v[index]
