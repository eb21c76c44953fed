"""The OpenAI-compatible HTTP server: Starlette routes over one `EngineClient`.

Stateless: the model's name, limits, tokenizer and chat template all come from the
engine's `HelloReply`, so a server needs no checkpoint and can be killed and restarted
at any time. Every error is OpenAI's error JSON with the right status (`errors.py`).

Requests: validate the body (`openai_params.py`), render the chat template, tokenize,
check the context length, then run the choices in the engine (`generation.py`). A
streamed request fetches its first event before the response starts, so a refusal by
the engine still gets a proper status code; after that, failures are an error event
followed by `data: [DONE]`. A client that disconnects has its request aborted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitinfer.protocol import HelloReply
from splitinfer.server.chat_template import ChatTemplate, ChatTemplateError
from splitinfer.server.engine_client import (
    DEFAULT_STALL_TIMEOUT_S,
    EngineClient,
    EngineRequestError,
    EngineUnavailable,
    Health,
)
from splitinfer.server.errors import APIError, bad_request, engine_request_error, engine_unavailable, internal_error
from splitinfer.server.json_body import parse_json_object
from splitinfer.server.generation import ChoiceEvent, ChoiceSpec, EngineFailure, Timing, merged_choices
from splitinfer.server.metrics import ServerMetrics
from splitinfer.server.openai_params import Common, choice_params, parse_chat, parse_completion
from splitinfer.server import responses
from splitinfer.server.tokenizer import ServerTokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
PARSE_INLINE_BYTES = 256 * 2**10  # bodies above this are parsed in a worker thread
ENGINE_FAILURES = (EngineUnavailable, EngineFailure)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine_address: str
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    engine_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class ModelContext:
    """What one engine instance told us: built once per engine id."""

    info: HelloReply
    name: str
    tokenizer: ServerTokenizer
    template: ChatTemplate


class ClientGone(Exception):
    """The HTTP client disconnected before its response was complete."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(request: Request, work: Awaitable) -> object:
    """Await `work`; if the client disconnects first, cancel it (which aborts its engine
    requests) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


class OpenAIServer:
    def __init__(self, config: ServerConfig, client: EngineClient | None = None) -> None:
        self.config = config
        self.client = client or EngineClient(config.engine_address, connect_timeout_s=2.0,
                                             stall_timeout_s=config.engine_stall_timeout_s)
        self.metrics = ServerMetrics()
        # The key's bytes as the command line gave them (argv undecodable as UTF-8 arrives escaped).
        self._api_key = config.api_key.encode("utf-8", "surrogateescape") if config.api_key is not None else b""
        self._context: ModelContext | None = None
        self._connector: asyncio.Task | None = None
        routes = [
            Route("/v1/chat/completions", self._endpoint("chat", self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self._endpoint("completions", self.completions), methods=["POST"]),
            Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._endpoint("model", self.model), methods=["GET"]),
            Route("/health", self._guarded(self.health), methods=["GET"]),
            Route("/metrics", self._guarded(self.metrics_endpoint), methods=["GET"]),
        ]
        self.app = Starlette(
            routes=routes, lifespan=self._lifespan,
            exception_handlers={HTTPException: self._http_exception, Exception: self._unexpected},
        )

    # Lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._connector = asyncio.create_task(self._connect_until_ready())
        try:
            yield
        finally:
            self._connector.cancel()
            await self.client.close()

    async def _connect_until_ready(self) -> None:
        backoff = 0.1
        while True:
            try:
                info = await self.client.start()
                logger.info("engine %s ready: model %s, max_model_len %d", info.engine_id, info.model_name,
                            info.max_model_len)
                return
            except EngineUnavailable as exc:
                logger.warning("%s; retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 2.0)

    def context(self) -> ModelContext:
        """The model as the connected engine describes it; 503 while there is none."""
        info = self.client.info
        if self.client.health is not Health.READY or info is None:
            raise engine_unavailable(f"not connected to {self.config.engine_address}")
        if self._context is None or self._context.info.engine_id != info.engine_id:
            tokenizer = ServerTokenizer.from_files(info.tokenizer_files)
            self._context = ModelContext(
                info=info, name=self.config.served_model_name or info.model_name, tokenizer=tokenizer,
                template=ChatTemplate(info.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or ""),
            )
        return self._context

    # Plumbing ------------------------------------------------------------------------

    def _endpoint(self, name: str, handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                self._authorize(request)
                response = await handler(request)
            except APIError as exc:
                response = exc.response()
            except ClientGone:
                logger.info("%s %s: the client disconnected; its request was aborted", request.method, request.url.path)
                response = Response(status_code=499)
            except Exception as exc:
                # Answered here, not by Starlette's error middleware, which re-raises after its
                # 500 so that uvicorn drops the connection: the client's next request on it failed.
                response = internal_error(exc, f"{request.method} {request.url.path}").response()
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    @staticmethod
    def _guarded(handler: Callable[[Request], Awaitable[Response]]):
        """The unauthenticated routes: an unexpected error answered here too, keeping the connection."""
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return internal_error(exc, f"{request.method} {request.url.path}").response()

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant time, so response times do not reveal how much of a guess was right
        # (vLLM fixed the same after a timing-attack advisory). As bytes: compare_digest takes
        # str only when it is ASCII; Starlette decodes header bytes as latin-1.
        if not secrets.compare_digest(token.strip().encode("latin-1"), self._api_key) \
                or scheme.lower() != "bearer":
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}", code="request_too_large")
        chunks, size = [], 0
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

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        messages = {404: f"no route for {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        codes = {404: "not_found", 405: "method_not_allowed"}
        error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code=codes.get(exc.status_code))
        return error.response()

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        # Only for what fails outside the routes' own guards (routing, middleware): after it,
        # Starlette re-raises and uvicorn closes the connection.
        return internal_error(exc, f"{request.method} {request.url.path}").response()

    def _check_model(self, ctx: ModelContext, model: str) -> None:
        if model != ctx.name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{ctx.name}'",
                           param="model", code="model_not_found")

    def _max_tokens(self, ctx: ModelContext, prompt_len: int, requested: int | None, what: str) -> int:
        limit = ctx.info.max_model_len
        wanted = requested if requested is not None else max(limit - prompt_len, 0)
        if prompt_len + max(wanted, 1) > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max(wanted, 1)} tokens ({prompt_len} in the {what}, {max(wanted, 1)} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                param=what, code="context_length_exceeded")
        return wanted

    # Endpoints -----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await self._read_json(request)
        ctx = self.context()
        req = parse_chat(body)
        self._check_model(ctx, req.common.model)
        try:
            prompt = ctx.template.render(req.messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            if exc.param is None:  # the checkpoint's template itself is broken: our fault, not the client's
                raise APIError(500, f"the model's chat template failed: {exc}", code="chat_template_error") from None
            raise bad_request(str(exc), param=exc.param) from None
        prompt_ids = ctx.tokenizer.encode_chat_prompt(prompt)
        max_tokens = self._max_tokens(ctx, len(prompt_ids), req.common.max_tokens, "messages")
        specs = self._specs(req.common, [prompt_ids], max_tokens)
        top = req.top_logprobs if req.logprobs else None
        return await self._respond(request, ctx, req.common, specs, "chat", top)

    async def completions(self, request: Request) -> Response:
        body = await self._read_json(request)
        ctx = self.context()
        req = parse_completion(body)
        self._check_model(ctx, req.common.model)
        prompts = []
        for i, prompt in enumerate(req.prompts):
            ids = ctx.tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise bad_request(f"prompt {i} is empty", param="prompt")
            if any(not 0 <= t < ctx.info.vocab_size for t in ids):
                raise bad_request(f"prompt {i} has a token id outside [0, {ctx.info.vocab_size})", param="prompt")
            prompts.append(ids)
        max_tokens = min(self._max_tokens(ctx, len(ids), req.common.max_tokens, "prompt") for ids in prompts)
        specs = self._specs(req.common, prompts, max_tokens)
        return await self._respond(request, ctx, req.common, specs, "completions", req.logprobs)

    def _specs(self, common: Common, prompts: list[list[int]], max_tokens: int) -> list[ChoiceSpec]:
        base = responses.new_id("req")
        return [
            ChoiceSpec(index=p * common.n + i, request_id=f"{base}-{p * common.n + i}", prompt_token_ids=ids,
                       params=choice_params(common, max_tokens, p * common.n + i), stop=common.stop)
            for p, ids in enumerate(prompts) for i in range(common.n)
        ]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(self.context())]})

    async def model(self, request: Request) -> Response:
        ctx = self.context()
        model_id = request.path_params["model_id"]
        self._check_model(ctx, model_id)
        return JSONResponse(self._model_card(ctx))

    def _model_card(self, ctx: ModelContext) -> dict:
        return {"id": ctx.name, "object": "model", "created": 0, "owned_by": "splitinfer",
                "max_model_len": ctx.info.max_model_len}

    async def health(self, request: Request) -> Response:
        if self.client.health is Health.READY:
            with contextlib.suppress(EngineUnavailable, asyncio.TimeoutError):
                await self.client.ping(timeout_s=1.0)
                return JSONResponse({"status": "ok", "engine_id": self.client.info.engine_id})
        return engine_unavailable(self.client.health.value).response()

    async def metrics_endpoint(self, request: Request) -> Response:
        stats = None
        if self.client.health is Health.READY:
            with contextlib.suppress(EngineUnavailable, asyncio.TimeoutError):
                stats = await self.client.stats(timeout_s=1.0)
        self.metrics.observe_engine(stats)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Generation ----------------------------------------------------------------------

    async def _respond(self, request: Request, ctx: ModelContext, common: Common, specs: list[ChoiceSpec],
                       kind: str, logprobs: int | None) -> Response:
        timing = Timing()
        events = merged_choices(self.client, ctx.tokenizer, specs, timing)
        response_id = responses.new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = responses.now()
        streaming = False
        try:
            if not common.stream:
                choices, usage = await run_unless_disconnected(request, self._collect(events, len(specs), common.n))
                self._observe(timing, usage)
                build = responses.chat_completion if kind == "chat" else responses.text_completion
                return JSONResponse(build(response_id, ctx.name, created, choices, usage, ctx.tokenizer, logprobs))
            first = await run_unless_disconnected(request, anext(events))
            streaming = True
        except EngineRequestError as exc:
            raise engine_request_error(exc) from None
        except ENGINE_FAILURES as exc:
            raise engine_unavailable(str(exc)) from None
        except StopAsyncIteration:
            raise APIError(500, "the engine produced no output", code="internal_error") from None
        finally:
            if not streaming:  # whatever went wrong, no choice may stay running in the engine
                await events.aclose()
        stream = self._chat_events if kind == "chat" else self._completion_events
        return EventSourceResponse(
            stream(first, events, ctx, common, response_id, created, logprobs, timing), sep="\n")

    async def _collect(self, events: AsyncIterator[ChoiceEvent], count: int, n: int):
        choices = [responses.ChoiceText() for _ in range(count)]
        usage = responses.Usage()
        async for event in events:
            choices[event.index].add(event)
            usage.add(event, event.index // n)
        return choices, usage

    def _observe(self, timing: Timing, usage: responses.Usage) -> None:
        if timing.first_token is not None:
            self.metrics.ttft.observe(timing.first_token - timing.start)
        for gap in timing.token_gaps:
            self.metrics.inter_token.observe(gap)
        self.metrics.e2e.observe(time.perf_counter() - timing.start)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)

    async def _stream(self, first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent], common: Common,
                      timing: Timing, to_chunks: Callable[[ChoiceEvent], list[dict]], usage_chunk: Callable) -> \
            AsyncIterator[dict]:
        """SSE events: each choice event as chunks, the usage chunk if asked, then [DONE]. An engine
        failure mid-stream becomes an error event (then [DONE])."""
        usage = responses.Usage()

        async def all_events() -> AsyncIterator[ChoiceEvent]:
            yield first
            async for event in rest:
                yield event

        try:
            async for event in all_events():
                usage.add(event, event.index // common.n)
                for chunk in to_chunks(event):
                    yield {"data": json.dumps(chunk)}
            if common.include_usage:
                yield {"data": json.dumps(usage_chunk(usage))}
            self._observe(timing, usage)
        except EngineRequestError as exc:
            yield {"data": json.dumps(engine_request_error(exc).body())}
        except ENGINE_FAILURES as exc:
            yield {"data": json.dumps(engine_unavailable(str(exc)).body())}
        except Exception as exc:  # a bug of ours: the client still gets an error event and [DONE]
            yield {"data": json.dumps(internal_error(exc, "a streamed response").body())}
        finally:
            await rest.aclose()
        yield {"data": "[DONE]"}

    def _chat_events(self, first, rest, ctx: ModelContext, common: Common, response_id: str, created: int,
                     top: int | None, timing: Timing) -> AsyncIterator[dict]:
        started: set[int] = set()

        def chunk(index: int, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
            return responses.chat_chunk(response_id, ctx.name, created, index, delta, logprobs, finish,
                                        common.include_usage)

        def to_chunks(event: ChoiceEvent) -> list[dict]:
            out = []
            if event.index not in started:  # the role, once, on each choice's first chunk
                started.add(event.index)
                out.append(chunk(event.index, {"role": "assistant", "content": ""}))
            logprobs = responses.chat_logprobs(ctx.tokenizer, event.logprobs, top) \
                if top is not None and event.logprobs else None
            if event.text or logprobs:
                out.append(chunk(event.index, {"content": event.text}, logprobs))
            if event.finish_reason is not None:
                out.append(chunk(event.index, {}, None, event.finish_reason))
            return out

        return self._stream(first, rest, common, timing, to_chunks,
                            lambda usage: responses.usage_chunk(response_id, ctx.name, created,
                                                                "chat.completion.chunk", usage))

    def _completion_events(self, first, rest, ctx: ModelContext, common: Common, response_id: str, created: int,
                           logprobs: int | None, timing: Timing) -> AsyncIterator[dict]:
        offsets: dict[int, int] = {}

        def to_chunks(event: ChoiceEvent) -> list[dict]:
            lp = None
            if logprobs is not None and event.logprobs:
                lp = responses.completion_logprobs(ctx.tokenizer, event.logprobs, offsets.get(event.index, 0))
            offsets[event.index] = offsets.get(event.index, 0) + len(event.text)
            if not (event.text or lp or event.finish_reason):
                return []
            return [responses.completion_chunk(response_id, ctx.name, created, event.index, event.text, lp,
                                               event.finish_reason, common.include_usage)]

        return self._stream(first, rest, common, timing, to_chunks,
                            lambda usage: responses.usage_chunk(response_id, ctx.name, created,
                                                                "text_completion", usage))


def build_app(config: ServerConfig) -> Starlette:
    return OpenAIServer(config).app
