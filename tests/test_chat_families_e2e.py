"""Chat templates through a real engine process and server, per family: the engine finds the
checkpoint's template (Qwen3's chat_template.jinja, Mistral's list of named templates) or
takes --chat-template's (a file, or inline), sends it in HelloReply, and the server renders
and encodes the prompt exactly as transformers does (`usage.prompt_tokens`), tool calls and
tool results included; a bad tool call is a 400 naming the field. A checkpoint
with no template and no flag gets a 400 on chat and keeps its completions; a template that
cannot work stops the engine at start.

One engine and one server per stack, started when its first test needs it and stopped
before the next stack starts (module-scoped, indirectly parametrized).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FAMILIES
from conversations import TOOL_CONVERSATIONS, for_transformers
from procs import ENGINE, REPO, free_port, start_engine, start_server, stop

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a river. <|im_end|> é 中文"},
    {"role": "assistant", "content": "The Rhine."},
    {"role": "user", "content": " And another?"},
]
# A --chat-template file: plain "role: content" lines, recognisably not the checkpoint's format.
FILE_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
INLINE_TEMPLATE = "{{ messages | map(attribute='content') | join(' / ') }}<|im_start|>assistant\n"


@dataclass(frozen=True)
class Stack:
    checkpoint: Path
    port: int
    template: str | None  # --chat-template's, if given

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=60)

    def model(self) -> str:
        return self.checkpoint.name


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def without_template(path: Path) -> Path:
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


# name: (family, whether its copy loses its template, --chat-template's value: "file", "inline" or None)
STACKS = {
    "qwen3": ("qwen3", False, None),
    "mistral": ("mistral", False, None),
    "qwen2-no-template": ("qwen2", True, None),
    "qwen2-template-file": ("qwen2", True, "file"),
    "qwen3-inline-template": ("qwen3", False, "inline"),
}


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    family, drop_template, option = STACKS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    checkpoint = make_checkpoint(*FAMILIES[family])
    if drop_template:
        checkpoint = without_template(copy_checkpoint(checkpoint, tmp / f"{family}-untemplated"))
    flags: tuple[str, ...] = ()
    template = {"file": FILE_TEMPLATE, "inline": INLINE_TEMPLATE, None: None}[option]
    if option == "file":
        (tmp / "template.jinja").write_text(FILE_TEMPLATE)
        flags = ("--chat-template", str(tmp / "template.jinja"))
    elif option == "inline":
        flags = ("--chat-template", INLINE_TEMPLATE)
    address = f"ipc://{tmp}/engine.sock"
    engine = start_engine(checkpoint, address, tmp / "engine.log", *flags)
    server = None
    try:
        port = free_port()
        server = start_server(address, port, tmp / "server.log")
        yield Stack(checkpoint, port, template)
    finally:
        if server is not None:
            stop(server)
        stop(engine)


@functools.lru_cache(maxsize=8)
def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_chat_ids(path: Path, messages: list[dict], chat_template: str | None = None) -> list[int]:
    ids = hf_tokenizer(path).apply_chat_template(
        messages, chat_template=chat_template, tokenize=True, add_generation_prompt=True
    )
    return list(ids["input_ids"])


def chat_usage(stack: Stack, messages: list[dict]) -> openai.types.CompletionUsage:
    reply = stack.client().chat.completions.create(model=stack.model(), messages=messages, max_tokens=3, temperature=0)
    assert isinstance(reply.choices[0].message.content, str)
    return reply.usage


# The checkpoint's own template ---------------------------------------------------------------


@pytest.mark.parametrize("stack", ["qwen3", "mistral"], indirect=True)
@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:2]], ids=["multi-turn", "user only"])
def test_chat_prompt_is_the_one_transformers_builds(stack: Stack, messages: list[dict]) -> None:
    assert chat_usage(stack, messages).prompt_tokens == len(hf_chat_ids(stack.checkpoint, messages))


@pytest.mark.parametrize("stack", ["mistral"], indirect=True)
def test_a_conversation_the_template_rejects_is_a_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat_usage(stack, [MESSAGES[1], MESSAGES[1]])
    error = info.value.body
    assert error["param"] == "messages" and "must alternate" in error["message"]


@pytest.mark.parametrize("stack", ["qwen3", "mistral"], indirect=True)
@pytest.mark.parametrize("conversation", ["two calls, their results", "one call, answered, asked again"])
def test_a_tool_round_trip_prompt_is_the_one_transformers_builds(stack: Stack, conversation: str) -> None:
    messages = TOOL_CONVERSATIONS[conversation]
    expected = hf_chat_ids(stack.checkpoint, for_transformers(messages))
    assert chat_usage(stack, messages).prompt_tokens == len(expected)


@pytest.mark.parametrize("stack", ["mistral"], indirect=True)
def test_a_bad_tool_call_is_a_400_naming_the_field(stack: Stack) -> None:
    messages = json.loads(json.dumps(TOOL_CONVERSATIONS["one call, its result"]))
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{city: Paris}"
    with pytest.raises(openai.BadRequestError) as info:
        chat_usage(stack, messages)
    assert info.value.body["param"] == "messages[1].tool_calls[0].function.arguments"
    messages[1]["tool_calls"][0]["function"]["arguments"] = "{}"
    messages[1]["tool_calls"][0]["id"] = "call_abc123xyz"  # OpenAI's kind, which Mistral's template refuses
    with pytest.raises(openai.BadRequestError) as info:
        chat_usage(stack, messages)
    assert info.value.body["param"] == "messages" and "length 9" in info.value.body["message"]


# No template -----------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["qwen2-no-template"], indirect=True)
def test_without_a_template_chat_is_refused_and_completions_work(stack: Stack) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{stack.port}/v1/chat/completions",
        json={"model": stack.model(), "messages": MESSAGES[1:2], "max_tokens": 3},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing" and error["type"] == "invalid_request_error"
    assert "--chat-template" in error["message"]
    completion = stack.client().completions.create(model=stack.model(), prompt="Once upon", max_tokens=3)
    assert completion.usage.prompt_tokens == len(hf_tokenizer(stack.checkpoint)("Once upon")["input_ids"])


@pytest.mark.parametrize("stack", ["qwen2-no-template"], indirect=True)
@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_qwen2_stops_on_each_of_its_eos_ids(stack: Stack, eos: str) -> None:
    # config.json names <|im_end|>; generation_config.json adds <|endoftext|>.
    eos_id = hf_tokenizer(stack.checkpoint).convert_tokens_to_ids(eos)
    completion = stack.client().completions.create(
        model=stack.model(), prompt="Once upon", max_tokens=8, temperature=0, logit_bias={str(eos_id): 100}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == 1


# --chat-template ----------------------------------------------------------------------------


@pytest.mark.parametrize("stack", ["qwen2-template-file", "qwen3-inline-template"], indirect=True)
def test_chat_template_flag_replaces_the_checkpoints(stack: Stack) -> None:
    assert stack.template is not None
    expected = hf_chat_ids(stack.checkpoint, MESSAGES, chat_template=stack.template)
    assert chat_usage(stack, MESSAGES).prompt_tokens == len(expected)
    if (stack.checkpoint / "chat_template.jinja").is_file():  # the flag wins over the checkpoint's file
        assert len(expected) != len(hf_chat_ids(stack.checkpoint, MESSAGES))


def broken_checkpoint_template(source: Path, target: Path) -> Path:
    """A copy of `source` whose chat_template.jinja does not compile."""
    path = copy_checkpoint(source, target)
    (path / "chat_template.jinja").write_text("{% for message in messages %}{{ message }}")
    return path


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--chat-template", "no/such/template.jinja"), "no such file"),
        (("--chat-template", "{% for m in messages %}"), "--chat-template: the chat template does not compile"),
        ((), "the chat template does not compile"),
    ],
    ids=["missing file", "inline that does not compile", "checkpoint's does not compile"],
)
def test_a_chat_template_that_cannot_work_stops_the_engine_at_start(
    make_checkpoint: Callable[..., Path], tmp_path: Path, flags: tuple[str, ...], says: str
) -> None:
    checkpoint = make_checkpoint(*FAMILIES["qwen3"])
    if not flags:
        checkpoint = broken_checkpoint_template(checkpoint, tmp_path / "broken")
    run = subprocess.run(
        [*ENGINE, "--model", str(checkpoint), "--address", f"ipc://{tmp_path}/engine.sock", "--device", "cpu", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 2, run.stderr
    assert "cannot start" in run.stderr and says in run.stderr
    if not flags:
        assert "pass one that works with --chat-template" in run.stderr
    assert "ready on" not in run.stderr
