"""Messages between the HTTP servers and the engine process (msgpack over ZeroMQ).

Plain Python only (msgspec; no torch, no event loop), so both sides import it cheaply.
`docs/PROTOCOL.md` is the wire specification.

- `messages.py`: one frozen msgspec Struct per message, tagged by its wire type. Client to engine:
  `Hello`, `Generate`, `Abort`, `Ping`, `Stats`, `Goodbye`. Engine to client: `HelloReply`,
  `Outputs` (of `RequestOutput`, with `TokenLogprobs`), `Error`, `Pong`, `StatsReply`,
  `Shutdown`.
- `codec.py`: `encode(message) -> bytes` and `decode(bytes, limits) -> message`, the one
  codec; `decode` raises only `ProtocolError` (`errors.py`, with an `ErrorCode`).
- `fields.py`: the value types with their bounds; `structs.py`: the base every type shares
  (checked when decoded and when built) and how a failed check names its field.
- `addresses.py`: `default_engine_address()` and `parse_address()` (ipc:// or tcp://).
- `sampling_params.py`: `SamplingParams`, which `Generate` carries.
- `tokenizer.py`: the checkpoint's tokenizer, built from the files `HelloReply` carries (the
  servers) or from a checkpoint directory (the offline `LLM`); one wrapper for both sides.
"""

from splitinfer.protocol.addresses import Address, default_engine_address, parse_address
from splitinfer.protocol.codec import DEFAULT_LIMITS, Limits, decode, encode
from splitinfer.protocol.errors import ErrorCode, ProtocolError
from splitinfer.protocol.messages import (
    CLIENT_MESSAGES,
    ENGINE_MESSAGES,
    FINISH_REASONS,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Abort,
    Error,
    Generate,
    Goodbye,
    Hello,
    HelloReply,
    Message,
    Outputs,
    Ping,
    Pong,
    RequestOutput,
    Shutdown,
    Stats,
    StatsReply,
    TokenLogprobs,
)
from splitinfer.protocol.sampling_params import SamplingParams

__all__ = [
    "CLIENT_MESSAGES",
    "DEFAULT_LIMITS",
    "ENGINE_MESSAGES",
    "FINISH_REASONS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Abort",
    "Address",
    "Error",
    "ErrorCode",
    "Generate",
    "Goodbye",
    "Hello",
    "HelloReply",
    "Limits",
    "Message",
    "Outputs",
    "Ping",
    "Pong",
    "ProtocolError",
    "RequestOutput",
    "SamplingParams",
    "Shutdown",
    "Stats",
    "StatsReply",
    "TokenLogprobs",
    "decode",
    "default_engine_address",
    "encode",
    "parse_address",
]
