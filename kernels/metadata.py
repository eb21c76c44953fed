"""The attention metadata of one forward: what every attention op of every layer reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitinfer.kernels.attention import PagedAttentionPlan, plan_paged_attention_cpu


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the packed batch and in the paged KV cache.

    A forward's inputs are the concatenated new tokens of B sequences, [T] of them; this says
    how they split and what they attend to. It is built once per step and handed to every
    layer's attention ops (`Backend.store_kv`, `flash_attention_varlen`, `paged_attention`),
    which take what they need from it rather than a list of tensors at every call.

    - `cu_seqlens_q` [B+1] int32: sequence b's new tokens are `cu_seqlens_q[b]:cu_seqlens_q[b+1]`.
    - `seq_lens` [B] int32: each sequence's length after this step (cached prefix + new tokens).
    - `max_seqlen_q`: the longest new-token run, a host int: it sizes kernel launch grids (1
      selects the split-K decode kernel), and reading it from the device would sync.
    - `slot_mapping` [T] int64: the flat KV-cache slot (block * block_size + offset) each new
      token is written to; -1 writes nothing (padding rows); None: the forward writes no K/V.
    - `block_tables` [B, max_blocks] int32: each sequence's KV blocks in order, -1 padded.
    - `has_cached_prefix`: whether any sequence attends to tokens cached by an earlier step;
      when none does, attention runs over the fresh K/V alone (prefill) without reading the cache.
    - `num_decode_seqs`: how many leading sequences have exactly one new token (a host int). A
      mixed step packs its decodes first so that paged attention can send them to the split-K
      decode kernel and only the longer rows to the prefill kernel; 0 when not known.
    - `decode_workspace`: preallocated fp32 scratch for split-K decode attention (the graph
      runner's, `decode_workspace_numel` elements), so that a decode step allocates nothing;
      None lets the kernel allocate.
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    max_seqlen_q: int
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    has_cached_prefix: bool = False
    num_decode_seqs: int = 0
    decode_workspace: torch.Tensor | None = None
    _cpu_plans: dict[int | None, PagedAttentionPlan] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def cpu_plan(self, block_size: int, window: int | None = None) -> PagedAttentionPlan:
        """How the CPU path (`paged_attention_cpu`) splits this batch for layers with sliding
        `window` (None: full attention), made on first use and then shared by every layer with
        that window, as in FlashInfer's plan/run split: the planning is host work (lengths read
        back, decode rows grouped, the window's blocks picked) that would otherwise repeat in each
        layer. A model whose layers alternate between windows keeps one plan per window. The
        Triton kernels need no plan: they read lengths and tables on the device."""
        plan = self._cpu_plans.get(window)
        if plan is None:
            plan = plan_paged_attention_cpu(self.block_tables, self.seq_lens, self.cu_seqlens_q, block_size, window)
            self._cpu_plans[window] = plan
        return plan
