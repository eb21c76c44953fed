"""The real HTTP server process with two injected bugs, for the error-handling tests:

    python tests/faulty_server.py SERVER-ARGS...

- a completions request whose prompt is TRIGGER raises inside the handler, with a message
  that holds a file path (which must not reach the client);
- the usage chunk of a stream (asked with `stream_options.include_usage`) raises, after
  the tokens have been streamed.

Everything else is `python -m splitinfer.server`.
"""

from __future__ import annotations

import sys

from splitinfer.server import app, responses
from splitinfer.server.__main__ import main

TRIGGER = "raise an internal error"
SECRET = "/srv/secret/splitinfer/handler.py"


def inject() -> None:
    real_parse = app.parse_completion

    def parse_completion(body: dict):
        if body.get("prompt") == TRIGGER:
            raise RuntimeError(f"injected bug at {SECRET}:42")
        return real_parse(body)

    def usage_chunk(*args, **kwargs):
        raise RuntimeError(f"injected bug at {SECRET}:99")

    app.parse_completion = parse_completion
    responses.usage_chunk = usage_chunk


if __name__ == "__main__":
    inject()
    sys.exit(main(sys.argv[1:]))
