"""The engine protocol: every message round-trips, every malformed frame is a ProtocolError
with the right code (and nothing else, whatever the bytes), addresses parse, and
docs/PROTOCOL.md documents every message and field the code defines."""

from __future__ import annotations

import math
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import fields

from splitinfer.protocol import (
    CLIENT_MESSAGES,
    DEFAULT_LIMITS,
    ENGINE_MESSAGES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    Error,
    ErrorCode,
    Generate,
    Goodbye,
    Hello,
    HelloReply,
    Limits,
    Message,
    Outputs,
    Ping,
    Pong,
    ProtocolError,
    RequestOutput,
    SamplingParams,
    Shutdown,
    Stats,
    StatsReply,
    TokenLogprobs,
    decode,
    default_engine_address,
    encode,
    parse_address,
)
from splitinfer.protocol.constraint import Constraint
from splitinfer.protocol.fields import MAX_ID_LENGTH, MAX_INT, MAX_TOKEN_ID

FAST = settings(
    max_examples=60, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ = settings(FAST, max_examples=300)
DOC = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"


# Strategies --------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=12)
token_id = st.integers(0, MAX_TOKEN_ID)
token_ids = st.lists(token_id, max_size=6)
uints = st.integers(0, MAX_INT)
numbers = st.floats(allow_nan=False, allow_infinity=False)
rates = st.floats(0, 1)

sampling_params = st.builds(
    SamplingParams,
    max_tokens=st.integers(16, 2**40),
    min_tokens=st.integers(0, 16),
    temperature=st.floats(0, 4),
    top_k=st.integers(-1, 1000),
    top_p=st.floats(0.01, 1),
    min_p=rates,
    seed=st.none() | st.integers(-(2**63), MAX_INT),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    repetition_penalty=st.floats(0.1, 4),
    logit_bias=st.dictionaries(token_id, st.floats(-100, 100), max_size=3),
    stop_token_ids=token_ids,
    ignore_eos=st.booleans(),
    logprobs=st.none() | st.integers(0, 20),
)
logprob = st.floats(max_value=0.0, allow_nan=False)  # -inf included
token_logprobs = st.builds(TokenLogprobs, token_id, logprob, st.lists(st.tuples(token_id, logprob), max_size=3))


@st.composite
def request_outputs(draw: st.DrawFn) -> RequestOutput:
    new = draw(token_ids)
    logprobs = draw(st.none() | st.lists(token_logprobs, min_size=len(new), max_size=len(new)))
    reason = draw(st.sampled_from([None, "stop", "length", "abort", "error"]))
    error = draw(st.none() | st.text(max_size=20)) if reason == "error" else None
    return RequestOutput(draw(ids), new, reason, logprobs, draw(uints), draw(uints), draw(uints), error)


MESSAGES: dict[type[Message], st.SearchStrategy] = {
    Hello: st.builds(Hello, ids, ids, st.integers(1, MAX_INT)),
    Generate: st.builds(Generate, ids, st.lists(token_id, min_size=1, max_size=50), sampling_params),
    Abort: st.builds(Abort, st.lists(ids, min_size=1, max_size=4), st.text(max_size=20)),
    Ping: st.builds(Ping, uints, numbers),
    Stats: st.just(Stats()),
    Goodbye: st.builds(Goodbye, ids),
    HelloReply: st.builds(
        HelloReply,
        ids,
        ids,
        st.integers(1, 2**20),
        st.integers(1, MAX_TOKEN_ID + 1),
        token_ids,
        st.none() | st.text(max_size=40),
        st.dictionaries(st.sampled_from(["tokenizer.json", "tokenizer_config.json", "x"]), st.binary(max_size=40)),
        uints,
        st.integers(1, 256),
        st.floats(0.001, 3600),
    ),
    Outputs: st.builds(Outputs, st.lists(request_outputs(), max_size=4)),
    Error: st.builds(
        Error,
        st.none() | ids,
        st.sampled_from(list(ErrorCode)),
        st.text(max_size=40),
        st.booleans(),
        st.none() | st.text(max_size=10),
    ),
    Pong: st.builds(Pong, uints, numbers),
    StatsReply: st.builds(
        StatsReply, uints, uints, uints, uints, uints, rates, rates, st.floats(0, 1e9), st.floats(0, 1e9), uints, uints
    ),
    Shutdown: st.builds(Shutdown, st.text(max_size=20)),
}
any_message = st.one_of(*MESSAGES.values())


def wire(message: Message) -> dict:
    """A message as the msgpack map a peer sends, to be tampered with."""
    return msgpack.unpackb(encode(message), strict_map_key=False)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def rejected(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, limits)
    return info.value


GENERATE = Generate("req-7", [1, 2, 3], SamplingParams(max_tokens=8, logit_bias={5: -1.5}, stop_token_ids=[9]))


def generate_wire(**changes: object) -> dict:
    raw = wire(GENERATE)
    raw.update(changes)
    return raw


def params_wire(**changes: object) -> dict:
    raw = wire(GENERATE)
    raw["params"].update(changes)
    return raw


# Round trips -------------------------------------------------------------------------


def test_every_message_type_has_a_strategy_and_a_direction():
    assert set(MESSAGES) == set(MESSAGE_TYPES.values())
    assert set(CLIENT_MESSAGES) | set(ENGINE_MESSAGES) == set(MESSAGE_TYPES.values())
    assert not set(CLIENT_MESSAGES) & set(ENGINE_MESSAGES)


@FUZZ
@given(any_message)
def test_every_message_round_trips(message: Message):
    frame = encode(message)
    assert decode(frame) == message
    raw = msgpack.unpackb(frame, strict_map_key=False)
    assert raw.keys() == {"type", "v", *type(message).FIELDS}
    assert (raw["type"], raw["v"]) == (type(message).TYPE, PROTOCOL_VERSION)


def test_decoded_messages_hold_tuples_and_typed_values():
    out = decode(
        encode(
            Outputs(
                [
                    RequestOutput(
                        "a", [4, 5], "stop", [TokenLogprobs(4, -0.1, [[4, -0.1]]), TokenLogprobs(5, -math.inf)], 3, 2, 0
                    )
                ]
            )
        )
    )
    entry = out.outputs[0]
    assert entry.new_token_ids == (4, 5) and entry.logprobs[0].top == ((4, -0.1),)
    assert entry.logprobs[1].logprob == -math.inf
    err = decode(encode(Error("r", "too_large", "m")))
    assert err.code is ErrorCode.TOO_LARGE and err.code == "too_large"
    params = decode(encode(GENERATE)).params
    assert params.logit_bias == {5: -1.5} and params.stop_token_ids == (9,)
    assert decode(encode(Ping(1, 2))).sent_at == 2.0 and type(decode(encode(Ping(1, 2))).sent_at) is float


def test_hello_reply_carries_tokenizer_bytes_and_template():
    reply = HelloReply(
        "e1", "tiny", 2048, 32000, [2], "{{ messages }}", {"tokenizer.json": b"\x00\xff{}"}, 4096, 16, 5.0
    )
    assert decode(encode(reply)) == reply


# Malformed frames --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x82\xa4type",
        pack({"type": "ping", "v": 1}) + b"\x00",
        b"\x91" * 5000 + b"\xc0",
        b"\xdd\xff\xff\xff\xff",
        b"\x81\x80\x01",
        "hello".encode("utf-16"),
    ],
    ids=[
        "empty",
        "reserved-byte",
        "truncated",
        "trailing-bytes",
        "deep-nesting",
        "huge-array-header",
        "unhashable-key",
        "not-msgpack",
    ],
)
def test_bytes_that_are_not_msgpack_are_bad_message(data: bytes):
    assert rejected(data).code is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    "obj",
    [[1, 2], "hello", 7, None, {"type": "ping"}, {"v": "1", "type": "ping"}],
    ids=["array", "string", "int", "nil", "no-version", "string-version"],
)
def test_a_frame_must_be_a_map_with_an_integer_version(obj: object):
    assert rejected(pack(obj)).code is ErrorCode.BAD_MESSAGE


def test_wrong_version_is_bad_version():
    raw = wire(Ping(1, 2.0))
    raw["v"] = PROTOCOL_VERSION + 1
    error = rejected(pack(raw))
    assert error.code is ErrorCode.BAD_VERSION and str(PROTOCOL_VERSION + 1) in error.message


def test_unknown_type_is_unknown_type_and_missing_type_bad_message():
    assert rejected(pack({"type": "launch_missiles", "v": PROTOCOL_VERSION})).code is ErrorCode.UNKNOWN_TYPE
    assert rejected(pack({"v": PROTOCOL_VERSION})).code is ErrorCode.BAD_MESSAGE
    assert rejected(pack({"type": ["ping"], "v": PROTOCOL_VERSION})).code is ErrorCode.BAD_MESSAGE


def test_missing_and_unknown_fields_are_named():
    raw = wire(Hello("c", "n", 5))
    del raw["pid"]
    error = rejected(pack(raw))
    assert error.code is ErrorCode.BAD_MESSAGE and "pid" in error.message and error.field == "pid"
    raw = wire(Hello("c", "n", 5))
    raw["colour"] = "blue"
    error = rejected(pack(raw))
    assert error.code is ErrorCode.BAD_MESSAGE and "colour" in error.message


@pytest.mark.parametrize(
    "message, field, value",
    [
        (Hello("c", "n", 5), "pid", True),
        (Hello("c", "n", 5), "pid", 2**64 - 1),
        (Hello("c", "n", 5), "pid", 0),
        (Hello("c", "n", 5), "client_id", ""),
        (Hello("c", "n", 5), "client_id", "x" * (MAX_ID_LENGTH + 1)),
        (Hello("c", "n", 5), "nonce", 17),
        (Ping(1, 2.0), "sent_at", math.nan),
        (Ping(1, 2.0), "sent_at", "now"),
        (Ping(1, 2.0), "nonce", -1),
        (Abort(["a"]), "request_ids", []),
        (Abort(["a"]), "request_ids", "a"),
        (Abort(["a"]), "reason", None),
        (Error(None, "internal", "m"), "code", "on_fire"),
        (Error(None, "internal", "m"), "retryable", 1),
        (StatsReply(0, 0, 1, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0), "kv_usage", 1.5),
        (StatsReply(0, 0, 1, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0), "running", 1.0),
        (HelloReply("e", "m", 8, 8, [], None, {}, 0, 16, 5.0), "tokenizer_files", {"../evil": b""}),
        (HelloReply("e", "m", 8, 8, [], None, {}, 0, 16, 5.0), "tokenizer_files", {"a.json": "text"}),
        (HelloReply("e", "m", 8, 8, [], None, {}, 0, 16, 5.0), "eos_token_ids", [2, False]),
        (HelloReply("e", "m", 8, 8, [], None, {}, 0, 16, 5.0), "lease_s", 0),
        (Outputs([]), "outputs", {"request_id": "a"}),
    ],
)
def test_a_mistyped_or_out_of_range_field_is_bad_message_naming_it(message: Message, field: str, value: object):
    raw = wire(message)
    raw[field] = value
    error = rejected(pack(raw))
    assert error.code is ErrorCode.BAD_MESSAGE
    assert field in error.message


def _output_entry(**changes: object) -> dict:
    raw = wire(Outputs([RequestOutput("a", [1], None, None, 1, 1, 0)]))
    raw["outputs"][0].update(changes)
    return raw


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"finish_reason": "bored"}, "finish_reason"),
        ({"finish_reason": [1]}, "finish_reason"),
        ({"new_token_ids": [1.0]}, "new_token_ids"),
        ({"logprobs": [{"token_id": 1, "logprob": -0.5, "top": []}] * 2}, "logprobs"),
        ({"logprobs": [{"token_id": 1, "logprob": math.nan, "top": []}]}, "logprob"),
        ({"logprobs": [{"token_id": 1, "logprob": -1.0, "top": [[1]]}]}, "top"),
        ({"num_cached_tokens": None}, "num_cached_tokens"),
    ],
)
def test_a_bad_output_entry_is_bad_message_naming_the_field(changes: dict, field: str):
    error = rejected(pack(_output_entry(**changes)))
    assert error.code is ErrorCode.BAD_MESSAGE and field in error.message


# Generate: request errors name the request and the field --------------------------------


@pytest.mark.parametrize(
    "prompt, code",
    [
        ([1, -2, 3], ErrorCode.INVALID_REQUEST),
        ([1, 2**32], ErrorCode.INVALID_REQUEST),
        ([], ErrorCode.INVALID_REQUEST),
        ([1, True], ErrorCode.BAD_MESSAGE),
        ([1, 2.0], ErrorCode.BAD_MESSAGE),
        ("1 2 3", ErrorCode.BAD_MESSAGE),
        (5, ErrorCode.BAD_MESSAGE),
        ({"0": 1}, ErrorCode.BAD_MESSAGE),
    ],
    ids=["negative", "over-uint32", "empty", "bool", "float", "string", "int", "map"],
)
def test_a_bad_prompt_names_the_field_and_the_request(prompt: object, code: ErrorCode):
    error = rejected(pack(generate_wire(prompt_token_ids=prompt)))
    assert error.code is code
    assert error.field == "prompt_token_ids" and "prompt_token_ids" in error.message
    assert error.request_id == "req-7"


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("temperature", "hot"),
        ("temperature", -1.0),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("max_tokens", 2**64 - 1),
        ("min_tokens", 100),
        ("logprobs", 21),
        ("seed", 1.5),
        ("logit_bias", {"5": 1.0}),
        ("logit_bias", {5: 1000.0}),
        ("logit_bias", [[5, 1.0]]),
        ("stop_token_ids", {9: 1}),
        ("stop_token_ids", "9"),
        ("stop_token_ids", [-9]),
        ("ignore_eos", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", math.nan),
    ],
)
def test_a_bad_sampling_parameter_is_invalid_request_naming_it(field: str, value: object):
    error = rejected(pack(params_wire(**{field: value})))
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.field == f"params.{field}" and f"params.{field}" in error.message
    assert error.request_id == "req-7"


def test_sampling_params_with_missing_or_unknown_keys_are_bad_message():
    raw = generate_wire()
    del raw["params"]["top_p"]
    error = rejected(pack(raw))
    assert error.code is ErrorCode.BAD_MESSAGE and error.field == "params.top_p" and error.request_id == "req-7"
    error = rejected(pack(params_wire(stop_strings=["\n"])))
    assert error.code is ErrorCode.BAD_MESSAGE and "stop_strings" in error.message
    assert rejected(pack(generate_wire(params=None))).code is ErrorCode.BAD_MESSAGE


def test_request_id_is_recovered_only_when_readable():
    assert rejected(pack(generate_wire(request_id="", prompt_token_ids=[-1]))).request_id is None
    assert rejected(pack(generate_wire(request_id=7))).request_id is None
    abort = wire(Abort(["only"]))
    abort["reason"] = 3
    assert rejected(pack(abort)).request_id == "only"
    abort["request_ids"] = ["a", "b"]
    assert rejected(pack(abort)).request_id is None


# Limits --------------------------------------------------------------------------------


def test_a_frame_over_the_limit_is_too_large_before_parsing():
    frame = encode(GENERATE)
    error = rejected(frame, Limits(max_frame_bytes=len(frame) - 1, max_prompt_tokens=100))
    assert error.code is ErrorCode.TOO_LARGE and error.request_id is None
    assert decode(frame, Limits(max_frame_bytes=len(frame), max_prompt_tokens=100)) == GENERATE
    assert rejected(b"\xc1" * 11, Limits(max_frame_bytes=10)).code is ErrorCode.TOO_LARGE  # not even msgpack


def test_a_prompt_over_the_limit_is_too_large_and_names_the_request():
    limits = Limits(max_prompt_tokens=3)
    assert decode(encode(GENERATE), limits) == GENERATE  # exactly 3 tokens
    error = rejected(encode(Generate("long", [1, 2, 3, 4], SamplingParams())), limits)
    assert error.code is ErrorCode.TOO_LARGE and error.request_id == "long" and error.field == "prompt_token_ids"
    # The limit is checked before the elements: a huge junk prompt is refused by its length.
    assert rejected(pack(generate_wire(prompt_token_ids=["x"] * 4)), limits).code is ErrorCode.TOO_LARGE


def test_limits_are_validated():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_frame_bytes"):
            Limits(max_frame_bytes=bad)


# Construction: the sender's bug shows where it is made ---------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: Generate("r", [1, True], SamplingParams()), "Generate.prompt_token_ids"),
        (lambda: Generate("r", [1], {"max_tokens": 5}), "Generate.params"),
        (lambda: RequestOutput("r", [1, 2], None, [TokenLogprobs(1, -1.0)]), "RequestOutput.logprobs"),
        (lambda: RequestOutput("r", [1], "done"), "RequestOutput.finish_reason"),
        (lambda: TokenLogprobs(1, -1.0, [(2, -1.0)] * 21), "TokenLogprobs.top"),
        (lambda: TokenLogprobs(1, math.nan), "TokenLogprobs.logprob"),
        (lambda: TokenLogprobs(1, -1.0, [(2, math.inf)]), "TokenLogprobs.logprob"),
        (lambda: Outputs([{"request_id": "r"}]), "Outputs.outputs"),
        (lambda: Hello("c", "n", 1.0), "Hello.pid"),
    ],
)
def test_building_an_invalid_message_raises_protocol_error_naming_the_field(build, field: str):
    with pytest.raises(ProtocolError, match=re.escape(field)):
        build()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"top_k": 2**63}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"logit_bias": {2**32: 1.0}}, "logit_bias"),
        ({"min_tokens": 2**63}, "min_tokens"),
    ],
)
def test_sampling_params_refuse_what_the_wire_cannot_carry(kwargs: dict, field: str):
    # SamplingParams owns the wire's bounds (int64, uint32 token ids), so no Generate can hold more.
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams(**kwargs)


def test_encode_refuses_non_messages_and_unencodable_text():
    with pytest.raises(TypeError):
        encode({"type": "ping", "v": 1})
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(Shutdown("\udc80"))  # a lone surrogate is not UTF-8


# Fuzz: nothing but ProtocolError, whatever arrives -------------------------------------


def decode_or_protocol_error(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolError as exc:
        assert exc.code is not ErrorCode.INTERNAL, exc  # INTERNAL would mean a check let junk through
        assert isinstance(exc.code, ErrorCode) and exc.message
    else:
        assert isinstance(message, Message)
        assert decode(encode(message)) == message


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), children, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(data: bytes):
    decode_or_protocol_error(data)


@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES)), st.data())
def test_fuzz_every_field_of_a_known_type_arbitrary(tag: str, data: st.DataObject):
    # All the right keys, junk values: the constructors' checks see every kind of value.
    raw = {name: data.draw(msgpack_values) for name in MESSAGE_TYPES[tag].FIELDS}
    decode_or_protocol_error(pack({**raw, "type": tag, "v": PROTOCOL_VERSION}))


@FUZZ
@given(msgpack_values)
def test_fuzz_arbitrary_msgpack_structures(value: object):
    decode_or_protocol_error(pack(value))


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a decoded wire map (for tampering with one field, nested ones too)."""
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += _paths(value, (*prefix, index))
    return found


@FUZZ
@given(any_message, st.data())
def test_fuzz_valid_messages_with_one_field_tampered(message: Message, data: st.DataObject):
    raw = wire(message)
    path = data.draw(st.sampled_from(_paths(raw)))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(msgpack_values)
    elif action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=6))] = data.draw(msgpack_values)
    decode_or_protocol_error(pack(raw))


@FAST
@given(any_message, st.integers(1, 40))
def test_fuzz_truncated_frames(message: Message, cut: int):
    frame = encode(message)
    decode_or_protocol_error(frame[: max(len(frame) - cut, 0)])


# Addresses ----------------------------------------------------------------------------


def test_default_address_is_under_xdg_runtime_dir_or_tmp(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000/")
    assert default_engine_address() == "ipc:///run/user/1000/splitinfer-engine.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    address = default_engine_address()
    assert re.fullmatch(r"ipc:///tmp/splitinfer-engine-\d+\.sock", address)
    assert parse_address(address).path == address[len("ipc://") :]
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")  # not trusted: falls back to /tmp
    assert default_engine_address() == address


@pytest.mark.parametrize(
    "address, scheme, path, host, port",
    [
        ("ipc:///tmp/e.sock", "ipc", "/tmp/e.sock", None, None),
        ("tcp://127.0.0.1:5555", "tcp", None, "127.0.0.1", 5555),
        ("tcp://engine-0.cluster.local:1", "tcp", None, "engine-0.cluster.local", 1),
        ("tcp://*:65535", "tcp", None, "*", 65535),
        ("tcp://[::1]:5555", "tcp", None, "[::1]", 5555),
    ],
)
def test_parse_valid_addresses(address: str, scheme: str, path, host, port):
    parsed = parse_address(address)
    assert (parsed.scheme, parsed.path, parsed.host, parsed.port) == (scheme, path, host, port)
    assert parsed.url == str(parsed) == address


@pytest.mark.parametrize(
    "address, why",
    [
        ("/tmp/e.sock", "no scheme"),
        ("http://localhost:80", "only ipc:// and tcp://"),
        ("ipc://relative.sock", "absolute"),
        ("ipc://@abstract", "abstract"),
        ("ipc:///tmp/dir/", "directory"),
        ("ipc:///" + "x" * 200, "107"),
        ("tcp://localhost", "port"),
        ("tcp://localhost:0", "port"),
        ("tcp://localhost:70000", "port"),
        ("tcp://localhost:http", "port"),
        ("tcp://:5555", "host:port"),
        ("tcp://[zz]:5555", "IPv6"),
        ("tcp://bad/host:5555", "host name"),
        ("tcp://a;b:5555", "host name"),
        ("tcp://local host:5555", "whitespace"),
        (None, "string"),
    ],
)
def test_parse_invalid_addresses_says_why(address: object, why: str):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_address(address)


# The specification documents what the code defines -------------------------------------


def _doc_tables() -> dict[str, set[str]]:
    """Heading name -> the field names of the tables under it, from docs/PROTOCOL.md."""
    tables: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            heading = re.match(r"#{2,3} (\w+) \(`(\w+)`\)", line)
            current = heading.group(1) if heading else None
            if heading:
                tables[current] = {f"tag:{heading.group(2)}"}
            continue
        label = re.match(r"(\w+) \(a map\):", line)
        if label:
            current = label.group(1)
            tables[current] = set()
        elif line.startswith("`params` ("):
            current = "SamplingParams"
            tables[current] = set()
        row = re.match(r"\| `(\w+)` \|", line)
        if row and current is not None:
            tables[current].add(row.group(1))
    return tables


def test_protocol_doc_has_a_table_for_every_message_and_record():
    tables = _doc_tables()
    for cls in MESSAGE_TYPES.values():
        assert tables.get(cls.__name__) == {f"tag:{cls.TYPE}", *cls.FIELDS}, cls.__name__
    for cls in (RequestOutput, TokenLogprobs, SamplingParams, Constraint):
        assert tables.get(cls.__name__) == {f.name for f in fields(cls)}, cls.__name__
    codes = set(re.findall(r"^\| `(\w+)` \|", DOC.read_text().split("## Error codes")[1].split("##")[0], re.M))
    assert codes == {code.value for code in ErrorCode}
