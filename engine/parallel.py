"""Tensor parallelism: how the model is split across ranks, and the collectives it needs.

As Megatron-LM and vLLM split a decoder, over torch.distributed (NCCL on CUDA, gloo on CPU):

- attention heads: rank r computes heads [r H/N, (r+1) H/N) of q; its K/V heads are the
  ones those q heads read. With fewer KV heads than ranks (Hkv < N), each KV head is
  replicated on the N/Hkv ranks whose q heads share it;
- the fused q/k/v and gate/up projections are column-parallel (each rank holds its heads'
  rows, its slice of the intermediate size); o_proj and down_proj are row-parallel (each
  rank holds the matching columns) and are followed by one all-reduce each, then their
  bias, once;
- the embedding and the lm_head are vocabulary-parallel: rank r holds rows
  [r ceil(V/N), ...) of the vocabulary; a token's embedding comes from its rank (the
  others add zeros in the all-reduce), and logits are gathered on rank 0, the only rank
  that samples;
- norms (and Qwen3's per-head q/k norms) are replicated.

`TensorParallel` is one rank's view (rank, size, process group) with the collectives; the
single-rank one (`SINGLE`) makes every collective a no-op, so a model built without
parallelism runs exactly the code it always did. `ShardPlan` computes each rank's sizes and
offsets from the model's config; `check_tensor_parallel` refuses a split the model does not
allow before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from splitinfer.engine.errors import ConfigError
from splitinfer.engine.model_config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: Any = None  # the torch.distributed process group; None for a single rank

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor, full: int) -> torch.Tensor | None:
        """Rank 0: the ranks' column blocks of `x` [T, <= ceil(full / size)] side by side,
        trimmed to `full` columns; other ranks: None. Blocks shorter than the first (the
        last rank's, when `full` does not divide) are padded to its width for the gather."""
        if self.size == 1:
            return x
        width = -(-full // self.size)
        if x.shape[1] < width:
            x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return torch.cat(parts, dim=1)[:, :full] if parts is not None else None


SINGLE = TensorParallel()


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One rank's slices of a model: every size and offset the modules and the loader need."""

    num_heads: int  # this rank's q heads
    head_start: int
    num_kv_heads: int  # this rank's K/V heads (replicated ones included)
    kv_head_start: int
    intermediate_size: int
    intermediate_start: int
    vocab_start: int  # this rank's rows of the embedding and lm_head
    vocab_count: int
    vocab_size: int  # the whole vocabulary

    @classmethod
    def of(cls, config: ModelConfig, tp: TensorParallel) -> ShardPlan:
        check_tensor_parallel(config, tp.size)
        n, r = tp.size, tp.rank
        heads = config.num_heads // n
        if config.num_kv_heads >= n:
            kv_heads, kv_start = config.num_kv_heads // n, r * (config.num_kv_heads // n)
        else:  # replicated: the ranks of one KV head's q heads each keep a copy of it
            kv_heads, kv_start = 1, r // (n // config.num_kv_heads)
        inter = config.intermediate_size // n
        vocab_width = -(-config.vocab_size // n)
        vocab_start = min(r * vocab_width, config.vocab_size)
        return cls(
            num_heads=heads,
            head_start=r * heads,
            num_kv_heads=kv_heads,
            kv_head_start=kv_start,
            intermediate_size=inter,
            intermediate_start=r * inter,
            vocab_start=vocab_start,
            vocab_count=min(vocab_width, config.vocab_size - vocab_start),
            vocab_size=config.vocab_size,
        )


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """ConfigError unless `config`'s model splits evenly over `size` ranks."""
    if size < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got {size}", "tensor_parallel_size")
    if size == 1:
        return
    problems = []
    if config.num_heads % size:
        problems.append(f"its {config.num_heads} attention heads")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"its {kv} KV heads (which must divide by the ranks, or the ranks by them)")
    if config.intermediate_size % size:
        problems.append(f"its MLP's intermediate size {config.intermediate_size}")
    if problems:
        raise ConfigError(
            f"--tensor-parallel-size {size} does not divide {' or '.join(problems)} ({config.path})",
            "tensor_parallel_size",
        )
