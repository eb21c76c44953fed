"""The message types: one frozen msgspec Struct per message, tagged by its wire `type`.

On the wire a message is a msgpack map of its fields plus `type` (the tag) and `v` (the
protocol version); see codec.py and docs/PROTOCOL.md. Field types carry their bounds
(fields.py), so the decoder checks them; building a message checks the same (structs.py).
Sequences are tuples: the messages are immutable values.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta
from msgspec.structs import force_setattr as _set

from splitinfer.protocol.errors import ErrorCode
from splitinfer.protocol.fields import (
    FileName,
    Id,
    Logprob,
    Number,
    PerSecond,
    Rate,
    TokenId,
    UInt,
)
from splitinfer.protocol.sampling_params import MAX_LOGPROBS, SamplingParams
from splitinfer.protocol.structs import FieldError, Struct, building

PROTOCOL_VERSION = 4  # 3: SamplingParams.constraint; 4: prompt logprobs
FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS = frozenset(FinishReason.__args__)


class Message(Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    """Base of every message. `TYPE` is the wire tag; `FIELDS` the field names in order
    (without `v`, which every message carries)."""

    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[str, ...]]

    # Required on the wire, so its default means "absent"; a message built here is stamped.
    v: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if building():
            _set(self, "v", PROTOCOL_VERSION)


# Client -> engine ------------------------------------------------------------------


class Hello(Message, tag="hello"):
    """Opens (or resumes) a session. The same `client_id` with a new `nonce` is a restarted
    client: the engine aborts what the old instance left running."""

    client_id: Id
    nonce: Id
    pid: Annotated[int, Meta(ge=1, le=2**63 - 1)]


class Generate(Message, tag="generate"):
    """Start a request. `request_id` is the client's own name for it (unique among its live
    requests); every `RequestOutput` about it carries the same id."""

    request_id: Id
    prompt_token_ids: Annotated[tuple[TokenId, ...], Meta(min_length=1)]
    params: SamplingParams


class Abort(Message, tag="abort"):
    """Stop requests of this client; each ends with finish reason "abort"."""

    request_ids: Annotated[tuple[Id, ...], Meta(min_length=1)]
    reason: str = ""


class Ping(Message, tag="ping"):
    """Heartbeat (renews the client's lease) and round-trip probe; answered by a `Pong`
    with the same `nonce` and `sent_at` (the sender's clock: only the sender reads it)."""

    nonce: UInt
    sent_at: Number


class Stats(Message, tag="stats"):
    """Ask for a `StatsReply`."""


class Goodbye(Message, tag="goodbye"):
    """The client is leaving: the engine aborts its requests and forgets its session now,
    without waiting for the lease to run out."""

    client_id: Id


# Engine -> client ------------------------------------------------------------------


class HelloReply(Message, tag="hello_reply"):
    """Everything a server needs to serve this engine's model without the checkpoint:
    limits, eos ids, the chat templates (the checkpoint's "tool_use" one, if it has one,
    renders requests with tools) and the tokenizer files' bytes. `lease_s`: the
    client must send something (at least a Ping) this often or lose its requests."""

    engine_id: Id
    model_name: Annotated[str, Meta(min_length=1)]
    max_model_len: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    vocab_size: Annotated[int, Meta(ge=1, le=2**32)]
    eos_token_ids: tuple[TokenId, ...]
    chat_template: str | None
    tokenizer_files: dict[FileName, bytes]
    kv_capacity_tokens: UInt
    block_size: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    lease_s: Annotated[float, Meta(ge=1e-3, le=1e300)]
    tool_chat_template: str | None = None  # rendered instead of chat_template for a request with tools


class TokenLogprobs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Log-probabilities at one position: the sampled (or, for a prompt position, the given)
    token's, and the `top` most likely tokens' as (token_id, logprob) pairs, best first
    (empty if none asked). `rank`: the token's 1-based rank among the whole vocabulary
    (1 + how many tokens are more likely); set for prompt positions only.

    Built per token by the sampler, so checked by a lean `__post_init__` of its own rather
    than the `Struct` base's full conversion (structs.py)."""

    token_id: TokenId
    logprob: Logprob
    top: Annotated[tuple[tuple[TokenId, Logprob], ...], Meta(max_length=MAX_LOGPROBS)] = ()
    rank: Annotated[int, Meta(ge=1, le=2**32)] | None = None

    def __post_init__(self) -> None:
        if not building():  # decoded: the field types already held every rule below
            return
        top = self.top
        if type(top) is not tuple:
            top = tuple(top)
            _set(self, "top", top)
        if len(top) > MAX_LOGPROBS:
            raise FieldError("TokenLogprobs", "top", f"has {len(top)} entries, more than {MAX_LOGPROBS}")
        # A NaN from a broken forward fails here, in the engine's sampler (which the isolating
        # executor pins on its request), not in every server's decoder with the whole step's frame.
        if not self.logprob < _INF or not all(pair[1] < _INF for pair in top):
            raise FieldError("TokenLogprobs", "logprob", "must be a number below +inf (NaN is not)")


class RequestOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One request's news from one engine step: the tokens it generated (usually one;
    none when it only finished, e.g. aborted, or only scored prompt tokens), why it finished
    if it did, logprobs per new token if it asked, the next prompt tokens' logprobs if it
    asked (`prompt_logprobs`: entries for prompt tokens 1, 2, ... in order, continued across
    outputs; the first prompt token has none), and its token counts so far (`num_cached_tokens`: prompt tokens
    served from the prefix cache). A request the engine failed on ends with finish reason
    "error" and `error` saying what happened (no other request is affected).

    Built per request per step by the engine, so checked by a lean `__post_init__` (its
    usual case, a running request without logprobs, costs one comparison)."""

    request_id: Id
    new_token_ids: tuple[TokenId, ...]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    num_prompt_tokens: UInt = 0
    num_output_tokens: UInt = 0
    num_cached_tokens: UInt = 0
    error: str | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None

    def __post_init__(self) -> None:
        if type(self.new_token_ids) is not tuple:
            _set(self, "new_token_ids", tuple(self.new_token_ids))
        if (
            self.logprobs is not None
            or self.finish_reason is not None
            or self.error is not None
            or self.prompt_logprobs is not None
        ):
            self._check()

    def _check(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise FieldError(
                "RequestOutput",
                "finish_reason",
                f"must be None or one of {sorted(FINISH_REASONS)}, got {self.finish_reason!r}",
            )
        logprobs = self.logprobs
        if logprobs is not None:
            if type(logprobs) is not tuple:
                logprobs = tuple(logprobs)
                _set(self, "logprobs", logprobs)
            if len(logprobs) != len(self.new_token_ids):
                raise FieldError(
                    "RequestOutput", "logprobs", f"has {len(logprobs)} entries for {len(self.new_token_ids)} new tokens"
                )
            if not all(type(entry) is TokenLogprobs for entry in logprobs):
                raise FieldError("RequestOutput", "logprobs", "must hold TokenLogprobs")
        scored = self.prompt_logprobs
        if scored is not None:
            if type(scored) is not tuple:
                scored = tuple(scored)
                _set(self, "prompt_logprobs", scored)
            if not all(type(entry) is TokenLogprobs for entry in scored):
                raise FieldError("RequestOutput", "prompt_logprobs", "must hold TokenLogprobs")
        if self.error is not None and self.finish_reason != "error":
            raise FieldError("RequestOutput", "error", "is set only when finish_reason is 'error'")


class Outputs(Message, tag="outputs"):
    """One engine step's news for one client: an entry per request of that client that
    produced tokens or finished in the step."""

    VALIDATE_ON_BUILD: ClassVar[bool] = False  # built per client per step; its entries check themselves

    outputs: tuple[RequestOutput, ...]

    def _check(self) -> None:
        outputs = self.outputs
        if type(outputs) is not tuple:
            outputs = tuple(outputs)
            _set(self, "outputs", outputs)
        # The decoder built every entry itself; a caller may have passed anything.
        if building() and not all(type(entry) is RequestOutput for entry in outputs):
            raise self._fail("outputs", "must hold RequestOutput entries")


class Error(Message, tag="error"):
    """Something the client sent failed. `request_id` names the request when the failure
    is about one (that request is over); `param` the offending field when known;
    `retryable`: the same message may succeed later (the engine is shutting down)."""

    request_id: Id | None
    code: ErrorCode
    message: str
    retryable: bool = False
    param: str | None = None


class Pong(Message, tag="pong"):
    """The answer to a `Ping`, echoing its `nonce` and `sent_at`."""

    nonce: UInt
    sent_at: Number


class StatsReply(Message, tag="stats_reply"):
    """The engine's load: requests waiting and running, KV blocks in use or holding cached
    prefixes, the prefix-cache hit rate, recent throughput, preemptions, clients."""

    waiting: UInt
    running: UInt
    kv_total_blocks: UInt
    kv_used_blocks: UInt
    kv_cached_blocks: UInt
    kv_usage: Rate
    prefix_hit_rate: Rate
    prompt_tokens_per_s: PerSecond
    generation_tokens_per_s: PerSecond
    num_preemptions: UInt
    num_clients: UInt


class Shutdown(Message, tag="shutdown"):
    """The engine is stopping: in-flight requests have ended with "abort"; nothing new is
    accepted. Clients should fail over or reconnect later."""

    message: str = ""


_INF = float("inf")
CLIENT_MESSAGES: tuple[type[Message], ...] = (Hello, Generate, Abort, Ping, Stats, Goodbye)
ENGINE_MESSAGES: tuple[type[Message], ...] = (HelloReply, Outputs, Error, Pong, StatsReply, Shutdown)
MESSAGE_TYPES: dict[str, type[Message]] = {}
for _cls in (*CLIENT_MESSAGES, *ENGINE_MESSAGES):
    _cls.TYPE = _cls.__struct_config__.tag
    _cls.FIELDS = tuple(name for name in _cls.__struct_fields__ if name != "v")
    MESSAGE_TYPES[_cls.TYPE] = _cls
