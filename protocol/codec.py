"""The one codec: a message is one msgpack map per ZeroMQ frame.

    frame = encode(Generate(request_id="r1", prompt_token_ids=[1, 2, 3], params=SamplingParams()))
    message = decode(frame)            # -> Generate, or raises ProtocolError

Every map carries `type` (the message's wire tag) and `v` (PROTOCOL_VERSION) beside the
message's fields, all of them, always. msgspec does the work: one decoder for the tagged
union of every message, checking each field's type and bounds in C. `decode` raises only
`ProtocolError` whatever the bytes are, and is strict: a wrong version, an unknown type,
a missing field, a field of the wrong type and an unknown field are all errors. Unknown
fields are refused rather than skipped because both sides ship from one repository and
any change to a message bumps the version: a field we do not know is a peer we do not
understand, and skipping it (say, a new sampling option) would silently serve something
the client did not ask for.

Limits (frame size, prompt length) are checked here, on the receiving side, so that a
violation becomes an `Error` reply about the request instead of a crash or a huge
allocation: the frame size before msgpack looks at the bytes, the prompt length before
its token ids are judged one by one.

A valid frame costs one C decode. Only a refused one is looked at again, leniently, to
say why in the order a person needs: not a map, the version, the type, then the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import msgspec

from splitinfer.protocol.errors import ErrorCode, ProtocolError, show
from splitinfer.protocol.fields import MAX_ID_LENGTH
from splitinfer.protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Abort, Generate, Message
from splitinfer.protocol.sampling_params import SamplingParams
from splitinfer.protocol.structs import from_validation_error, trusted


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts. A frame over `max_frame_bytes` or a `Generate` whose prompt
    has more than `max_prompt_tokens` tokens is refused with `ErrorCode.TOO_LARGE`.

    The defaults fit a 1M-token prompt (msgpack spends at most 5 bytes per token id)."""

    max_frame_bytes: int = 16 * 2**20
    max_prompt_tokens: int = 2**20

    def __post_init__(self) -> None:
        for name in ("max_frame_bytes", "max_prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = Limits()

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[tuple(MESSAGE_TYPES.values())])  # noqa: UP007 (a runtime tuple)
# The second, lenient look at a refused frame: any map, every value kept as it is.
_RAW = msgspec.msgpack.Decoder(dict[Any, Any])


def encode(message: Message) -> bytes:
    """One message as one msgpack frame. The message checked itself when it was built;
    what msgpack still refuses (a string that is not valid UTF-8) raises ProtocolError."""
    if not isinstance(message, Message):
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    try:
        return _ENCODER.encode(message)
    except (ValueError, TypeError, OverflowError, msgspec.EncodeError) as exc:  # e.g. a lone surrogate
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"cannot encode {type(message).__name__}: {exc}") from None


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in one frame. Raises `ProtocolError` (and nothing else) for any bytes
    that are not a valid message of this version within `limits`; its `request_id` is set
    when the frame was a Generate or Abort whose request id was readable."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode takes the bytes of one frame, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"a frame of {size} bytes is over the limit of {limits.max_frame_bytes}"
        )
    try:
        with trusted():
            message = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise _refused(data, exc, limits) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a msgpack message ({exc})") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "not a msgpack message (nested too deeply)") from None
    if message.v != PROTOCOL_VERSION:
        raise _bad_version(message.v) if message.v else _no_version(None)
    if type(message) is Generate:
        _check_generate(message, data, limits)
    return message


def _check_generate(message: Generate, data: bytes | bytearray | memoryview, limits: Limits) -> None:
    if len(message.prompt_token_ids) > limits.max_prompt_tokens:
        raise _prompt_too_long(message.request_id, len(message.prompt_token_ids), limits)
    # A client that leaves a sampling option out was built against another set of them:
    # refused, not served with a default it did not choose. (Costs a C pass over the keys.)
    missing = _SAMPLING_FIELDS.difference(_PARAMS_KEYS.decode(data).params)
    if missing:
        name = min(missing)
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"Generate.params.{name} is missing",
            field=f"params.{name}",
            request_id=message.request_id,
        )


class _ParamsKeys(msgspec.Struct):
    params: dict[str, msgspec.Raw]


_PARAMS_KEYS = msgspec.msgpack.Decoder(_ParamsKeys)
_SAMPLING_FIELDS = frozenset(SamplingParams.__struct_fields__)


def _refused(data: bytes | bytearray | memoryview, exc: msgspec.ValidationError, limits: Limits) -> ProtocolError:
    """Why a well-formed msgpack frame is not a message, in the order a person needs."""
    try:
        raw = _RAW.decode(data)
    except (msgspec.DecodeError, RecursionError):
        raw = None
    if raw is None:
        return ProtocolError(ErrorCode.BAD_MESSAGE, "a message is a msgpack map with string keys, got something else")
    version = raw.get("v")
    if type(version) is not int:
        return _no_version(version)
    if version != PROTOCOL_VERSION:
        return _bad_version(version)
    tag = raw.get("type")
    if type(tag) is not str:
        return ProtocolError(ErrorCode.BAD_MESSAGE, f"the message has no string 'type' (got {show(tag)})", field="type")
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {show(tag)}", field="type")
    request_id = _readable_request_id(cls, raw)
    prompt = raw.get("prompt_token_ids") if cls is Generate else None
    if type(prompt) is list and len(prompt) > limits.max_prompt_tokens:
        return _prompt_too_long(request_id, len(prompt), limits)
    error = from_validation_error(exc, cls, raw, _generate_code if cls is Generate else _malformed)
    error.request_id = request_id
    return error


def _generate_code(field: str | None, kind: str) -> ErrorCode:
    """A refused Generate field's code: a well-formed Generate whose values are refused is
    an invalid request (its user asked for what we do not serve); one that is malformed,
    a bad message (the client itself is broken)."""
    if kind != "shape" and field is not None and field.startswith("params."):
        return ErrorCode.INVALID_REQUEST
    if kind == "value" and field == "prompt_token_ids":
        return ErrorCode.INVALID_REQUEST
    return ErrorCode.BAD_MESSAGE


def _malformed(field: str | None, kind: str) -> ErrorCode:
    return ErrorCode.BAD_MESSAGE


def _readable_request_id(cls: type[Message], raw: dict) -> str | None:
    if cls is Generate:
        request_id = raw.get("request_id")
        return request_id if _is_id(request_id) else None
    if cls is Abort:
        ids = raw.get("request_ids")
        if type(ids) is list and len(ids) == 1 and _is_id(ids[0]):
            return ids[0]
    return None


def _is_id(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH


def _no_version(version: object) -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_MESSAGE, f"the message has no integer protocol version 'v' (got {show(version)})", field="v"
    )


def _bad_version(version: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_VERSION,
        f"the peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}",
        field="v",
    )


def _prompt_too_long(request_id: str | None, length: int, limits: Limits) -> ProtocolError:
    return ProtocolError(
        ErrorCode.TOO_LARGE,
        f"Generate.prompt_token_ids has {length} tokens, over the limit of {limits.max_prompt_tokens}",
        field="prompt_token_ids",
        request_id=request_id,
    )
