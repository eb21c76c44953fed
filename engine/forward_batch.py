"""The attention metadata of one model forward over a packed batch of sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitinfer import kernels


@dataclass(slots=True)
class ForwardBatch:
    """Where each sequence's tokens sit in the packed batch and in the KV cache.

    The model's inputs are `input_ids` and `positions` of shape [T], the concatenated
    new tokens of B sequences; this object says how they split and what they attend to.

    - `cu_seqlens_q` [B+1] int32: sequence b's new tokens are `cu_seqlens_q[b]:cu_seqlens_q[b+1]`.
    - `seq_lens` [B] int32: each sequence's length after this step (cached prefix + new tokens).
    - `max_seqlen_q`: the longest new-token run (a host int: it sizes kernel launch grids).
    - `slot_mapping` [T] int64: the flat KV-cache slot (block * block_size + offset) each new
      token is written to; -1 writes nothing (padding rows).
    - `block_tables` [B, max_blocks] int32: each sequence's KV blocks in order, -1 padded.
    - `num_decode_seqs`: how many leading sequences have exactly one new token (a host int). A
      mixed step packs its decodes first so that paged attention can send them to the split-K
      decode kernel and only the longer rows to the prefill kernel; 0 when not known.
    - `has_cached_prefix`: whether any sequence attends to tokens cached by an earlier step;
      when none does, attention runs over the fresh K/V alone (prefill) without reading the cache.
    - `logits_indices` [S] int64: which rows to compute logits for (the last token of each
      sequence that samples, in the step's order, whatever order the rows are packed in);
      None computes logits for every token.
    - `decode_workspace`: preallocated fp32 scratch for split-K decode attention (the graph
      runner's), so that a decode step allocates nothing; None lets the kernel allocate.

    `attention_plan(block_size)` is the paged-attention plan of this batch, made on first use
    and shared by every layer.
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen_q: int
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    has_cached_prefix: bool = False
    num_decode_seqs: int = 0
    logits_indices: torch.Tensor | None = None
    decode_workspace: torch.Tensor | None = None
    _attention_plan: kernels.PagedAttentionPlan | None = field(default=None, init=False, repr=False)
    _planned: bool = field(default=False, init=False, repr=False)

    def attention_plan(self, block_size: int) -> kernels.PagedAttentionPlan | None:
        if not self._planned:
            self._attention_plan = kernels.plan_paged_attention(self.block_tables, self.seq_lens, self.cu_seqlens_q,
                                                                block_size)
            self._planned = True
        return self._attention_plan

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @classmethod
    def for_prefill(cls, lengths: list[int], device: torch.device | str, all_logits: bool = False) -> ForwardBatch:
        """Packed prefill of fresh sequences with no KV cache: attention over the batch alone."""
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(
            cu_seqlens_q=cu.to(device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            max_seqlen_q=max(lengths),
            logits_indices=None if all_logits else (cu[1:] - 1).to(device=device, dtype=torch.int64),
        )
