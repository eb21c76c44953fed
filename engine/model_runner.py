"""Turns one scheduled step into a model forward plus sampling.

It owns the model, the KV cache and the sampler. A step may mix decodes (one token)
and prefill chunks (many tokens, possibly after a cached prefix) of different
sequences in one packed forward; a decode-only step goes through the static-buffer
graph runner instead. Logits are computed only for the sequences that sample.
"""

from __future__ import annotations

import torch

from splitinfer.engine.cuda_graph import DecodeGraphRunner
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model import LlamaForCausalLM
from splitinfer.engine.sampler import Sampler, SamplerOutput
from splitinfer.engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        sampler: Sampler,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = model.rope_cache.device
        self.block_size = kv_cache.block_size
        max_blocks = -(-max_model_len // self.block_size)
        self.graph_runner = DecodeGraphRunner(model, kv_cache, max_num_seqs, max_blocks, use_cuda_graphs)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def prepare(self, step: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """Packed inputs and attention metadata of a step; logits rows for the sampling sequences."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        for item in step.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq.block_table, start, end)
            cu.append(cu[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                logits_rows.append(cu[-1] - 1)
        width = max(len(item.seq.block_table) for item in step.scheduled)
        tables = [item.seq.block_table + [-1] * (width - len(item.seq.block_table)) for item in step.scheduled]
        batch = ForwardBatch(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            max_seqlen_q=max(item.num_new_tokens for item in step.scheduled),
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            has_cached_prefix=any(item.seq.num_computed_tokens > 0 for item in step.scheduled),
            logits_indices=self._tensor(logits_rows, torch.int64),
        )
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), batch

    def _decode_hidden(self, step: SchedulerOutput) -> torch.Tensor:
        """Hidden states of a decode step's whole bucket [bucket, hidden]: its rows first, then padding."""
        seqs = [item.seq for item in step.scheduled]
        positions = [seq.num_computed_tokens for seq in seqs]
        return self.graph_runner.run(
            input_ids=[seq.token_ids[p] for seq, p in zip(seqs, positions)],
            positions=positions,
            slot_mapping=[self._slots(seq.block_table, p, p + 1)[0] for seq, p in zip(seqs, positions)],
            seq_lens=[seq.num_tokens for seq in seqs],
            block_tables=[seq.block_table for seq in seqs],
        )

    @torch.inference_mode()
    def compute_logits(self, step: SchedulerOutput) -> torch.Tensor:
        """The step's forward: fp32 logits [S, V] of the S sequences that sample (a decode-only
        step through the static-buffer graph runner, any other as one packed forward)."""
        if step.is_decode_only and len(step.scheduled) <= self.graph_runner.max_batch_size:
            n = len(step.scheduled)
            hidden = self._decode_hidden(step)
            if self.model.packed_lm_head is None:
                return self.model.compute_logits(hidden[:n])
            # CPU with prepacked weights: the lm_head over the whole bucket, whose row count
            # is one the packed matmul serves (n could be any count up to max_num_seqs, and
            # each new one would leave oneDNN state behind); the padding rows are dropped.
            return self.model.compute_logits(hidden)[:n]
        input_ids, positions, batch = self.prepare(step)
        hidden = self.model(input_ids, positions, batch, self.kv_cache)
        return self.model.compute_logits(hidden, batch.logits_indices)

    @torch.inference_mode()
    def probe(self) -> None:
        """A forward with no request in it (one bucket of padding rows through the decode path:
        no K/V written, nothing attended), waited for. Raises if the device or the model can
        no longer compute at all, whatever the requests."""
        self.graph_runner.run([], [], [], [], [])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a CUDA error surfaces at a sync

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> SamplerOutput:
        """Run the step's forward; sample one token for each sequence that completes its known tokens."""
        logits = self.compute_logits(step)
        sampling = [item.seq for item in step.scheduled if item.samples]
        if not sampling:
            return SamplerOutput([], [])
        return self.sampler(logits, sampling)
