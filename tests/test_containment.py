"""A failure while computing one request fails that request only (engine core, in process).

Faults are injected into the real engine at the places a real bug would be: the forward,
the sampler (after the seeded generators have drawn), the bookkeeping after the forward,
and the scheduler. Each test checks who failed, that the others' tokens equal a clean
run's, that every KV block is back, and that the engine goes on serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_engine_core import assert_pool_empty, finish_of, make_core, run_to_completion, tokens_of

from splitinfer.engine import LLM, EngineCore, EngineDeadError, SamplingParams
from splitinfer.engine.request import Request

POISON = 7  # a prompt starting with this token trips the injected fault


def poisoned(seqs: list[Request]) -> bool:
    return any(seq.prompt_token_ids[0] == POISON for seq in seqs)


class InjectedFault(RuntimeError):
    pass


def fail_forward_of_poisoned(core: EngineCore) -> None:
    """The model's forward raises whenever a poisoned request is in the batch."""
    real = core.runner.compute_logits

    def compute_logits(step):
        if poisoned([item.seq for item in step.scheduled]):
            raise InjectedFault("injected forward fault")
        return real(step)

    core.runner.compute_logits = compute_logits


class FaultySampler:
    """Samples as usual (the seeded generators draw), then raises if a poisoned row is in the batch."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __call__(self, logits, seqs, masks=None):
        out = self.sampler(logits, seqs, masks)
        if poisoned(seqs):
            raise InjectedFault("injected sampler fault")
        return out


REQUESTS = {
    "greedy-a": ([1, 2, 3, 4, 5], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
    "greedy-b": (list(range(10, 60)), SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)),
    "seeded-a": ([9, 8, 7, 6], SamplingParams(max_tokens=14, temperature=1.0, seed=11, ignore_eos=True)),
    "seeded-b": (
        list(range(100, 140)),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
    ),
}
BAD = ([POISON, 1, 2, 3], SamplingParams(max_tokens=10, temperature=0.7, seed=3, ignore_eos=True))


def clean_run(path: Path) -> dict[str, list[int]]:
    core = make_core(path)
    for rid, (prompt, params) in REQUESTS.items():
        core.add_request(rid, prompt, params)
    return {rid: tokens_of(outs) for rid, outs in run_to_completion(core).items()}


@pytest.fixture(scope="module")
def clean(tiny_checkpoint: Path) -> dict[str, list[int]]:
    return clean_run(tiny_checkpoint)


def run_with_poison(core: EngineCore, poison_at_step: int) -> dict:
    """The good requests from the start, the poisoned one joining at `poison_at_step`."""
    for rid, (prompt, params) in REQUESTS.items():
        core.add_request(rid, prompt, params)

    def add_bad(step: int) -> None:
        if step == poison_at_step:
            core.add_request("bad", *BAD)

    return run_to_completion(core, on_step=add_bad)


def assert_only_bad_failed(outputs: dict, clean: dict[str, list[int]]) -> None:
    assert finish_of(outputs["bad"]) == "error"
    assert "failed while computing this request" in outputs["bad"][-1].error
    assert "InjectedFault" in outputs["bad"][-1].error
    for rid in REQUESTS:
        assert finish_of(outputs[rid]) == "length", rid
        assert all(out.error is None for out in outputs[rid])
        assert tokens_of(outputs[rid]) == clean[rid], f"{rid} differs from a clean run"


def assert_still_serves(core: EngineCore, clean: dict[str, list[int]]) -> None:
    assert_pool_empty(core)
    prompt, params = REQUESTS["seeded-a"]
    core.add_request("later", prompt, params)
    assert tokens_of(run_to_completion(core)["later"]) == clean["seeded-a"]


@pytest.mark.parametrize("poison_at_step", [0, 3], ids=["prefill-together", "joins-mid-decode"])
def test_a_forward_that_fails_for_one_request_fails_only_that_request(
    tiny_checkpoint: Path, clean: dict, poison_at_step: int, caplog: pytest.LogCaptureFixture
) -> None:
    core = make_core(tiny_checkpoint)
    fail_forward_of_poisoned(core)
    outputs = run_with_poison(core, poison_at_step)
    assert_only_bad_failed(outputs, clean)
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, "the step's failure is logged once with its traceback"
    assert_still_serves(core, clean)


def test_a_sampler_failure_after_seeded_draws_leaves_the_seeded_neighbours_exact(
    tiny_checkpoint: Path, clean: dict
) -> None:
    core = make_core(tiny_checkpoint)
    core.runner.sampler = FaultySampler(core.runner.sampler)
    outputs = run_with_poison(core, poison_at_step=2)
    assert_only_bad_failed(outputs, clean)
    assert_still_serves(core, clean)


def test_bookkeeping_that_fails_after_the_forward_fails_only_its_request(tiny_checkpoint: Path, clean: dict) -> None:
    core = make_core(tiny_checkpoint)
    real = core.kv_manager.commit_computed

    def commit_computed(seq: Request) -> None:
        if poisoned([seq]):
            raise InjectedFault("injected bookkeeping fault")
        real(seq)

    core.kv_manager.commit_computed = commit_computed
    outputs = run_with_poison(core, poison_at_step=1)
    assert_only_bad_failed(outputs, clean)
    assert_still_serves(core, clean)


def test_a_failing_scheduler_fails_everything_in_flight_and_is_rebuilt(tiny_checkpoint: Path, clean: dict) -> None:
    core = make_core(tiny_checkpoint)
    for rid, (prompt, params) in REQUESTS.items():
        core.add_request(rid, prompt, params)
    core.step()
    core.step()
    broken = core.scheduler

    def schedule():
        raise InjectedFault("injected scheduler fault")

    broken.schedule = schedule
    outputs = {out.request_id: out for out in core.step()}
    assert set(outputs) == set(REQUESTS)
    assert all(out.finish_reason == "error" and "InjectedFault" in out.error for out in outputs.values())
    assert core.scheduler is not broken and not core.has_unfinished()
    assert_still_serves(core, clean)


def test_an_abort_that_finds_the_scheduler_broken_resets_it_instead_of_raising(
    tiny_checkpoint: Path, clean: dict
) -> None:
    core = make_core(tiny_checkpoint)
    for rid, (prompt, params) in REQUESTS.items():
        core.add_request(rid, prompt, params)
    core.step()
    broken = core.scheduler

    def abort(seq, reason="abort"):
        raise InjectedFault("injected abort fault")

    broken.abort = abort
    assert core.abort("greedy-a")  # the engine process calls this between steps: it must not raise
    outputs = {out.request_id: out for out in core.step()}
    assert set(outputs) >= set(REQUESTS) and all(out.finish_reason == "error" for out in outputs.values())
    assert core.scheduler is not broken
    assert_still_serves(core, clean)


def test_a_device_that_fails_even_an_empty_forward_is_dead(tiny_checkpoint: Path) -> None:
    core = make_core(tiny_checkpoint)

    def broken(*args, **kwargs):
        raise InjectedFault("the device is gone")

    core.runner.compute_logits = broken
    core.runner.graph_runner.run = broken  # the probe's path too
    core.add_request("a", *REQUESTS["greedy-a"])
    with pytest.raises(EngineDeadError, match="forward with no request in it fails too"):
        core.step()


def test_the_offline_llm_returns_the_others_and_an_error_for_the_failed_prompt(
    tiny_checkpoint: Path, clean: dict
) -> None:
    llm = LLM(tiny_checkpoint, device="cpu", dtype="float32")
    fail_forward_of_poisoned(llm.engine)
    prompts = [REQUESTS["greedy-a"][0], BAD[0], REQUESTS["greedy-b"][0]]
    params = [REQUESTS["greedy-a"][1], BAD[1], REQUESTS["greedy-b"][1]]
    good_a, bad, good_b = llm.generate(prompts, params)
    assert (bad.finish_reason, bad.token_ids) == ("error", []) and "InjectedFault" in bad.error
    assert good_a.token_ids == clean["greedy-a"] and good_a.error is None
    assert good_b.token_ids == clean["greedy-b"] and good_b.finish_reason == "length"
