"""Prompt scoring over HTTP, as evaluation harnesses use it: completions' `echo` with `logprobs`
(and `max_tokens` 0 or 1) returns the prompt's tokens and logprobs equal to a transformers
forward within 1e-4, with and without the prompt in the prefix cache, whole and streamed;
vLLM's `prompt_logprobs` in completions and chat; bad combinations are 400s naming the field.
One engine and one server, through the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FAMILIES
from hf_oracle import hf_logits
from procs import free_port, start_engine, start_server, stop

TOL = 1e-4
MODEL = "tiny"  # the server's --served-model-name
CHUNK = 32  # the engine's token budget per step: longer prompts are prefilled in chunks


@pytest.fixture(scope="module")
def served(make_checkpoint, tmp_path_factory) -> Iterator[tuple[openai.OpenAI, Path]]:
    path: Path = make_checkpoint(*FAMILIES["llama"])
    tmp = tmp_path_factory.mktemp("prompt-logprobs")
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(
        path, address, tmp / "engine.log", "--max-num-batched-tokens", str(CHUNK), "--max-num-seqs", "8"
    )
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log", "--served-model-name", MODEL)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120), path
    finally:
        if server is not None:
            stop(server)
        stop(engine)


def token_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(length)]


def assert_prompt_scored(path: Path, prompt: list[int], logprobs, top: int) -> None:
    """The first len(prompt) entries of completions logprobs score the prompt as transformers does."""
    reference = hf_logits(path, prompt).log_softmax(dim=-1)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, len(prompt)):
        row = reference[i - 1]
        assert abs(logprobs.token_logprobs[i] - row[prompt[i]].item()) < TOL, i
        # Keyed by token text, as OpenAI's are: two ids that spell the same text share one key.
        expected_top = row.topk(top).values.tolist() if top else []
        alternatives = logprobs.top_logprobs[i]
        assert (len(alternatives) >= 1) == bool(top) and len(alternatives) <= top
        for value in alternatives.values():
            assert min(abs(value - expected) for expected in expected_top) < TOL


def test_echo_scores_a_long_prompt_as_transformers_does_cached_or_not(served) -> None:
    client, path = served
    prompt = token_prompt(1, 3 * CHUNK + 5)
    for attempt in ("cold", "after a plain request cached the prompt"):
        out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
        [choice] = out.choices
        assert choice.finish_reason == "length" and out.usage.completion_tokens == 0, attempt
        assert len(choice.logprobs.tokens) == len(prompt) and out.usage.prompt_tokens == len(prompt)
        assert_prompt_scored(path, prompt, choice.logprobs, top=3)
        assert out.usage.prompt_tokens_details.cached_tokens == 0, "scoring computes the whole prompt"
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)


def test_echo_with_a_completion_puts_the_prompt_first_and_offsets_run_through(served) -> None:
    client, path = served
    text = "The quick brown fox jumps over the lazy dog. " * 3
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, logprobs=2)
    echoed = client.completions.create(model=MODEL, prompt=text, max_tokens=4, temperature=0, logprobs=2, echo=True)
    [p], [e] = plain.choices, echoed.choices
    assert e.text == text + p.text
    prompt_len = echoed.usage.prompt_tokens
    assert e.logprobs.tokens[prompt_len:] == p.logprobs.tokens
    assert e.logprobs.token_logprobs[prompt_len:] == pytest.approx(p.logprobs.token_logprobs, abs=TOL)
    assert e.logprobs.text_offset[prompt_len:] == [len(text) + offset for offset in p.logprobs.text_offset]
    offsets = e.logprobs.text_offset[:prompt_len]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_a_streamed_echo_reassembles_to_the_whole_answer(served) -> None:
    client, _ = served
    kwargs = dict(model=MODEL, prompt=token_prompt(2, 50), max_tokens=3, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, values = "", [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert values[0] is None and values[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=TOL)


def test_every_choice_of_n_echoes_its_prompt_with_the_same_scores(served) -> None:
    client, _ = served
    prompts = [token_prompt(3, 20), token_prompt(4, 25)]
    out = client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=2, temperature=1.0, seed=5, logprobs=1, echo=True
    )
    assert len(out.choices) == 4
    for choice in out.choices:
        length = len(prompts[choice.index // 2])
        sibling = out.choices[choice.index - choice.index % 2]
        assert choice.logprobs.token_logprobs[:length] == sibling.logprobs.token_logprobs[:length]
        assert len(choice.logprobs.tokens) == length + 2


def test_vllm_prompt_logprobs_in_completions_and_chat(served) -> None:
    client, path = served
    prompt = token_prompt(6, 40)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    scored = out.choices[0].model_extra["prompt_logprobs"]
    reference = hf_logits(path, prompt).log_softmax(dim=-1)
    assert scored[0] is None and len(scored) == len(prompt)
    for i in range(1, len(prompt)):
        entry = scored[i][str(prompt[i])]
        assert abs(entry["logprob"] - reference[i - 1, prompt[i]].item()) < TOL
        assert entry["rank"] == int((reference[i - 1] > reference[i - 1, prompt[i]]).sum()) + 1
        assert {e["rank"] for e in scored[i].values()} >= {1, 2}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )
    chat_scored = chat.model_extra["prompt_logprobs"]
    assert chat_scored[0] is None and len(chat_scored) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in chat_scored[1:])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "hi", "max_tokens": False, "echo": True}, "max_tokens"),
        ("completions", {"prompt": "hi", "echo": "yes"}, "echo"),
        ("completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("completions", {"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs"),
        ("completions", {"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ("completions", {"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2.5},
            "prompt_logprobs",
        ),
    ],
)
def test_bad_scoring_requests_are_400s_naming_the_field(served, path: str, body: dict, param: str) -> None:
    client, _ = served
    response = httpx.post(f"{client.base_url}{path}", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert json.dumps(response.json())  # OpenAI's error JSON
