"""The caching block allocator and the scheduler's use of it, without a model: random
interleavings of admission, steps (chunked prefill, decode, preemption), finishing and
aborting never leak or double-free a block, and every refcount returns to zero."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitinfer.engine import block_pool
from splitinfer.engine.block_pool import ROOT_KEY, BlockPool, block_key
from splitinfer.engine.kv_manager import KVCacheManager
from splitinfer.engine.scheduler import Scheduler, SchedulerOutput
from splitinfer.engine.sequence import Sequence, SequenceStatus
from splitinfer.protocol import SamplingParams

# Prompts from a few shared stems, so prefixes repeat and the cache gets hits.
STEMS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 20, 21, 22, 23], [30] * 10, [7, 7, 8, 8]]


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(4, 24), block_size=st.sampled_from([1, 2, 4, 8]), caching=st.booleans(),
        max_num_seqs=st.integers(1, 6), budget_extra=st.integers(0, 40),
    )
    def setup(self, num_blocks: int, block_size: int, caching: bool, max_num_seqs: int, budget_extra: int) -> None:
        self.pool = BlockPool(num_blocks, block_size, caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_seqs + budget_extra)
        self.live: dict[str, Sequence] = {}
        self.next_id = 0
        self.preempted = 0

    @rule(stem=st.sampled_from(STEMS), cut=st.integers(1, 12), tail=st.lists(st.integers(0, 40), max_size=10),
          max_tokens=st.integers(1, 12))
    def add(self, stem: list[int], cut: int, tail: list[int], max_tokens: int) -> None:
        prompt = stem[:cut] + tail
        if self.kv.blocks_for(len(prompt) + max_tokens) > self.pool.num_blocks:
            return  # EngineCore refuses these at admission
        seq = Sequence(f"r{self.next_id}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self.next_id += 1
        self.live[seq.request_id] = seq
        self.scheduler.add(seq)

    @precondition(lambda self: self.scheduler.has_unfinished())
    @rule()
    def step(self) -> None:
        plan = self.scheduler.schedule()
        self.check_plan(plan)
        self.preempted += len(plan.preempted)
        for item in plan.scheduled:  # what EngineCore.step does around the forward
            item.seq.num_computed_tokens += item.num_new_tokens
            self.kv.commit_computed(item.seq)
        for item in plan.scheduled:
            seq = item.seq
            if seq.num_computed_tokens == seq.num_tokens:
                token = (seq.num_tokens * 7) % 5  # deterministic, so outputs share prefixes too
                if seq.append_token(token, frozenset(), max_model_len=10**6) is not None:
                    self.scheduler.finish(seq, "length")
                    del self.live[seq.request_id]

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.scheduler.abort(self.live.pop(rid))

    def check_plan(self, plan: SchedulerOutput) -> None:
        ids = [item.seq.request_id for item in plan.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        assert plan.num_tokens <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        for item in plan.scheduled:
            seq = item.seq
            assert seq.status is SequenceStatus.RUNNING, f"{seq.request_id} scheduled while {seq.status}"
            assert item.num_new_tokens >= 1
            assert seq.num_computed_tokens + item.num_new_tokens <= seq.num_tokens
            assert len(seq.block_table) * self.pool.block_size >= seq.num_computed_tokens + item.num_new_tokens, \
                "scheduled without blocks for its new tokens"

    @invariant()
    def refcounts_match_the_live_block_tables(self) -> None:
        if not hasattr(self, "pool"):
            return
        held = Counter(b for seq in self.live.values() for b in seq.block_table)
        for seq in self.live.values():
            assert len(set(seq.block_table)) == len(seq.block_table), "a block twice in one table"
            if seq.status is SequenceStatus.WAITING:
                assert not seq.block_table, "a waiting request holds blocks"
        for block in self.pool.blocks:
            assert block.ref_count == held[block.block_id], f"block {block.block_id}"
            assert (block.block_id in self.pool._free) == (block.ref_count == 0)
        stats = self.pool.stats()
        assert stats.used_blocks + stats.free_blocks == stats.total_blocks
        assert stats.used_blocks == len(held)

    @invariant()
    def cached_blocks_hold_the_tokens_of_their_key(self) -> None:
        if not hasattr(self, "pool"):
            return
        for key, block_id in self.pool._cached.items():
            block = self.pool.blocks[block_id]
            assert block.key == key == block_key(block.parent_key, block.token_ids)
            assert len(block.token_ids) == self.pool.block_size

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        for seq in list(self.live.values()):  # whatever is left ends by abort
            self.scheduler.abort(seq)
        assert not self.scheduler.has_unfinished()
        assert all(block.ref_count == 0 for block in self.pool.blocks)
        stats = self.pool.stats()
        assert (stats.used_blocks, stats.free_blocks) == (0, stats.total_blocks)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Single behaviours -----------------------------------------------------------------------


def test_freeing_a_block_twice_raises() -> None:
    pool = BlockPool(4, 2)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids[:1])


def test_allocating_more_than_is_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4, 2)
    pool.allocate(3)
    before = pool.stats()
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.stats() == before


def full_blocks(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Allocate and register blocks holding `tokens` (whole blocks), as a computed prefix would."""
    ids = pool.allocate(len(tokens) // pool.block_size)
    parent = ROOT_KEY
    for i, block_id in enumerate(ids):
        parent = pool.register_full_block(block_id, parent, tuple(tokens[i * pool.block_size:(i + 1) * pool.block_size]))
    return ids


def test_eviction_takes_the_least_recently_freed_block_and_a_prefix_head_outlives_its_tail() -> None:
    pool = BlockPool(4, 2)
    first = full_blocks(pool, [1, 2, 3, 4])  # two cached blocks
    pool.free(first)  # the tail enters the free queue before the head
    pool.allocate(2)  # the two never-used blocks first
    pool.allocate(1)  # then the least recently freed: the tail
    assert pool.match_prefix([1, 2, 3, 4, 5]).block_ids == first[:1], "the head is still cached"
    assert pool.stats().cached_blocks == 1


def test_a_prefix_match_never_covers_the_last_prompt_token() -> None:
    pool = BlockPool(8, 2)
    pool.free(full_blocks(pool, [1, 2, 3, 4]))
    assert len(pool.match_prefix([1, 2, 3, 4]).block_ids) == 1, "the last token's logits must be computed"
    assert len(pool.match_prefix([1, 2, 3, 4, 9]).block_ids) == 2


def test_a_hash_collision_never_serves_another_prefixs_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_pool, "block_key", lambda parent, tokens: 42)  # every block collides
    pool = BlockPool(8, 2)
    pool.free(full_blocks(pool, [1, 2]))
    assert pool.match_prefix([1, 2, 3]).block_ids != []
    assert pool.match_prefix([5, 6, 3]).block_ids == [], "stored tokens differ: not a hit"


def test_prefix_hits_are_counted_and_caching_off_never_matches() -> None:
    for caching in (True, False):
        kv = KVCacheManager(BlockPool(16, 4, enable_prefix_caching=caching))
        first = Sequence("a", list(range(10)), SamplingParams())
        assert kv.admit(first, budget=100) == 10
        first.num_computed_tokens = 10
        kv.commit_computed(first)
        kv.free(first)
        second = Sequence("b", list(range(9)) + [99], SamplingParams())
        n = kv.admit(second, budget=100)
        stats = kv.pool.stats()
        if caching:
            assert (n, second.num_cached_tokens) == (2, 8) and stats.prefix_hit_tokens == 8
            assert stats.prefix_hit_rate == pytest.approx(8 / 20)
        else:
            assert (n, second.num_cached_tokens, stats.prefix_hit_tokens) == (10, 0, 0)


def test_a_failed_admission_holds_nothing_and_counts_no_query() -> None:
    kv = KVCacheManager(BlockPool(3, 4))
    hog = Sequence("hog", list(range(8)), SamplingParams())
    assert kv.admit(hog, budget=100) == 8
    late = Sequence("late", list(range(20, 30)), SamplingParams())
    assert kv.admit(late, budget=100) == 0
    assert late.block_table == [] and late.num_computed_tokens == 0
    assert kv.pool.stats().prefix_queried_tokens == 8, "only the admitted request was counted"
