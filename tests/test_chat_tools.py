"""Tools, tool calls and tool results through the chat template, with transformers as the oracle.

For each tiny checkpoint of conftest.FAMILIES, whose template follows the real family's tool
conventions (Llama 3.1: tools in the first user message, results under ipython; Qwen2.5 and
Qwen3: <tools> in the system turn, <tool_call> and <tool_response> blocks; Mistral v0.3:
[AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]), the server's `ChatTemplate` renders
OpenAI-style requests (arguments as JSON text, content null or absent beside tool calls) byte
for byte as `apply_chat_template(messages, tools=...)` renders the same conversation given the
way transformers takes it (arguments as dicts), and encodes it to the same token ids. Bad tool
calls and tool messages fail naming the field; a conversation the template refuses (Llama's
two calls in a turn, a Mistral id that is not 9 characters long) is the client's error.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jinja2
import pytest
from conftest import FAMILIES
from conversations import PARALLEL_TOOL_CONVERSATIONS, TOOL_CONVERSATIONS, TOOLS, WEATHER_CALL, for_transformers

from splitinfer.protocol.chat_template import ChatTemplateError, compile_chat_template, find_chat_template
from splitinfer.protocol.tokenizer import Tokenizer
from splitinfer.server.chat_template import ChatTemplate, normalize_messages

# Each family's tool tokens: (token, special), as the real tokenizers have them.
TOOL_TOKENS = {
    "llama": [("<|eom_id|>", True), ("<|python_tag|>", True)],
    "qwen2": [("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False)],
    "qwen3": [("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False)],
    "mistral": [
        ("[AVAILABLE_TOOLS]", True),
        ("[/AVAILABLE_TOOLS]", True),
        ("[TOOL_CALLS]", True),
        ("[TOOL_RESULTS]", True),
        ("[/TOOL_RESULTS]", True),
    ],
}
# The tokens each family's prompt holds once tools, a call and its result are in it.
PROMPT_TOOL_TOKENS = {
    "llama": ["<|start_header_id|>"],  # custom tools need no tokens of their own; ipython is a header
    "qwen2": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    "qwen3": ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
    "mistral": ["[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
}
USER = {"role": "user", "content": "Weather?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]}


def family(name: str) -> str:
    """The model family a conftest.FAMILIES checkpoint is made with (qwen2-sliding: qwen2)."""
    args = FAMILIES[name]
    return args[args.index("--family") + 1]


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    return {name: make_checkpoint(*args) for name, args in FAMILIES.items()}


@functools.lru_cache(maxsize=16)
def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=16)
def served_template(path: Path) -> ChatTemplate:
    """The template as a server builds it from the engine's HelloReply (model_context.py)."""
    template = ChatTemplate.for_model(find_chat_template(path), Tokenizer.from_dir(path))
    assert template is not None
    return template


def hf_render(path: Path, messages: list[dict], tools: list[dict] | None, **kwargs: object) -> str:
    return hf_tokenizer(path).apply_chat_template(
        for_transformers(messages), tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
    )


def hf_ids(path: Path, messages: list[dict], tools: list[dict] | None) -> list[int]:
    ids = hf_tokenizer(path).apply_chat_template(
        for_transformers(messages), tools=tools, tokenize=True, add_generation_prompt=True
    )
    return list(ids["input_ids"])


def refused(name: str, conversation: str) -> bool:
    return family(name) == "llama" and conversation in PARALLEL_TOOL_CONVERSATIONS


# The checkpoints' vocabularies ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_has_its_tool_tokens_as_transformers_reads_them(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    tokenizer, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 512  # the tiny preset's, whatever the tool tokens took
    assert tokenizer.vocab_size <= config["vocab_size"]
    for token, is_special in TOOL_TOKENS[family(name)]:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None and token_id == hf.convert_tokens_to_ids(token), token
        assert tokenizer.encode(f"a {token} b", add_special_tokens=False).count(token_id) == 1
        assert hf.added_tokens_decoder[token_id].special == is_special, token
        text = f"x{token}y"
        ids = tokenizer.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_llama_stops_at_eom_as_llama_31_does(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama"]
    tokenizer = Tokenizer.from_dir(path)
    eos = json.loads((path / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]


# Rendering and token ids, per family -------------------------------------------------------------


@pytest.mark.parametrize("with_tools", [True, False], ids=["tools", "no tools"])
@pytest.mark.parametrize("conversation", sorted(TOOL_CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tool_conversations_render_like_transformers(
    checkpoints: dict[str, Path], name: str, conversation: str, with_tools: bool
) -> None:
    path, messages = checkpoints[name], TOOL_CONVERSATIONS[conversation]
    tools = TOOLS if with_tools else None
    if refused(name, conversation):
        with pytest.raises(jinja2.TemplateError, match="only supports single tool-calls"):
            hf_render(path, messages, tools)
        with pytest.raises(ChatTemplateError, match="only supports single tool-calls") as info:
            served_template(path).render(messages, tools=tools)
        assert info.value.param == "messages"
        return
    rendered = served_template(path).render(messages, tools=tools)
    assert rendered == hf_render(path, messages, tools)
    if with_tools:
        assert "get_weather" in rendered and "The city's name" in rendered


@pytest.mark.parametrize(
    ("name", "conversation"),
    [(name, c) for name in sorted(FAMILIES) for c in sorted(TOOL_CONVERSATIONS) if not refused(name, c)],
)
def test_tool_prompt_ids_equal_transformers(checkpoints: dict[str, Path], name: str, conversation: str) -> None:
    path, messages = checkpoints[name], TOOL_CONVERSATIONS[conversation]
    tokenizer = Tokenizer.from_dir(path)
    ids = tokenizer.encode_chat_prompt(served_template(path).render(messages, tools=TOOLS))
    assert ids == hf_ids(path, messages, TOOLS)
    if conversation == "one call, its result":
        for token in PROMPT_TOOL_TOKENS[family(name)]:
            assert tokenizer.token_to_id(token) in ids, token


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_the_templates_options_work_with_tools(checkpoints: dict[str, Path], name: str) -> None:
    # Qwen3's enable_thinking and Llama 3.1's tools_in_user_message, which a request cannot
    # set: passed as transformers passes template kwargs, to our environment running the
    # served template on the messages the server would give it.
    path = checkpoints[name]
    messages = TOOL_CONVERSATIONS["system, one call with text, result in parts"]
    option = {"qwen3": {"enable_thinking": False}, "llama": {"tools_in_user_message": False}}[name]
    expected = hf_render(path, messages, TOOLS, **option)
    assert expected != hf_render(path, messages, TOOLS)
    source = find_chat_template(path)
    assert source is not None
    rendered = compile_chat_template(source).render(
        messages=normalize_messages(messages),
        tools=TOOLS,
        add_generation_prompt=True,
        **option,
        **Tokenizer.from_dir(path).special_tokens_map,
    )
    assert rendered == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_no_tools_and_an_empty_tool_list_render_alike(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    messages = TOOL_CONVERSATIONS["user only"]
    plain = served_template(path).render(messages)
    assert served_template(path).render(messages, tools=[]) == plain == hf_render(path, messages, None)
    assert plain != served_template(path).render(messages, tools=TOOLS)


def test_the_template_sees_what_transformers_passes(checkpoints: dict[str, Path]) -> None:
    # Null keys left out (a tool-only turn has no content), arguments as dicts, tool_call_id and
    # name passed on, tools as sent.
    source = "{{ messages | tojson(sort_keys=True) }}#{{ tools | tojson(sort_keys=True) }}"
    path = checkpoints["qwen2"]
    tokenizer = Tokenizer.from_dir(path)
    template = ChatTemplate(source, tokenizer.special_tokens_map)
    for conversation in ("one call, its result", "two calls, their results"):
        messages = TOOL_CONVERSATIONS[conversation]
        rendered = template.render(messages, tools=TOOLS)
        assert rendered == hf_render(path, messages, TOOLS, chat_template=source)
        seen = json.loads(rendered.split("#")[0])
        assert "content" not in seen[1] and seen[1]["tool_calls"][0]["function"]["arguments"]["days"] == 2
        assert seen[2]["tool_call_id"] == "a1b2c3d4e"
    assert seen[3]["name"] == "get_time"


# Mistral's tool call ids -------------------------------------------------------------------------


@pytest.mark.parametrize("call_id", ["call_abc123xyz", "abc", ""])
@pytest.mark.parametrize("where", ["tool_calls", "tool_call_id"])
def test_mistral_refuses_call_ids_that_are_not_9_characters(
    checkpoints: dict[str, Path], where: str, call_id: str
) -> None:
    path = checkpoints["mistral"]
    messages = copy.deepcopy(TOOL_CONVERSATIONS["one call, its result"])
    if where == "tool_calls":
        messages[1]["tool_calls"][0]["id"] = call_id
    else:
        messages[2]["tool_call_id"] = call_id
    says = "Tool call IDs should be alphanumeric strings with length 9"
    with pytest.raises(jinja2.TemplateError, match=says):
        hf_render(path, messages, TOOLS)
    with pytest.raises(ChatTemplateError, match=says) as info:
        served_template(path).render(messages, tools=TOOLS)
    assert info.value.param == "messages"


def test_mistral_takes_9_alphanumeric_call_ids(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["mistral"]
    messages = copy.deepcopy(TOOL_CONVERSATIONS["one call, its result"])
    messages[1]["tool_calls"][0]["id"] = messages[2]["tool_call_id"] = "Z9y8X7w6V"
    rendered = served_template(path).render(messages, tools=TOOLS)
    assert rendered == hf_render(path, messages, TOOLS)
    assert '"id": "Z9y8X7w6V"}]</s>[TOOL_RESULTS]' in rendered and '"call_id": "Z9y8X7w6V"}' in rendered


# Invalid tool calls and tool messages name the field -----------------------------------------------


def _call(**changes: object) -> dict:
    """WEATHER_CALL with fields changed (name and arguments are its function's); None removes one."""
    call = copy.deepcopy(WEATHER_CALL)
    for key, value in changes.items():
        fields = call["function"] if key in ("name", "arguments") else call
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    return call


def _called(*calls: object, content: object = None) -> list[dict]:
    """A user's question and an assistant turn making `calls`."""
    return [USER, {"role": "assistant", "content": content, "tool_calls": list(calls)}]


def _answered(**fields: object) -> list[dict]:
    """A question, a call, and a tool message with `fields` changed (None removes one)."""
    tool = {"role": "tool", "content": "18 C", "tool_call_id": "a1b2c3d4e"} | fields
    return [USER, CALLED, {key: value for key, value in tool.items() if value is not None}]


CALL = "messages[1].tool_calls[0]"
ARGS = f"{CALL}.function.arguments"
INVALID_MESSAGES = {
    # case: (messages, param, what the message says)
    "tool_calls not a list": (
        [USER, {"role": "assistant", "tool_calls": WEATHER_CALL}],
        "messages[1].tool_calls",
        "a list",
    ),
    "a call not an object": (_called("get_weather"), CALL, "must be an object"),
    "id missing": (_called(_call(id=None)), f"{CALL}.id", "must be a string"),
    "id not a string": (_called(_call(id=7)), f"{CALL}.id", "must be a string"),
    "type not function": (_called(_call(type="code")), f"{CALL}.type", "must be 'function'"),
    "function missing": (_called(_call(function=None)), f"{CALL}.function", "must be an object"),
    "name missing": (_called(_call(name=None)), f"{CALL}.function.name", "must be a string"),
    "the second call's name not a string": (
        _called(WEATHER_CALL, _call(name=5)),
        "messages[1].tool_calls[1].function.name",
        "must be a string",
    ),
    "arguments missing": (_called(_call(arguments=None)), ARGS, "must be a string holding a JSON object"),
    "arguments an object, not text": (_called(_call(arguments={"city": "Paris"})), ARGS, "must be a string"),
    "arguments not JSON": (_called(_call(arguments="city=Paris")), ARGS, "not JSON"),
    "arguments empty": (_called(_call(arguments="")), ARGS, "not JSON"),
    "arguments with NaN": (_called(_call(arguments='{"x": NaN}')), ARGS, "NaN is not a JSON value"),
    "arguments a JSON list": (_called(_call(arguments="[1, 2]")), ARGS, "JSON of type list"),
    "arguments deeper than a body may be": (
        _called(_call(arguments='{"a": ' + "[" * 200 + "]" * 200 + "}")),
        ARGS,
        "nested too deeply",
    ),
    "arguments deeper than the parser goes": (_called(_call(arguments="[" * 100_000)), ARGS, "nested too deeply"),
    "arguments with a lone surrogate": (_called(_call(arguments='{"city": "\\udcff"}')), ARGS, "lone surrogate"),
    "no content and no calls": (_called(), "messages[1].content", "missing or null"),
    "tool calls on a user message": (
        [{"role": "user", "content": "Hi", "tool_calls": [WEATHER_CALL]}],
        "messages[0].tool_calls",
        "only assistant messages",
    ),
    "legacy function_call": (
        [USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}],
        "messages[1].function_call",
        "legacy function_call",
    ),
    "tool message without tool_call_id": (_answered(tool_call_id=None), "messages[2].tool_call_id", "must be a string"),
    "tool_call_id not a string": (_answered(tool_call_id=1), "messages[2].tool_call_id", "must be a string"),
    "tool message without content": (_answered(content=None), "messages[2].content", "missing or null"),
    "tool message with an image": (
        _answered(content=[{"type": "image_url", "image_url": {"url": "x"}}]),
        "messages[2].content[0].type",
        "not supported",
    ),
    "tool name not a string": (_answered(name=["get_weather"]), "messages[2].name", "must be a string"),
    "legacy function role": ([USER, {"role": "function", "name": "f", "content": "42"}], "messages[1].role", "legacy"),
    "ipython role": ([USER, {"role": "ipython", "content": "42"}], "messages[1].role", "send them as 'tool' messages"),
}
INVALID_TOOLS = {
    # case: (tools, param, what the message says)
    "not a list": ({"type": "function"}, "tools", "must be a list"),
    "a tool not an object": (["get_weather"], "tools[0]", "must be an object"),
    "a tool not a function": ([{"type": "code_interpreter"}], "tools[0].type", "must be 'function'"),
    "a tool without a function": ([{"type": "function"}], "tools[0].function", "must be an object"),
    "a function without a name": (
        [TOOLS[0], {"type": "function", "function": {"description": "x"}}],
        "tools[1].function.name",
        "must be a string",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID_MESSAGES))
def test_invalid_tool_use_is_refused_naming_the_field(checkpoints: dict[str, Path], case: str) -> None:
    messages, param, says = INVALID_MESSAGES[case]
    with pytest.raises(ChatTemplateError, match=says) as info:
        served_template(checkpoints["qwen2"]).render(messages, tools=TOOLS)
    assert info.value.param == param


@pytest.mark.parametrize("case", sorted(INVALID_TOOLS))
def test_invalid_tools_are_refused_naming_the_field(checkpoints: dict[str, Path], case: str) -> None:
    tools, param, says = INVALID_TOOLS[case]
    with pytest.raises(ChatTemplateError, match=says) as info:
        served_template(checkpoints["qwen2"]).render([USER], tools=tools)
    assert info.value.param == param


def test_a_checkpoints_tool_use_template_renders_requests_with_tools(checkpoints, tmp_path: Path) -> None:
    """A checkpoint with named templates ("default" and "tool_use", as Hermes-2-Pro ships them):
    transformers renders a call with tools through "tool_use" and one without through
    "default"; the engine serves both in its HelloReply and the server picks as transformers."""
    import shutil

    from splitinfer.engine.config import EngineConfig
    from splitinfer.engine.service import served_chat_template, served_tool_chat_template
    from splitinfer.protocol import HelloReply
    from splitinfer.protocol.tokenizer import read_tokenizer_files
    from splitinfer.server.model_context import ModelContext

    path = tmp_path / "named"
    shutil.copytree(checkpoints["qwen2"], path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    default = config["chat_template"]
    tool_use = "{{ 'TOOLS: ' + (tools | map(attribute='function.name') | join(',')) + '\\n' }}" + default
    config["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]
    config_file.write_text(json.dumps(config))

    engine_config = EngineConfig(model=str(path))
    assert served_chat_template(engine_config) == default
    assert served_tool_chat_template(engine_config) == tool_use
    assert served_tool_chat_template(EngineConfig(model=str(path), chat_template=default)) is None
    reply = HelloReply(
        engine_id="e",
        model_name="m",
        max_model_len=2048,
        vocab_size=512,
        eos_token_ids=[1],
        chat_template=served_chat_template(engine_config),
        tokenizer_files=read_tokenizer_files(path),
        kv_capacity_tokens=0,
        block_size=16,
        lease_s=5.0,
        tool_chat_template=served_tool_chat_template(engine_config),
    )
    context = ModelContext.from_hello(reply, None)
    hf = hf_tokenizer(path)
    messages = [USER]
    for tools in (TOOLS, None):
        expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert expected.startswith("TOOLS: ") == (tools is not None)
        assert context.chat_prompt(messages, tools) == context.tokenizer.encode_chat_prompt(expected)
