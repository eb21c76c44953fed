"""Request bodies: JSON as RFC 8259 defines it, holding only values the server can carry.

Python's `json.loads` accepts more than JSON, and some of what JSON allows cannot travel
further; each of these once turned a client's request into a 500:

- the literals `NaN`, `Infinity` and `-Infinity` are not JSON, and a number too large for
  a double (`1e400`) parses as infinity: both are refused, so every float is finite;
- a lone surrogate escape (`"\\udcff"`) is legal JSON but not Unicode: such a string can
  be encoded neither for the tokenizer nor for the reply, so it is refused, naming where
  it is (`messages[0].content`). Refused rather than replaced: a replaced character would
  silently change the prompt;
- the parser recurses once per nesting level, so 50,000 opening brackets raise
  `RecursionError`; anything nested deeper than `MAX_DEPTH` is refused, which also keeps
  the code downstream (chat templates, JSON schemas) far from the recursion limit.

Every refusal is a 400 with code `invalid_json` (or `invalid_value`) and the JSON path
as `param`.
"""

from __future__ import annotations

import json
import math
from typing import NoReturn

from splitinfer.server.errors import bad_request

MAX_DEPTH = 128
_SCALARS = {int, float, bool, type(None)}


def parse_json_object(raw: bytes) -> dict:
    """The body as a dict, or a 400 `APIError` saying what is wrong and where."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise bad_request(f"the body is nested too deeply (at most {MAX_DEPTH} levels)", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    check_values(body)
    return body


# A path as a chain of links (parent link, key): extending it costs O(1), and it is spelled
# out only for an error message.
PathLink = tuple["PathLink", str | int] | None


def check_values(body: dict) -> None:
    """Walk the parsed body without recursion: every string (keys too) must be valid Unicode
    and no container may be nested deeper than MAX_DEPTH. Depth first over iterators, so the
    walk holds one frame per level, whatever the number of items (a frame per item, each
    with its whole path, took gigabytes for a 16 MB body of small containers)."""
    stack: list[tuple[object, int, PathLink]] = [(iter(body.items()), 0, None)]
    while stack:
        items, depth, link = stack[-1]
        for key, value in items:  # until a container to descend into (json.loads gives exact types)
            if type(key) is str and not key.isascii():
                _check_string(key, (link, key))
            kind = type(value)
            if kind is str:
                if not value.isascii():
                    _check_string(value, (link, key))
            elif kind is dict or kind is list:
                if depth + 1 >= MAX_DEPTH:
                    raise bad_request(
                        f"the body is nested too deeply (at most {MAX_DEPTH} levels)",
                        param=json_path(_unlink((link, key))),
                        code="invalid_json",
                    )
                if kind is dict and value:
                    stack.append((iter(value.items()), depth + 1, (link, key)))
                    break
                if kind is list and value and not {*map(type, value)} <= _SCALARS:  # a C scan: token-id lists
                    stack.append((enumerate(value), depth + 1, (link, key)))
                    break
        else:
            stack.pop()


def _unlink(link: PathLink) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    while link is not None:
        link, key = link
        parts.append(key)
    return tuple(reversed(parts))


def _check_string(text: str, link: PathLink) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        path = json_path(_unlink(link))
        raise bad_request(
            f"{path or 'the body'} holds a lone surrogate ({text[exc.start]!r} at character "
            f"{exc.start}): it is not a Unicode character",
            param=path or None,
            code="invalid_value",
        ) from None


def json_path(path: tuple[str | int, ...]) -> str:
    """`("messages", 0, "content")` -> `messages[0].content`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # A key may hold a lone surrogate itself: written as an escape, so the path can be sent.
            shown = part.encode("utf-8", "backslashreplace").decode("utf-8")
            out += f".{shown}" if out else shown
    return out


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a double")
    return value
