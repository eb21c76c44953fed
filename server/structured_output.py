"""A request's output constraint, from OpenAI's `response_format` or vLLM's extra parameters.

Accepted (at most one of them per request; two is a 400, since they could contradict):

- OpenAI `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`. The
  schema is always enforced, `strict` or not (as vLLM does): a constrained sampler has no
  "best effort".
- vLLM's current `structured_outputs` object, one of `json` (a schema), `json_object`
  (true), `regex`, `choice` (a list of strings), `grammar` (Lark or GBNF); and its older
  top-level fields `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`. The
  OpenAI SDK sends these through `extra_body`, which puts them at the top level.
  `guided_decoding_backend` and `structured_outputs.backend` name vLLM's engines; they are
  accepted and ignored (we have one).

Every constraint is compiled here without a tokenizer (`Constraint.check`), so a schema
with a keyword llguidance cannot enforce, a bad regex or a grammar error is a 400 naming
the parameter and saying what is wrong, before anything reaches the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from splitinfer.protocol.constraint import Constraint, ConstraintKind
from splitinfer.protocol.errors import ProtocolError, show
from splitinfer.server.errors import bad_request

# vLLM's older top-level names, and the kind each gives.
GUIDED_FIELDS = {
    "guided_json": ConstraintKind.JSON_SCHEMA,
    "guided_regex": ConstraintKind.REGEX,
    "guided_choice": ConstraintKind.CHOICE,
    "guided_grammar": ConstraintKind.GRAMMAR,
}
# `structured_outputs`' keys, and the kind each gives.
STRUCTURED_OUTPUT_KEYS = {
    "json": ConstraintKind.JSON_SCHEMA,
    "json_object": ConstraintKind.JSON_OBJECT,
    "regex": ConstraintKind.REGEX,
    "choice": ConstraintKind.CHOICE,
    "grammar": ConstraintKind.GRAMMAR,
}
IGNORED_STRUCTURED_OUTPUT_KEYS = frozenset({"backend", "disable_any_whitespace", "disable_fallback"})


def parse_constraint(body: Mapping) -> tuple[Constraint | None, str | None]:
    """The request's constraint and the parameter it came from (for errors about it), or
    (None, None). Raises a 400 `APIError` naming the parameter for anything invalid."""
    found: list[tuple[Constraint, str]] = []
    if body.get("response_format") is not None:
        constraint = _response_format(body["response_format"])
        if constraint is not None:
            found.append((constraint, "response_format"))
    if body.get("structured_outputs") is not None:
        found.append(_structured_outputs(body["structured_outputs"]))
    for name, kind in GUIDED_FIELDS.items():
        if body.get(name) is not None:
            found.append((_constraint(kind, body[name], name), name))
    if len(found) > 1:
        names = ", ".join(f"'{param}'" for _, param in found)
        raise bad_request(f"give one output constraint, not several: {names}", param=found[1][1])
    if not found:
        return None, None
    constraint, param = found[0]
    try:
        constraint.check()
    except ProtocolError as exc:
        raise bad_request(f"'{param}': {exc.message}", param=param) from None
    return constraint, param


def schema_constraint(schema: object, param: str) -> Constraint:
    """A JSON-schema constraint from a schema given as an object (or a boolean), checked."""
    constraint = _constraint(ConstraintKind.JSON_SCHEMA, schema, param)
    try:
        constraint.check()
    except ProtocolError as exc:
        raise bad_request(f"'{param}': {exc.message}", param=param) from None
    return constraint


def _response_format(value: object) -> Constraint | None:
    param = "response_format"
    if not isinstance(value, Mapping):
        raise bad_request(
            f"'{param}' must be an object like {{'type': 'json_object'}}, got {_show(value)}", param=param
        )
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        where = f"{param}.json_schema"
        if not isinstance(spec, Mapping):
            raise bad_request(f"'{where}' must be an object with a 'schema', got {_show(spec)}", param=where)
        for key, types, what in (
            ("name", str, "a string"),
            ("description", str, "a string"),
            ("strict", bool, "a boolean"),
        ):
            if spec.get(key) is not None and not isinstance(spec[key], types):
                raise bad_request(f"'{where}.{key}' must be {what}, got {_show(spec[key])}", param=f"{where}.{key}")
        if spec.get("schema") is None:
            raise bad_request(f"'{where}.schema' is required: the JSON schema the output must follow", param=where)
        return _constraint(ConstraintKind.JSON_SCHEMA, spec["schema"], f"{where}.schema")
    raise bad_request(
        f"'{param}.type' must be 'text', 'json_object' or 'json_schema', got {_show(kind)}", param=f"{param}.type"
    )


def _structured_outputs(value: object) -> tuple[Constraint, str]:
    param = "structured_outputs"
    if not isinstance(value, Mapping):
        raise bad_request(f"'{param}' must be an object like {{'json': {{...}}}}, got {_show(value)}", param=param)
    unknown = set(value) - set(STRUCTURED_OUTPUT_KEYS) - IGNORED_STRUCTURED_OUTPUT_KEYS
    if unknown:
        name = sorted(unknown)[0]
        raise bad_request(f"'{param}.{name}' is not supported by this server", param=f"{param}.{name}")
    given = [key for key in STRUCTURED_OUTPUT_KEYS if value.get(key) not in (None, False)]
    if len(given) != 1:
        keys = ", ".join(STRUCTURED_OUTPUT_KEYS)
        raise bad_request(f"'{param}' must set exactly one of {keys}; it sets {len(given)}", param=param)
    key = given[0]
    where = f"{param}.{key}"
    if key == "json_object":
        if value[key] is not True:
            raise bad_request(f"'{where}' must be true, got {_show(value[key])}", param=where)
        return Constraint(ConstraintKind.JSON_OBJECT), where
    return _constraint(STRUCTURED_OUTPUT_KEYS[key], value[key], where), where


def _constraint(kind: ConstraintKind, value: object, param: str) -> Constraint:
    """One constraint of `kind` from the request's value (not yet compiled)."""
    try:
        if kind is ConstraintKind.JSON_SCHEMA:
            if isinstance(value, str):  # vLLM takes a schema as JSON text too
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise bad_request(f"'{param}' is a string but not JSON: {exc}", param=param) from None
            if not isinstance(value, (Mapping, bool)):
                raise bad_request(f"'{param}' must be a JSON schema (an object), got {_show(value)}", param=param)
            return Constraint(kind, json.dumps(value, ensure_ascii=False))
        if kind is ConstraintKind.CHOICE:
            if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
                raise bad_request(f"'{param}' must be a non-empty list of non-empty strings", param=param)
            return Constraint(kind, choices=tuple(value))
        if not isinstance(value, str) or not value:
            raise bad_request(f"'{param}' must be a non-empty string, got {_show(value)}", param=param)
        return Constraint(kind, value)
    except ProtocolError as exc:  # a bound of Constraint's (too many choices)
        raise bad_request(f"'{param}': {exc.message}", param=param) from None


def _show(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {show(value)}"
