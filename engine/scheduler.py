"""Continuous batching: which tokens of which requests the next forward computes.

Every step first gives each running request in decode its next token, then spends the
rest of the token budget (`max_num_batched_tokens`) on prefill: running requests whose
prompt is still being computed, then waiting requests in arrival order (FIFO), with
long prompts split into chunks. When the KV cache runs out of blocks the most recently
admitted running request is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (its prefix may still be cached).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitinfer.engine.kv_manager import KVCacheManager
from splitinfer.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledSeq:
    """A sequence in a step, with the tokens the step computes for it. Decided once, when
    scheduled: whether the step samples its next token (it computes the last known one, and
    the request generates at all: `max_tokens` 0 only scores its prompt) and how many of the
    new tokens are prompt tokens (for the throughput counters)."""

    seq: Request
    num_new_tokens: int
    samples: bool = field(init=False)
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        computed, end = self.seq.num_computed_tokens, self.seq.num_computed_tokens + self.num_new_tokens
        self.samples = end == self.seq.num_tokens and self.seq.params.max_tokens > 0
        self.num_prompt_tokens = max(0, min(end, self.seq.num_prompt_tokens) - computed)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence feeds exactly its last known token over a cached context: the shape of
        a decode step (a prefill chunk of one token that is not the last does not qualify)."""
        return all(s.num_new_tokens == 1 and s.samples and s.seq.num_computed_tokens > 0 for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        stop_ids: frozenset[int] = frozenset(),
        max_model_len: int = 2**63 - 1,
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs}) "
                "so every running request can decode in each step"
            )
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stop_ids = stop_ids  # the checkpoint's eos ids
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        # Running requests by id, in admission order (dicts keep it): the last is preempted
        # first, and finishing or aborting one is O(1).
        self.running: dict[str, Request] = {}

    def add(self, seq: Request) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledSeq] = {}
        preempted: list[Request] = []
        # Decodes first (one token each), then prompts still being prefilled, oldest first.
        running = list(self.running.values())
        in_decode = [s for s in running if s.num_computed_tokens >= s.num_prompt_tokens]
        in_prefill = [s for s in running if s.num_computed_tokens < s.num_prompt_tokens]
        for seq in in_decode + in_prefill:
            if seq.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            if n <= 0:
                continue
            while not self.kv.allocate(seq, n):
                victim = self._preempt_newest()
                preempted.append(victim)
                # The victim may already hold a place in this step (a decode scheduled before
                # an older request's prefill chunk): its blocks are gone, so it leaves the step.
                dropped = scheduled.pop(victim.request_id, None)
                if dropped is not None:
                    budget += dropped.num_new_tokens
                if victim is seq:
                    break
            else:  # no break: the blocks were found
                scheduled[seq.request_id] = ScheduledSeq(seq, n)
                budget -= n
        # No admissions in a step that had to preempt: the cache is full.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = self.kv.admit(seq, budget)
            if n == 0:
                break  # out of blocks: it stays first in line (FIFO), holding nothing
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running[seq.request_id] = seq
            scheduled[seq.request_id] = ScheduledSeq(seq, n)
            budget -= n
        return SchedulerOutput(list(scheduled.values()), preempted)

    def update(self, item: ScheduledSeq, token: int | None) -> str | None:
        """After the step's forward succeeded for `item`: its new tokens are computed (full
        blocks enter the prefix cache, scored prompt positions are recorded) and the token it
        sampled, if it sampled, is appended. Returns the finish reason when that ends the
        sequence (its blocks are freed now): a request that only scores its prompt ends with
        "length" once the prompt is computed."""
        seq = item.seq
        end = seq.num_computed_tokens + item.num_new_tokens
        seq.num_scored_positions = max(seq.num_scored_positions, seq.scored_positions(0, end).stop)
        seq.num_computed_tokens = end
        self.kv.commit_computed(seq)
        if token is None:
            if seq.params.max_tokens == 0 and end == seq.num_tokens:
                self.finish(seq, "length")
                return "length"
            return None
        reason = seq.append_token(token, self.stop_ids, self.max_model_len)
        if reason is not None:
            self.finish(seq, reason)
        return reason

    def _preempt_newest(self) -> Request:
        """Free the most recently admitted running request's blocks and put it first in line;
        it is recomputed from its tokens (prompt and outputs) when readmitted."""
        _, seq = self.running.popitem()
        self.kv.free(seq)
        seq.status = RequestStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq

    def finish(self, seq: Request, reason: str) -> None:
        """End a running request: free its blocks now."""
        del self.running[seq.request_id]
        self._release(seq, reason)

    def abort(self, seq: Request, reason: str = "abort") -> None:
        """End a request wherever it is (waiting, mid-prefill, running), freeing its blocks now."""
        if seq.status is RequestStatus.RUNNING:
            del self.running[seq.request_id]
        elif seq.status is RequestStatus.WAITING:
            self.waiting.remove(seq)  # O(waiting), but aborts are rare next to steps
        else:
            return
        self._release(seq, reason)

    def _release(self, seq: Request, reason: str) -> None:
        if seq.block_table:
            self.kv.free(seq)
        seq.status = RequestStatus.FINISHED
        seq.finish_reason = reason
