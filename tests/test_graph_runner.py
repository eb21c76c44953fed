"""The decode graph runner's host side, on CPU: warm-up writes no K/V, and the block tables it
keeps on the device (sending only the blocks each table gained since the last step) always
equal the sequences' own, through preemption, prefix-cache hits, aborts, steps re-run in
halves after a failure, and batches that change from step to step."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_decode_graph import decode_plan, eager_logits, make_core, written_slots

from splitinfer.engine import EngineConfig, EngineCore, SamplingParams
from splitinfer.engine.cuda_graph import DecodeGraphRunner, DecodeStep, TableSlots

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.gpu])]


def bare_runner(max_num_seqs: int, max_blocks: int, device: str = "cpu") -> DecodeGraphRunner:
    """A runner without a model: enough to load steps into its buffers (its "forward" returns
    the token ids it was given)."""
    config = SimpleNamespace(num_heads=2, head_dim=8)
    model = SimpleNamespace(
        rope_cache=torch.empty(0, device=device),
        config=config,
        shard=config,
        driver=None,
        local_forward=lambda input_ids, positions, batch: input_ids.clone(),
    )
    return DecodeGraphRunner(model, max_num_seqs, max_blocks, use_cuda_graphs=False)


def load(runner: DecodeGraphRunner, tables: list[list[int]]) -> None:
    n = len(tables)
    runner.load_step(DecodeStep([0] * n, [0] * n, [-1] * n, [0] * n, tables))


def test_warm_up_writes_no_kv_even_after_a_real_step(tiny_checkpoint: Path) -> None:
    """Warm-up (what capture runs first, on every bucket) must use padding rows whatever the
    buffers held: a re-capture after serving would otherwise write into live blocks."""
    core = make_core(tiny_checkpoint, "cpu", enforce_eager=True)
    runner = core.runner.graph_runner
    for when in ("fresh buffers", "after a decode step"):
        if when == "after a decode step":
            core.runner.compute_logits(decode_plan(core, 5))  # the buffers now hold real slots and lengths
        k, v = core.kv_cache.k.clone(), core.kv_cache.v.clone()
        runner.warm_up()
        assert not written_slots(k, core.kv_cache.k) and not written_slots(v, core.kv_cache.v), (
            f"warm-up wrote K/V ({when})"
        )


def test_a_table_sends_only_what_it_gained_wherever_its_row_is() -> None:
    slots = TableSlots(num_slots=4, width=8)
    a, b = [5, 6], [7]
    first, _, values = slots.plan([a, b])
    assert values == [5, 6, 7]
    a.append(9)
    moved, index, values = slots.plan([b, a])  # rows swapped, a grew by one block
    assert moved == first[::-1] and values == [9] and index == [first[0] * 8 + 2]
    assert slots.plan([b, a])[1:] == ([], []), "nothing changed, nothing sent"
    c = [1]
    slots.plan([c])  # a step without a and b (a sub-batch): they keep their slots
    assert slots.plan([a, b, c])[1:] == ([], [])


def test_a_new_list_or_an_edited_one_is_sent_whole() -> None:
    slots = TableSlots(num_slots=2, width=8)
    a = [3, 4]
    slot = slots.plan([a])[0][0]
    readmitted = list(a)  # a preempted request comes back with a new list, maybe the same blocks
    assert slots.plan([readmitted])[2] == [3, 4]
    a2 = [3, 4]
    slots.plan([a2])
    a2[-1] = 8  # edited in place (the engine never does this): the tripwire resends it whole
    assert slots.plan([a2])[2] == [3, 8]
    del a2[1:]
    a2 += [5, 6]
    assert slots.plan([a2])[2] == [3, 5, 6]
    slots.plan([[0]])  # the other slot, so that a2's is the least recently used
    b = [9, 9, 6, 1]  # takes a2's slot and agrees with its last entry: still written whole
    assert slots.plan([b]) == ([slot], [slot * 8 + i for i in range(4)], b)


def test_a_table_that_died_cannot_lend_its_identity_to_a_new_one() -> None:
    """Slots are keyed by the list object: a new list allocated where a dead one was (CPython
    reuses the memory at once) must not find the dead one's slot."""
    runner = bare_runner(max_num_seqs=2, max_blocks=8)
    for _ in range(20):
        dead = [1, 2, 3]
        batch = [dead]
        load(runner, batch)
        del batch, dead  # freed last, so the next list created takes its memory (if the runner let it go)
        new = [7, 8, 3, 4]  # agrees with the dead table where an append would be checked
        load(runner, [new])
        runner.check_block_tables([new])


def test_slots_go_to_the_least_recently_used_and_limits_are_checked() -> None:
    slots = TableSlots(num_slots=2, width=3)
    a, b, c = [1], [2], [3]
    sa = slots.plan([a])[0][0]
    assert slots.plan([b])[0] != [sa]
    assert slots.plan([c])[0] == [sa], "c takes a's slot, the least recently used"
    assert slots.plan([b])[2] == [], "b kept its slot"
    with pytest.raises(ValueError, match="exceed the 2 slots"):
        slots.plan([a, b, c])
    with pytest.raises(ValueError, match="4 blocks exceeds the 3"):
        slots.plan([[1, 2, 3, 4]])


@pytest.mark.parametrize("device", DEVICES)
def test_device_block_tables_follow_random_histories(device: str) -> None:
    """Tables that grow, are replaced (preemption, prefix hits), leave and come back in random
    batches and orders, some steps a sub-batch: after every step the device rows equal them.
    Block ids come from a small range, so a new table often agrees with a slot's old one in
    places (freed blocks are reused), which must not pass for an up-to-date slot."""
    runner = bare_runner(max_num_seqs=8, max_blocks=40, device=device)
    for batch in random_batches(random.Random(0), 600):
        load(runner, batch)
        runner.check_block_tables(batch)


def random_batches(rng: random.Random, steps: int) -> Iterator[list[list[int]]]:
    """The block tables of `steps` decode steps of a random history (see the test above)."""
    live: list[list[int]] = []
    for _ in range(steps):
        for i, table in enumerate(live):
            roll = rng.random()
            if roll < 0.3 and len(table) < 40:
                table.append(rng.randrange(12))
            elif roll < 0.35:  # preempted and readmitted: a new list, its cached head reused
                live[i] = table[: rng.randrange(len(table) + 1)] + [rng.randrange(12)]
        if live and rng.random() < 0.1:
            live.pop(rng.randrange(len(live)))
        while len(live) < 8 and rng.random() < 0.3:
            live.append([rng.randrange(12) for _ in range(rng.randrange(1, 6))])
        yield rng.sample(live, rng.randrange(len(live) + 1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_worker_runner_following_rank_0_holds_the_same_tables_and_inputs(device: str) -> None:
    """Tensor parallelism: a worker's runner gets only what rank 0's staged each step
    (`decode_call`: padded rows and block-table writes) and must end every step with the same
    device tables and inputs, through random histories, steps that failed on rank 0 before
    being sent (rank 0 then rewrites whole tables, which the worker takes as they come) and
    empty steps (the liveness probe)."""
    rng = random.Random(1)
    leader = bare_runner(max_num_seqs=8, max_blocks=40, device=device)
    worker = bare_runner(max_num_seqs=8, max_blocks=40, device=device)
    for step, batch in enumerate(random_batches(rng, 400)):
        n = len(batch)
        ids = [rng.randrange(1000) for _ in range(n)]
        decode = DecodeStep(ids, list(range(n)), [rng.randrange(-1, 99) for _ in range(n)], [5] * n, batch)
        if step % 37 == 5:  # fails after staging, before anything is sent: the worker never hears of it
            leader.table_slots.forget()
            continue
        with torch.inference_mode():  # as `run` loads
            bs, num_writes, width = leader._load(decode)
        ints, tensors = leader.decode_call(bs, n, num_writes, width)
        hidden = worker.follow(ints, [t.clone() for t in tensors])  # what StepChannel delivers: copies
        worker.check_block_tables(batch)
        assert hidden.tolist() == ids + [0] * (bs - n), "the worker ran the same rows, padding after"
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            assert torch.equal(getattr(worker.inputs, name)[:bs], getattr(leader.inputs, name)[:bs]), name


def test_a_step_that_fails_while_loading_leaves_no_stale_table(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = bare_runner(max_num_seqs=4, max_blocks=8)
    a, b = [1, 2], [3]
    load(runner, [a, b])
    a.append(4)
    real_upload = runner._upload

    def failing_upload(*args: object) -> None:
        raise RuntimeError("injected: the copy never happened")

    monkeypatch.setattr(runner, "_upload", failing_upload)
    with pytest.raises(RuntimeError, match="injected"):
        load(runner, [a, b])
    monkeypatch.setattr(runner, "_upload", real_upload)
    load(runner, [a, b])  # a's new block was planned by the failed step: it must be sent again
    runner.check_block_tables([a, b])
    with pytest.raises(ValueError, match="exceeds"):
        load(runner, [a, list(range(9))])
    a.append(5)
    load(runner, [b, a])
    runner.check_block_tables([b, a])


@needs_cuda
@pytest.mark.gpu
def test_loading_steps_on_cuda_neither_syncs_nor_allocates() -> None:
    """Steps that send new blocks, whole new tables and reordered rows: one pinned copy and
    device-side indexing, so no host sync and no device allocation."""
    runner = bare_runner(max_num_seqs=16, max_blocks=64, device="cuda")
    assert runner.staging.raw.is_pinned(), "a non_blocking copy from pageable memory would sync"
    tables = [list(range(10 * i, 10 * i + 1 + i)) for i in range(13)]
    load(runner, tables)  # the first call may touch lazily created state
    torch.cuda.synchronize()
    allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
    for step in range(12):
        tables[step % 13].append(500 + step)
        tables[(5 * step) % 13] = tables[(5 * step) % 13][:2] + [600 + step]  # a new list
        tables.reverse()
        torch.cuda.synchronize()  # the engine's sampler reads its tokens back every step
        torch.cuda.set_sync_debug_mode("error")
        try:
            load(runner, tables[: 13 - step % 3])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocations
    runner.check_block_tables(tables[: 13 - 11 % 3])


class FailingOnPoison:
    """The sampler, raising for a batch with the poisoned request once that has decoded a few
    tokens: decode steps with it are re-run in halves until it is found."""

    def __init__(self, sampler, poison: str) -> None:
        self.sampler, self.poison = sampler, poison

    def __call__(self, logits, seqs, masks=None):
        out = self.sampler(logits, seqs, masks)
        if any(seq.request_id == self.poison and seq.num_output_tokens >= 4 for seq in seqs):
            raise RuntimeError("injected sampler fault")
        return out


def test_device_block_tables_and_logits_stay_right_through_preemption_prefix_hits_aborts_and_retries(
    tiny_checkpoint: Path,
) -> None:
    """A pool small enough to preempt, prompts sharing a prefix, requests arriving and aborted
    mid-decode, and a poisoned request whose decode steps are re-run in halves: after every
    decode forward the device rows equal the sequences' tables, and its logits equal the
    plain packed forward's."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_checkpoint),
            device="cpu",
            dtype="float32",
            block_size=4,
            num_kv_blocks=48,
            max_num_seqs=8,
            max_num_batched_tokens=64,
        )
    )
    runner = core.runner.graph_runner
    checked = {"decode steps": 0, "rows": 0, "sub-batches": 0}
    mismatches: list[str] = []  # collected: the engine would contain a raise as a failed request
    real_run, real_compute_logits = runner.run, core.runner.compute_logits

    def checked_run(step: DecodeStep) -> torch.Tensor:
        hidden = real_run(step)
        try:
            runner.check_block_tables(step.block_tables)
        except RuntimeError as exc:
            mismatches.append(str(exc))
        checked["rows"] += step.num_seqs
        checked["sub-batches"] += step.num_seqs < len(core.scheduler.running)
        return hidden

    def compared_logits(step):
        logits = real_compute_logits(step)
        if step.is_decode_only:
            checked["decode steps"] += 1
            try:
                torch.testing.assert_close(logits, eager_logits(core, step), atol=1e-4, rtol=1e-4)
            except AssertionError as exc:
                mismatches.append(str(exc))
        return logits

    runner.run = checked_run
    core.runner.compute_logits = compared_logits
    core.runner.sampler = FailingOnPoison(core.runner.sampler, poison="poisoned")

    shared = [(3 * j) % 500 for j in range(16)]  # four full blocks every prompt below starts with
    rng = random.Random(1)
    arrivals: dict[int, list[tuple[str, list[int], int]]] = {}
    for i in range(20):
        prompt = shared + [rng.randrange(500) for _ in range(rng.randrange(1, 12))]
        arrivals.setdefault(rng.randrange(80), []).append((f"r{i}", prompt, rng.randrange(10, 60)))
    arrivals.setdefault(10, []).append(("poisoned", shared + [1, 2], 30))
    finished: dict[str, str] = {}
    cached = 0
    for step in range(1000):
        for rid, prompt, max_tokens in arrivals.get(step, []):
            core.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        running = sorted(set(core.scheduler.running) - {"poisoned"})
        if step % 15 == 14 and running:  # abort one request mid-decode
            core.abort(rng.choice(running))
        for out in core.step():
            cached = max(cached, out.num_cached_tokens)
            if out.finish_reason is not None:
                finished[out.request_id] = out.finish_reason
        if step >= 80 and not core.has_unfinished():
            break
    assert not mismatches, mismatches[0]
    assert not core.has_unfinished() and len(finished) == 21
    assert finished["poisoned"] == "error" and list(finished.values()).count("abort") >= 3
    assert core.stats().num_preemptions >= 3, "the pool rarely ran out: preemption was not exercised"
    assert cached >= 16, "no prefix-cache hit was exercised"
    assert checked["decode steps"] >= 100 and checked["sub-batches"] >= 2


class FollowingDriver:
    """Stands in for rank 0's `Driver`: each decode call goes straight to a second runner on
    the same model (a worker's, on one device), whose hidden states it keeps."""

    def __init__(self, follower: DecodeGraphRunner) -> None:
        self.follower = follower
        self.hidden: list[torch.Tensor] = []

    def decode(self, ints: list[int], tensors: list[torch.Tensor]) -> None:
        copies = [t.clone() for t in tensors]  # what StepChannel delivers
        self.hidden.append(self.follower.follow(ints, copies).clone())  # it may live in a graph pool

    def mirrored(self, run):
        return run()


@pytest.mark.parametrize("device", DEVICES)
def test_a_worker_runner_replays_every_decode_step_as_rank_0_does(tiny_checkpoint: Path, device: str) -> None:
    """What a tensor-parallel worker does, on one device: its own runner (its own buffers and,
    on CUDA, its own captured graphs) fed only rank 0's `decode_call` computes the same
    hidden states as rank 0's runner, step after step, as sequences grow across blocks and
    finish (the KV cache is shared here, and both write the same K/V into it)."""
    core = make_core(tiny_checkpoint, device, num_kv_blocks=512)
    leader = core.runner.graph_runner
    follower = DecodeGraphRunner(
        core.model, core.config.max_num_seqs, leader.slot_tables.shape[1], use_cuda_graphs=bool(leader.graphs)
    )
    assert bool(follower.graphs) == (device == "cuda")
    driver = FollowingDriver(follower)
    leader.driver = driver
    ours: list[torch.Tensor] = []
    run = leader.run
    leader.run = lambda step: ours.append(run(step).clone()) or ours[-1]
    for i in range(6):
        prompt = [(11 * i + j) % 500 for j in range(1 + 5 * i)]
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=10 + 7 * i, temperature=0.0, ignore_eos=True))
    while core.has_unfinished():
        assert all(out.error is None for out in core.step())
    assert len(ours) == len(driver.hidden) > 30
    for step, (a, b) in enumerate(zip(ours, driver.hidden)):
        assert torch.equal(a, b), f"step {step}: the follower's hidden states differ"
