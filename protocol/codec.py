"""The one codec: a message is one msgpack map per ZeroMQ frame.

    frame = encode(Generate(request_id="r1", prompt_token_ids=[1, 2, 3], params=SamplingParams()))
    message = decode(frame)            # -> Generate, or raises ProtocolError

Every map carries `type` (the message's wire tag) and `v` (PROTOCOL_VERSION) beside the
message's fields, all of them, always. `decode` raises only `ProtocolError` whatever the
bytes are, and is strict: a wrong version, an unknown type, a missing field, a field of
the wrong type and an unknown field are all errors. Unknown fields are refused rather
than skipped because both sides ship from one repository and any change to a message
bumps the version: a field we do not know is a peer we do not understand, and skipping it
(say, a new sampling option) would silently serve something the client did not ask for.

Limits (frame size, prompt length) are checked here, on the receiving side, so that a
violation becomes an `Error` reply about the request instead of a crash or a huge
allocation: the frame size before msgpack looks at the bytes, the prompt length before its
token ids are checked one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import msgpack

from splitinfer.protocol.checks import is_id, show
from splitinfer.protocol.errors import ErrorCode, ProtocolError
from splitinfer.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    Error,
    Generate,
    Message,
    Outputs,
    RequestOutput,
    TokenLogprobs,
)
from splitinfer.protocol.sampling_params import SamplingParams

Wire = dict  # a message as msgpack sees it


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


# Encoding --------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """One message as one msgpack frame. The message validated itself when it was built;
    what msgpack still refuses (a string that is not valid UTF-8) raises ProtocolError."""
    encoder = _ENCODERS.get(type(message))
    if encoder is None:
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    try:
        return msgpack.packb(encoder(message), use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a str with lone surrogates is not UTF-8
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"cannot encode {type(message).__name__}: {exc}") from None


def _field_encoder(cls: type[Message]) -> Callable[[Message], Wire]:
    tag, names = cls.TYPE, cls.FIELDS

    def encode_fields(message: Message) -> Wire:
        wire = {"type": tag, "v": PROTOCOL_VERSION}
        for name in names:
            wire[name] = getattr(message, name)
        return wire

    return encode_fields


_SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))
_SAMPLING_KEYS = frozenset(_SAMPLING_FIELDS)


def _encode_generate(message: Generate) -> Wire:
    params = message.params
    return {"type": Generate.TYPE, "v": PROTOCOL_VERSION, "request_id": message.request_id,
            "prompt_token_ids": message.prompt_token_ids,
            "params": {name: getattr(params, name) for name in _SAMPLING_FIELDS}}


def _encode_token_logprobs(entry: TokenLogprobs) -> Wire:
    return {"token_id": entry.token_id, "logprob": entry.logprob, "top": entry.top}


def _encode_outputs(message: Outputs) -> Wire:
    # Written out field by field: this runs once per client per engine step.
    return {"type": Outputs.TYPE, "v": PROTOCOL_VERSION, "outputs": [
        {"request_id": o.request_id, "new_token_ids": o.new_token_ids, "finish_reason": o.finish_reason,
         "logprobs": None if o.logprobs is None else [_encode_token_logprobs(t) for t in o.logprobs],
         "num_prompt_tokens": o.num_prompt_tokens, "num_output_tokens": o.num_output_tokens,
         "num_cached_tokens": o.num_cached_tokens}
        for o in message.outputs
    ]}


def _encode_error(message: Error) -> Wire:
    wire = _encode_error_fields(message)
    wire["code"] = message.code.value
    return wire


_encode_error_fields = _field_encoder(Error)
_ENCODERS: dict[type, Callable[[Message], Wire]] = {cls: _field_encoder(cls) for cls in MESSAGE_TYPES.values()}
_ENCODERS.update({Generate: _encode_generate, Outputs: _encode_outputs, Error: _encode_error})


# Decoding --------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in one frame. Raises `ProtocolError` (and nothing else) for any bytes
    that are not a valid message of this version within `limits`; its `request_id` is set
    when the frame was a Generate or Abort whose request id was readable."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode takes the bytes of one frame, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_frame_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"a frame of {size} bytes is over the limit of "
                                                 f"{limits.max_frame_bytes}")
    try:
        # use_list=False: arrays arrive as tuples, which the frozen messages store as they are.
        # strict_map_key=False: logit_bias maps int token ids.
        wire = msgpack.unpackb(data, raw=False, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack's errors span ValueError, TypeError and others: all mean "not msgpack"
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"not a msgpack message ({why})") from None
    if type(wire) is not dict:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"a message is a msgpack map, got {type(wire).__name__}")
    version = wire.get("v")
    if type(version) is not int:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"the message has no integer protocol version 'v' "
                                                   f"(got {show(version)})", field="v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"the peer speaks protocol version {version}, this side "
                                                   f"speaks {PROTOCOL_VERSION}", field="v")
    tag = wire.get("type")
    if type(tag) is not str:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"the message has no string 'type' (got {show(tag)})", field="type")
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {show(tag)}", field="type")
    try:
        return decoder(wire, limits)
    except ProtocolError as exc:
        if exc.request_id is None:
            exc.request_id = _readable_request_id(tag, wire)
        raise
    except Exception as exc:
        # The checks above and in the constructors should turn every input into a
        # ProtocolError; if one slipped through, it is our bug, but the caller still gets
        # the one error type it handles (tests assert this code never appears).
        raise ProtocolError(ErrorCode.INTERNAL, f"decoding a {tag!r} message failed: "
                                                f"{type(exc).__name__}: {exc}") from exc


def _readable_request_id(tag: str, wire: Wire) -> str | None:
    if tag == Generate.TYPE:
        request_id = wire.get("request_id")
        return request_id if is_id(request_id) else None
    if tag == Abort.TYPE:
        ids = wire.get("request_ids")
        if type(ids) is tuple and len(ids) == 1 and is_id(ids[0]):
            return ids[0]
    return None


def _check_keys(record: object, keys: frozenset, where: str) -> None:
    if type(record) is not dict:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{where} must be a map, got {show(record)}")
    if record.keys() != keys:
        missing = sorted(keys - record.keys())
        unknown = sorted(map(show, record.keys() - keys))
        problems = ([f"is missing {', '.join(missing)}"] if missing else []) + (
            [f"has unknown field(s) {', '.join(unknown)}"] if unknown else [])
        prefix = where.partition(".")[2]  # "Generate.params" -> fields named "params.top_p"
        field = f"{prefix}.{missing[0]}" if missing and prefix else (missing or [None])[0]
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{where} {' and '.join(problems)}", field=field)


def _field_decoder(cls: type[Message]) -> Callable[[Wire, Limits], Message]:
    names, keys, where = cls.FIELDS, frozenset(cls.FIELDS) | {"type", "v"}, cls.__name__

    def decode_fields(wire: Wire, limits: Limits) -> Message:
        _check_keys(wire, keys, where)
        return cls(*[wire[name] for name in names])

    return decode_fields


_GENERATE_KEYS = frozenset(Generate.FIELDS) | {"type", "v"}


def _decode_generate(wire: Wire, limits: Limits) -> Generate:
    _check_keys(wire, _GENERATE_KEYS, "Generate")
    prompt = wire["prompt_token_ids"]
    if type(prompt) is tuple and len(prompt) > limits.max_prompt_tokens:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"Generate.prompt_token_ids has {len(prompt)} tokens, over the "
                                                 f"limit of {limits.max_prompt_tokens}", field="prompt_token_ids")
    return Generate(wire["request_id"], prompt, _decode_sampling_params(wire["params"]))


def _decode_sampling_params(params: object) -> SamplingParams:
    _check_keys(params, _SAMPLING_KEYS, "Generate.params")
    # Shapes SamplingParams would otherwise coerce (tuple() of a map or a string).
    if type(params["stop_token_ids"]) is not tuple:
        raise _params_error("stop_token_ids", f"must be a list, got {show(params['stop_token_ids'])}")
    if type(params["logit_bias"]) is not dict:
        raise _params_error("logit_bias", f"must be a map, got {show(params['logit_bias'])}")
    try:
        return SamplingParams(**params)
    except (ValueError, TypeError, OverflowError) as exc:
        # SamplingParams is the one judge of request parameters (the servers build them
        # with it too); its messages start with the field's name.
        text = str(exc)
        name = text.split(" ", 1)[0]
        if name in _SAMPLING_KEYS:
            raise _params_error(name, text.split(" ", 1)[1]) from None
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"Generate.params: {text}", field="params") from None


def _params_error(name: str, problem: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_REQUEST, f"Generate.params.{name} {problem}", field=f"params.{name}")


_OUTPUTS_KEYS = frozenset({"type", "v", "outputs"})
_REQUEST_OUTPUT_KEYS = frozenset(f.name for f in fields(RequestOutput))
_TOKEN_LOGPROBS_KEYS = frozenset(f.name for f in fields(TokenLogprobs))


def _decode_outputs(wire: Wire, limits: Limits) -> Outputs:
    _check_keys(wire, _OUTPUTS_KEYS, "Outputs")
    entries = wire["outputs"]
    if type(entries) is not tuple:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"Outputs.outputs must be a list, got {show(entries)}",
                            field="outputs")
    return Outputs(tuple([_decode_request_output(entry) for entry in entries]))


def _decode_request_output(entry: object) -> RequestOutput:
    _check_keys(entry, _REQUEST_OUTPUT_KEYS, "RequestOutput")
    logprobs = entry["logprobs"]
    if logprobs is not None:
        if type(logprobs) is not tuple:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"RequestOutput.logprobs must be a list or nil, got "
                                                       f"{show(logprobs)}", field="logprobs")
        logprobs = tuple([_decode_token_logprobs(item) for item in logprobs])
    return RequestOutput(entry["request_id"], entry["new_token_ids"], entry["finish_reason"], logprobs,
                         entry["num_prompt_tokens"], entry["num_output_tokens"], entry["num_cached_tokens"])


def _decode_token_logprobs(item: object) -> TokenLogprobs:
    _check_keys(item, _TOKEN_LOGPROBS_KEYS, "TokenLogprobs")
    return TokenLogprobs(item["token_id"], item["logprob"], item["top"])


_DECODERS: dict[str, Callable[[Wire, Limits], Message]] = {
    tag: _field_decoder(cls) for tag, cls in MESSAGE_TYPES.items()
}
_DECODERS.update({Generate.TYPE: _decode_generate, Outputs.TYPE: _decode_outputs})
