"""Grammar-constrained sampling in the engine core (in process, tiny random checkpoints).

Random weights make enforcement visible: left alone, such a model writes noise, so every
output that parses and validates is the grammar's doing. Each test also checks what a
long-running engine needs: every KV block back, the matchers right through preemption,
aborts and failed steps, and unconstrained requests unaffected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from schemas import (
    ARITHMETIC_GBNF,
    ARITHMETIC_LARK,
    ARITHMETIC_PATTERN,
    CHOICES,
    DATE_REGEX,
    EMAIL_REGEX,
    SCHEMAS,
)
from test_containment import FaultySampler, poisoned
from test_engine_core import assert_pool_empty, finish_of, make_core, run_to_completion, tokens_of

from splitinfer.engine import EngineCore, SamplingParams
from splitinfer.protocol.constraint import Constraint, ConstraintKind
from splitinfer.protocol.tokenizer import Tokenizer

TEMPERATURES = (0.0, 0.7, 1.0, 1.5)
PROMPTS = ([1, 2, 3, 4, 5], list(range(20, 60)), [7, 9])


def schema_constraint(name: str) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMAS[name]))


def constrained(constraint: Constraint, seed: int, **params: object) -> SamplingParams:
    settings = dict(max_tokens=400, temperature=TEMPERATURES[seed % len(TEMPERATURES)], seed=seed)
    return SamplingParams(constraint=constraint, **{**settings, **params})


def texts(core: EngineCore, outputs: dict, tokenizer: Tokenizer) -> dict[str, tuple[str, str | None]]:
    return {rid: (tokenizer.decode(tokens_of(outs)), finish_of(outs)) for rid, outs in outputs.items()}


def assert_written_as_json_dumps_writes(text: str) -> None:
    """ ", " and ": " between items and no other whitespace outside strings."""
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", re.sub(r"[,:] ", "", outside_strings)), text
    assert not re.search(r"[,:](?! )", outside_strings), text


@pytest.fixture(scope="module")
def qwen2(make_checkpoint) -> Path:
    return make_checkpoint("--family", "qwen2", "--seed", "3")


@pytest.fixture(scope="module")
def core(qwen2: Path) -> EngineCore:
    return make_core(qwen2, max_num_seqs=24, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def tokenizer(qwen2: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen2)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate_for_20_seeds_up_to_temperature_1_5(core, tokenizer, name: str) -> None:
    constraint = schema_constraint(name)
    for seed in range(20):
        core.add_request(f"{name}-{seed}", PROMPTS[seed % 3], constrained(constraint, seed))
    results = texts(core, run_to_completion(core), tokenizer)
    assert len(results) == 20
    for rid, (text, finish) in results.items():
        assert finish == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        assert_written_as_json_dumps_writes(text)
    assert_pool_empty(core)


@pytest.mark.parametrize(
    ("constraint", "pattern"),
    [
        (Constraint(ConstraintKind.REGEX, EMAIL_REGEX), EMAIL_REGEX),
        (Constraint(ConstraintKind.REGEX, DATE_REGEX), DATE_REGEX),
        (Constraint(ConstraintKind.CHOICE, choices=CHOICES), "|".join(CHOICES)),
        (Constraint(ConstraintKind.GRAMMAR, ARITHMETIC_LARK), ARITHMETIC_PATTERN),
        (Constraint(ConstraintKind.GRAMMAR, ARITHMETIC_GBNF), ARITHMETIC_PATTERN),
    ],
    ids=["email", "date", "choice", "lark", "gbnf"],
)
def test_regex_choice_and_grammar_outputs_match(core, tokenizer, constraint: Constraint, pattern: str) -> None:
    for seed in range(20):
        core.add_request(f"r{seed}", PROMPTS[seed % 3], constrained(constraint, seed, max_tokens=64))
    for rid, (text, finish) in texts(core, run_to_completion(core), tokenizer).items():
        assert finish == "stop" and re.fullmatch(pattern, text), (rid, text, finish)
    assert_pool_empty(core)


def test_json_object_outputs_are_objects_or_cut_by_max_tokens(core, tokenizer) -> None:
    constraint = Constraint(ConstraintKind.JSON_OBJECT)
    for seed in range(8):
        core.add_request(f"o{seed}", PROMPTS[seed % 3], constrained(constraint, seed, max_tokens=96))
    for rid, (text, finish) in texts(core, run_to_completion(core), tokenizer).items():
        assert text.startswith("{"), (rid, text)
        if finish == "stop":
            assert isinstance(json.loads(text), dict), (rid, text)
        else:  # an unbounded language: the random model may run out of tokens first
            assert finish == "length"


def test_unconstrained_requests_in_a_mixed_batch_produce_what_they_produce_alone(qwen2: Path) -> None:
    plain = [
        (f"plain{i}", PROMPTS[i % 3], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)) for i in range(4)
    ]
    alone = make_core(qwen2, max_num_seqs=16)
    for rid, prompt, params in plain:
        alone.add_request(rid, prompt, params)
    expected = {rid: tokens_of(outs) for rid, outs in run_to_completion(alone).items()}
    assert alone.masks.masks_filled == 0, "unconstrained requests compute no masks"

    mixed = make_core(qwen2, max_num_seqs=16)
    for i, (rid, prompt, params) in enumerate(plain):
        mixed.add_request(rid, prompt, params)
        mixed.add_request(f"json{i}", PROMPTS[(i + 1) % 3], constrained(schema_constraint("person"), i))
    outputs = run_to_completion(mixed)
    assert {rid: tokens_of(outputs[rid]) for rid in expected} == expected
    assert mixed.masks.masks_filled > 0


def test_preemption_and_recompute_keep_every_matcher_right(qwen2: Path, tokenizer) -> None:
    """A pool too small for the batch: requests are preempted and recomputed mid-output, and
    their grammars carry on from where they were."""
    core = make_core(qwen2, max_num_seqs=12, num_kv_blocks=40, max_num_batched_tokens=64)
    constraint = schema_constraint("inventory")
    for seed in range(12):
        core.add_request(f"p{seed}", list(range(30 + seed, 70 + seed)), constrained(constraint, seed))
    results = texts(core, run_to_completion(core), tokenizer)
    assert core.stats().num_preemptions > 0
    for rid, (text, finish) in results.items():
        assert finish == "stop", (rid, text)
        jsonschema.validate(json.loads(text), SCHEMAS["inventory"])
    assert_pool_empty(core)


def test_seeded_constrained_sampling_repeats_with_and_without_a_prefix_cache_hit(qwen2: Path) -> None:
    core = make_core(qwen2, max_num_seqs=8)
    prompt = list(range(100, 180))
    constraint = schema_constraint("person")
    core.add_request("first", prompt, constrained(constraint, 3))
    first = tokens_of(run_to_completion(core)["first"])
    core.add_request("again", prompt, constrained(constraint, 3))
    outputs = run_to_completion(core)["again"]
    assert outputs[-1].num_cached_tokens > 0, "the prompt's blocks came from the prefix cache"
    assert tokens_of(outputs) == first
    assert core.grammar.compiled == 1, "the compiled grammar came from the cache the second time"


def test_n_choices_share_one_compile_and_differ(core, tokenizer) -> None:
    before = core.grammar.compiled
    constraint = Constraint(ConstraintKind.REGEX, r"[a-z]{5,12}")  # compiled by no other test
    for i in range(8):
        core.add_request(
            f"n{i}", [1, 2, 3], SamplingParams(constraint=constraint, temperature=1.0, seed=i, max_tokens=20)
        )
    results = texts(core, run_to_completion(core), tokenizer)
    assert core.grammar.compiled == before + 1
    assert all(re.fullmatch(r"[a-z]{5,12}", text) for text, _ in results.values())
    assert len({text for text, _ in results.values()}) > 1


def test_aborts_while_compiling_and_mid_output_free_everything(core) -> None:
    big = {"type": "object", "properties": {f"k{i}": {"enum": [f"v{i}", i]} for i in range(300)}}
    core.add_request(
        "compiling", [1, 2], SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(big)))
    )
    assert core.abort("compiling") and not core.abort("compiling")
    core.add_request("running", [1, 2], constrained(schema_constraint("person"), 1))
    early = core.step() + core.step()
    assert core.abort("running")
    outputs = run_to_completion(core)
    for out in early:
        outputs.setdefault(out.request_id, []).insert(0, out)
    assert finish_of(outputs["compiling"]) == "abort" and finish_of(outputs["running"]) == "abort"
    assert_pool_empty(core)
    assert core.compiling == {}


def test_a_constraint_that_does_not_compile_fails_its_request_alone(core) -> None:
    bad = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object", "if": {"type": "object"}}))
    core.add_request("bad", [1, 2], SamplingParams(constraint=bad))
    core.add_request("good", [1, 2], SamplingParams(max_tokens=5, temperature=0.0))
    outputs = run_to_completion(core)
    assert finish_of(outputs["bad"]) == "error"
    assert "cannot enforce" in outputs["bad"][-1].error and '"if"' in outputs["bad"][-1].error
    assert finish_of(outputs["good"]) == "length"
    assert_pool_empty(core)


def test_every_sampling_setting_works_on_the_masked_distribution(core, tokenizer) -> None:
    """Logit bias toward a refused token, penalties, top-k/p, min-p and logprobs: the output still
    matches, and logprobs come from the model's raw distribution (documented)."""
    choice = Constraint(ConstraintKind.CHOICE, choices=CHOICES)
    banned = tokenizer.encode("x", add_special_tokens=False)[0]
    settings = [
        dict(logit_bias={banned: 100.0}, temperature=1.0),
        dict(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0, temperature=0.8),
        dict(top_k=3, top_p=0.5, min_p=0.1, temperature=1.2),
        dict(min_tokens=30, temperature=1.0),  # the grammar ends the request before min_tokens
        dict(temperature=0.0, logprobs=3),
    ]
    for i, extra in enumerate(settings):
        core.add_request(f"s{i}", [5, 6, 7], SamplingParams(constraint=choice, seed=i, max_tokens=32, **extra))
    outputs = run_to_completion(core)
    for rid, outs in outputs.items():
        text = tokenizer.decode(tokens_of(outs))
        assert finish_of(outs) == "stop" and text in CHOICES, (rid, text)
    entries = [entry for out in outputs["s4"] for entry in out.logprobs]
    assert len(entries) == len(tokens_of(outputs["s4"]))
    assert all(entry.top[0][1] >= entry.logprob for entry in entries), "raw distribution: top-1 first"


def test_a_sampler_failure_leaves_the_surviving_matchers_exactly_right(qwen2: Path, tokenizer) -> None:
    """Steps with a poisoned request fail and are re-run in halves; constrained survivors must
    sample what a clean run samples (their matchers did not advance in the failed attempts)."""
    constraint = schema_constraint("person")

    def run(with_poison: bool) -> dict[str, list[int]]:
        core = make_core(qwen2, max_num_seqs=8)
        if with_poison:
            core.runner.sampler = FaultySampler(core.runner.sampler)
        for seed in range(4):
            core.add_request(f"c{seed}", [9 + seed, 3, 4], constrained(constraint, seed + 1))
        if with_poison:
            core.add_request("poison", [7, 1, 2], constrained(constraint, 9))
        return {rid: tokens_of(outs) for rid, outs in run_to_completion(core).items()}

    assert poisoned.__name__  # the poison is a prompt starting with token 7
    clean, faulty = run(False), run(True)
    assert faulty.pop("poison") == []
    assert faulty == clean
