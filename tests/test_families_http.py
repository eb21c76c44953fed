"""Every family served end to end: a real engine process (chunked prefill, prefix caching) and
one real HTTP server per family, driven by the official `openai` SDK. Completions of 16 token
prompts sent at once equal transformers' greedy text one prompt at a time; a chat request is
tokenized with the checkpoint's own template exactly as transformers tokenizes it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import FAMILIES
from hf_oracle import hf_greedy
from procs import free_port, start_engine, start_server, stop

from splitinfer.engine import LLM, SamplingParams

NEW_TOKENS = 8
SERVED = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="module", params=SERVED)
def served(request: pytest.FixtureRequest, make_checkpoint, tmp_path_factory) -> Iterator[tuple[Path, openai.OpenAI]]:
    path = make_checkpoint(*FAMILIES[request.param])
    tmp = tmp_path_factory.mktemp(request.param)
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(path, address, tmp / "engine.log", "--max-num-batched-tokens", "48", "--max-num-seqs", "16")
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log")
        yield path, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        if server is not None:
            stop(server)
        stop(engine)


def test_16_concurrent_completions_equal_transformers(served: tuple[Path, openai.OpenAI]) -> None:
    from transformers import AutoTokenizer

    path, client = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(3)
    prefix = [rng.randrange(3, 400) for _ in range(37)]
    prompts = [prefix + [rng.randrange(3, 400) for _ in range(n)] for n in (0, 5, 11, 30, 44, 60, 90, 3)]
    prompts += [[rng.randrange(3, 400) for _ in range(n)] for n in (1, 2, 9, 17, 40, 41, 77, 100)]

    def complete(prompt: list[int]):
        return client.completions.create(
            model=client.models.list().data[0].id,
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            logprobs=0,  # spells out each token
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(complete, prompts))
    for prompt, response in zip(prompts, responses):
        assert response.usage.prompt_tokens == len(prompt)
        assert response.usage.completion_tokens == NEW_TOKENS
        expected = hf_greedy(path, prompt, NEW_TOKENS)
        spelled = [tokenizer.decode([t], skip_special_tokens=False) for t in expected]
        assert response.choices[0].logprobs.tokens == spelled, f"prompt of {len(prompt)}"
        # The text continues the prompt: a SentencePiece decoder strips the leading space of
        # what it decodes alone, so the continuation is what prompt + output decode to beyond
        # the prompt's own text.
        before = tokenizer.decode(prompt, skip_special_tokens=True)
        text = tokenizer.decode(prompt + expected, skip_special_tokens=True).removeprefix(before)
        # A random model may emit byte-fallback tokens that form no UTF-8 character; decoding
        # them at once turns every byte of the run, valid ones too, into U+FFFD, which text
        # decoded as it streams cannot know in advance.
        if "\ufffd" not in text + before:
            assert response.choices[0].text == text, f"prompt of {len(prompt)}"


def test_chat_uses_the_checkpoints_template_as_transformers_does(served: tuple[Path, openai.OpenAI]) -> None:
    from transformers import AutoTokenizer

    path, client = served
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Where is the old stone bridge? Ça va?"},
    ]
    expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected_ids = list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)
    response = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, max_tokens=NEW_TOKENS, temperature=0.0
    )
    assert response.usage.prompt_tokens == len(expected_ids)
    offline = LLM(path, device="cpu", dtype="float32").generate(
        [expected_ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    )[0]
    assert response.choices[0].message.content == tokenizer.decode(offline.token_ids, skip_special_tokens=True)
    assert response.choices[0].finish_reason == offline.finish_reason
