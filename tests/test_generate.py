"""The offline LLM API: greedy generation equal to transformers, stopping, sampling, validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hf_oracle import hf_greedy

from splitinfer.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path) -> LLM:
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", ["gqa4-llama3-tied", "mha-untied-sharded"])
def test_greedy_generate_equals_transformers_for_64_tokens(make_checkpoint, name: str) -> None:
    from conftest import VARIANTS

    path = make_checkpoint(*VARIANTS[name])
    llm = LLM(path, device="cpu", dtype="float32")
    prompts = [[3, 17, 42], list(range(100, 129)), [7]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        # transformers stops at eos only if told; with no eos it runs the full 64 like ignore_eos.
        assert out.token_ids == hf_greedy(path, prompt, 64)
        assert out.finish_reason == "length" and len(out.token_ids) == 64
    assert len(set(outs[1].token_ids)) > 1, "a degenerate model would make this test meaningless"


def test_greedy_generate_stops_at_the_checkpoints_eos_like_transformers(
    llm: LLM, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    prompt = [5, 6, 7, 8]
    free_run = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    # A copy of the checkpoint whose generation_config makes the third generated token an eos id.
    eos = free_run.token_ids[2]
    path = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [eos]
    (path / "generation_config.json").write_text(json.dumps(generation))
    out = LLM(path, device="cpu", dtype="float32").generate([prompt], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert out.token_ids == free_run.token_ids[: free_run.token_ids.index(eos) + 1]
    assert out.finish_reason == "stop"
    assert out.token_ids == hf_greedy(tiny_checkpoint, prompt, 40, eos=[eos])


def test_stop_token_ids_end_a_request(llm: LLM) -> None:
    free_run = llm.generate([[9, 9, 9]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    stop = free_run.token_ids[4]
    out = llm.generate([[9, 9, 9]], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop


def test_batched_greedy_equals_one_at_a_time(llm: LLM) -> None:
    prompts = [[1, 2, 3], list(range(40, 90)), [11] * 17, [300, 301]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        assert llm.generate([prompt], params)[0].token_ids == out.token_ids


def test_string_prompts_are_tokenized_with_bos_and_outputs_detokenized(llm: LLM) -> None:
    out = llm.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids[0] == llm.config.bos_token_id
    assert out.prompt_token_ids == llm.tokenizer.encode("Hello world")
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([[4, 5, 6]], seeded)[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=0.8, ignore_eos=True)
    batched = llm.generate([[8, 8], [4, 5, 6], list(range(20, 40))], [other, seeded, other])[1].token_ids
    assert alone == batched
    different = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert different[0].token_ids != alone


def test_top_k_1_sampling_is_greedy(llm: LLM) -> None:
    greedy = llm.generate([[12, 13]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    top1 = llm.generate([[12, 13]], SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_many_prompts_fill_several_waves_of_a_small_kv_cache(tiny_checkpoint: Path) -> None:
    small = LLM(tiny_checkpoint, device="cpu", dtype="float32", num_kv_blocks=6, block_size=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[i, i + 1, i + 2] for i in range(10, 20)]
    outs = small.generate(prompts, params)
    big = LLM(tiny_checkpoint, device="cpu", dtype="float32")
    assert [o.token_ids for o in outs] == [o.token_ids for o in big.generate(prompts, params)]


@pytest.mark.parametrize(
    ("prompts", "params", "message"),
    [
        ([[]], SamplingParams(), "prompt 0: the prompt is empty"),
        ([[1, 999999]], SamplingParams(), "token id outside"),
        ([[1] * 2040], SamplingParams(max_tokens=16), "prompt 0: .*exceeds max_model_len=2048"),
        ([[1], [2]], [SamplingParams()], "got 1 sampling params for 2 prompts"),
    ],
)
def test_bad_requests_raise_clear_errors(llm: LLM, prompts, params, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(prompts, params)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"temperature": float("nan")}, "temperature"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_llm_refuses_bad_settings(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        LLM(tiny_checkpoint, device="cpu", dtype="float64")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_checkpoint, device="cpu", max_model_len=10**6)
