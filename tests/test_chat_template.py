"""Chat templates and prompt tokenization in the server, with transformers as the oracle.

The tiny checkpoint's tokenizer files go through `Tokenizer.from_files` as they would
arrive in a HelloReply; transformers loads the same directory and must render and tokenize
every conversation identically.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from conversations import CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, for_transformers

from splitinfer.protocol.chat_template import ChatTemplateError
from splitinfer.protocol.tokenizer import Tokenizer, TokenizerFilesError
from splitinfer.server.chat_template import LLAMA3_CHAT_TEMPLATE, ChatTemplate

BOS, EOS = "<|begin_of_text|>", "<|eot_id|>"
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS}


def checkpoint_files(path: Path) -> dict[str, bytes]:
    """The files a HelloReply carries, read from a checkpoint directory."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    return {name: (path / name).read_bytes() for name in names if (path / name).is_file()}


@functools.lru_cache(maxsize=2)
def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_files(checkpoint_files(tiny_checkpoint))


@pytest.fixture(scope="module")
def checkpoint_template(tiny_checkpoint: Path, tokenizer: Tokenizer) -> ChatTemplate:
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    return ChatTemplate(config["chat_template"], tokenizer.special_tokens_map)


@pytest.fixture(scope="module")
def fallback_template(tokenizer: Tokenizer) -> ChatTemplate:
    template = ChatTemplate.for_model(None, tokenizer)  # a Llama 3 tokenizer: its format is assumed
    assert template is not None
    return template


# Tokenizer ----------------------------------------------------------------------


def test_tokenizer_reads_special_token_names_from_tokenizer_config(tokenizer: Tokenizer) -> None:
    assert tokenizer.bos_token == BOS
    assert tokenizer.eos_token == EOS
    assert tokenizer.special_tokens_map == SPECIAL_TOKENS
    assert tokenizer.add_bos_token is None  # Llama 3 leaves BOS to the post-processor
    assert tokenizer.vocab_size == 512  # the tiny preset's vocabulary, special tokens included


def test_tokenizer_accepts_added_token_objects_in_tokenizer_config(tiny_checkpoint: Path) -> None:
    files = checkpoint_files(tiny_checkpoint)
    config = json.loads(files["tokenizer_config.json"])
    config["bos_token"] = {"content": BOS, "lstrip": False, "normalized": False, "rstrip": False}
    config["add_bos_token"] = True
    files["tokenizer_config.json"] = json.dumps(config).encode()
    tokenizer = Tokenizer.from_files(files)
    assert tokenizer.bos_token == BOS
    assert tokenizer.add_bos_token is True


def test_tokenizer_without_tokenizer_config_has_no_token_names(tiny_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_files({"tokenizer.json": (tiny_checkpoint / "tokenizer.json").read_bytes()})
    assert tokenizer.bos_token is None and tokenizer.eos_token is None
    assert tokenizer.special_tokens_map == {}
    # A chat prompt holds the special tokens its template wrote, and no others.
    assert tokenizer.encode_chat_prompt("hi") == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize(
    ("files", "names"),
    [
        ({}, "tokenizer.json: missing"),
        ({"tokenizer.json": b"{not json"}, "tokenizer.json: does not load"),
        ({"tokenizer.json": b"\xff\xfe"}, "tokenizer.json: not UTF-8"),
    ],
)
def test_tokenizer_refuses_a_missing_or_broken_tokenizer_json(files: dict[str, bytes], names: str) -> None:
    with pytest.raises(TokenizerFilesError, match=names) as info:
        Tokenizer.from_files(files)
    assert info.value.file == "tokenizer.json"


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (b"[1, 2", "not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"bos_token": 7}', "bos_token must be"),
        (b'{"add_bos_token": "yes"}', "add_bos_token must be"),
    ],
)
def test_tokenizer_refuses_a_broken_tokenizer_config(tiny_checkpoint: Path, config: bytes, names: str) -> None:
    files = {"tokenizer.json": (tiny_checkpoint / "tokenizer.json").read_bytes(), "tokenizer_config.json": config}
    with pytest.raises(TokenizerFilesError, match=names) as info:
        Tokenizer.from_files(files)
    assert info.value.file == "tokenizer_config.json"


def test_tokenizer_vocabulary_lookups(tokenizer: Tokenizer) -> None:
    bos_id = tokenizer.token_to_id(BOS)
    assert bos_id is not None and tokenizer.id_to_token(bos_id) == BOS
    assert tokenizer.token_to_id("<|no such token|>") is None
    assert tokenizer.id_to_token(tokenizer.vocab_size) is None
    assert tokenizer.id_to_token(-1) is None


@pytest.mark.parametrize("text", ["Hello world", " café 中文 😀", "<|start_header_id|>user<|end_header_id|>\n\nx", ""])
def test_encode_and_decode_match_transformers(tokenizer: Tokenizer, tiny_checkpoint: Path, text: str) -> None:
    hf = hf_tokenizer(tiny_checkpoint)
    for add_special_tokens in (False, True):
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_prompt_tokens_match_transformers_with_one_bos(
    tokenizer: Tokenizer, checkpoint_template: ChatTemplate, tiny_checkpoint: Path, name: str
) -> None:
    messages = CONVERSATIONS[name]
    ids = tokenizer.encode_chat_prompt(checkpoint_template.render(messages))
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert ids == expected["input_ids"]
    assert ids.count(tokenizer.token_to_id(BOS)) == 1


# ChatTemplate: the checkpoint's template against transformers ---------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_checkpoint_template_renders_like_transformers(
    checkpoint_template: ChatTemplate, tiny_checkpoint: Path, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert checkpoint_template.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_text_parts_are_joined_with_newlines(checkpoint_template: ChatTemplate, tiny_checkpoint: Path) -> None:
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}],
        },
    ]
    joined = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "First part.\nSecond part."}]
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    assert checkpoint_template.render(parts) == expected


@pytest.mark.parametrize("reply", ["The answer is", "  Padded, with a trailing space ", "Two\nlines\n"])
def test_continue_final_message_cuts_like_transformers(
    checkpoint_template: ChatTemplate, tiny_checkpoint: Path, reply: str
) -> None:
    messages = [*CONVERSATIONS["system+user"], {"role": "assistant", "content": reply}]
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    rendered = checkpoint_template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert rendered == expected and rendered.endswith(reply.strip())


@pytest.mark.parametrize(
    ("last", "generation_prompt"),
    [({"role": "assistant", "content": "Sure"}, True), ({"role": "assistant", "content": " "}, False)],
)
def test_continue_final_message_refusals_name_the_field(
    checkpoint_template: ChatTemplate, last: dict, generation_prompt: bool
) -> None:
    messages = [{"role": "user", "content": "Hi"}, last]
    with pytest.raises(ChatTemplateError) as caught:
        checkpoint_template.render(messages, add_generation_prompt=generation_prompt, continue_final_message=True)
    assert caught.value.param == ("continue_final_message" if generation_prompt else "messages")


def test_developer_role_renders_as_system(checkpoint_template: ChatTemplate) -> None:
    as_developer = [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi"}]
    as_system = [{"role": "system", "content": "Rules."}, {"role": "user", "content": "Hi"}]
    assert checkpoint_template.render(as_developer) == checkpoint_template.render(as_system)


def test_extra_message_keys_do_not_reach_the_template(checkpoint_template: ChatTemplate) -> None:
    named = [{"role": "user", "content": "Hi", "name": "ann", "tool_calls": []}]
    assert checkpoint_template.render(named) == checkpoint_template.render([{"role": "user", "content": "Hi"}])


# ChatTemplate: the Llama 3 fallback ---------------------------------------------------------


def test_fallback_template_renders_llama3_format(fallback_template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    )
    assert fallback_template.is_fallback
    assert fallback_template.render(messages, add_generation_prompt=False) == expected
    assert fallback_template.render(messages) == expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_fallback_template_matches_transformers_running_it(
    tiny_checkpoint: Path, fallback_template: ChatTemplate
) -> None:
    messages = CONVERSATIONS["multi-turn"]
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(
        messages, chat_template=LLAMA3_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert fallback_template.render(messages) == expected


def test_fallback_template_renders_tool_use_like_transformers_running_it(
    tiny_checkpoint: Path, fallback_template: ChatTemplate
) -> None:
    # Llama 3's format knows no tools: a tool-only turn is an empty assistant turn, a result a
    # "tool" turn, as transformers renders the same template.
    messages = TOOL_CONVERSATIONS["one call, answered, asked again"]
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template(
        for_transformers(messages),
        tools=TOOLS,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert fallback_template.render(messages, tools=TOOLS) == expected


# ChatTemplate: invalid requests name the field ---------------------------------------------

USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([], "messages", "at least one"),
        ("hello", "messages", "list of messages"),
        ([USER, "hi"], "messages[1]", "must be an object"),
        ([{"content": "Hi"}], "messages[0].role", "must be a string"),
        ([USER, {"role": "robot", "content": "x"}], "messages[1].role", "must be one of"),
        ([USER, {"role": "function", "content": "42"}], "messages[1].role", "'function' role is not supported"),
        ([USER, {"role": "tool", "content": "42"}], "messages[1].tool_call_id", "must be a string"),
        ([{"role": "user"}], "messages[0].content", "missing or null"),
        ([USER, {"role": "assistant", "content": None}], "messages[1].content", "missing or null"),
        (
            [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}],
            "messages[1].tool_calls[0].function",
            "must be an object",
        ),
        ([{"role": "user", "content": 5}], "messages[0].content", "string or a list"),
        (
            [
                USER,
                USER,
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                    ],
                },
            ],
            "messages[2].content[1].type",
            "'image_url' are not supported",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0].type",
            "not supported",
        ),
        ([{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0].type", "must be a string"),
        (
            [{"role": "user", "content": [{"type": "text", "text": None}]}],
            "messages[0].content[0].text",
            "must be a string",
        ),
        ([{"role": "user", "content": ["a"]}], "messages[0].content[0]", "must be an object"),
    ],
)
def test_invalid_messages_are_refused_naming_the_field(
    fallback_template: ChatTemplate, messages: object, param: str, says: str
) -> None:
    with pytest.raises(ChatTemplateError, match=says) as info:
        fallback_template.render(messages)  # type: ignore[arg-type]
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


def test_template_raise_exception_becomes_a_chat_template_error() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
        "{% endif %}{{ messages[0]['content'] }}",
        SPECIAL_TOKENS,
    )
    assert template.render([USER]) == "Hi"
    with pytest.raises(ChatTemplateError, match="must start with a user turn") as info:
        template.render([{"role": "assistant", "content": "Hello"}, USER])
    assert info.value.param == "messages"


def test_templates_run_sandboxed_and_immutable() -> None:
    template = ChatTemplate("{% set _ = messages.append(messages[0]) %}{{ messages | length }}", SPECIAL_TOKENS)
    with pytest.raises(ChatTemplateError) as info:
        template.render([USER])
    assert info.value.param == "messages"
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}", SPECIAL_TOKENS).render([USER])


def test_a_template_that_does_not_compile_is_the_servers_error() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile") as info:
        ChatTemplate("{% for message in messages %}", SPECIAL_TOKENS)
    assert info.value.param is None


def test_template_helpers_are_those_of_transformers() -> None:
    # Llama 3.1 templates date the system prompt with strftime_now, dump tools with tojson
    # (non-ASCII kept), break out of loops, and test `tools is not none`.
    template = ChatTemplate(
        "{{ strftime_now('%Y') }}#{{ {'text': 'é<b>'} | tojson }}#"
        "{% for m in messages %}{{ m['role'] }}{% break %}{% endfor %}#"
        "{% if tools is not none %}tools{% else %}no tools{% endif %}#{{ bos_token }}{{ eos_token }}",
        SPECIAL_TOKENS,
    )
    year, dumped, first_role, tools, tokens = template.render([USER, USER]).split("#")
    assert len(year) == 4 and year.isdigit()
    assert dumped == '{"text": "é<b>"}'
    assert first_role == "user"
    assert tools == "no tools"
    assert tokens == BOS + EOS


def test_blocks_are_trimmed_like_transformers(tiny_checkpoint: Path) -> None:
    source = (
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}"
    )
    expected = hf_tokenizer(tiny_checkpoint).apply_chat_template([USER, USER], chat_template=source, tokenize=False)
    assert (
        ChatTemplate(source, SPECIAL_TOKENS).render([USER, USER], add_generation_prompt=False)
        == expected
        == "[Hi]\n[Hi]\n"
    )
