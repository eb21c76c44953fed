"""`python -m splitinfer.server` (console script `splitinfer-server`): one stateless
OpenAI-compatible HTTP server in front of a running engine."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from splitinfer.protocol import default_engine_address, parse_address
from splitinfer.protocol.curve import ClientKeys, load_key_pair, load_public_key
from splitinfer.server.app import DEFAULT_MAX_REQUEST_BYTES, OpenAIServer, ServerConfig
from splitinfer.server.engine_client import DEFAULT_STALL_TIMEOUT_S
from splitinfer.server.tool_calls import TOOL_CALL_FORMAT_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitinfer-server",
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/responses, "
        "/v1/models, vLLM's /tokenize and /detokenize, /health, /metrics) in front of one or more splitinfer "
        "engines. It keeps no state: the models, tokenizers and chat templates come from the engines, so any "
        "number of servers can share them and restart freely, and an engine started or stopped loads or unloads "
        "its model in every server.",
    )
    p.add_argument(
        "--engine",
        action="append",
        default=None,
        metavar="ADDR",
        help="Address of an engine's socket: ipc:///path or tcp://host:port. Repeat it to serve several engines: "
        "each serves the model it names, engines with the same model are replicas, and requests are routed to the "
        f"least loaded replica, preferring the one that has the prompt's prefix cached (default: "
        f"{default_engine_address()}).",
    )
    p.add_argument(
        "--engines-file",
        default=None,
        metavar="FILE",
        help="A file of engines, one per line: an address and, for a CURVE engine with its own key, its public key "
        "file ('#' starts a comment). Served besides any --engine.",
    )
    p.add_argument(
        "--routing",
        default="prefix-affinity",
        choices=["prefix-affinity", "least-loaded"],
        help="How a request picks among a model's replicas: prefix-affinity sends a prompt to the replica that "
        "was sent its beginning, unless it is much busier than the least loaded; least-loaded ignores prefixes "
        "and takes equally loaded replicas in turn (default: %(default)s).",
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: %(default)s).")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s).")
    p.add_argument(
        "--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1 requests (default: no key)."
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="Model name clients must send and /v1/models reports, with a single engine (default: the engine's; "
        "with several, each engine names its model with its own --served-model-name).",
    )
    p.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=["auto", *TOOL_CALL_FORMAT_NAMES, "none"],
        help="How the model writes tool calls, for requests with 'tools': hermes (Qwen2/2.5/3, Hermes: "
        "<tool_call>...</tool_call>), llama3_json (Llama 3.1/3.2: a JSON call, optionally after <|python_tag|>), "
        "mistral ([TOOL_CALLS] [...]); auto picks it from the checkpoint's vocabulary and chat template; none "
        "refuses requests that want calls parsed (default: %(default)s).",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="Largest request body accepted; bigger ones get 413 (default: %(default)s).",
    )
    p.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        help="Seconds the engine's loop may answer nothing (while its connection stays up) before "
        "in-flight requests fail with 503 and the server reconnects. One engine step can legitimately "
        "take long (a CPU prefill). A closed connection counts at once (default: %(default)s).",
    )
    p.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="Serve GET /tokenizer_info (vLLM's): the tokenizer's configuration and the chat template. Off by "
        "default, as in vLLM, since it shows every client the operator's template and settings.",
    )
    p.add_argument(
        "--curve-secret-key",
        default=None,
        metavar="FILE",
        help="This server's CURVE key pair (the NAME.key_secret file splitinfer-keys wrote), for engines that "
        "require keys; the engine must list its NAME.key among its --curve-allowed-keys.",
    )
    p.add_argument(
        "--curve-engine-key",
        default=None,
        metavar="FILE",
        help="The engines' CURVE public key (the engine's NAME.key file); an engine listed in --engines-file may "
        "give its own after its address.",
    )
    p.add_argument(
        "--no-web-ui",
        action="store_true",
        help="Do not serve the chat page at / (by default every server does: a page that lists the models, "
        "streams replies from /v1/chat/completions and asks for the API key when one is required).",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging verbosity (default: %(default)s).",
    )
    return p


@dataclass(frozen=True, slots=True)
class EngineEntry:
    address: str
    public_key_file: str | None = None  # the engine's CURVE public key, if given beside its address


def engine_entries(flags: list[str] | None, file: str | None) -> tuple[EngineEntry, ...]:
    """The --engine flags, then the file's lines ("ADDRESS [ENGINE_PUBLIC_KEY_FILE]"); the
    default address when there are none."""
    entries = [EngineEntry(flag) for flag in flags or []]
    if file is not None:
        for number, line in enumerate(Path(file).read_text().splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if len(fields) > 2:
                raise ValueError(f"{file}:{number}: expected 'ADDRESS [ENGINE_PUBLIC_KEY_FILE]', got {line.strip()!r}")
            if fields:
                entries.append(EngineEntry(*fields))
    if not entries:
        return (EngineEntry(default_engine_address()),)
    addresses = [entry.address for entry in entries]
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(f"engine addresses given more than once: {', '.join(repeated)}")
    for address in addresses:
        parse_address(address)
    return tuple(entries)


def client_keys(
    entries: tuple[EngineEntry, ...], secret_key_file: str | None, engine_key_file: str | None
) -> dict[str, ClientKeys]:
    """Each engine's CURVE settings: this server's pair, and its public key (its own line's, else
    --curve-engine-key). Without --curve-secret-key, none (ValueError if keys are half given)."""
    if secret_key_file is None:
        if engine_key_file is not None or any(e.public_key_file for e in entries):
            raise ValueError("engine public keys need this server's own: give --curve-secret-key")
        return {}
    own = load_key_pair(secret_key_file)
    keys = {}
    for entry in entries:
        key_file = entry.public_key_file or engine_key_file
        if key_file is None:
            raise ValueError(
                f"no public key for the engine at {entry.address}: give --curve-engine-key, or its key file after its "
                "address in --engines-file"
            )
        keys[entry.address] = ClientKeys(own, load_public_key(key_file))
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        entries = engine_entries(args.engine, args.engines_file)
        keys = client_keys(entries, args.curve_secret_key, args.curve_engine_key)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    addresses = tuple(entry.address for entry in entries)
    if args.served_model_name is not None and len(addresses) > 1:
        parser.error("--served-model-name applies to a single engine; start each engine with its own")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        engine_addresses=addresses,
        engine_keys=keys,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        tool_call_parser=args.tool_call_parser,
        max_request_bytes=args.max_request_bytes,
        engine_stall_timeout_s=args.engine_stall_timeout,
        enable_tokenizer_info=args.enable_tokenizer_info_endpoint,
        prefix_affinity=args.routing == "prefix-affinity",
        web_ui=not args.no_web_ui,
    )
    server = OpenAIServer(config)
    uvicorn.run(
        server.app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
