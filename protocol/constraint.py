"""Constrained decoding: what a request's output must match, and the grammar that enforces it.

A `Constraint` travels in `SamplingParams.constraint`. The engine compiles it with
llguidance (Rust; token masks computed on the CPU from the checkpoint's `tokenizer.json`)
and masks every sampled token with it, so the output can only be text the grammar accepts.
Kinds:

- `json_schema`: `value` is a JSON schema (as JSON text); `json_object`: any JSON object;
- `regex`: `value` is a regular expression the whole output matches (Rust regex syntax,
  no look-around or backreferences);
- `choice`: the output is exactly one of `choices`;
- `grammar`: `value` is a context-free grammar in llguidance's Lark dialect or in GBNF
  (llama.cpp's, which vLLM's `guided_grammar` also takes).

JSON is written as `json.dumps` writes it (`", "` and `": "` between items, no other
whitespace): the form models are trained on, and a random model cannot wander off into
endless whitespace. A schema's own `"x-guidance"` options override that.

`check()` compiles the grammar without a tokenizer, so a server can refuse a bad schema
with a 400 (naming the keyword llguidance does not support) before anything reaches the
engine; the engine checks again when a `Generate` arrives.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, ClassVar

import llguidance
from msgspec import Meta

from splitinfer.protocol.errors import ErrorCode, ProtocolError
from splitinfer.protocol.structs import Struct

# The separators json.dumps writes; no whitespace elsewhere (see the module docstring).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'
MAX_CHOICES = 1024


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


class Constraint(Struct, frozen=True, forbid_unknown_fields=True):
    """What the output must match (module docstring). Hashable: the engine caches compiled
    grammars by it."""

    BUILD_ERROR_CODE: ClassVar[ErrorCode] = ErrorCode.INVALID_REQUEST

    kind: ConstraintKind
    value: str = ""  # the schema (JSON text), the regex or the grammar; "" for json_object and choice
    choices: Annotated[tuple[str, ...], Meta(max_length=MAX_CHOICES)] = ()

    def _check(self) -> None:
        if self.kind is ConstraintKind.CHOICE:
            if not self.choices:
                raise self._fail("choices", "must hold at least one string for a choice constraint")
        elif self.choices:
            raise self._fail("choices", f"must be empty for a {self.kind.value} constraint")
        if self.kind in (ConstraintKind.CHOICE, ConstraintKind.JSON_OBJECT):
            if self.value:
                raise self._fail("value", f"must be empty for a {self.kind.value} constraint")
        elif not self.value:
            raise self._fail("value", f"must not be empty for a {self.kind.value} constraint")

    def grammar(self) -> str:
        """llguidance's grammar for this constraint. Raises `ProtocolError` (invalid_request)
        when the value is not even well-formed (a schema that is not JSON)."""
        kind = self.kind
        if kind is ConstraintKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
        if kind is ConstraintKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.value)
            except ValueError as exc:
                raise _invalid(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise _invalid(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if kind is ConstraintKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if kind is ConstraintKind.CHOICE:
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice) for choice in self.choices)
            )
        try:
            return llguidance.grammar_from("grammar", self.value)
        except ValueError as exc:  # GBNF that does not convert
            raise _invalid(str(exc)) from None

    def check(self) -> None:
        """Raise `ProtocolError` (invalid_request) saying what is wrong if llguidance cannot
        compile this constraint (an unsupported schema keyword, a bad regex, a grammar error)."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar())
        if is_error:
            raise _invalid(describe_grammar_error(self.kind, messages[0]))


def describe_grammar_error(kind: ConstraintKind, message: str) -> str:
    """llguidance's message, said in the request's terms."""
    message = message.strip()
    what = {
        ConstraintKind.JSON_SCHEMA: "the JSON schema",
        ConstraintKind.JSON_OBJECT: "the JSON object grammar",
        ConstraintKind.REGEX: "the regular expression",
        ConstraintKind.CHOICE: "the choices",
        ConstraintKind.GRAMMAR: "the grammar",
    }[kind]
    if message.startswith("Unimplemented keys:"):
        keys = message.removeprefix("Unimplemented keys:").strip()
        return f"{what} uses keywords this server cannot enforce: {keys}"
    return f"{what} cannot be compiled: {message}"


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, message, field="constraint")
