"""What every endpoint needs from HTTP besides its own answer: the request body, the API
key, the client's presence, and every failure answered as OpenAI's error JSON.

- `read_json`: the body, at most `--max-request-bytes` (413), parsed as strict JSON into an
  object (`json_body.py`; large bodies in a worker thread, off the event loop).
- `APIKey`: `Authorization: Bearer KEY` on the /v1 routes, compared in constant time (401).
- `answer`, `guarded`: an endpoint's failures answered in the endpoint itself, so the
  keep-alive connection survives (Starlette's error middleware would re-raise, and uvicorn
  would close it); an unexpected one is a 500 with an incident id (`errors.internal_error`).
- `EXCEPTION_HANDLERS`: Starlette's handlers for what fails outside the endpoints (no such
  route, a method not allowed, a bug in routing or middleware).
- `run_unless_disconnected`: a non-streamed request's work, cancelled (which aborts its
  engine requests) when the client goes away.
- `engine_error`: an engine failure as the `APIError` a client gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from splitinfer.server.engine_client import EngineRequestError, EngineUnavailable
from splitinfer.server.errors import APIError, engine_request_error, engine_unavailable, internal_error
from splitinfer.server.generation import EngineFailure
from splitinfer.server.json_body import parse_json_object

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

PARSE_INLINE_BYTES = 256 * 2**10  # bodies above this are parsed in a worker thread
# Every way the engine can fail a request: `engine_error` turns each into what the client gets.
ENGINE_ERRORS = (EngineRequestError, EngineUnavailable, EngineFailure)


# The request body ----------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object; 413 past `limit` bytes, 400 if it is not strict JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    # The declared length may be absent (chunked) or a lie: count what actually arrives.
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if size <= PARSE_INLINE_BYTES:
        return parse_json_object(raw)
    # Megabytes take a second or more to parse and check: off the event loop, so the
    # server's other streams keep flowing meanwhile.
    return await asyncio.to_thread(parse_json_object, raw)


# Authorization -------------------------------------------------------------------------


class APIKey:
    """The key a /v1 request must send as `Authorization: Bearer KEY`; None: no key needed."""

    def __init__(self, key: str | None) -> None:
        # The key's bytes as the command line gave them (argv undecodable as UTF-8 arrives escaped).
        self._key = key.encode("utf-8", "surrogateescape") if key is not None else None

    def check(self, request: Request) -> None:
        """Raise a 401 unless the request carries the key."""
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant time, so response times do not reveal how much of a guess was right
        # (vLLM fixed the same after a timing-attack advisory). As bytes: compare_digest takes
        # str only when it is ASCII; Starlette decodes header bytes as latin-1.
        if not secrets.compare_digest(token.strip().encode("latin-1"), self._key) or scheme.lower() != "bearer":
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    def required(self, handler: Handler) -> Handler:
        """`handler`, refusing requests without the key first."""

        async def authorized(request: Request) -> Response:
            self.check(request)
            return await handler(request)

        return authorized


# Failures inside an endpoint -----------------------------------------------------------


class ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


def _where(request: Request) -> str:
    return f"{request.method} {request.url.path}"


async def answer(request: Request, handler: Handler) -> Response:
    """`handler`'s response, or the response to what it raised: an `APIError` as itself, a
    client gone as 499 (no one reads it; it is for the metrics), anything else a 500."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except ClientGone:
        logger.info("%s: the client disconnected; its request was aborted", _where(request))
        return Response(status_code=499)
    except Exception as exc:
        # Answered here, not by Starlette's error middleware, which re-raises after its
        # 500 so that uvicorn drops the connection: the client's next request on it failed.
        return internal_error(exc, _where(request)).response()


def guarded(handler: Handler) -> Handler:
    """For the routes outside /v1 (no key, no metrics): every failure answered by `answer`
    too, so an unexpected one keeps the connection."""

    async def endpoint(request: Request) -> Response:
        return await answer(request, handler)

    return endpoint


def engine_error(exc: Exception, prompt_param: str) -> APIError:
    """One of `ENGINE_ERRORS` as the client sees it: the engine's refusal as a 400 (or 500),
    the engine gone or failing a request as a retryable 503. `prompt_param`: the request's
    field the engine's `prompt` is (`messages`, `prompt`)."""
    if isinstance(exc, EngineRequestError):
        return engine_request_error(exc, prompt_param)
    return engine_unavailable(str(exc))


# Failures outside the endpoints --------------------------------------------------------


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no route for {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code=codes.get(exc.status_code))
    return error.response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Only for what fails outside the routes' own guards (routing, middleware): after it,
    # Starlette re-raises and uvicorn closes the connection.
    return internal_error(exc, _where(request)).response()


# Starlette calls the handler of the exception's nearest class in this mapping.
EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    HTTPException: _http_exception,
    Exception: _unexpected,
}


# The client's presence -----------------------------------------------------------------


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (which aborts its engine
    requests) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself cancelled (a server shutting down): so is the work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()
