"""Prompt logprobs in the engine: every prompt token's log-probability, rank and top-k equal a
transformers forward over the same tokens (fp32, within 1e-4), with prompts longer than a
prefill chunk, after a prefix-cache hit on the prompt, under preemption, in slices, beside
ordinary requests that stay unchanged; `max_tokens` 0 scores without generating; a failure
while scoring fails only its own request."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hf_oracle import hf_logits
from test_engine_core import assert_pool_empty, finish_of, make_core, run_to_completion, tokens_of

from splitinfer.engine import LLM, SamplingParams, prompt_logprobs
from splitinfer.protocol import ProtocolError, RequestOutput, TokenLogprobs

TOL = 1e-4
TOP = 5


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(500) for _ in range(length)]


def scored_of(outputs: list[RequestOutput]) -> list[TokenLogprobs]:
    return [entry for out in outputs for entry in out.prompt_logprobs or ()]


def assert_matches_transformers(path: Path, tokens: list[int], entries: list[TokenLogprobs], top: int = TOP) -> None:
    """Entry i scores prompt token i + 1 as transformers' forward over the whole prompt does."""
    assert [e.token_id for e in entries] == tokens[1:], "one entry per prompt token after the first, in order"
    reference = hf_logits(path, tokens).log_softmax(dim=-1)
    for i, entry in enumerate(entries):
        row = reference[i]
        expected = row[tokens[i + 1]].item()
        assert abs(entry.logprob - expected) < TOL, (i, entry.logprob, expected)
        near = int(((row - expected).abs() < TOL).sum()) - 1  # near-ties may rank either way
        assert abs(entry.rank - (int((row > expected).sum()) + 1)) <= near, f"rank at position {i}"
        values, ids = row.topk(top)
        assert len(entry.top) == top
        for (token, logprob), ref_id, ref_value in zip(entry.top, ids.tolist(), values.tolist()):
            assert abs(logprob - ref_value) < TOL
            assert token == ref_id or abs(row[token].item() - ref_value) < TOL  # a near-tie may swap


def test_prompts_longer_than_a_chunk_match_transformers_and_generation_is_unchanged(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint, max_num_batched_tokens=48, max_num_seqs=8)
    prompts = [prompt(i, n) for i, n in enumerate([1, 2, 47, 48, 49, 130])]
    for i, tokens in enumerate(prompts):
        core.add_request(f"s{i}", tokens, SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=TOP))
        core.add_request(f"g{i}", tokens, SamplingParams(max_tokens=4, temperature=0.0))
    outputs = run_to_completion(core)
    for i, tokens in enumerate(prompts):
        assert_matches_transformers(tiny_checkpoint, tokens, scored_of(outputs[f"s{i}"]))
        assert tokens_of(outputs[f"s{i}"]) == tokens_of(outputs[f"g{i}"]), "scoring changes nothing it generates"
        assert scored_of(outputs[f"g{i}"]) == []
    # The 130-token prompt is scored in pieces, as its chunks are computed.
    assert sum(1 for out in outputs["s5"] if out.prompt_logprobs) >= 3
    assert_pool_empty(core)


def test_a_cached_prompt_is_computed_again_for_its_logprobs_and_others_reuse_its_blocks(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint, max_num_batched_tokens=64, max_num_seqs=8, block_size=16)
    tokens = prompt(7, 100)
    core.add_request("warm", tokens, SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(core)
    core.add_request("scored", tokens, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP))
    outputs = run_to_completion(core)["scored"]
    assert outputs[-1].num_cached_tokens == 0, "the cache holds K/V, not the logits scoring needs"
    assert_matches_transformers(tiny_checkpoint, tokens, scored_of(outputs))
    # A scoring request's own blocks enter the cache like anyone's.
    core.add_request("after", tokens[:80] + [1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0))
    assert run_to_completion(core)["after"][-1].num_cached_tokens == 80
    assert_pool_empty(core)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(tiny_checkpoint: Path) -> None:
    llm = LLM(tiny_checkpoint, device="cpu", dtype="float32", max_num_batched_tokens=32, max_num_seqs=8)
    tokens = prompt(3, 70)
    [out] = llm.generate([tokens], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert (out.token_ids, out.finish_reason) == ([], "length")
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(tokens)
    assert_matches_transformers(tiny_checkpoint, tokens, out.prompt_logprobs[1:], top=0)
    [one] = llm.generate([[5]], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert one.prompt_logprobs == [None] and one.finish_reason == "length"
    with pytest.raises(ProtocolError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert_pool_empty(llm.engine)


def test_preempted_scoring_requests_report_each_prompt_token_once(tiny_checkpoint: Path) -> None:
    # 12 blocks of 16 tokens for eight requests of 60-100 prompt tokens: preemption mid-prompt.
    core = make_core(tiny_checkpoint, num_kv_blocks=12, block_size=16, max_num_batched_tokens=64, max_num_seqs=8)
    prompts = [prompt(20 + i, 60 + 5 * i) for i in range(8)]
    for i, tokens in enumerate(prompts):
        core.add_request(
            f"r{i}", tokens, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        )
    outputs = run_to_completion(core)
    assert core.stats().num_preemptions > 0, "the pool was meant to be too small to avoid preemption"
    for i, tokens in enumerate(prompts):
        assert_matches_transformers(tiny_checkpoint, tokens, scored_of(outputs[f"r{i}"]), top=1)
        assert finish_of(outputs[f"r{i}"]) == "length" and len(tokens_of(outputs[f"r{i}"])) == 30
    assert_pool_empty(core)


def test_slices_of_a_few_rows_give_the_same_entries(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = prompt(11, 90)
    params = SamplingParams(max_tokens=0, prompt_logprobs=20)
    whole = LLM(tiny_checkpoint, device="cpu", dtype="float32").generate([tokens], params)[0]
    vocab = json.loads((tiny_checkpoint / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(prompt_logprobs, "MAX_SLICE_ELEMENTS", 7 * vocab)  # 7 rows per slice
    sliced = LLM(tiny_checkpoint, device="cpu", dtype="float32").generate([tokens], params)[0]
    # The lm_head over 7 rows rounds a little differently from one over 89: equal within fp32 noise.
    assert sliced.prompt_logprobs[0] is None and len(sliced.prompt_logprobs) == len(whole.prompt_logprobs)
    for a, b in zip(sliced.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5 and abs(a.rank - b.rank) <= 1
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)


def test_a_failure_while_scoring_fails_only_that_request(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = prompt_logprobs.score

    def score(model, hidden, plan):
        if any(request_id == "poisoned" for request_id, _ in plan.requests):
            raise RuntimeError("injected scoring fault")
        return real(model, hidden, plan)

    monkeypatch.setattr(prompt_logprobs, "score", score)
    core = make_core(tiny_checkpoint)
    tokens = prompt(5, 40)
    core.add_request("poisoned", tokens, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    core.add_request("healthy", tokens, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))
    core.add_request("plain", tokens, SamplingParams(max_tokens=3, temperature=0.0))
    outputs = run_to_completion(core)
    assert finish_of(outputs["poisoned"]) == "error"
    assert_matches_transformers(tiny_checkpoint, tokens, scored_of(outputs["healthy"]), top=2)
    assert tokens_of(outputs["healthy"]) == tokens_of(outputs["plain"]) and len(tokens_of(outputs["plain"])) == 3
    assert_pool_empty(core)


def test_prompt_logprobs_are_bounded_like_logprobs() -> None:
    for bad in (-1, 21):
        with pytest.raises(ProtocolError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
