"""The caching block allocator and the scheduler's bookkeeping, with no model.

Random interleavings (hypothesis) of new requests, steps, stops and aborts drive a real
Scheduler over a real KVCacheManager and BlockPool, with each forward simulated as
`EngineCore.step` does it; after every operation refcounts, the free queue, the prefix
cache and every sequence's blocks must agree, and at the end the pool must be empty again
(nothing leaked, nothing freed twice). A shadow of the KV cache records which token, in
which context, each slot would hold, so a prefix hit that serves the wrong K/V is caught
without a model. Unit tests pin down eviction order, prefix matching, hash collisions and
the stats.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from splitinfer.engine.block_pool import ROOT_KEY, BlockPool
from splitinfer.engine.kv_manager import KVCacheManager
from splitinfer.engine.request import Request, RequestStatus
from splitinfer.engine.scheduler import Scheduler, SchedulerOutput
from splitinfer.protocol.sampling_params import SamplingParams

MAX_MODEL_LEN = 10**6  # never the binding limit here: requests are sized to the pool instead
UNBOUNDED = 10**6  # a token budget that never limits a test's single admission

# Prompts over a 3-token alphabet, cut from a few stems that share their beginnings, so that
# many requests share prefixes (and some share whole blocks at several depths).
ALPHABET = (1, 2, 3)
_rng = random.Random(7)
_TRUNK = [_rng.choice(ALPHABET) for _ in range(24)]
STEMS = tuple(tuple(_TRUNK[:cut] + [_rng.choice(ALPHABET) for _ in range(64 - cut)]) for cut in (24, 24, 8, 0))


# Helpers ---------------------------------------------------------------------------------


def running_seqs(scheduler: Scheduler) -> list[Request]:
    """The running requests in admission order, whether the scheduler keeps a dict or a sequence."""
    running = scheduler.running
    return list(running.values()) if isinstance(running, dict) else list(running)


def holders(scheduler: Scheduler) -> list[Request]:
    """Every request the scheduler still knows (and so may hold blocks)."""
    return list(scheduler.waiting) + running_seqs(scheduler)


def request(request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def fake_token(seq: Request) -> int:
    """A 'sampled' token that depends only on the sequence's tokens, so equal prompts grow equal
    outputs and recomputed outputs can hit the prefix cache too."""
    return ALPHABET[sum(seq.token_ids) % len(ALPHABET)]


class ShadowKV:
    """What each KV slot would hold after the simulated forwards: the token written there and
    its whole context. A token's K/V depend on everything before it, so a sequence's computed
    positions must hold exactly its own prefixes, however its blocks were obtained."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.slots: list[list[tuple[int, ...] | None]] = [[None] * pool.block_size for _ in pool.blocks]

    def write(self, seq: Request, num_new_tokens: int) -> None:
        bs = self.pool.block_size
        for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens):
            block = self.pool.blocks[seq.block_table[pos // bs]]
            assert block.ref_count == 1 and block.key is None, (
                f"{seq.request_id} would overwrite block {block.block_id}, which another sequence "
                f"(ref_count {block.ref_count}) or the prefix cache (key {block.key}) relies on"
            )
            self.slots[block.block_id][pos % bs] = tuple(seq.token_ids[: pos + 1])

    def check(self, seq: Request) -> None:
        bs = self.pool.block_size
        for pos in range(seq.num_computed_tokens):
            held = self.slots[seq.block_table[pos // bs]][pos % bs]
            assert held == tuple(seq.token_ids[: pos + 1]), (
                f"{seq.request_id}: position {pos} (block {seq.block_table[pos // bs]}) holds K/V computed "
                f"for another context"
            )


def compute(kv: KVCacheManager, seq: Request, shadow: ShadowKV | None = None) -> int:
    """Admit a sequence and compute all its known tokens in one forward; returns how many
    tokens came from the prefix cache."""
    n = kv.admit(seq, UNBOUNDED)
    assert n == seq.num_uncomputed_tokens > 0
    if shadow is not None:
        shadow.check(seq)
        shadow.write(seq, n)
    seq.num_computed_tokens += n
    kv.commit_computed(seq)
    return seq.num_cached_tokens


def check_pool(pool: BlockPool, live: list[Request]) -> None:
    """Refcounts, the free queue and the prefix cache agree with the sequences holding blocks.

    Reads the pool's private free queue and cache map: they are what the invariants are about.
    """
    for seq in live:
        assert len(set(seq.block_table)) == len(seq.block_table), f"{seq.request_id} lists a block twice"
    held = Counter(block_id for seq in live for block_id in seq.block_table)
    for block in pool.blocks:
        assert block.ref_count == held[block.block_id], (
            f"block {block.block_id}: ref_count {block.ref_count}, held by {held[block.block_id]} sequences"
        )
        assert (block.block_id in pool._free) == (block.ref_count == 0), f"block {block.block_id} free-queue state"
    stats = pool.stats()
    assert stats.total_blocks == pool.num_blocks
    assert stats.used_blocks + stats.free_blocks == stats.total_blocks
    assert stats.free_blocks == sum(block.ref_count == 0 for block in pool.blocks)
    assert 0 <= stats.prefix_hit_tokens <= stats.prefix_queried_tokens
    keys = [block.key for block in pool.blocks if block.key is not None]
    assert len(keys) == len(set(keys)) == len(pool._cached) == stats.cached_blocks, "a key names two blocks"
    assert ROOT_KEY not in keys
    for entry, block_id in pool._cached.items():
        block = pool.blocks[block_id]
        assert block.key is not None, f"cache entry {entry} points at unregistered block {block_id}"
        assert entry == (block.parent_key, block.token_ids), f"block {block_id} is cached under another entry"
        assert len(block.token_ids) == pool.block_size
    if not pool.enable_prefix_caching:
        assert not pool._cached


def check_sequences(kv: KVCacheManager, scheduler: Scheduler, shadow: ShadowKV) -> None:
    waiting, running = list(scheduler.waiting), running_seqs(scheduler)
    ids = [seq.request_id for seq in waiting + running]
    assert len(ids) == len(set(ids)), "a request is queued twice"
    assert len(running) <= scheduler.max_num_seqs
    for seq in waiting:
        assert seq.status is RequestStatus.WAITING
        # A waiting request holds nothing, so waiting requests can never hold the pool.
        assert not seq.block_table and seq.num_computed_tokens == 0, f"waiting {seq.request_id} holds blocks"
    for seq in running:
        assert seq.status is RequestStatus.RUNNING
        assert 0 < seq.num_computed_tokens <= seq.num_tokens
        assert kv.blocks_for(seq.num_computed_tokens) <= len(seq.block_table) <= kv.blocks_for(seq.num_tokens), (
            f"{seq.request_id}: {len(seq.block_table)} blocks for {seq.num_computed_tokens} computed "
            f"of {seq.num_tokens} tokens"
        )
        assert len(seq.block_keys) == seq.num_computed_tokens // kv.block_size
        for block_id, key in zip(seq.block_table, seq.block_keys):
            registered = kv.pool.blocks[block_id].key
            assert registered is None or registered == key, (
                f"{seq.request_id}: block {block_id} cached under another key"
            )
        shadow.check(seq)


def check_schedule(out: SchedulerOutput, scheduler: Scheduler, kv: KVCacheManager) -> None:
    """What a forward needs of a plan: every scheduled sequence runs, once, and holds the blocks
    for its new tokens; preempted ones hold nothing and are not in the plan."""
    scheduled_ids = [item.seq.request_id for item in out.scheduled]
    assert len(scheduled_ids) == len(set(scheduled_ids)), "a request is scheduled twice in one step"
    assert out.num_tokens <= scheduler.max_num_batched_tokens
    running_ids = {seq.request_id for seq in running_seqs(scheduler)}
    for item in out.scheduled:
        seq = item.seq
        assert seq.status is RequestStatus.RUNNING and seq.request_id in running_ids, (
            f"{seq.request_id} is scheduled but {seq.status.value}"
        )
        assert 0 < item.num_new_tokens <= seq.num_uncomputed_tokens
        assert len(seq.block_table) >= kv.blocks_for(seq.num_computed_tokens + item.num_new_tokens), (
            f"{seq.request_id} is scheduled for {item.num_new_tokens} tokens without the blocks to hold them"
        )
    for seq in out.preempted:
        assert seq.request_id not in scheduled_ids, f"{seq.request_id} is both preempted and scheduled"
        assert seq.status is RequestStatus.WAITING and not seq.block_table


def simulate_step(scheduler: Scheduler, kv: KVCacheManager, shadow: ShadowKV) -> SchedulerOutput:
    """One EngineCore.step without a model: schedule, 'compute' the new tokens, register full
    blocks, append a sampled token where the known tokens are all computed, finish at max_tokens."""
    out = scheduler.schedule()
    check_schedule(out, scheduler, kv)
    for item in out.scheduled:
        shadow.write(item.seq, item.num_new_tokens)
        item.seq.num_computed_tokens += item.num_new_tokens
        kv.commit_computed(item.seq)
    for seq in [item.seq for item in out.scheduled if item.seq.num_computed_tokens == item.seq.num_tokens]:
        reason = seq.append_token(fake_token(seq), frozenset(), MAX_MODEL_LEN)
        if reason is not None:
            scheduler.finish(seq, reason)
    return out


# The state machine -----------------------------------------------------------------------


@st.composite
def prompts(draw: st.DrawFn) -> list[int]:
    stem = draw(st.sampled_from(STEMS))
    head = list(stem[: draw(st.integers(0, len(stem)))])
    tail = draw(st.lists(st.sampled_from(ALPHABET), max_size=16))
    return (head + tail) or [1]


class SchedulerAndPool(RuleBasedStateMachine):
    """Requests arrive, steps run, requests stop or are aborted, in any order."""

    @initialize(
        block_size=st.integers(1, 8),
        num_blocks=st.integers(4, 24),
        prefix_caching=st.booleans(),
        max_num_seqs=st.integers(1, 6),
        extra_budget=st.integers(0, 40),
        drain_by_abort=st.booleans(),
    )
    def setup(
        self,
        block_size: int,
        num_blocks: int,
        prefix_caching: bool,
        max_num_seqs: int,
        extra_budget: int,
        drain_by_abort: bool,
    ) -> None:
        # At least 16 tokens of room, so every request below fits once its prompt is trimmed.
        num_blocks = max(num_blocks, -(-16 // block_size))
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_seqs + extra_budget)
        self.shadow = ShadowKV(self.pool)
        self.drain_by_abort = drain_by_abort
        self.live: dict[str, Request] = {}
        self.ended: list[Request] = []
        self.next_id = 0

    def _forget_ended(self) -> None:
        for rid, seq in list(self.live.items()):
            if seq.finished:
                self.ended.append(self.live.pop(rid))

    @rule(prompt=prompts(), max_tokens=st.integers(1, 8))
    def add_request(self, prompt: list[int], max_tokens: int) -> None:
        # EngineCore refuses a request whose full length could never fit in the pool.
        prompt = prompt[: self.pool.num_blocks * self.pool.block_size - max_tokens]
        assert self.kv.blocks_for(len(prompt) + max_tokens) <= self.pool.num_blocks
        seq = request(f"r{self.next_id}", prompt, max_tokens)
        self.next_id += 1
        self.live[seq.request_id] = seq
        self.scheduler.add(seq)

    @rule()
    def step(self) -> None:
        simulate_step(self.scheduler, self.kv, self.shadow)
        self._forget_ended()

    @precondition(
        lambda self: any(
            s.num_output_tokens and s.num_computed_tokens == s.num_tokens - 1 for s in running_seqs(self.scheduler)
        )
    )
    @rule(data=st.data())
    def stop_request(self, data: st.DataObject) -> None:
        """What EngineCore does when the token a request just sampled is a stop token."""
        just_sampled = [
            s for s in running_seqs(self.scheduler) if s.num_output_tokens and s.num_computed_tokens == s.num_tokens - 1
        ]
        self.scheduler.finish(data.draw(st.sampled_from(just_sampled)), "stop")
        self._forget_ended()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort_request(self, data: st.DataObject) -> None:
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        self.scheduler.abort(seq)
        assert seq.finished and seq.finish_reason == "abort" and not seq.block_table
        self._forget_ended()

    @invariant()
    def bookkeeping_agrees(self) -> None:
        assert {seq.request_id for seq in holders(self.scheduler)} == set(self.live)
        assert self.scheduler.has_unfinished() == bool(self.live)
        check_sequences(self.kv, self.scheduler, self.shadow)
        check_pool(self.pool, holders(self.scheduler))
        for seq in self.ended:
            assert seq.finished and not seq.block_table

    def teardown(self) -> None:
        if not hasattr(self, "pool"):
            return
        if self.drain_by_abort:
            for rid in sorted(self.live):
                self.scheduler.abort(self.live[rid])
                check_pool(self.pool, holders(self.scheduler))
        else:
            for _ in range(10_000):
                if not self.scheduler.has_unfinished():
                    break
                simulate_step(self.scheduler, self.kv, self.shadow)
                check_sequences(self.kv, self.scheduler, self.shadow)
                check_pool(self.pool, holders(self.scheduler))
            assert not self.scheduler.has_unfinished(), "the scheduler stopped making progress"
        self._forget_ended()
        assert not self.live
        stats = self.pool.stats()
        assert all(block.ref_count == 0 for block in self.pool.blocks)
        assert stats.used_blocks == 0 and stats.free_blocks == stats.total_blocks


TestSchedulerAndPool = SchedulerAndPool.TestCase
TestSchedulerAndPool.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, derandomize=True, database=None
)


# The allocator ---------------------------------------------------------------------------


def pool_state(pool: BlockPool) -> tuple[object, ...]:
    return (
        [(b.ref_count, b.key, b.parent_key, b.token_ids) for b in pool.blocks],
        list(pool._free),
        dict(pool._cached),
        pool.stats(),
    )


def test_freeing_a_block_twice_raises() -> None:
    pool = BlockPool(4, 2)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(ids[:1])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([3])  # never allocated


def test_allocating_more_than_is_free_raises_memory_error_and_changes_nothing() -> None:
    pool = BlockPool(6, 2)
    kv = KVCacheManager(pool)
    compute(kv, request("a", [1, 2, 3, 4, 5]))  # 3 blocks held, 2 of them cached
    before = pool_state(pool)
    with pytest.raises(MemoryError):
        pool.allocate(4)
    assert pool_state(pool) == before
    seq = request("b", [1] * 9)  # needs 5 blocks, 3 are free
    assert not kv.allocate(seq, 9)
    assert seq.block_table == [] and pool_state(pool) == before


def test_eviction_takes_the_least_recently_freed_block_and_a_prefix_head_outlives_its_tail() -> None:
    pool = BlockPool(6, 2)
    kv = KVCacheManager(pool)
    a, b = request("a", [1, 1, 2, 2, 3]), request("b", [3, 3, 2, 2, 1])  # two full blocks + one partial each
    compute(kv, a)
    compute(kv, b)
    kv.free(a)
    kv.free(b)

    def cached_depth(prompt: list[int]) -> int:
        return len(pool.match_prefix(prompt).block_ids)

    # Freed tail first, so "a"'s blocks go before "b"'s, and within each the tail goes first.
    expected = [(2, 2), (1, 2), (0, 2), (0, 2), (0, 1), (0, 0)]
    for depths in expected:
        pool.allocate(1)
        assert (cached_depth(a.prompt_token_ids), cached_depth(b.prompt_token_ids)) == depths


def test_a_prefix_hit_makes_its_blocks_the_most_recently_freed() -> None:
    pool = BlockPool(6, 2)
    kv = KVCacheManager(pool)
    a, b = request("a", [1, 1, 2, 2, 3]), request("b", [3, 3, 2, 2, 1])
    compute(kv, a)
    compute(kv, b)
    kv.free(a)
    kv.free(b)
    again = request("a2", a.prompt_token_ids)
    assert compute(kv, again) == 4  # revives "a"'s two cached blocks
    kv.free(again)
    pool.allocate(3)  # the three oldest free blocks are now "b"'s
    assert len(pool.match_prefix(a.prompt_token_ids).block_ids) == 2
    assert len(pool.match_prefix(b.prompt_token_ids).block_ids) == 0


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_a_prefix_match_never_includes_the_prompts_last_token(block_size: int) -> None:
    for length in range(1, 3 * block_size + 2):
        pool = BlockPool(8, block_size)
        kv = KVCacheManager(pool)
        prompt = [(7 * i) % 5 for i in range(length)]
        first = request("first", prompt + [9])  # so every block of the prompt is full and cached
        compute(kv, first)
        kv.free(first)
        second = request("second", prompt)
        n = kv.admit(second, UNBOUNDED)
        assert second.num_cached_tokens == (length - 1) // block_size * block_size
        assert n == length - second.num_cached_tokens >= 1, "the last prompt token must be computed for its logits"


class Colliding(int):
    """A token id whose hash is always 0: every block of such tokens, at any depth, lands on
    the same hash of the prefix cache's table, so only comparing the stored entry can tell
    blocks apart (as with a hash collision, accidental or crafted)."""

    def __hash__(self) -> int:
        return 0


def colliding(tokens: list[int]) -> list[int]:
    return [Colliding(t) for t in tokens]


def test_blocks_whose_hashes_all_collide_are_served_only_after_their_own_prefix() -> None:
    pool = BlockPool(32, 2)
    kv = KVCacheManager(pool)
    shadow = ShadowKV(pool)
    rng = random.Random(3)
    hits = 0
    for i in range(80):
        prompt = list(rng.choice(STEMS)[: rng.randint(1, 12)]) + [rng.choice(ALPHABET)]
        seq = request(f"r{i}", colliding(prompt))
        hits += compute(kv, seq, shadow)  # checks that the cached blocks hold this prompt's prefix
        kv.free(seq)
        check_pool(pool, [])
    assert hits > 0, "colliding blocks are still reused when their prefix matches"


@pytest.mark.parametrize(
    "prompts",
    [
        # [1, 1] and [2, 2] collide; [3, 3] computed after [2, 2] must not be served after [1, 1].
        [[1, 1, 9], [2, 2, 3, 3, 9], [1, 1, 3, 3, 9]],
        # The same block at depth 1 and 2: a child of the root and a child of itself.
        [[1, 1, 9], [1, 1, 1, 1, 9], [1, 1, 1, 1, 1, 1, 9]],
    ],
)
def test_a_block_is_never_served_after_another_prefix_whatever_the_hashes(prompts: list[list[int]]) -> None:
    pool = BlockPool(16, 2)
    kv = KVCacheManager(pool)
    shadow = ShadowKV(pool)
    for i, prompt in enumerate(prompts):
        seq = request(f"r{i}", colliding(prompt))
        compute(kv, seq, shadow)  # the shadow check fails when a served block holds another context
        kv.free(seq)
        check_pool(pool, [])


def test_a_key_outlives_its_block_so_children_of_an_evicted_block_are_never_misread() -> None:
    """A sequence that computed a prefix beside an identical cached block chains its later
    blocks onto that block's key. When the cached block is evicted and reused for other
    tokens, the children registered under its old key must not follow the new tokens (as
    they would if a key were, say, the block id)."""
    pool = BlockPool(6, 2)
    kv = KVCacheManager(pool)
    shadow = ShadowKV(pool)
    first, twin = request("first", [1, 1, 9]), request("twin", [1, 1, 9])
    for seq in (first, twin):  # admitted in one step: neither can reuse the other's block
        assert kv.admit(seq, UNBOUNDED) == 3
    for seq in (first, twin):
        shadow.write(seq, 3)
        seq.num_computed_tokens = 3
        kv.commit_computed(seq)
    assert pool.blocks[twin.block_table[0]].key is None, "the twin's copy stays private"
    assert twin.block_keys == first.block_keys
    kv.free(first)
    pool.free(pool.allocate(pool.num_free))  # evicts every free block, first's cached [1, 1] among them
    assert pool.stats().cached_blocks == 0
    twin.append_token(9, frozenset(), MAX_MODEL_LEN)  # twin decodes on: its block [9, 9] fills
    shadow.write(twin, 1)
    twin.num_computed_tokens += 1
    kv.commit_computed(twin)
    assert pool.stats().cached_blocks == 1
    kv.free(twin)
    for i, prompt in enumerate([[2, 2, 9], [2, 2, 9, 9, 5], [1, 1, 9, 9, 5], [1, 1, 9, 9, 5]]):
        seq = request(f"r{i}", prompt)
        compute(kv, seq, shadow)  # the shadow check fails if [9, 9] is served after other tokens
        kv.free(seq)
        check_pool(pool, [])


def test_a_failed_admission_holds_nothing_and_counts_no_query() -> None:
    kv = KVCacheManager(BlockPool(3, 4))
    hog = request("hog", list(range(8)))
    assert kv.admit(hog, UNBOUNDED) == 8
    late = request("late", list(range(20, 30)))
    assert kv.admit(late, UNBOUNDED) == 0
    assert late.block_table == [] and late.num_computed_tokens == 0
    assert kv.pool.stats().prefix_queried_tokens == 8, "only the admitted request was counted"


def test_prefix_hit_rate_counts_prompt_tokens_served_from_the_cache() -> None:
    pool = BlockPool(16, 4)
    kv = KVCacheManager(pool)
    prompt = list(range(13))  # three full blocks and one token
    first = request("first", prompt)
    assert compute(kv, first) == 0
    kv.free(first)
    second = request("second", prompt)
    assert compute(kv, second) == 12
    stats = pool.stats()
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (26, 12)
    assert stats.prefix_hit_rate == pytest.approx(12 / 26)
    assert (stats.used_blocks, stats.free_blocks, stats.cached_blocks) == (4, 12, 3)
    assert BlockPool(4, 4).stats().prefix_hit_rate == 0.0


def test_running_sequences_with_a_common_prefix_share_its_blocks() -> None:
    pool = BlockPool(16, 2)
    kv = KVCacheManager(pool)
    a, b = request("a", [1, 2, 3, 4, 5, 6, 7]), request("b", [1, 2, 3, 4, 9])
    compute(kv, a)
    compute(kv, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert [pool.blocks[i].ref_count for i in a.block_table] == [2, 2, 1, 1]
    check_pool(pool, [a, b])


def test_without_prefix_caching_nothing_is_matched_or_cached() -> None:
    pool = BlockPool(16, 2, enable_prefix_caching=False)
    kv = KVCacheManager(pool)
    a = request("a", [1, 2, 3, 4, 5])
    compute(kv, a)
    b = request("b", [1, 2, 3, 4, 5])
    assert compute(kv, b) == 0
    assert not set(a.block_table) & set(b.block_table)
    assert pool.match_prefix([1, 2, 3, 4, 5]).block_ids == []
    stats = pool.stats()
    assert (stats.cached_blocks, stats.prefix_hit_tokens, stats.prefix_hit_rate) == (0, 0, 0.0)


def test_a_pool_needs_positive_sizes() -> None:
    for num_blocks, block_size in [(0, 4), (4, 0), (-1, 1)]:
        with pytest.raises(ValueError, match="num_blocks and block_size"):
            BlockPool(num_blocks, block_size)


# The scheduler ---------------------------------------------------------------------------


def make_oldest(scheduler: Scheduler, seq: Request) -> None:
    """Move a running request to the front of the admission order, whatever holds it."""
    running = scheduler.running
    if isinstance(running, dict):
        items = sorted(running.items(), key=lambda item: item[1] is not seq)
        running.clear()
        running.update(items)
    else:
        running.remove(seq)
        running.insert(0, seq)


def test_a_request_preempted_after_it_was_scheduled_leaves_the_step() -> None:
    """The newest request's decode is scheduled first; an older request still in chunked prefill
    then needs blocks, and the newest is the victim. It must not stay in the plan.

    Today an older request in prefill uses the whole budget, so nothing newer is admitted until
    its prefill ends and this order never arises on its own; the test arranges it so that the
    scheduler's handling stays right if its policy changes."""
    pool = BlockPool(5, 2, enable_prefix_caching=False)
    kv = KVCacheManager(pool)
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=4)
    shadow = ShadowKV(pool)
    newest, older = request("newest", [1, 2, 3], max_tokens=4), request("older", [5] * 8, max_tokens=1)
    scheduler.add(newest)
    simulate_step(scheduler, kv, shadow)  # "newest" computes its prompt and samples
    scheduler.add(older)
    simulate_step(scheduler, kv, shadow)  # "newest" decodes; "older" gets a 3-token chunk
    assert newest.num_output_tokens == 2 and older.num_computed_tokens == 3
    make_oldest(scheduler, older)
    assert pool.num_free == 1

    # "newest" takes the last free block for its decode, then "older" needs one for its chunk.
    out = scheduler.schedule()
    check_schedule(out, scheduler, kv)
    assert [(item.seq.request_id, item.num_new_tokens) for item in out.scheduled] == [("older", 3)]
    assert out.preempted == [newest] and newest.num_preemptions == 1
    assert list(scheduler.waiting) == [newest]
    check_pool(pool, holders(scheduler))

    for item in out.scheduled:  # finish the step, then run everything to the end
        shadow.write(item.seq, item.num_new_tokens)
        item.seq.num_computed_tokens += item.num_new_tokens
        kv.commit_computed(item.seq)
    for _ in range(100):
        if not scheduler.has_unfinished():
            break
        simulate_step(scheduler, kv, shadow)
        check_sequences(kv, scheduler, shadow)
        check_pool(pool, holders(scheduler))
    assert newest.finish_reason == older.finish_reason == "length"
    assert newest.num_output_tokens == 4 and older.num_output_tokens == 1
    assert pool.stats().used_blocks == 0


def test_abort_frees_blocks_in_every_state_and_a_second_abort_is_a_no_op() -> None:
    pool = BlockPool(12, 2)
    kv = KVCacheManager(pool)
    scheduler = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=4)
    shadow = ShadowKV(pool)
    decoding, prefilling, waiting = request("d", [1, 2]), request("p", [3] * 10), request("w", [4] * 3)
    for seq in (decoding, prefilling, waiting):
        scheduler.add(seq)
    simulate_step(scheduler, kv, shadow)
    assert decoding.num_output_tokens == 1 and 0 < prefilling.num_computed_tokens < 10
    assert waiting.status is RequestStatus.WAITING
    for seq in (prefilling, waiting, decoding):
        scheduler.abort(seq)
        assert seq.finish_reason == "abort" and not seq.block_table
        check_pool(pool, holders(scheduler))
    scheduler.abort(decoding)
    assert not scheduler.has_unfinished()
    assert pool.stats().used_blocks == 0
