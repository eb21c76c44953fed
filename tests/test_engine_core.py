"""The engine core through its step API: continuous batching against transformers, preemption,
prefix reuse, seeded sampling across batch compositions, aborts, and admission errors."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_model

from splitinfer.engine import EngineConfig, EngineCore, RequestError, SamplingParams
from splitinfer.protocol import RequestOutput

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_core(path: Path, **overrides: object) -> EngineCore:
    return EngineCore(EngineConfig(model=str(path), device="cpu", dtype="float32", **overrides))


def run_to_completion(core: EngineCore, on_step: Callable[[int], None] | None = None) -> dict[str, list[RequestOutput]]:
    """Step until nothing is unfinished; every output, grouped by request id."""
    outputs: dict[str, list[RequestOutput]] = {}
    steps = 0
    while core.has_unfinished():
        if on_step is not None:
            on_step(steps)
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        steps += 1
        assert steps < 10_000, "the engine stopped making progress"
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def finish_of(outputs: list[RequestOutput]) -> str | None:
    reasons = [out.finish_reason for out in outputs if out.finish_reason is not None]
    assert len(reasons) == 1 and outputs[-1].finish_reason == reasons[0], "exactly one finish, in the last output"
    return reasons[0]


def assert_pool_empty(core: EngineCore) -> None:
    stats = core.stats()
    assert (stats.waiting, stats.running) == (0, 0)
    assert stats.kv.used_blocks == 0 and stats.kv.free_blocks == stats.kv.total_blocks
    assert all(block.ref_count == 0 for block in core.block_pool.blocks)


# 16 prompts from 1 to 200 tokens, each with its own max_tokens.
PROMPT_LENGTHS = [1, 2, 5, 15, 16, 17, 31, 48, 64, 77, 100, 128, 150, 170, 199, 200]
MAX_TOKENS = [9, 3, 20, 1, 16, 7, 25, 12, 4, 18, 11, 2, 14, 6, 10, 24]


@pytest.fixture(scope="module")
def workload() -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [([rng.randrange(500) for _ in range(n)], m) for n, m in zip(PROMPT_LENGTHS, MAX_TOKENS)]


@pytest.fixture(scope="module")
def hf_expected(tiny_checkpoint: Path, workload) -> list[list[int]]:
    """transformers' greedy tokens for each request, run one at a time."""
    expected = []
    with torch.inference_mode():
        for prompt, max_tokens in workload:
            out = hf_model(tiny_checkpoint).generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            expected.append(out[0, len(prompt) :].tolist())
    return expected


def submit(core: EngineCore, workload, **params: object) -> list[str]:
    ids = []
    for i, (prompt, max_tokens) in enumerate(workload):
        core.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, **{**GREEDY, **params}))
        ids.append(f"r{i}")
    return ids


def test_sixteen_requests_batched_together_equal_transformers_one_at_a_time(
    tiny_checkpoint: Path, workload, hf_expected
) -> None:
    # A small token budget forces chunked prefill of the long prompts beside running decodes.
    core = make_core(tiny_checkpoint, max_num_batched_tokens=96, max_num_seqs=16)
    ids = submit(core, workload)
    outputs = run_to_completion(core)
    for rid, expected, (prompt, max_tokens) in zip(ids, hf_expected, workload):
        assert tokens_of(outputs[rid]) == expected, f"{rid} (prompt of {len(prompt)} tokens)"
        assert finish_of(outputs[rid]) == "length"
        last = outputs[rid][-1]
        assert (last.num_prompt_tokens, last.num_output_tokens) == (len(prompt), max_tokens)
    stats = core.stats()
    assert stats.prompt_tokens == sum(PROMPT_LENGTHS) and stats.generated_tokens == sum(MAX_TOKENS)
    assert_pool_empty(core)


def test_preemption_in_a_small_kv_pool_keeps_outputs_identical(tiny_checkpoint: Path, workload, hf_expected) -> None:
    # 16 blocks of 16 tokens: the longest request alone needs 14, so they cannot all run at once.
    core = make_core(tiny_checkpoint, num_kv_blocks=16, block_size=16, max_num_batched_tokens=128, max_num_seqs=16)
    ids = submit(core, workload)
    outputs = run_to_completion(core)
    assert core.stats().num_preemptions > 0, "the pool was meant to be too small to avoid preemption"
    for rid, expected in zip(ids, hf_expected):
        assert tokens_of(outputs[rid]) == expected, rid  # no token lost or emitted twice
    assert_pool_empty(core)


def test_a_shared_100_token_prefix_reuses_six_blocks_with_unchanged_output(tiny_checkpoint: Path) -> None:
    rng = random.Random(1)
    prefix = [rng.randrange(500) for _ in range(100)]
    first, second = prefix + [1, 2, 3], prefix + [7, 8]
    params = SamplingParams(max_tokens=12, **GREEDY)

    def generate(core: EngineCore) -> list[list[int]]:
        core.add_request("a", first, params)
        outputs = run_to_completion(core)
        core.add_request("b", second, params)
        outputs |= run_to_completion(core)
        return [tokens_of(outputs["a"]), tokens_of(outputs["b"])]

    cached = make_core(tiny_checkpoint, block_size=16)
    with_cache = generate(cached)
    hits = cached.stats().kv.prefix_hit_tokens
    assert hits >= 6 * 16, f"only {hits} prompt tokens came from the cache"
    uncached = make_core(tiny_checkpoint, block_size=16, enable_prefix_caching=False)
    assert generate(uncached) == with_cache
    assert uncached.stats().kv.prefix_hit_tokens == 0
    assert_pool_empty(cached)
    assert cached.stats().kv.cached_blocks >= 6, "freed blocks keep their content for later prompts"


def test_running_requests_share_cached_prefix_blocks(tiny_checkpoint: Path) -> None:
    prefix = list(range(200, 264))  # four full blocks
    params = SamplingParams(max_tokens=20, **GREEDY)
    core = make_core(tiny_checkpoint, block_size=16)
    core.add_request("a", prefix + [5], params)
    first = core.step()  # "a" computes its prompt; its full blocks enter the cache
    core.add_request("b", prefix + [6, 6], params)
    second = core.step()  # "b" is admitted on the cached prefix while "a" decodes
    a, b = core.requests["a"], core.requests["b"]
    shared = set(a.block_table) & set(b.block_table)
    assert len(shared) == 4 and all(core.block_pool.blocks[i].ref_count == 2 for i in shared)
    outputs = run_to_completion(core)
    b_tokens = tokens_of([o for o in first + second if o.request_id == "b"] + outputs["b"])
    assert outputs["b"][-1].num_cached_tokens == 64
    assert all(core.block_pool.blocks[i].ref_count == 0 for i in shared)
    reference = make_core(tiny_checkpoint, enable_prefix_caching=False)
    reference.add_request("b", prefix + [6, 6], params)
    assert tokens_of(run_to_completion(reference)["b"]) == b_tokens


@pytest.mark.parametrize("pool", [None, 12], ids=["roomy", "preempting"])
def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_checkpoint: Path, pool: int | None) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=77, ignore_eos=True)
    noise = SamplingParams(max_tokens=30, temperature=1.2, ignore_eos=True)
    prompt = [11, 22, 33, 44]

    alone = make_core(tiny_checkpoint)
    alone.add_request("x", prompt, seeded)
    expected = tokens_of(run_to_completion(alone)["x"])

    # Other requests arrive before, beside and after it, some with seeds of their own.
    core = make_core(tiny_checkpoint, num_kv_blocks=pool, block_size=8)
    core.add_request("before", list(range(40)), noise)
    core.add_request("x", prompt, seeded)
    late = {3: ("during", list(range(60, 90))), 9: ("after", [5] * 33)}

    def add_late(step: int) -> None:
        if step in late:
            rid, p = late[step]
            core.add_request(rid, p, SamplingParams(max_tokens=20, temperature=1.0, seed=step, ignore_eos=True))

    assert tokens_of(run_to_completion(core, on_step=add_late)["x"]) == expected
    if pool is not None:
        assert core.stats().num_preemptions > 0


def test_aborts_anywhere_free_blocks_at_once_and_return_the_pool_to_its_baseline(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint, max_num_batched_tokens=64, max_num_seqs=4, block_size=8)
    baseline = core.stats().kv
    params = SamplingParams(max_tokens=50, **GREEDY)
    core.add_request("running", [1, 2, 3], params)
    core.add_request("mid-prefill", list(range(300)), params)  # 300 tokens at 64 a step
    for rid in ("w1", "w2", "w3", "w4"):
        core.add_request(rid, [9] * 10, params)
    for _ in range(2):
        core.step()
    seqs = core.requests
    assert seqs["running"].num_output_tokens > 0
    assert 0 < seqs["mid-prefill"].num_computed_tokens < 300
    assert seqs["w4"].status.value == "waiting"

    for rid in ("running", "mid-prefill", "w4"):
        before = core.stats().kv.used_blocks
        held = len(seqs[rid].block_table)
        assert core.abort(rid)
        assert core.stats().kv.used_blocks == before - held, f"{rid}'s blocks were not freed at once"
    assert not core.abort("running"), "a second abort of the same request is a no-op"
    assert not core.abort("no-such-request")

    reported = {out.request_id: out for out in core.step() if out.finish_reason == "abort"}
    assert set(reported) == {"running", "mid-prefill", "w4"}
    assert reported["running"].new_token_ids == ()
    outputs = run_to_completion(core)
    assert {rid: finish_of(outs) for rid, outs in outputs.items()} == {"w1": "length", "w2": "length", "w3": "length"}
    after = core.stats().kv
    assert (after.used_blocks, after.free_blocks, after.total_blocks) == (
        baseline.used_blocks,
        baseline.free_blocks,
        baseline.total_blocks,
    )
    assert_pool_empty(core)


def test_requests_that_can_never_fit_are_refused_at_admission(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint, num_kv_blocks=4, block_size=16, max_model_len=256)
    with pytest.raises(RequestError, match="exceeds max_model_len=256") as too_long:
        core.add_request("a", [1] * 200, SamplingParams(max_tokens=100))
    assert too_long.value.field == "max_tokens"
    with pytest.raises(RequestError, match="needs 5 KV blocks.*has 4") as too_big:
        core.add_request("b", [1] * 70, SamplingParams(max_tokens=1))
    assert too_big.value.field == "max_tokens"
    core.add_request("c", [1] * 10, SamplingParams(max_tokens=5, ignore_eos=True))
    with pytest.raises(RequestError, match="already in use") as duplicate:
        core.add_request("c", [1], SamplingParams())
    assert duplicate.value.field == "request_id"
    with pytest.raises(RequestError, match="outside") as bad_bias:
        core.add_request("d", [1], SamplingParams(logit_bias={100_000: 1.0}))
    assert bad_bias.value.field == "logit_bias"
    assert core.stats().waiting == 1, "refused requests leave nothing behind"
    assert finish_of(run_to_completion(core)["c"]) == "length"


def test_stop_reasons_and_logprobs_come_through_the_step_api(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint)
    core.add_request("free", [4, 5, 6], SamplingParams(max_tokens=8, logprobs=3, **GREEDY))
    free = run_to_completion(core)["free"]
    stop_at = tokens_of(free)[3]
    core.add_request("stopped", [4, 5, 6], SamplingParams(max_tokens=8, stop_token_ids=[stop_at], **GREEDY))
    stopped = run_to_completion(core)["stopped"]
    assert tokens_of(stopped)[-1] == stop_at and finish_of(stopped) == "stop"
    assert all(len(out.logprobs) == 1 and len(out.logprobs[0].top) == 3 for out in free)
    assert all(out.logprobs[0].token_id == out.new_token_ids[0] for out in free)
    assert all(out.logprobs is None for out in stopped)
