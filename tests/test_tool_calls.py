"""Tool-call formats: parsing, streaming under any split, and grammars that llguidance enforces.

The streaming tests hold the parser to its one hard rule: for any text and any split of it,
the events add up to what ``parse`` returns. Texts come from hypothesis, built from the
formats' own pieces (markers, JSON fragments, whitespace) and from valid outputs mutated at
random, so they reach the parser's edge cases. The grammar tests random-walk llguidance's
token masks on tiny checkpoints of three families and parse what comes out.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jsonschema
import llguidance
import pytest
import torch
from conftest import FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer

from splitinfer.engine.grammar import allowed_tokens
from splitinfer.server.tool_calls import (
    TOOL_CALL_FORMAT_NAMES,
    TOOL_CALL_FORMATS,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ParsedOutput,
    StreamEvent,
    ToolCall,
    ToolCallFormat,
    ToolSpec,
    detect_tool_call_format,
)

FUZZ = settings(
    max_examples=120, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
HERMES, LLAMA, MISTRAL = (TOOL_CALL_FORMATS[name] for name in ("hermes", "llama3_json", "mistral"))


def counter_ids() -> Callable[[], str]:
    """Deterministic ids, so that two parses of one text can be compared whole."""
    count = itertools.count()
    return lambda: f"id{next(count)}"


def calls_of(parsed: ParsedOutput) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed.calls]


def stream(
    fmt: ToolCallFormat, pieces: Sequence[str], incremental: bool, **options: object
) -> tuple[ParsedOutput, list[StreamEvent]]:
    parser = fmt.stream_parser(incremental, new_call_id=counter_ids(), **options)
    events = [event for piece in pieces for event in parser.feed(piece)] + parser.finish()
    return ParsedOutput.from_events(events), events


def split_at(text: str, cuts: Sequence[int]) -> list[str]:
    bounds = [0, *sorted(cut % (len(text) + 1) for cut in cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------------------------
# Rendering calls the way each family's model writes them


def render(fmt: ToolCallFormat, calls: Sequence[tuple[str, str]], content: str = "") -> str:
    """An output holding ``calls`` (name, arguments text) in ``fmt``, after ``content``."""
    if fmt is HERMES:
        body = "\n".join(f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>' for n, a in calls)
        return f"{content}\n{body}" if content else body
    if fmt is LLAMA:
        return "<|python_tag|>" + "; ".join(f'{{"name": {json.dumps(n)}, "parameters": {a}}}' for n, a in calls)
    items = ", ".join(f'{{"name": {json.dumps(n)}, "arguments": {a}}}' for n, a in calls)
    return f"{content}[TOOL_CALLS] [{items}]"


ARGUMENTS = [
    "{}",
    '{"city": "Paris", "days": 3}',
    '{"q": "a}b{c]\\"\\\\", "nested": {"list": [1, 2.5, null, true, {"x": []}]}}',
    '{"text": "<tool_call> [TOOL_CALLS] </tool_call> ; {"}',
    '{"emoji": "😀 中文", "esc": "\\u00e9\\n"}',
]


@pytest.mark.parametrize("fmt", TOOL_CALL_FORMATS.values(), ids=TOOL_CALL_FORMAT_NAMES)
@pytest.mark.parametrize("incremental", [False, True])
def test_rendered_calls_parse_back_exactly(fmt: ToolCallFormat, incremental: bool) -> None:
    calls = [(f"tool_{i}", arguments) for i, arguments in enumerate(ARGUMENTS)]
    content = "" if fmt is LLAMA else "Let me look that up."
    parsed = fmt.parse(render(fmt, calls, content), incremental=incremental)
    assert parsed.content == content
    assert calls_of(parsed) == calls


@pytest.mark.parametrize(
    "fmt, text, content, calls",
    [
        # Qwen writes content, then calls separated by newlines; whitespace around calls is framing.
        (
            HERMES,
            'Checking.\n\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\nDone.',
            "Checking.Done.",
            [("f", '{"a": 1}')],
        ),
        # Member order is free and other members are ignored when the region is parsed whole.
        (HERMES, '<tool_call>{"arguments":{},"id":7,"name":"f"}</tool_call>', "", [("f", "{}")]),
        (
            LLAMA,
            '  {"name": "f", "arguments": {"x": 1}} ;{"name": "g", "parameters": {}}',
            "",
            [("f", '{"x": 1}'), ("g", "{}")],
        ),
        # Text after the calls is content, as is a next object not joined by ";".
        (
            LLAMA,
            '{"name": "f", "parameters": {}} {"name": "g", "parameters": {}}',
            '{"name": "g", "parameters": {}}',
            [("f", "{}")],
        ),
        # A closer inside a JSON string does not end the call; an opener that never closes is content.
        (
            HERMES,
            'Use <tool_call> tags: <tool_call>\n{"name": "f", "arguments": {"s": "</tool_call>"}}\n</tool_call>',
            "Use <tool_call> tags:",
            [("f", '{"s": "</tool_call>"}')],
        ),
        (MISTRAL, 'Sure[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "a1b2c3d4e"}]', "Sure", [("f", "{}")]),
        (
            MISTRAL,
            '[TOOL_CALLS]\n [ {"name": "f", "arguments": {}} , {"name": "g", "arguments": {"k": [1]}} ] ok',
            "ok",
            [("f", "{}"), ("g", '{"k": [1]}')],
        ),
    ],
)
def test_parse_examples(fmt: ToolCallFormat, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    parsed = fmt.parse(text)
    assert (parsed.content, calls_of(parsed)) == (content, calls)


@pytest.mark.parametrize(
    "fmt, text",
    [
        (HERMES, '<tool_call>\n{"name": "f", "arguments": {}}\n'),  # never closed
        (HERMES, '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>'),  # not strict JSON
        (HERMES, '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>'),  # arguments not an object
        (HERMES, '<tool_call>{"name": 3, "arguments": {}}</tool_call>'),  # name not a string
        (HERMES, '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        (HERMES, '<tool_call>{"name": "f", "name": "g", "arguments": {}}</tool_call>'),  # duplicate member
        (HERMES, '<tool_call>{"name": "f", "arguments": {}} extra</tool_call>'),
        (HERMES, '<tool_call>{"name": "f", "parameters": {}}</tool_call>'),  # llama's key, not hermes'
        (LLAMA, 'I will call {"name": "f", "parameters": {}}'),  # does not start with "{"
        (LLAMA, '{"name": "f", "parameters": {}, "arguments": {}}'),  # both keys
        (LLAMA, '<|python_tag|>brave_search.call(query="x")'),  # a built-in tool: not ours
        (MISTRAL, '[TOOL_CALLS] {"name": "f", "arguments": {}}'),  # no array
        (MISTRAL, '[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g"}]'),  # one bad call spoils the region
        (MISTRAL, "[TOOL_CALLS] []"),
        (MISTRAL, '[TOOL_CALLS] [{"name": "f", "arguments": {}}'),  # cut short
    ],
)
def test_malformed_regions_are_content(fmt: ToolCallFormat, text: str) -> None:
    assert fmt.parse(text) == ParsedOutput(text, [])


def test_unknown_tool_names_are_content() -> None:
    text = render(HERMES, [("f", "{}"), ("evil", "{}")])
    for incremental in (False, True):
        parsed = HERMES.parse(text, incremental=incremental, allowed_names=frozenset({"f"}))
        assert calls_of(parsed) == [("f", "{}")]
        assert parsed.content == '<tool_call>\n{"name": "evil", "arguments": {}}\n</tool_call>'
    # A Mistral region is one array: an unknown name in it makes all of it content.
    text = render(MISTRAL, [("f", "{}"), ("evil", "{}")])
    assert MISTRAL.parse(text, allowed_names=frozenset({"f"})) == ParsedOutput(text, [])


@pytest.mark.parametrize("fmt", TOOL_CALL_FORMATS.values(), ids=TOOL_CALL_FORMAT_NAMES)
@pytest.mark.parametrize("incremental", [False, True])
def test_parallel_false_keeps_the_first_call_and_drops_the_rest(fmt: ToolCallFormat, incremental: bool) -> None:
    text = render(fmt, [("f", '{"a": 1}'), ("g", "{}"), ("h", "{}")])
    parsed = fmt.parse(text, incremental=incremental, parallel=False)
    assert (parsed.content, calls_of(parsed)) == ("", [("f", '{"a": 1}')])


def test_call_ids_follow_each_format() -> None:
    for fmt, pattern in ((HERMES, r"call_[a-z0-9]{24}"), (LLAMA, r"call_[a-z0-9]{24}"), (MISTRAL, r"[A-Za-z0-9]{9}")):
        parsed = fmt.parse(render(fmt, [("f", "{}"), ("g", "{}")]))
        ids = [call.id for call in parsed.calls]
        assert len(set(ids)) == 2 and all(re.fullmatch(pattern, i) for i in ids), ids


# ---------------------------------------------------------------------------------------------
# Streaming


def test_content_streams_but_a_possible_marker_waits() -> None:
    parser = HERMES.stream_parser(False)
    assert parser.feed("The answer <tool_") == [ContentDelta("The answer")]  # " " may be framing
    assert parser.feed("x is 4") == [ContentDelta(" <tool_x is 4")]
    assert parser.finish() == []
    parser = MISTRAL.stream_parser(False)
    assert parser.feed("Hi [TOOL") == [ContentDelta("Hi")]
    assert parser.finish() == [ContentDelta(" [TOOL")]
    # Llama: only the output's start can be a call, so only it waits.
    parser = LLAMA.stream_parser(False)
    assert parser.feed(" <|python") == []
    assert parser.feed("_tag|>x {") == [ContentDelta(" <|python_tag|>x {")]


def test_auto_mode_holds_a_call_until_it_is_complete() -> None:
    text = 'Hmm. <tool_call>\n{"name": "f", "arguments": {"city": "Oslo"}}\n</tool_call>'
    parser = HERMES.stream_parser(False, new_call_id=counter_ids())
    cut = text.index("</tool_call>")
    assert parser.feed(text[:cut]) == [ContentDelta("Hmm.")]
    assert parser.feed(text[cut:]) == [CallStart(0, "id0", "f"), ArgumentsDelta(0, '{"city": "Oslo"}')]
    assert parser.finish() == []


def test_incremental_mode_streams_arguments_as_they_arrive() -> None:
    parser = MISTRAL.stream_parser(True, allowed_names=frozenset({"f", "g"}), new_call_id=counter_ids())
    assert parser.feed('[TOOL_CALLS] [{"name": "f", "argu') == []
    assert parser.feed('ments": {"ci') == [CallStart(0, "id0", "f"), ArgumentsDelta(0, '{"ci')]
    assert parser.feed('ty": "Oslo"}') == [ArgumentsDelta(0, 'ty": "Oslo"}')]
    # The object's "}" and what follows are framing; the next call starts with its arguments' "{".
    assert parser.feed('}, {"name": "g", "arguments": ') == []
    assert parser.feed("{}}]") == [CallStart(1, "id1", "g"), ArgumentsDelta(1, "{}")]
    assert parser.finish() == []


def test_incremental_mode_keeps_what_it_committed_when_cut_short() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"city": "Os'
    assert HERMES.parse(text, incremental=True).calls[0].arguments == '{"city": "Os'
    # Cut in the framing after the arguments: that text is content.
    parsed = HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}}\n</tool', incremental=True)
    assert (parsed.content, calls_of(parsed)) == ("}\n</tool", [("f", "{}")])


def test_incremental_mode_parses_other_member_orders_whole() -> None:
    text = '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>'
    parser = HERMES.stream_parser(True)
    assert parser.feed(text[:-3]) == []
    assert calls_of(ParsedOutput.from_events(parser.feed(text[-3:]))) == [("f", '{"a": 1}')]


# Pieces that the formats are made of, so random texts often come close to calls.
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "[TOOL", "<|python_tag|>", "<|py",
    '{"name": "f", "arguments": ', '{"name": "g", "parameters": ', '{"arguments": ', '"name": "f"',
    "{", "}", "[", "]", ", ", ": ", "; ", ";", ",", '"', "\\", '\\"', "\\u00e9", "\\u12", "NaN",
    "1", "true", "null", '"x"', '"a}b"', "\n", " ", "  \t", "hello", "é中😀",
]  # fmt: skip
fragment_texts = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join)
cuts = st.lists(st.integers(0, 10_000), max_size=12)
format_names = st.sampled_from(TOOL_CALL_FORMAT_NAMES)
parser_options = st.fixed_dictionaries(
    {"allowed_names": st.sampled_from([None, frozenset({"f"}), frozenset({"f", "g"})]), "parallel": st.booleans()}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
argument_texts = st.builds(
    json.dumps, st.dictionaries(st.text(max_size=5), json_values, max_size=4), ensure_ascii=st.booleans()
)


def outputs_of(name: str) -> st.SearchStrategy[tuple[str, list[tuple[str, str]], str]]:
    """(format name, one to three calls, content) for outputs in format ``name``."""
    calls = st.lists(st.tuples(st.sampled_from(["f", "g", "h"]), argument_texts), min_size=1, max_size=3)
    contents = st.just("") if name == "llama3_json" else st.sampled_from(["", "Sure.", "a <tool_call> b"])
    return st.tuples(st.just(name), calls, contents)


valid_outputs = format_names.flatmap(outputs_of)


def mutate(text: str, edits: Sequence[tuple[int, int, str]]) -> str:
    """Apply (position, deleted length, inserted fragment) edits."""
    for position, deleted, inserted in edits:
        at = position % (len(text) + 1)
        text = text[:at] + inserted + text[at + deleted :]
    return text


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3), st.sampled_from(["", *FRAGMENTS])), max_size=3)
rendered = valid_outputs.map(lambda output: render(TOOL_CALL_FORMATS[output[0]], output[1], output[2]))
texts = fragment_texts | st.builds(mutate, rendered, edits) | st.text(max_size=40)


@FUZZ
@given(name=format_names, text=texts, cuts=st.lists(cuts, min_size=1, max_size=3), options=parser_options)
def test_any_split_streams_what_parse_returns(
    name: str, text: str, cuts: list[list[int]], options: dict[str, object]
) -> None:
    fmt = TOOL_CALL_FORMATS[name]
    for incremental in (False, True):
        whole = fmt.parse(text, incremental=incremental, new_call_id=counter_ids(), **options)
        assert whole == stream(fmt, list(text), incremental, **options)[0]  # character by character
        for cut in cuts:
            streamed, events = stream(fmt, split_at(text, cut), incremental, **options)
            assert streamed == whole
            assert all(event.text for event in events if not isinstance(event, CallStart))
        if not incremental:
            assert all(call.arguments in text for call in whole.calls)
            assert all(isinstance(json.loads(call.arguments), dict) for call in whole.calls)
            if not whole.calls:
                assert whole.content == text  # nothing lost
        if not options["parallel"]:
            assert len(whole.calls) <= 1


@FUZZ
@given(output=valid_outputs)
def test_valid_outputs_parse_back_in_both_modes(output: tuple[str, list[tuple[str, str]], str]) -> None:
    name, calls, content = output
    fmt = TOOL_CALL_FORMATS[name]
    text = render(fmt, calls, content)
    for incremental in (False, True):
        parsed = fmt.parse(text, incremental=incremental)
        assert (parsed.content, calls_of(parsed)) == (content, calls)


# ---------------------------------------------------------------------------------------------
# Detecting the format of a checkpoint


@pytest.mark.parametrize(
    "template, vocabulary, expected",
    [
        (None, {"[TOOL_CALLS]", "[INST]"}, "mistral"),
        ("... <tool_call> ...", set(), "hermes"),
        (None, {"<tool_call>", "<|im_start|>"}, "hermes"),
        (None, {"<|python_tag|>"}, "llama3_json"),
        ("{{ messages }}", {"<|start_header_id|>"}, "llama3_json"),
        (None, {"<s>"}, None),
    ],
)
def test_detect_tool_call_format(template: str | None, vocabulary: set[str], expected: str | None) -> None:
    assert detect_tool_call_format(template, vocabulary.__contains__) == expected


# ---------------------------------------------------------------------------------------------
# Grammars, enforced by llguidance on tiny checkpoints

WALK_SEEDS = 20
MAX_STEPS = 400
ENDING_BOOST = 3.0
TOOLS = [
    ToolSpec(
        "get_weather",
        "Today's weather.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "book_table",
        None,
        {
            "type": "object",
            "properties": {
                "guests": {"type": "integer", "minimum": 1, "maximum": 12},
                "when": {
                    "type": "object",
                    "properties": {
                        "day": {"enum": ["mon", "tue"]},
                        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    },
                    "required": ["day", "hour"],
                    "additionalProperties": False,
                },
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
                "vip": {"type": "boolean"},
            },
            "required": ["guests", "when"],
            "additionalProperties": False,
        },
    ),
    ToolSpec("get_time", None, {"type": "object", "properties": {}, "additionalProperties": False}),
]
FAMILY_FORMATS = {"qwen2": HERMES, "llama": LLAMA, "mistral": MISTRAL}


def tokenizer_with_marker(checkpoint: Path, marker: str | None, tmp_path: Path) -> Path:
    """The checkpoint's tokenizer.json, or a copy with ``marker`` added when it lacks it."""
    path = checkpoint / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    if marker is None or tokenizer.token_to_id(marker) is not None:
        return path
    tokenizer.add_special_tokens([AddedToken(marker, special=True, normalized=False)])
    copy = tmp_path / "tokenizer.json"
    tokenizer.save(str(copy))
    return copy


def random_walk(matcher: llguidance.LLMatcher, n_vocab: int, endings: list[int], seed: int) -> list[int]:
    """Sample tokens from random logits at temperature 1.5 under the grammar's mask. Tokens that
    may end the output (eos, "]") get a head start, so that parallel calls rarely outrun MAX_STEPS."""
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while not matcher.is_stopped() and len(tokens) < MAX_STEPS:
        mask = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[None, :]
        logits = torch.randn(1, n_vocab, generator=generator)
        logits[0, endings] += ENDING_BOOST
        logits.masked_fill_(~allowed_tokens(mask, n_vocab), float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits / 1.5, dim=-1), 1, generator=generator))
        assert matcher.consume_token(token), matcher.get_error()
        tokens.append(token)
    assert matcher.is_stopped(), f"no end in {MAX_STEPS} steps"
    return tokens


@pytest.mark.parametrize("family", FAMILY_FORMATS)
def test_grammars_make_outputs_that_parse_as_valid_calls(
    family: str, make_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    fmt = FAMILY_FORMATS[family]
    checkpoint = make_checkpoint(*FAMILIES[family])
    tokenizer_path = tokenizer_with_marker(checkpoint, fmt.marker_token, tmp_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    config = json.loads((checkpoint / "config.json").read_text())
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    n_vocab = max(config["vocab_size"], tokenizer.get_vocab_size())
    lltokenizer = llguidance.LLTokenizer(tokenizer_path.read_text(), n_vocab=n_vocab, eos_token=eos)
    endings = eos + [i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]).startswith("]")]
    assert detect_tool_call_format(None, lambda token: tokenizer.token_to_id(token) is not None) == fmt.name
    schemas = {tool.name: tool.parameters for tool in TOOLS}
    rng = random.Random(family)
    # Several tools with parallel calls, "required" with one call, a named function.
    for tools, parallel in ((TOOLS, True), (TOOLS, False), (TOOLS[1:2], False)):
        grammar = fmt.grammar(tools, parallel, tokenizer.token_to_id)
        lark = llguidance.LLMatcher.grammar_from_lark(grammar)
        assert llguidance.LLMatcher.validate_grammar_with_warnings(lark, lltokenizer) == (False, [])
        counts = []
        for seed in range(WALK_SEEDS):
            tokens = random_walk(llguidance.LLMatcher(lltokenizer, lark), n_vocab, endings, seed)
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=False)
            parsed = fmt.parse(text)
            assert parsed.content == "", text
            assert len(parsed.calls) >= 1 if parallel else len(parsed.calls) == 1, text
            counts.append(len(parsed.calls))
            for call in parsed.calls:
                assert call.name in {tool.name for tool in tools}
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            # The grammar writes what the incremental parser commits at once, whatever the split.
            allowed = frozenset(tool.name for tool in tools)
            streamed, _ = stream(
                fmt, split_at(text, [rng.randrange(len(text)) for _ in range(8)]), True, allowed_names=allowed
            )
            assert calls_of(streamed) == calls_of(parsed) and streamed.content == ""
        assert max(counts) > 1 if parallel else True, counts


def test_grammar_needs_the_marker_token_and_a_tool() -> None:
    with pytest.raises(ValueError, match=r"\[TOOL_CALLS\]"):
        MISTRAL.grammar(TOOLS, True, lambda token: None)
    with pytest.raises(ValueError, match="at least one tool"):
        HERMES.grammar([], True, lambda token: None)
    # Llama's python tag is optional in the format and never written by the grammar.
    assert "<[" not in LLAMA.grammar(TOOLS, True, lambda token: None)
    # Qwen's markers are written as their added tokens when the vocabulary has them, else as text.
    assert '"<tool_call>"' in HERMES.grammar(TOOLS, True, lambda token: None)
    assert "<[7]>" in HERMES.grammar(TOOLS, True, {"<tool_call>": 7}.get)


def test_schema_keywords_llguidance_lacks_fail_the_grammar() -> None:
    """Never enforced in part: the server refuses such tools with a 400 before building this."""
    tool = ToolSpec("f", None, {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}})
    lark = llguidance.LLMatcher.grammar_from_lark(HERMES.grammar([tool], False, lambda token: None))
    error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(lark)
    assert error and "uniqueItems" in messages[0]


def test_tool_without_parameters_takes_an_empty_object_schema() -> None:
    assert ToolSpec("ping").parameters == {"type": "object", "properties": {}}
    assert (
        ToolCall("id", "ping", "{}") in HERMES.parse(render(HERMES, [("ping", "{}")]), new_call_id=lambda: "id").calls
    )
