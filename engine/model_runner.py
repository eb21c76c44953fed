"""Turns a list of sequences into one model forward plus sampling.

It owns the model and the KV cache, builds the packed inputs and `ForwardBatch` for
a prefill or a decode step, and returns one new token per sequence.
"""

from __future__ import annotations

import torch

from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model import LlamaForCausalLM
from splitinfer.engine.sampler import sample
from splitinfer.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, default_generator: torch.Generator) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.rope_cache.device
        self.default_generator = default_generator

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots of the sequence's token positions [start, end)."""
        bs = self.block_size
        return [seq.block_table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def _tensor(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def prefill_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """Every prompt token of fresh sequences, packed; logits for each one's last token."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lengths: list[int] = []
        for seq in seqs:
            n = len(seq.prompt_token_ids)
            ids += seq.prompt_token_ids
            positions += range(n)
            slots += self._slots(seq, 0, n)
            lengths.append(n)
        batch = ForwardBatch.for_prefill(lengths, self.device)
        batch.slot_mapping = self._tensor(slots, torch.int64)
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), batch

    def decode_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """The newest token of each running sequence, attending to its whole cached context."""
        positions = [seq.num_tokens - 1 for seq in seqs]
        width = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        batch = ForwardBatch(
            cu_seqlens_q=self._tensor(list(range(len(seqs) + 1)), torch.int32),
            seq_lens=self._tensor([seq.num_tokens for seq in seqs], torch.int32),
            max_seqlen_q=1,
            slot_mapping=self._tensor([self._slots(s, p, p + 1)[0] for s, p in zip(seqs, positions)], torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            has_cached_prefix=True,
            logits_indices=None,
        )
        return self._tensor([seq.last_token_id for seq in seqs], torch.int64), self._tensor(positions, torch.int64), batch

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], prefill: bool) -> list[int]:
        """Run one forward over `seqs` and sample one next token for each."""
        input_ids, positions, batch = self.prefill_inputs(seqs) if prefill else self.decode_inputs(seqs)
        hidden = self.model(input_ids, positions, batch, self.kv_cache)
        logits = self.model.compute_logits(hidden, batch)
        generators = [seq.generator or self.default_generator for seq in seqs]
        return sample(logits, [seq.params for seq in seqs], generators).tolist()
