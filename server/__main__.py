"""`python -m splitinfer.server` (console script `splitinfer-server`): one stateless
OpenAI-compatible HTTP server in front of a running engine."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from splitinfer.protocol import default_engine_address
from splitinfer.server.app import DEFAULT_MAX_REQUEST_BYTES, OpenAIServer, ServerConfig
from splitinfer.server.engine_client import DEFAULT_STALL_TIMEOUT_S
from splitinfer.server.tool_calls import TOOL_CALL_FORMAT_NAMES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitinfer-server",
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/responses, "
        "/v1/models, vLLM's /tokenize and /detokenize, /health, /metrics) in front of a splitinfer engine. It keeps "
        "no state: the model, tokenizer and chat template come from the engine, so any number of servers can share "
        "one engine and restart freely.",
    )
    p.add_argument(
        "--engine",
        default=default_engine_address(),
        help="Address of the engine's socket: ipc:///path or tcp://host:port (default: %(default)s).",
    )
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default: %(default)s).")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: %(default)s).")
    p.add_argument(
        "--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1 requests (default: no key)."
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="Model name clients must send and /v1/models reports (default: the engine's).",
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
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging verbosity (default: %(default)s).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        engine_address=args.engine,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        tool_call_parser=args.tool_call_parser,
        max_request_bytes=args.max_request_bytes,
        engine_stall_timeout_s=args.engine_stall_timeout,
        enable_tokenizer_info=args.enable_tokenizer_info_endpoint,
    )
    server = OpenAIServer(config)
    uvicorn.run(
        server.app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
