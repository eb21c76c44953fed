"""The protocol's one error type and the closed set of error codes.

`ProtocolError` is what constructing an invalid message or decoding a bad frame raises;
`ErrorCode` is also what the engine puts in an `Error` reply, so a decode failure turns
into a reply with no translation table in between.
"""

from __future__ import annotations

import reprlib
from enum import Enum

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6
_repr.maxlevel = 3


def show(value: object) -> str:
    """A short repr for error messages: a bad field may be megabytes of nested junk, or an
    int of a million digits (described instead: repr refuses past 4300 digits)."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return _repr.repr(value)


class ErrorCode(str, Enum):
    """Why something failed. A `str` enum: it compares equal to its wire string."""

    BAD_MESSAGE = "bad_message"  # not a well-formed message: not msgpack, missing/unknown/mistyped field
    BAD_VERSION = "bad_version"  # the frame's `v` is not this side's PROTOCOL_VERSION
    UNKNOWN_TYPE = "unknown_type"  # the frame's `type` names no message
    INVALID_REQUEST = "invalid_request"  # a well-formed request whose values are refused
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt + max_tokens over the model's context
    DUPLICATE_REQUEST_ID = "duplicate_request_id"  # the client already has a live request with this id
    UNKNOWN_REQUEST = "unknown_request"  # an Abort names no live request (often a harmless race)
    NO_SESSION = "no_session"  # the sender has no session: say Hello (again)
    TOO_LARGE = "too_large"  # a frame over Limits.max_frame_bytes or a prompt over max_prompt_tokens
    SHUTTING_DOWN = "shutting_down"  # the engine is stopping and accepts nothing new
    INTERNAL = "internal"  # a bug on the side that reports it

    def __str__(self) -> str:
        return self.value


class ProtocolError(ValueError):
    """A message that cannot be built or decoded.

    - `code`: the `ErrorCode` an `Error` reply about it carries.
    - `message`: one line for a person, naming the message type and field.
    - `request_id`: the request it concerns, when the frame was a `Generate` or `Abort`
      whose id could be read even though the rest was bad (so the engine can fail that
      request instead of leaving the client waiting); else None.
    - `field`: the offending field (`"prompt_token_ids"`, `"params.top_p"`), or None.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, request_id: str | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field
