"""The base of every protocol type, and how a failed check becomes a `ProtocolError`.

A `Struct` is a frozen `msgspec.Struct` that refuses unknown fields. Its field types carry
their bounds (`fields.py`); what a type cannot say (one field against another) is the
class's `_check`, which raises `FieldError`. Both are enforced whichever way a value is made:

- **decoded** (`codec.decode`): msgspec checks the types and bounds in C, then calls
  `__post_init__`, which runs `_check`. The decoder marks itself `trusted()` so that
  nothing is checked twice.
- **built** by a caller: `__post_init__` passes the fields through `msgspec.convert`, the
  same checks as decoding, and keeps the normalised values (a list becomes a tuple, an int
  given for a float a float, a string given for an enum its member). A sender's bug raises
  where it is made.

`Outputs` (built once per client per step) sets `VALIDATE_ON_BUILD = False`: its `_check`
covers what the engine can get wrong at run time; its entries (`RequestOutput`,
`TokenLogprobs`, built per request per step) are plain msgspec Structs with a lean
`__post_init__` of their own, for the same reason. Their field types are the engine's own
code's, and the receiver's decoder checks them all.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import ClassVar

import msgspec
import msgspec.inspect
from msgspec.structs import asdict, force_setattr

from splitinfer.protocol.errors import ErrorCode, ProtocolError, show

_TRUSTED: ContextVar[bool] = ContextVar("splitinfer_protocol_trusted", default=False)


class FieldError(ProtocolError):
    """A rule across fields failed (`_check`): `field` (a name of the struct) and `problem`."""

    def __init__(self, owner: str, field: str, problem: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(code, f"{owner}.{field} {problem}" if owner else f"{field} {problem}", field=field)
        self.problem = problem


class Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    VALIDATE_ON_BUILD: ClassVar[bool] = True
    # The code of an error building this type directly (SamplingParams: the request's values),
    # and whether its message starts with the type's name ("Hello.pid ..." but "top_p ...").
    BUILD_ERROR_CODE: ClassVar[ErrorCode] = ErrorCode.BAD_MESSAGE
    NAMED_IN_ERRORS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.VALIDATE_ON_BUILD and not _TRUSTED.get():
            _validate(self)  # the checked copy ran _check
        else:
            self._check()

    def _check(self) -> None:
        """Rules across fields, which the field types cannot carry; raise with `_fail`."""

    def _fail(self, field: str, problem: str) -> FieldError:
        return FieldError(type(self).__name__ if self.NAMED_IN_ERRORS else "", field, problem, self.BUILD_ERROR_CODE)


def building() -> bool:
    """Whether the struct being initialised is built by a caller (not decoded or converted)."""
    return not _TRUSTED.get()


@contextlib.contextmanager
def trusted() -> Iterator[None]:
    """Within: structs being built are being decoded (or converted), already checked."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _validate(obj: Struct) -> None:
    cls = type(obj)
    try:
        with trusted():
            checked = msgspec.convert(asdict(obj), cls)
    except msgspec.ValidationError as exc:
        code = cls.BUILD_ERROR_CODE
        classify = lambda field, kind: ErrorCode.BAD_MESSAGE if kind == "shape" else code  # noqa: E731
        raise from_validation_error(exc, cls, obj, classify) from None
    for name in cls.__struct_fields__:
        value = getattr(checked, name)
        if isinstance(value, msgspec.Struct) and type(getattr(obj, name)) is not type(value):
            # convert() builds a nested struct from a map; a caller passing a map has a bug.
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"{cls.__name__}.{name} must be a {type(value).__name__}, got {type(getattr(obj, name)).__name__}",
                field=name,
            )
        force_setattr(obj, name, value)


# msgspec's error text -> ours ----------------------------------------------------------

_LOCATION = re.compile(r"^(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.S)
_FIELD_NAMED = re.compile(r"^Object (?P<kind>missing required|contains unknown) field `(?P<name>[^`]*)`$")
_TYPE_NAME = re.compile(r"`([^`]*)`")
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "array": "a list",
    "object": "a map",
    "bytes": "bytes",
    "null": "nil",
}
_NOT_FOUND = object()


Classify = Callable[[str | None, str], ErrorCode]  # (field, kind) -> the error's code


def from_validation_error(
    exc: msgspec.ValidationError, cls: type[Struct], root: object, classify: Classify
) -> ProtocolError:
    """One `ProtocolError` naming the field (`params.top_p`, `prompt_token_ids`) for a
    msgspec validation error about `root` (a `cls` or its raw map). `classify` picks the
    code from the field and the kind of failure: "shape" (a field missing or unknown),
    "type" (a value of the wrong type) or "value" (a value out of bounds, or a failed
    `_check`)."""
    match = _LOCATION.match(str(exc))
    what, path = match.group("what"), match.group("path") or ""
    steps = [step for step in re.split(r"\.|\[(?:\d+|\.\.\.)\]", path) if step]
    shown_path = path.lstrip(".")
    named = _FIELD_NAMED.match(what)
    cause = exc.__cause__
    if named:
        steps.append(named.group("name"))
        shown_path = f"{shown_path}.{named.group('name')}".lstrip(".")
        problem = "is missing" if named.group("kind").startswith("missing") else "is not a known field"
        kind = "shape"
    elif isinstance(cause, FieldError):
        steps.append(cause.field)
        shown_path = f"{shown_path}.{cause.field}".lstrip(".")
        problem, kind = cause.problem, "value"
    else:
        kind = "type" if ", got " in what or what.startswith("Invalid") else "value"
        value = _lookup(root, path) if not match.group("key") else _NOT_FOUND
        expected = (
            _expected(_leaf(cls, path, key=bool(match.group("key"))))
            if kind != "type" or what.startswith("Invalid")
            else None
        )
        problem = _problem(what, value, expected)
    field = ".".join(steps) or None
    where = cls.__name__ if cls.NAMED_IN_ERRORS else ""
    subject = ".".join(part for part in (where, shown_path) if part) or "the message"
    if match.group("key"):
        subject += " has a key that"
    return ProtocolError(classify(field, kind), f"{subject} {problem}", field=field)


def _problem(what: str, value: object, expected: str | None) -> str:
    """msgspec's "Expected `int` >= 0" as "must be an integer >= 0, got -3", or with what
    the field's type says "must be in [0, 100], got 101", "must be one of 'a', 'b', got 'c'"."""
    if expected is not None:
        return f"must be {expected}" + (f", got {show(value)}" if value is not _NOT_FOUND else "")
    if what.startswith("Expected "):
        expected, _, got = what[len("Expected ") :].partition(", got ")
        text = "must be " + _TYPE_NAME.sub(
            lambda m: " or ".join(_NOUNS.get(t, t) for t in m.group(1).split(" | ")), expected
        )
        if value is not _NOT_FOUND:
            return f"{text}, got {show(value)}"
        return f"{text}, got {_TYPE_NAME.sub(lambda m: _NOUNS.get(m.group(1), m.group(1)), got)}" if got else text
    if what.startswith(("Invalid enum value", "Invalid value")):
        return "has an invalid value " + what.split("value ", 1)[1]
    if what == "Number out of range":  # past what a float or int64 holds, before any bound was compared
        return "must be a number in range" + (f", got {show(value)}" if value is not _NOT_FOUND else "")
    return what


def _leaf(cls: type[Struct], path: str, key: bool) -> object:
    """The msgspec type (`msgspec.inspect`) of the value at `path` in `cls` (of its key if
    `key`), or None when the path leads nowhere known."""
    node: object = _type_info(cls)
    for name, _ in re.findall(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]", path):
        node = value_type(node)
        if name:
            if not isinstance(node, msgspec.inspect.StructType):
                return None
            node = next((f.type for f in node.fields if f.name == name), None)
        elif isinstance(node, msgspec.inspect.DictType):
            node = node.value_type
        elif isinstance(node, (msgspec.inspect.VarTupleType, msgspec.inspect.ListType)):
            node = node.item_type
        else:
            return None
    node = value_type(node)
    if key and isinstance(node, msgspec.inspect.DictType):
        node = value_type(node.key_type)
    return node


def _expected(node: object) -> str | None:
    """What a value must be, said the way a person reads it: "in [0, 100]" for a number
    bounded at both ends, "one of 'a', 'b'" for a choice; None for anything else."""
    if isinstance(node, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(map(repr, node.values))
    if isinstance(node, msgspec.inspect.EnumType):
        return "one of " + ", ".join(repr(member.value) for member in node.cls)
    if not isinstance(node, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        return None
    low, high = node.ge if node.ge is not None else node.gt, node.le if node.le is not None else node.lt
    if low is None or high is None:
        return None
    text = lambda bound: str(bound) if isinstance(bound, int) else f"{bound:g}"  # noqa: E731
    return f"in {'[' if node.ge is not None else '('}{text(low)}, {text(high)}{']' if node.le is not None else ')'}"


@functools.cache
def _type_info(cls: type[Struct]) -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(cls)


def value_type(node: object) -> object:
    """The type under its metadata, and an optional type's non-nil member (`int | None` -> int)."""
    if isinstance(node, msgspec.inspect.Metadata):
        node = node.type
    if isinstance(node, msgspec.inspect.UnionType):
        members = [value_type(t) for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
        return members[0] if len(members) == 1 else node
    return node


def _lookup(root: object, path: str) -> object:
    """The value at msgspec's `$.a.b[3]` path inside a struct or raw map, if it is there."""
    node = root
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            if name:
                node = node[name] if isinstance(node, dict) else getattr(node, name)
            else:
                node = node[int(index)]
        except (KeyError, IndexError, TypeError, AttributeError):
            return _NOT_FOUND
    return node
