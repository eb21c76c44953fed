"""OpenAI tool calls in three model families' text formats: parsing, streaming, enforcing grammars.

A chat model calls tools by writing text in its family's format. This module turns that text
back into OpenAI ``tool_calls`` (`ToolCallFormat.parse`, or event by event while it streams,
`ToolCallFormat.stream_parser`) and builds the llguidance grammar that makes a model write
well-formed calls (`ToolCallFormat.grammar`, for ``tool_choice`` "required" or a named function).

Formats (`TOOL_CALL_FORMATS`; `detect_tool_call_format` picks one from a checkpoint):

- ``hermes`` (Qwen2/2.5/3, Hermes): each call is
  ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, calls separated by a newline,
  text around them content. Qwen's ``<tool_call>`` and ``</tool_call>`` are plain added tokens.
- ``llama3_json`` (Llama 3.1/3.2 custom tools): ``{"name": "f", "parameters": {...}}`` ("arguments"
  is accepted too), optionally after ``<|python_tag|>``, several separated by ``; ``. As in vLLM,
  an output holds calls only if it starts (after whitespace and the tag) with ``{``; otherwise it
  is all content.
- ``mistral`` (Mistral 7B v0.3, Nemo, Small): ``[TOOL_CALLS]``, optional whitespace, then a JSON
  array of call objects; text before the marker is content. Mistral's chat templates refuse call
  ids that are not exactly 9 letters or digits, so this format makes such ids; the others make
  OpenAI's ``call_`` + 24 characters.

The text parsed is the detokenized output with the special tokens that are markers
(``<|python_tag|>``, ``[TOOL_CALLS]``) written as their text, and without the eos token.

What counts as a call. A *region* is text that a format's marker opens: hermes, from
``<tool_call>`` through the first ``</tool_call>`` outside a JSON string (or up to the next
``<tool_call>``, which makes it malformed); mistral, from ``[TOOL_CALLS]`` through the array's
closing bracket; llama3_json, one object at the start of the output or after a call and ``;``
(text after the last call is content). A region is calls when it is complete and well formed:
strict JSON (no NaN, no duplicate members in a call object), each call object with a string
"name" and an object "arguments" (llama3_json: or "parameters", not both), and a name among
``allowed_names`` when those are given; other members (Mistral's "id") are ignored. Otherwise
the whole region, markers included, is content, so nothing the model wrote is lost. A call's
``arguments`` is its arguments object's text exactly as the model wrote it, a slice of the
output, never re-serialised. Whitespace between content and a call, between calls and after
the last call is the format's framing and is dropped, so an output of calls alone has empty
content. With ``parallel=False`` only the first call is returned; later calls are dropped (they
become neither calls nor content), while malformed regions after it still are content.

Streaming. `ToolStreamParser.feed` takes the text as it arrives and returns events:
`ContentDelta`, `CallStart` (index, id, name) and `ArgumentsDelta` (the next piece of that
call's arguments). For any text and any split of it into deltas the events add up to exactly
what ``parse`` returns: ``parse`` is one parser fed the whole text, so the two share every
decision, ids included (they come from the parser, in call order). Content streams as it
arrives, except a tail that could begin a marker, and whitespace that may turn out to be
framing, which wait until the text after them decides (like stop strings).

Two modes:

- ``incremental=False`` (``tool_choice`` "auto", where the model may write anything): a region is
  held back until it is complete, then becomes one CallStart and one ArgumentsDelta per call,
  or content.
- ``incremental=True`` (a grammar enforces the format): a call is committed as soon as its
  object has opened with ``"name"``, the name of an allowed tool, the arguments key and the
  arguments' ``{``. CallStart goes out then (a grammar forces those few tokens right after the
  name, and a committed call's arguments always begin as an object). The arguments then
  stream as they arrive, nothing held back: everything up to their closing brace is theirs,
  and what follows it is framing. A region that does not open
  that way (another member first, an unknown name) is handled as above. Committed events are
  never taken back: if the output is malformed after that point (under a grammar it can only
  be cut short, by max_tokens), the call keeps the arguments it got, and the text after its
  arguments that does not complete the format is content. ``parse`` in this mode gives the
  same result, since it runs the same parser.

Grammars. `ToolCallFormat.grammar` returns an llguidance Lark grammar that accepts one call (or,
with ``parallel``, one or more) in the format, each object ``{"name": ..., "arguments": ...}``
with the name first, its arguments validated by that tool's parameters schema, and JSON
written with ", " and ": " and no other whitespace: the text the incremental parser commits
earliest. Markers the vocabulary holds as tokens are required as those tokens. A parameters
schema with a keyword llguidance does not implement makes the grammar fail to compile; the
server refuses such tools with a 400 before a grammar is built (`tool_request.py`).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from json.decoder import scanstring

# ---------------------------------------------------------------------------------------------
# Public data


def _no_parameters() -> dict:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function tool of a request; ``parameters`` is its JSON schema (an object's)."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=_no_parameters)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made; ``arguments`` is the arguments object's text as written."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """The next piece of the message's content."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    """A call begins: OpenAI's first tool-call chunk (index, id, name)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    """The next piece of call ``index``'s arguments text."""

    index: int
    text: str


StreamEvent = ContentDelta | CallStart | ArgumentsDelta


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole output: its content and its calls."""

    content: str
    calls: list[ToolCall]

    @classmethod
    def from_events(cls, events: Sequence[StreamEvent]) -> ParsedOutput:
        """Add up a stream's events, as a client that concatenates the chunks would."""
        content: list[str] = []
        calls: list[tuple[str, str, list[str]]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, CallStart):
                calls.append((event.id, event.name, []))
            else:
                calls[event.index][2].append(event.text)
        return cls("".join(content), [ToolCall(i, name, "".join(args)) for i, name, args in calls])


# ---------------------------------------------------------------------------------------------
# Matching a fixed sequence of JSON pieces against text that may still be growing

_JSON_SPACE = " \t\n\r"


class _Status(Enum):
    MATCH = "match"
    PARTIAL = "partial"  # the text ends while it still matches: more text decides
    FAIL = "fail"


class _Piece(Enum):
    SPACE = "space"  # any run of JSON whitespace, possibly empty
    STRING = "string"  # one JSON string; its decoded value is captured


_SPACE = _Piece.SPACE
_STRING = _Piece.STRING


@dataclass(frozen=True, slots=True)
class _Literal:
    """One of ``options`` (none a prefix of another), or nothing when ``optional``."""

    options: tuple[str, ...]
    optional: bool = False


_Step = str | _Literal | _Piece


@dataclass(frozen=True, slots=True)
class _Match:
    status: _Status
    end: int  # where the match ended, or where it stopped
    captures: tuple[str, ...] = ()


_SPACE_RUN = re.compile(r"[ \t\n\r]*")
_STRING_BODY = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_PARTIAL_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?\Z")


def _skip_space(text: str, pos: int) -> int:
    return _SPACE_RUN.match(text, pos).end()


def _string_end(text: str, pos: int) -> int | None:
    """Where the JSON string at ``pos`` ends; None while the text ends inside it, -1 if it is none."""
    body = _STRING_BODY.match(text, pos)
    if body is None:
        return -1
    end = body.end()
    if end == len(text) or _PARTIAL_ESCAPE.match(text, end):
        return None
    return end + 1 if text[end] == '"' else -1


def _match(text: str, pos: int, steps: Sequence[_Step]) -> _Match:
    """Match ``steps`` at ``pos``. PARTIAL means the text may still grow into a match: each
    answer depends only on the text so far, so growing text never changes a MATCH or a FAIL."""
    captures: list[str] = []
    for step in steps:
        if step is _SPACE:
            pos = _skip_space(text, pos)
            continue
        if pos == len(text):
            return _Match(_Status.PARTIAL, pos)
        if step is _STRING:
            end = _string_end(text, pos)
            if end is None:
                return _Match(_Status.PARTIAL, pos)
            if end < 0:
                return _Match(_Status.FAIL, pos)
            captures.append(json.loads(text[pos:end]))
            pos = end
            continue
        literal = step if isinstance(step, _Literal) else _Literal((step,))
        seen = {option: text[pos : pos + len(option)] for option in literal.options}
        full = [option for option, got in seen.items() if got == option]
        if full:
            pos += len(full[0])
        elif any(len(got) < len(option) and option.startswith(got) for option, got in seen.items()):
            return _Match(_Status.PARTIAL, pos)
        elif not literal.optional:
            return _Match(_Status.FAIL, pos)
    return _Match(_Status.MATCH, pos, tuple(captures))


# ---------------------------------------------------------------------------------------------
# Reading whole JSON call objects (a complete region)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _expect(text: str, pos: int, literal: str) -> int:
    if not text.startswith(literal, pos):
        raise ValueError(f"expected {literal!r} at {pos}")
    return pos + len(literal)


def _read_call(text: str, pos: int, argument_keys: tuple[str, ...]) -> tuple[str, str, int]:
    """Read the call object at ``pos``: its name, its arguments' text, where it ends.

    Members are read one by one, not with ``json.loads``, so the arguments' exact span is known.
    Raises ValueError (or RecursionError, for absurd nesting) when it is no call."""
    members: dict[str, tuple[object, int, int]] = {}
    pos = _expect(text, pos, "{")
    while True:
        key, pos = scanstring(text, _expect(text, _skip_space(text, pos), '"'))
        start = _skip_space(text, _expect(text, _skip_space(text, pos), ":"))
        value, pos = _DECODER.raw_decode(text, start)
        if key in members:
            raise ValueError(f"duplicate member {key!r}")
        members[key] = (value, start, pos)
        pos = _skip_space(text, pos)
        if text.startswith("}", pos):
            break
        pos = _expect(text, pos, ",")
    name = members.get("name", (None, 0, 0))[0]
    present = [key for key in argument_keys if key in members]
    if not isinstance(name, str) or len(present) != 1:
        raise ValueError("a call needs a string name and one arguments object")
    arguments, start, end = members[present[0]]
    if not isinstance(arguments, dict):
        raise ValueError("arguments must be an object")
    return name, text[start:end], pos + 1


# ---------------------------------------------------------------------------------------------
# Finding where a JSON value (or a region) ends, in text that arrives in pieces

_BRACKETS = re.compile(r'[\[\]{}"]')
_STRING_STOP = re.compile(r'["\\]')


@dataclass(slots=True)
class _JsonScan:
    """Scans JSON text for its end, skipping strings: the closing bracket of the value that
    starts at ``pos`` or, with markers, the first ``closer`` outside a string (or an ``opener``,
    which ends a region that never closed where the next begins). It resumes where it stopped
    (the text only grows), so a long value costs its length once."""

    pos: int
    closer: str | None = None
    opener: str | None = None
    depth: int = 0
    in_string: bool = False

    def advance(self, text: str) -> int | None:
        """Scan what arrived; return the index just past the end, or None for now."""
        stops = _BRACKETS if self.closer is None else _marker_stops(self.closer, self.opener)
        while True:
            if self.in_string:
                stop = _STRING_STOP.search(text, self.pos)
                if stop is None:
                    self.pos = len(text)
                    return None
                if stop.group() == '"':
                    self.in_string = False
                    self.pos = stop.end()
                elif stop.end() == len(text):  # a backslash whose escaped character is still to come
                    self.pos = stop.start()
                    return None
                else:
                    self.pos = stop.end() + 1
                continue
            stop = stops.search(text, self.pos)
            if stop is None:  # resume where a marker may have begun (no quote lies in between)
                held = max(
                    (_marker_prefix_len(text, marker) for marker in (self.closer, self.opener) if marker), default=0
                )
                self.pos = max(self.pos, len(text) - held)
                return None
            self.pos = stop.end()
            char = stop.group()
            if char == '"':
                self.in_string = True
            elif char == self.closer:
                return self.pos
            elif char == self.opener:
                return stop.start()
            elif char in "[{":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 0:
                    return self.pos


@functools.cache
def _marker_stops(closer: str, opener: str | None) -> re.Pattern[str]:
    return re.compile("|".join(['"', re.escape(closer), *([re.escape(opener)] if opener else [])]))


# ---------------------------------------------------------------------------------------------
# The formats' syntax, as the parser sees it


@dataclass(frozen=True, slots=True)
class _Syntax:
    """Where regions start and how their bodies look: ``ws ("[" ws)? object (ws "," ws object)*
    (ws "]")? (ws closer)?``, the brackets and commas only for a list."""

    opener: str | None  # the marker that opens a region anywhere in content
    closer: str | None  # the marker that ends one (hermes); else its JSON value's end does
    is_list: bool
    argument_keys: tuple[str, ...]
    # Formats without an opener (llama3_json): what may precede a region's "{" at the start of
    # the output, and after a call.
    first_prefix: tuple[_Step, ...] = ()
    chain_prefix: tuple[_Step, ...] = ()

    def object_prefix(self) -> tuple[_Step, ...]:
        """A call object's opening, up to its arguments' "{", with the name captured."""
        keys = _Literal(tuple(json.dumps(key) for key in self.argument_keys))
        return (
            "{",
            _SPACE,
            '"name"',
            _SPACE,
            ":",
            _SPACE,
            _STRING,
            _SPACE,
            ",",
            _SPACE,
            keys,
            _SPACE,
            ":",
            _SPACE,
            "{",
        )

    def first_call_steps(self) -> tuple[_Step, ...]:
        return (_SPACE, *(("[", _SPACE) if self.is_list else ()), *self.object_prefix())

    def next_call_steps(self) -> tuple[_Step, ...]:
        return (_SPACE, "}", _SPACE, ",", _SPACE, *self.object_prefix())

    def end_steps(self) -> tuple[_Step, ...]:
        """What follows the region's last call object."""
        return (*((_SPACE, "]") if self.is_list else ()), *((_SPACE, self.closer) if self.closer else ()))

    def close_steps(self) -> tuple[_Step, ...]:
        """What follows a call's arguments when that call is the region's last."""
        return (_SPACE, "}", *self.end_steps())

    def value_open_steps(self) -> tuple[_Step, ...]:
        return (_SPACE, "[" if self.is_list else "{")


# ---------------------------------------------------------------------------------------------
# The streaming parser


@dataclass(slots=True)
class _Region:
    """A region not (yet) committed: the buffer holds it from its start."""

    body_start: int
    prefix_failed: bool = False  # incremental: its object does not open as a committable call
    scan: _JsonScan | None = None


@dataclass(slots=True)
class _OpenCall:
    """A committed call (incremental mode) whose region is still arriving."""

    index: int | None  # None: dropped (parallel=False)
    scan: _JsonScan
    emitted: int  # the arguments' text up to here has been sent
    arguments_end: int | None = None


class ToolStreamParser:
    """Turns a format's text, delta by delta, into content and call events (module docstring)."""

    def __init__(
        self,
        syntax: _Syntax,
        *,
        incremental: bool,
        allowed_names: frozenset[str] | None,
        parallel: bool,
        new_call_id: Callable[[], str],
    ) -> None:
        self._syntax = syntax
        self._incremental = incremental
        self._allowed = allowed_names
        self._parallel = parallel
        self._new_call_id = new_call_id
        self._buf = ""  # text not yet decided, from the current region's start when in one
        self._events: list[StreamEvent] = []
        self._region: _Region | None = None
        self._call: _OpenCall | None = None
        self._calls = 0  # calls emitted
        # Where a region may begin without an opener (llama3_json); None once content came.
        self._call_prefix: tuple[_Step, ...] | None = syntax.first_prefix if syntax.opener is None else None
        self._space = ""  # trailing whitespace of content, dropped if a call follows
        self._after_call = False  # no content since the last call: leading whitespace is framing

    def feed(self, delta: str) -> list[StreamEvent]:
        """Take the next piece of output; return the events it decides."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """The output is complete: decide everything held back. The parser is done after this."""
        events = self._drain(final=True)
        if self._space and not self._after_call:
            events.append(ContentDelta(self._space))
        self._space = ""
        return events

    def _drain(self, final: bool) -> list[StreamEvent]:
        while self._step(final):
            pass
        events, self._events = self._events, []
        return events

    def _step(self, final: bool) -> bool:
        """Decide what the buffer allows; False when nothing more can be decided yet."""
        if self._call is not None:
            return self._step_call(final)
        if self._region is not None:
            return self._step_region(final)
        return self._step_content(final)

    # Content -----------------------------------------------------------------------------------

    def _step_content(self, final: bool) -> bool:
        syntax, buf = self._syntax, self._buf
        if syntax.opener is not None:
            at = buf.find(syntax.opener)
            if at >= 0:
                return self._open_region(at, at + len(syntax.opener))
            keep = 0 if final else _marker_prefix_len(buf, syntax.opener)
            self._consume_content(len(buf) - keep)
            return False
        if self._call_prefix is not None:
            found = _match(buf, 0, (*self._call_prefix, "{"))
            if found.status is _Status.MATCH:
                return self._open_region(0, found.end - 1)
            if found.status is _Status.PARTIAL and not final:
                return False
            self._call_prefix = None
        self._consume_content(len(buf))
        return False

    def _open_region(self, start: int, body_start: int) -> bool:
        self._consume_content(start)
        self._region = _Region(body_start - start)
        return True

    def _consume_content(self, end: int) -> None:
        """Send ``buf[:end]`` as content, keeping its trailing whitespace until the text after it
        decides whether it is framing."""
        text, self._buf = self._space + self._buf[:end], self._buf[end:]
        body = text.rstrip(_JSON_SPACE)
        self._space = text[len(body) :]
        if body:
            self._events.append(ContentDelta(body.lstrip(_JSON_SPACE) if self._after_call else body))
            self._after_call = False

    # A region not committed ---------------------------------------------------------------------

    def _step_region(self, final: bool) -> bool:
        region = self._region
        if self._incremental and not region.prefix_failed:
            opening = _match(self._buf, region.body_start, self._syntax.first_call_steps())
            if opening.status is _Status.MATCH and self._is_allowed(opening.captures[0]):
                self._region = None
                self._commit(opening.captures[0], opening.end - 1)
                return True
            # Before the opening is decided, even the region's end is not: a closer inside the
            # name string ends an uncommitted region but not a committed call.
            if opening.status is _Status.PARTIAL and not final:
                return False
            region.prefix_failed = True
        end = self._region_end(region, final)
        if end is None:
            return False
        calls = self._read_region(self._buf[region.body_start : end])
        self._region = None
        if calls is None:
            self._call_prefix = None
            self._consume_content(end)
            return True
        for name, arguments in calls:
            index = self._start_call(name)
            if index is not None:
                self._events.append(ArgumentsDelta(index, arguments))
        self._call_prefix = self._syntax.chain_prefix or None
        self._buf = self._buf[end:]
        return True

    def _region_end(self, region: _Region, final: bool) -> int | None:
        """Where the region ends (all of the text, when final and it never ends); None for now."""
        syntax, buf = self._syntax, self._buf
        if region.scan is None and syntax.closer is not None:
            region.scan = _JsonScan(region.body_start, syntax.closer, syntax.opener)
        elif region.scan is None:
            opening = _match(buf, region.body_start, syntax.value_open_steps())
            if opening.status is _Status.FAIL:
                return opening.end
            if opening.status is _Status.MATCH:
                region.scan = _JsonScan(opening.end - 1)
        if region.scan is not None and (end := region.scan.advance(buf)) is not None:
            return end
        return len(buf) if final else None

    def _read_region(self, body: str) -> list[tuple[str, str]] | None:
        """The calls of a complete region's body, or None when it is malformed."""
        syntax = self._syntax
        calls: list[tuple[str, str]] = []
        try:
            pos = _skip_space(body, 0)
            if syntax.is_list:
                pos = _skip_space(body, _expect(body, pos, "["))
            while True:
                name, arguments, pos = _read_call(body, pos, syntax.argument_keys)
                if not self._is_allowed(name):
                    return None
                calls.append((name, arguments))
                pos = _skip_space(body, pos)
                if not (syntax.is_list and body.startswith(",", pos)):
                    break
                pos = _skip_space(body, pos + 1)
        except (ValueError, RecursionError):
            return None
        rest = _match(body, pos, syntax.end_steps())
        return calls if rest.status is _Status.MATCH and rest.end == len(body) else None

    # A committed call (incremental mode) --------------------------------------------------------

    def _commit(self, name: str, arguments_start: int) -> None:
        self._call = _OpenCall(self._start_call(name), _JsonScan(arguments_start), arguments_start)

    def _step_call(self, final: bool) -> bool:
        call, buf = self._call, self._buf
        if call.arguments_end is None:
            end = call.scan.advance(buf)
            sent = end if end is not None else (len(buf) if final else call.scan.pos)
            if sent > call.emitted and call.index is not None:
                self._events.append(ArgumentsDelta(call.index, buf[call.emitted : sent]))
            call.emitted = sent
            if end is None:
                if final:
                    self._end_call(len(buf), complete=True)
                return final
            call.arguments_end = end
        closing = _match(buf, call.arguments_end, self._syntax.close_steps())
        if closing.status is _Status.MATCH:
            self._end_call(closing.end, complete=True)
            return True
        undecided = closing.status is _Status.PARTIAL
        if self._syntax.is_list:
            following = _match(buf, call.arguments_end, self._syntax.next_call_steps())
            if following.status is _Status.MATCH and self._is_allowed(following.captures[0]):
                self._commit(following.captures[0], following.end - 1)
                return True
            undecided = undecided or following.status is _Status.PARTIAL
        if undecided and not final:
            return False
        # What follows the arguments does not complete the format: it is content.
        self._end_call(call.arguments_end, complete=False)
        return True

    def _end_call(self, end: int, complete: bool) -> None:
        self._call = None
        self._call_prefix = (self._syntax.chain_prefix or None) if complete else None
        self._buf = self._buf[end:]

    # Calls ----------------------------------------------------------------------------------------

    def _is_allowed(self, name: str) -> bool:
        return self._allowed is None or name in self._allowed

    def _start_call(self, name: str) -> int | None:
        """Emit a CallStart; return the call's index, or None when parallel=False drops it."""
        self._space = ""
        self._after_call = True
        if self._calls and not self._parallel:
            return None
        index = self._calls
        self._calls += 1
        self._events.append(CallStart(index, self._new_call_id(), name))
        return index


def _marker_prefix_len(text: str, marker: str) -> int:
    """The length of the longest tail of ``text`` that ``marker`` starts with (shorter than it)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


# ---------------------------------------------------------------------------------------------
# The formats

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ID_ALPHABET = string.ascii_letters + string.digits
_OPENAI_ID_ALPHABET = string.ascii_lowercase + string.digits


def openai_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 lowercase letters or digits."""
    return "call_" + "".join(secrets.choice(_OPENAI_ID_ALPHABET) for _ in range(24))


def mistral_call_id() -> str:
    """A call id Mistral's chat templates accept: exactly 9 ASCII letters or digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _lark_string(text: str) -> str:
    return json.dumps(text)


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """One model family's tool-call format: its syntax, its ids and its grammar's framing."""

    name: str
    syntax: _Syntax
    new_call_id: Callable[[], str]
    # The grammar's framing: text pieces around each call object, and between calls.
    call_open: tuple[str, ...] = ()
    call_close: tuple[str, ...] = ()
    separator: str = ""
    marker_token: str | None = None  # the special token the calls start with
    # Framing the vocabulary may hold as single added tokens, which the grammar then requires:
    # the model writes them so, and llguidance treats every added token as special, never as
    # the text it spells.
    added_tokens: frozenset[str] = frozenset()
    # Tokens the parser reads: a detokenizer that skips special tokens must still write these.
    kept_tokens: tuple[str, ...] = ()

    def stream_parser(
        self,
        incremental: bool,
        allowed_names: frozenset[str] | None = None,
        parallel: bool = True,
        new_call_id: Callable[[], str] | None = None,
    ) -> ToolStreamParser:
        """A parser for one output; ``new_call_id`` overrides the format's ids (tests)."""
        return ToolStreamParser(
            self.syntax,
            incremental=incremental,
            allowed_names=allowed_names,
            parallel=parallel,
            new_call_id=new_call_id or self.new_call_id,
        )

    def parse(
        self,
        text: str,
        incremental: bool = False,
        allowed_names: frozenset[str] | None = None,
        parallel: bool = True,
        new_call_id: Callable[[], str] | None = None,
    ) -> ParsedOutput:
        """A whole output's content and calls: exactly what streaming it would give."""
        parser = self.stream_parser(incremental, allowed_names, parallel, new_call_id)
        return ParsedOutput.from_events(parser.feed(text) + parser.finish())

    def grammar(self, tools: Sequence[ToolSpec], parallel: bool, token_id: Callable[[str], int | None]) -> str:
        """An llguidance Lark grammar accepting one call to one of ``tools`` (one or more with
        ``parallel``); ``token_id`` maps a special token's text to its id, or None."""
        if not tools:
            raise ValueError("a tool-call grammar needs at least one tool")
        head: list[str] = []
        if self.marker_token is not None:
            marker = token_id(self.marker_token)
            if marker is None:
                raise ValueError(
                    f"the {self.name} tool-call format starts with the special token {self.marker_token!r}, "
                    "which this tokenizer does not have"
                )
            head.append(f'<[{marker}]> " "?')  # SentencePiece writes a space before the next word
        tail: list[str] = []
        if self.syntax.is_list:
            head.append('"["')
            tail.append('"]"')
        more = [f"({_lark_string(self.separator)} item)*"] if parallel else []
        item = [*self._lark_pieces(self.call_open, token_id), "call", *self._lark_pieces(self.call_close, token_id)]
        key = self.syntax.argument_keys[0]
        schema = {"anyOf": [_call_schema(tool, key) for tool in tools], "x-guidance": _JSON_STYLE}
        return "\n".join(
            [
                f"start: {' '.join([*head, 'item', *more, *tail])}",
                f"item: {' '.join(item)}",
                f"call: %json {json.dumps(schema)}",
            ]
        )

    def _lark_pieces(self, pieces: Sequence[str], token_id: Callable[[str], int | None]) -> list[str]:
        """Lark for framing text: an added token by its id when the vocabulary has it, else the text."""
        lark = []
        for piece in pieces:
            token = token_id(piece) if piece in self.added_tokens else None
            lark.append(_lark_string(piece) if token is None else f"<[{token}]>")
        return lark


def _call_schema(tool: ToolSpec, arguments_key: str) -> dict:
    """One call object's schema; llguidance writes properties in this order, the name first."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: tool.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


HERMES = ToolCallFormat(
    "hermes",
    _Syntax(opener="<tool_call>", closer="</tool_call>", is_list=False, argument_keys=("arguments",)),
    openai_call_id,
    call_open=("<tool_call>", "\n"),
    call_close=("\n", "</tool_call>"),
    separator="\n",
    added_tokens=frozenset({"<tool_call>", "</tool_call>"}),
    kept_tokens=("<tool_call>", "</tool_call>"),
)
LLAMA3_JSON = ToolCallFormat(
    "llama3_json",
    _Syntax(
        opener=None,
        closer=None,
        is_list=False,
        argument_keys=("parameters", "arguments"),
        first_prefix=(_SPACE, _Literal(("<|python_tag|>",), optional=True), _SPACE),
        chain_prefix=(_SPACE, ";", _SPACE),
    ),
    openai_call_id,
    separator="; ",
    kept_tokens=("<|python_tag|>",),
)
MISTRAL = ToolCallFormat(
    "mistral",
    _Syntax(opener="[TOOL_CALLS]", closer=None, is_list=True, argument_keys=("arguments",)),
    mistral_call_id,
    separator=", ",
    marker_token="[TOOL_CALLS]",
    kept_tokens=("[TOOL_CALLS]",),
)
TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {fmt.name: fmt for fmt in (HERMES, LLAMA3_JSON, MISTRAL)}
TOOL_CALL_FORMAT_NAMES: tuple[str, ...] = tuple(TOOL_CALL_FORMATS)


def detect_tool_call_format(chat_template: str | None, vocab_has: Callable[[str], bool]) -> str | None:
    """The format a checkpoint's model writes, judged by its vocabulary and chat template, or
    None. Mistral first: its vocabulary is the most specific sign."""
    if vocab_has("[TOOL_CALLS]"):
        return MISTRAL.name
    if "<tool_call>" in (chat_template or "") or vocab_has("<tool_call>"):
        return HERMES.name
    if vocab_has("<|python_tag|>") or vocab_has("<|start_header_id|>"):
        return LLAMA3_JSON.name
    return None
