"""Field checks shared by the message classes.

Each check takes the message name and field name (for the error text), validates one
value strictly (an int is an `int`, never a `bool` or a float; a list is a list) and
returns it normalised: sequences become tuples, so a frozen message holds no mutable
list and a decoded message (msgpack arrays arrive as tuples) needs no copy.
"""

from __future__ import annotations

import reprlib
import sys
from array import array

from splitinfer.protocol.errors import ErrorCode, ProtocolError

MAX_ID_LENGTH = 256  # request, client, engine ids and nonces
MAX_TOKEN_ID = 2**32 - 1  # token ids are uint32 on the wire (see token_ids)
MAX_INT = 2**63 - 1  # counters, pids: anything msgpack carries as a signed 64-bit int
MIN_INT = -(2**63)
MAX_FLOAT = sys.float_info.max

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6
_repr.maxlevel = 3
_INT_ONLY = {int}
# The array type code of a 4-byte unsigned int ("I" on every platform we know of).
_UINT32 = next(code for code in "IL" if array(code).itemsize == 4)


def show(value: object) -> str:
    """A short repr for error messages: a bad field may be megabytes of nested junk, or an
    int of a million digits (described instead: repr refuses past 4300 digits)."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return _repr.repr(value)


def fail(where: str, name: str, problem: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> ProtocolError:
    return ProtocolError(code, f"{where}.{name} {problem}", field=name)


def check_str(where: str, name: str, value: object) -> str:
    if type(value) is not str:
        raise fail(where, name, f"must be a string, got {show(value)}")
    return value


def check_id(where: str, name: str, value: object) -> str:
    """A non-empty string of at most MAX_ID_LENGTH characters."""
    if type(value) is not str:
        raise fail(where, name, f"must be a string id, got {show(value)}")
    if not 0 < len(value) <= MAX_ID_LENGTH:
        raise fail(where, name, f"must be 1 to {MAX_ID_LENGTH} characters, got {len(value)}")
    return value


def is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH


def check_bool(where: str, name: str, value: object) -> bool:
    if type(value) is not bool:
        raise fail(where, name, f"must be a boolean, got {show(value)}")
    return value


def check_int(where: str, name: str, value: object, low: int = 0, high: int = MAX_INT) -> int:
    if type(value) is not int:
        raise fail(where, name, f"must be an integer, got {show(value)}")
    if not low <= value <= high:
        raise fail(where, name, f"must be in [{low}, {high}], got {value}")
    return value


def check_float(where: str, name: str, value: object, low: float = -MAX_FLOAT, high: float = MAX_FLOAT) -> float:
    """A number in [low, high] (NaN never is), returned as a float; ints are accepted
    because a sender's `0` is as good as `0.0`, bools are not."""
    if type(value) is not float and type(value) is not int:
        raise fail(where, name, f"must be a number, got {show(value)}")
    if not low <= value <= high:  # also False for NaN
        raise fail(where, name, f"must be in [{low}, {high}], got {value}")
    return float(value)


def check_sequence(where: str, name: str, value: object) -> tuple:
    if type(value) is tuple:
        return value
    if type(value) is list:
        return tuple(value)
    raise fail(where, name, f"must be a list, got {show(value)}")


def check_token_ids(
    where: str, name: str, value: object, range_code: ErrorCode = ErrorCode.BAD_MESSAGE
) -> tuple[int, ...]:
    """A list of token ids in [0, MAX_TOKEN_ID]. A wrong element type is a malformed
    message; an int out of range is `range_code` (for a prompt: the request is invalid)."""
    ids = check_sequence(where, name, value)
    if not ids:
        return ids
    # Both checks run in C (a 1000-token prompt costs ~20 us): the type set catches
    # bools, floats and anything else; array(uint32) then rejects ints outside uint32.
    if {*map(type, ids)} != _INT_ONLY:
        bad = next(t for t in ids if type(t) is not int)
        raise fail(where, name, f"must hold integers only, got {show(bad)}")
    try:
        array(_UINT32, ids)
    except OverflowError:
        bad = next(t for t in ids if not 0 <= t <= MAX_TOKEN_ID)
        raise fail(where, name, f"holds token id {bad} outside [0, {MAX_TOKEN_ID}]", range_code) from None
    return ids
