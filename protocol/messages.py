"""The message types: one frozen dataclass per message, validated when it is built.

Each class has a wire tag (`TYPE`); on the wire a message is a msgpack map of its fields
plus `type` and `v` (see codec.py and docs/PROTOCOL.md). Building a message with a bad
field raises `ProtocolError` naming the class and field, so a sender's bug shows where it
was made and a decoded message (built by the same constructors) is valid by construction.
Sequences are stored as tuples: the messages are immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from splitinfer.protocol.checks import (
    MAX_FLOAT,
    MAX_TOKEN_ID,
    check_bool,
    check_float,
    check_id,
    check_int,
    check_sequence,
    check_str,
    check_token_ids,
    fail,
    show,
)
from splitinfer.protocol.errors import ErrorCode
from splitinfer.protocol.sampling_params import MAX_LOGPROBS, SamplingParams

PROTOCOL_VERSION = 1
FINISH_REASONS = frozenset({"stop", "length", "abort", "error"})

_set = object.__setattr__  # normalising a field of a frozen dataclass in __post_init__


class Message:
    """Base of every message. `TYPE` is the wire tag; `FIELDS` the field names in order."""

    __slots__ = ()
    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]


MESSAGE_TYPES: dict[str, type[Message]] = {}


def _message(tag: str):
    def register(cls: type[Message]) -> type[Message]:
        if tag in MESSAGE_TYPES:
            raise RuntimeError(f"two messages use the wire tag {tag!r}")
        cls.TYPE = tag
        cls.FIELDS = tuple(f.name for f in fields(cls))  # once per class, not per message
        MESSAGE_TYPES[tag] = cls
        return cls

    return register


# Client -> engine ------------------------------------------------------------------


@_message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Opens (or resumes) a session. The same `client_id` with a new `nonce` is a restarted
    client: the engine aborts what the old instance left running."""

    client_id: str
    nonce: str
    pid: int

    def __post_init__(self) -> None:
        check_id("Hello", "client_id", self.client_id)
        check_id("Hello", "nonce", self.nonce)
        check_int("Hello", "pid", self.pid, low=1)


@_message("generate")
@dataclass(frozen=True, slots=True)
class Generate(Message):
    """Start a request. `request_id` is the client's own name for it (unique among its live
    requests); every `RequestOutput` about it carries the same id."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams

    def __post_init__(self) -> None:
        check_id("Generate", "request_id", self.request_id)
        ids = check_token_ids("Generate", "prompt_token_ids", self.prompt_token_ids, ErrorCode.INVALID_REQUEST)
        if not ids:
            raise fail("Generate", "prompt_token_ids", "must not be empty", ErrorCode.INVALID_REQUEST)
        _set(self, "prompt_token_ids", ids)
        # SamplingParams checked its own values, the bounds the wire carries included.
        if type(self.params) is not SamplingParams:
            raise fail("Generate", "params", f"must be a SamplingParams, got {show(self.params)}")


@_message("abort")
@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Stop requests of this client; each ends with finish reason "abort"."""

    request_ids: tuple[str, ...]
    reason: str = ""

    def __post_init__(self) -> None:
        ids = check_sequence("Abort", "request_ids", self.request_ids)
        if not ids:
            raise fail("Abort", "request_ids", "must name at least one request")
        for request_id in ids:
            check_id("Abort", "request_ids", request_id)
        _set(self, "request_ids", ids)
        check_str("Abort", "reason", self.reason)


@_message("ping")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Heartbeat (renews the client's lease) and round-trip probe; answered by a `Pong`
    with the same `nonce` and `sent_at` (the sender's clock: only the sender reads it)."""

    nonce: int
    sent_at: float

    def __post_init__(self) -> None:
        check_int("Ping", "nonce", self.nonce)
        _set(self, "sent_at", check_float("Ping", "sent_at", self.sent_at))


@_message("stats")
@dataclass(frozen=True, slots=True)
class Stats(Message):
    """Ask for a `StatsReply`."""


@_message("goodbye")
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """The client is leaving: the engine aborts its requests and forgets its session now,
    without waiting for the lease to run out."""

    client_id: str

    def __post_init__(self) -> None:
        check_id("Goodbye", "client_id", self.client_id)


# Engine -> client ------------------------------------------------------------------


@_message("hello_reply")
@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    """Everything a server needs to serve this engine's model without the checkpoint:
    limits, eos ids, the chat template and the tokenizer files' bytes. `lease_s`: the
    client must send something (at least a Ping) this often or lose its requests."""

    engine_id: str
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    tokenizer_files: dict[str, bytes]
    kv_capacity_tokens: int
    block_size: int
    lease_s: float

    def __post_init__(self) -> None:
        check_id("HelloReply", "engine_id", self.engine_id)
        if not check_str("HelloReply", "model_name", self.model_name):
            raise fail("HelloReply", "model_name", "must not be empty")
        check_int("HelloReply", "max_model_len", self.max_model_len, low=1)
        check_int("HelloReply", "vocab_size", self.vocab_size, low=1, high=MAX_TOKEN_ID + 1)
        _set(self, "eos_token_ids", check_token_ids("HelloReply", "eos_token_ids", self.eos_token_ids))
        if self.chat_template is not None:
            check_str("HelloReply", "chat_template", self.chat_template)
        files = self.tokenizer_files
        if type(files) is not dict:
            raise fail("HelloReply", "tokenizer_files", f"must map file names to bytes, got {show(files)}")
        for name, content in files.items():
            # Bare names only: a client may write them into a directory of its own.
            if type(name) is not str or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
                raise fail("HelloReply", "tokenizer_files", f"has a key that is not a plain file name: {show(name)}")
            if type(content) is not bytes:
                raise fail("HelloReply", "tokenizer_files", f"[{name!r}] must be bytes, got {show(content)}")
        check_int("HelloReply", "kv_capacity_tokens", self.kv_capacity_tokens)
        check_int("HelloReply", "block_size", self.block_size, low=1)
        _set(self, "lease_s", check_float("HelloReply", "lease_s", self.lease_s, low=1e-3))


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one generated position: the sampled token's, and the `top`
    most likely tokens' as (token_id, logprob) pairs, best first (empty if none asked)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        check_int("TokenLogprobs", "token_id", self.token_id, high=MAX_TOKEN_ID)
        # -inf is a real answer (a token the sampler masked); NaN and +inf are not.
        _set(self, "logprob", check_float("TokenLogprobs", "logprob", self.logprob, low=-float("inf")))
        top = check_sequence("TokenLogprobs", "top", self.top)
        if len(top) > MAX_LOGPROBS:
            raise fail("TokenLogprobs", "top", f"has {len(top)} entries, more than {MAX_LOGPROBS}")
        pairs = []
        for pair in top:
            if type(pair) not in (tuple, list) or len(pair) != 2:
                raise fail("TokenLogprobs", "top", f"must hold (token_id, logprob) pairs, got {show(pair)}")
            token_id, logprob = pair
            pairs.append((check_int("TokenLogprobs", "top", token_id, high=MAX_TOKEN_ID),
                          check_float("TokenLogprobs", "top", logprob, low=-float("inf"))))
        _set(self, "top", tuple(pairs))


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One request's news from one engine step: the tokens it generated (usually one;
    none when it only finished, e.g. aborted), why it finished if it did, logprobs per
    new token if it asked, and its token counts so far (`num_cached_tokens`: prompt tokens
    served from the prefix cache)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        check_id("RequestOutput", "request_id", self.request_id)
        new = check_token_ids("RequestOutput", "new_token_ids", self.new_token_ids)
        _set(self, "new_token_ids", new)
        reason = self.finish_reason
        if reason is not None and (type(reason) is not str or reason not in FINISH_REASONS):
            raise fail("RequestOutput", "finish_reason",
                       f"must be None or one of {sorted(FINISH_REASONS)}, got {show(reason)}")
        if self.logprobs is not None:
            logprobs = check_sequence("RequestOutput", "logprobs", self.logprobs)
            if len(logprobs) != len(new):
                raise fail("RequestOutput", "logprobs", f"has {len(logprobs)} entries for {len(new)} new tokens")
            for entry in logprobs:
                if type(entry) is not TokenLogprobs:
                    raise fail("RequestOutput", "logprobs", f"must hold TokenLogprobs, got {show(entry)}")
            _set(self, "logprobs", logprobs)
        check_int("RequestOutput", "num_prompt_tokens", self.num_prompt_tokens)
        check_int("RequestOutput", "num_output_tokens", self.num_output_tokens)
        check_int("RequestOutput", "num_cached_tokens", self.num_cached_tokens)


@_message("outputs")
@dataclass(frozen=True, slots=True)
class Outputs(Message):
    """One engine step's news for one client: an entry per request of that client that
    produced tokens or finished in the step."""

    outputs: tuple[RequestOutput, ...]

    def __post_init__(self) -> None:
        outputs = check_sequence("Outputs", "outputs", self.outputs)
        for entry in outputs:
            if type(entry) is not RequestOutput:
                raise fail("Outputs", "outputs", f"must hold RequestOutput entries, got {show(entry)}")
        _set(self, "outputs", outputs)


@_message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """Something the client sent failed. `request_id` names the request when the failure
    is about one (that request is over); `param` the offending field when known;
    `retryable`: the same message may succeed later (overloaded, shutting down)."""

    request_id: str | None
    code: ErrorCode
    message: str
    retryable: bool = False
    param: str | None = None

    def __post_init__(self) -> None:
        if self.request_id is not None:
            check_id("Error", "request_id", self.request_id)
        if type(self.code) is not ErrorCode:
            try:
                _set(self, "code", ErrorCode(self.code))
            except ValueError:  # also for unhashable junk: Enum lookup falls back to a scan
                raise fail("Error", "code", f"must be one of {[c.value for c in ErrorCode]}, "
                                            f"got {show(self.code)}") from None
        check_str("Error", "message", self.message)
        check_bool("Error", "retryable", self.retryable)
        if self.param is not None:
            check_str("Error", "param", self.param)


@_message("pong")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """The answer to a `Ping`, echoing its `nonce` and `sent_at`."""

    nonce: int
    sent_at: float

    def __post_init__(self) -> None:
        check_int("Pong", "nonce", self.nonce)
        _set(self, "sent_at", check_float("Pong", "sent_at", self.sent_at))


@_message("stats_reply")
@dataclass(frozen=True, slots=True)
class StatsReply(Message):
    """The engine's load: requests waiting and running, KV blocks in use or holding cached
    prefixes, the prefix-cache hit rate, recent throughput, preemptions, clients."""

    waiting: int
    running: int
    kv_total_blocks: int
    kv_used_blocks: int
    kv_cached_blocks: int
    kv_usage: float
    prefix_hit_rate: float
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    num_preemptions: int
    num_clients: int

    def __post_init__(self) -> None:
        for name in ("waiting", "running", "kv_total_blocks", "kv_used_blocks", "kv_cached_blocks",
                     "num_preemptions", "num_clients"):
            check_int("StatsReply", name, getattr(self, name))
        for name, high in (("kv_usage", 1.0), ("prefix_hit_rate", 1.0),
                           ("prompt_tokens_per_s", MAX_FLOAT), ("generation_tokens_per_s", MAX_FLOAT)):
            _set(self, name, check_float("StatsReply", name, getattr(self, name), low=0.0, high=high))


@_message("shutdown")
@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """The engine is stopping: in-flight requests have ended with "abort"; nothing new is
    accepted. Clients should fail over or reconnect later."""

    message: str = ""

    def __post_init__(self) -> None:
        check_str("Shutdown", "message", self.message)


CLIENT_MESSAGES: tuple[type[Message], ...] = (Hello, Generate, Abort, Ping, Stats, Goodbye)
ENGINE_MESSAGES: tuple[type[Message], ...] = (HelloReply, Outputs, Error, Pong, StatsReply, Shutdown)
