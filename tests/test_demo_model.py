"""The demo model (models/demo-model/, trained by scripts/train_demo_model.py on Debian's fortunes):
splitinfer answers chat turns with it in English words, transformers renders its chat template
with one BOS and generates the same greedy tokens, and the directory stays small. Only the
committed checkpoint is used: no training, no download, no Debian package."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import pytest
from conftest import REPO
from hf_oracle import hf_greedy

from splitinfer.engine import LLM, SamplingParams
from splitinfer.protocol.chat_template import find_chat_template
from splitinfer.server.chat_template import ChatTemplate

DEMO = REPO / "models" / "demo-model"
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")  # the training script's word pattern (vocabulary.txt)
MESSAGES = ["Hello!", "Tell me something wise.", "What do you think about computers?"]
MAX_BYTES = 25_000_000
BOS, EOT, END_OF_TEXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(DEMO, device="cpu", dtype="float32") as llm:
        yield llm


@functools.cache
def vocabulary() -> frozenset[str]:
    return frozenset((DEMO / "vocabulary.txt").read_text().split())


def chat_prompt(llm: LLM, message: str) -> list[int]:
    """The prompt tokens of one user message, rendered and encoded as the servers do."""
    assert llm.tokenizer is not None
    template = ChatTemplate.for_model(find_chat_template(DEMO), llm.tokenizer)
    assert template is not None and not template.is_fallback, "the checkpoint ships its own template"
    return llm.tokenizer.encode_chat_prompt(template.render([{"role": "user", "content": message}]))


def test_sampled_replies_are_mostly_words_of_the_training_text(llm: LLM) -> None:
    prompts = [chat_prompt(llm, message) for message in MESSAGES]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.7, seed=7))
    for message, out in zip(MESSAGES, outs):
        words = WORD.findall(out.text.lower())
        known = [word for word in words if word in vocabulary()]
        assert len(words) >= 5, f"{message!r} got a reply of {len(words)} words: {out.text!r}"
        assert len(known) >= 0.7 * len(words), f"{message!r} got non-words: {out.text!r}"


def test_transformers_renders_one_bos_and_generates_the_same_greedy_reply(llm: LLM) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    messages = [{"role": "user", "content": MESSAGES[1]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(rendered["input_ids"] if "input_ids" in rendered else rendered)
    bos = tokenizer.convert_tokens_to_ids(BOS)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert prompt == chat_prompt(llm, MESSAGES[1])
    # Plain encoding gets its BOS from the post-processor, as Llama 3.1's tokenizer does.
    assert tokenizer("Hello").input_ids[0] == bos

    eos = [tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]
    out = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert out.token_ids == hf_greedy(DEMO, prompt, 40, eos=eos)
    assert len(WORD.findall(out.text.lower())) >= 5, out.text


def test_checkpoint_directory_is_under_25_mb() -> None:
    size = sum(path.stat().st_size for path in DEMO.rglob("*") if path.is_file())
    assert size < MAX_BYTES, f"{DEMO} holds {size:,} bytes"
