"""Turns one scheduled step into a model forward plus sampling.

It owns the model, the KV cache (bound to the model's layers when the runner is built)
and the sampler. A step may mix decodes (one token) and prefill chunks (many tokens,
possibly after a cached prefix) of different sequences in one packed forward; a
decode-only step goes through the static-buffer graph runner instead. Logits are
computed only for the sequences that sample, and for the prompt positions of requests that
asked for prompt logprobs (`prompt_logprobs.py`).
Before serving, `warm_up` compiles every Triton kernel variant that a step can launch
outside the captured decode graphs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from splitinfer import kernels
from splitinfer.engine import prompt_logprobs
from splitinfer.engine.cuda_graph import DecodeGraphRunner, DecodeStep
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.grammar import StepMasks
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model import CausalLM
from splitinfer.engine.prompt_logprobs import ScoringPlan
from splitinfer.engine.sampler import Sampler, SamplerOutput
from splitinfer.engine.scheduler import SchedulerOutput
from splitinfer.protocol import TokenLogprobs

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        sampler: Sampler,
        max_num_seqs: int,
        max_model_len: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        # Before the graph runner exists: its capture records the addresses of the layers' views.
        model.bind_kv_cache(kv_cache)
        self.sampler = sampler
        self.device = model.rope_cache.device
        self.block_size = kv_cache.block_size
        self.max_num_seqs = max_num_seqs
        max_blocks = -(-max_model_len // self.block_size)
        self.graph_runner = DecodeGraphRunner(model, max_num_seqs, max_blocks, use_cuda_graphs)
        self._row_indices = torch.arange(self.graph_runner.max_batch_size, dtype=torch.int64, device=self.device)

    def _first_rows(self, n: int) -> torch.Tensor:
        """Indices 0..n-1, as a view of one tensor made once (a decode step needs them each time)."""
        return self._row_indices[:n]

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def prepare(self, plan: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
        """Packed inputs and attention metadata of a step; logits rows for the sampling sequences.

        Sequences with one new token (decodes) are packed first, the longer ones (prefill
        chunks) after them, so that paged attention can give the decodes the split-K decode
        kernel (`ForwardBatch.num_decode_seqs`). `logits_indices` still lists the sampling
        sequences in the step's order, which is the order the sampler takes them in."""
        scheduled = plan.scheduled
        order = _packing_order(plan)
        packed = [scheduled[i] for i in order]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        last_row = [0] * len(scheduled)
        for i, item in zip(order, packed):
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq.block_table, start, end)
            cu.append(cu[-1] + item.num_new_tokens)
            seq_lens.append(end)
            last_row[i] = cu[-1] - 1
        logits_rows = [last_row[i] for i, item in enumerate(scheduled) if item.samples]
        width = max(len(item.seq.block_table) for item in scheduled)
        tables = [item.seq.block_table + [-1] * (width - len(item.seq.block_table)) for item in packed]
        batch = ForwardBatch(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            max_seqlen_q=max(item.num_new_tokens for item in scheduled),
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            has_cached_prefix=any(item.seq.num_computed_tokens > 0 for item in scheduled),
            num_decode_seqs=sum(item.num_new_tokens == 1 for item in scheduled),
            logits_indices=self._tensor(logits_rows, torch.int64),
        )
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), batch

    @staticmethod
    def scoring_plan(plan: SchedulerOutput) -> ScoringPlan:
        """The packed rows (as `prepare` packs them) whose logits score prompt tokens."""
        scoring = ScoringPlan()
        row = 0
        for i in _packing_order(plan):
            item = plan.scheduled[i]
            seq, start = item.seq, item.seq.num_computed_tokens
            positions = seq.scored_positions(start, start + item.num_new_tokens)
            rows = range(row + positions.start - start, row + positions.stop - start)
            scoring.add(
                seq.request_id,
                rows,
                seq.token_ids[positions.start + 1 : positions.stop + 1],
                seq.params.prompt_logprobs or 0,
            )
            row += item.num_new_tokens
        return scoring

    def _decode_hidden(self, plan: SchedulerOutput) -> torch.Tensor:
        """Hidden states of a decode step's whole bucket [bucket, hidden]: its rows first, then padding."""
        seqs = [item.seq for item in plan.scheduled]
        positions = [seq.num_computed_tokens for seq in seqs]
        return self.graph_runner.run(
            DecodeStep(
                input_ids=[seq.token_ids[p] for seq, p in zip(seqs, positions)],
                positions=positions,
                slot_mapping=[self._slots(seq.block_table, p, p + 1)[0] for seq, p in zip(seqs, positions)],
                seq_lens=[seq.num_tokens for seq in seqs],
                block_tables=[seq.block_table for seq in seqs],
            )
        )

    @torch.inference_mode()
    def compute_logits(self, plan: SchedulerOutput) -> torch.Tensor:
        """The step's forward: fp32 logits [S, V] of the S sequences that sample (a decode-only
        step through the static-buffer graph runner, any other as one packed forward)."""
        if plan.is_decode_only and len(plan.scheduled) <= self.graph_runner.max_batch_size:
            n = len(plan.scheduled)
            hidden = self._decode_hidden(plan)
            if self.model.packed_lm_head is None:  # rows by index: a call other ranks can mirror
                return self.model.compute_logits(hidden, self._first_rows(n))
            # CPU with prepacked weights: the lm_head over the whole bucket, whose row count
            # is one the packed matmul serves (n could be any count up to max_num_seqs, and
            # each new one would leave oneDNN state behind); the padding rows are dropped.
            return self.model.compute_logits(hidden)[:n]
        input_ids, positions, batch = self.prepare(plan)
        hidden = self.model(input_ids, positions, batch)
        return self.model.compute_logits(hidden, batch.logits_indices)

    @torch.inference_mode()
    def warm_up(self) -> list[int]:
        """Compile now every Triton kernel variant that a step can launch outside the captured
        decode graphs, so that no step stalls mid-serving on a compile (0.5-2 s each on a cold
        Triton cache): for each split count the decode kernel can pick, a mixed step of that
        many decode rows beside a prefill chunk over a cached prefix; a prefill chunk over a
        cached prefix alone; a fresh prefill. Batches are tiny: the point is to compile.

        Every row is harmless: slot -1 writes no K/V, and the block tables point at block 0,
        which is only read. Returns the decode split counts warmed up; with the torch kernels,
        which compile nothing, it runs nothing and returns []."""
        if not self.model.backend.uses_triton:
            return []
        start = time.perf_counter()
        splits = kernels.decode_split_batches(self.max_num_seqs, self.model.shard.num_kv_heads, self.device)
        for decodes in splits.values():
            self._harmless_forward(decodes, [2], cached_prefix=True)
        self._harmless_forward(0, [2], cached_prefix=True)
        self._harmless_forward(0, [2, 1], cached_prefix=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info(
            "warmed up the eager kernels in %.1f s (decode split counts %s)",
            time.perf_counter() - start,
            sorted(splits),
        )
        return sorted(splits)

    def _harmless_forward(self, decodes: int, chunks: list[int], cached_prefix: bool) -> None:
        """A forward of `decodes` one-token sequences, then sequences of `chunks` new tokens,
        after one cached token each when `cached_prefix`; it writes no K/V and reads only block 0."""
        num_new_tokens = [1] * decodes + chunks
        seq_lens = [n + cached_prefix for n in num_new_tokens]
        positions = [p for n, length in zip(num_new_tokens, seq_lens) for p in range(length - n, length)]
        cu = [0]
        for n in num_new_tokens:
            cu.append(cu[-1] + n)
        width = -(-max(seq_lens) // self.block_size)
        batch = ForwardBatch(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            max_seqlen_q=max(num_new_tokens),
            slot_mapping=self._tensor([-1] * cu[-1], torch.int64),
            block_tables=self._tensor([[0] * width] * len(seq_lens), torch.int32),
            has_cached_prefix=cached_prefix,
            num_decode_seqs=decodes,
        )
        self.model(self._tensor([0] * cu[-1], torch.int64), self._tensor(positions, torch.int64), batch)

    @torch.inference_mode()
    def probe(self) -> None:
        """A forward with no request in it (one bucket of padding rows through the decode path:
        no K/V written, nothing attended), waited for. Raises if the device or the model can
        no longer compute at all, whatever the requests."""
        self.graph_runner.run(DecodeStep.empty())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a CUDA error surfaces at a sync

    @torch.inference_mode()
    def scoring_forward(self, plan: SchedulerOutput, scoring: ScoringPlan) -> tuple[torch.Tensor, dict]:
        """A packed forward that also scores prompt tokens: the sampling rows' logits, and the
        prompt logprobs by request id. (Never a decode-only step: a decode scores nothing.)"""
        input_ids, positions, batch = self.prepare(plan)
        hidden = self.model(input_ids, positions, batch)
        return self.model.compute_logits(hidden, batch.logits_indices), prompt_logprobs.score(
            self.model, hidden, scoring
        )

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, masks: StepMasks | None = None) -> StepOutput:
        """Run the step's forward; score the prompt tokens whose logprobs were asked for; sample
        one token for each sequence that completes its known tokens, under its grammar's mask in
        `masks` if it is constrained."""
        scoring = self.scoring_plan(plan)
        if scoring:
            logits, scored = self.scoring_forward(plan, scoring)
        else:
            logits, scored = self.compute_logits(plan), {}
        sampling = [item.seq for item in plan.scheduled if item.samples]
        sampled = self.sampler(logits, sampling, masks) if sampling else SamplerOutput([], [])
        return StepOutput(sampled, scored)


@dataclass(slots=True)
class StepOutput:
    """What a step's forward gave: the sampled tokens (of the sampling sequences, in the step's
    order) and the prompt logprobs it computed, by request id."""

    sampled: SamplerOutput
    prompt_logprobs: dict[str, tuple[TokenLogprobs, ...]]


def _packing_order(plan: SchedulerOutput) -> list[int]:
    """The scheduled sequences' indices in packed order: decodes first, then prefill chunks,
    each group in the step's order (a stable sort)."""
    scheduled = plan.scheduled
    return sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens > 1)
