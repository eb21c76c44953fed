"""The OpenAI-compatible HTTP server: Starlette routes over one `EngineClient`.

Stateless: the model's name, limits, tokenizer and chat template all come from the
engine's `HelloReply` (`model_context.py`), so a server needs no checkpoint and can be
killed and restarted at any time. What every route shares, reading the body, checking the
API key and answering every failure as OpenAI's error JSON, is `http.py`.

Requests: validate the body (`openai_params.py`), turn the messages or prompts into token
ids within the model's limits (`model_context.py`), run the choices in the engine
(`generation.py`), answer in the endpoint's format (`responses.py`; the Responses API's,
which is a chat request in other words, in `responses_request.py` and `responses_api.py`).
A streamed request fetches its first event before the response starts, so a refusal by the
engine still gets a proper status code; after that, a failure is an error event (then
`data: [DONE]` for chat and completions).
A client that disconnects has its request aborted at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitinfer.protocol.curve import ClientKeys
from splitinfer.server import tokenization, web_ui
from splitinfer.server.engine_client import DEFAULT_STALL_TIMEOUT_S, EngineClient
from splitinfer.server.engine_pool import EnginePool
from splitinfer.server.errors import APIError, engine_unavailable, internal_error
from splitinfer.server.generation import ChoiceEvent, ChoiceSpec, Timing, merged_choices
from splitinfer.server.http import (
    ENGINE_ERRORS,
    EXCEPTION_HANDLERS,
    APIKey,
    Handler,
    answer,
    engine_error,
    guarded,
    read_json,
    run_unless_disconnected,
)
from splitinfer.server.metrics import ServerMetrics
from splitinfer.server.model_context import ModelContext
from splitinfer.server.openai_params import (
    ChatRequest,
    Common,
    choice_specs,
    parse_chat,
    parse_completion,
    with_constraint,
)
from splitinfer.server.responses import ChatFormat, CompletionFormat, EchoedPrompt, ResponseWriter, Usage, collect
from splitinfer.server.responses_api import ResponsesAPIFormat
from splitinfer.server.responses_request import parse_responses, responses_error
from splitinfer.server.router import Router
from splitinfer.server.tool_calls import ToolStreamParser

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine_addresses: tuple[str, ...]
    api_key: str | None = None
    served_model_name: str | None = None
    tool_call_parser: str = "auto"  # a TOOL_CALL_FORMATS name, "auto" (the checkpoint's) or "none"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    engine_stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    enable_tokenizer_info: bool = False  # GET /tokenizer_info shows the tokenizer config and chat template
    prefix_affinity: bool = True  # route a prompt to the replica that was sent its prefix (router.py)
    web_ui: bool = True  # the chat page at / (web_ui.py)
    engine_keys: Mapping[str, ClientKeys] = field(default_factory=dict)  # CURVE, by engine address


class OpenAIServer:
    def __init__(self, config: ServerConfig, pool: EnginePool | None = None) -> None:
        self.config = config
        self.pool = pool or EnginePool(
            config.engine_addresses,
            lambda address: EngineClient(
                address,
                connect_timeout_s=2.0,
                stall_timeout_s=config.engine_stall_timeout_s,
                keys=config.engine_keys.get(address),
            ),
            served_model_name=config.served_model_name,
            tool_call_parser=config.tool_call_parser,
            router=Router(affinity=config.prefix_affinity),
        )
        self.metrics = ServerMetrics()
        self._api_key = APIKey(config.api_key)
        routes = [
            Route("/v1/chat/completions", self._endpoint("chat", self.chat_completions), methods=["POST"]),
            Route("/v1/completions", self._endpoint("completions", self.completions), methods=["POST"]),
            Route("/v1/responses", self._endpoint("responses", self.responses), methods=["POST"]),
            Route(
                "/v1/responses/{response_id:path}",
                self._endpoint("responses", self.stored_response),
                methods=["GET", "POST", "DELETE"],
            ),
            Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._endpoint("model", self.model), methods=["GET"]),
            Route("/tokenize", self._endpoint("tokenize", self.tokenize), methods=["POST"]),
            Route("/detokenize", self._endpoint("detokenize", self.detokenize), methods=["POST"]),
            Route("/health", guarded(self.health), methods=["GET"]),
            Route("/metrics", guarded(self.metrics_endpoint), methods=["GET"]),
        ]
        if config.web_ui:
            routes += web_ui.routes()
        if config.enable_tokenizer_info:
            routes.append(
                Route("/tokenizer_info", self._endpoint("tokenizer_info", self.tokenizer_info), methods=["GET"])
            )
        self.app = Starlette(routes=routes, lifespan=self._lifespan, exception_handlers=EXCEPTION_HANDLERS)

    # Lifecycle -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.pool.start()  # connects in the background: the server answers 503 until then
        try:
            yield
        finally:
            await self.pool.close()

    def _endpoint(self, name: str, handler: Handler) -> Handler:
        """A /v1 route: the API key checked, every failure answered (`http.answer`), counted by status."""
        authorized = self._api_key.required(handler)

        async def endpoint(request: Request) -> Response:
            response = await answer(request, authorized)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    # Endpoints -----------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        req = parse_chat(await read_json(request, self.config.max_request_bytes))
        ctx = self.pool.context(req.common.model)
        common, specs, tool_parser = self._chat_choices(ctx, req)
        top = req.top_logprobs if req.logprobs else None
        fmt = ChatFormat(
            ctx.tokenizer, top, common.include_usage, prompt_logprobs=common.prompt_logprobs, tool_parser=tool_parser
        )
        return await self._respond(request, ctx, common, specs, fmt)

    async def responses(self, request: Request) -> Response:
        req = parse_responses(await read_json(request, self.config.max_request_bytes))
        try:
            ctx = self.pool.context(req.chat.common.model)
            common, specs, tool_parser = self._chat_choices(ctx, req.chat)
        except APIError as exc:
            raise responses_error(exc) from None
        fmt = ResponsesAPIFormat(echoed=req.echoed, tool_parser=tool_parser)
        return await self._respond(request, ctx, common, specs, fmt)

    async def stored_response(self, request: Request) -> Response:
        raise APIError(
            400,
            "this server keeps no responses, so none can be retrieved, listed, cancelled or deleted; each "
            "/v1/responses request carries its whole conversation in 'input'",
            param="response_id",
            code="unsupported_parameter",
        )

    def _chat_choices(
        self, ctx: ModelContext, req: ChatRequest
    ) -> tuple[Common, list[ChoiceSpec], Callable[[], ToolStreamParser] | None]:
        """A chat request's engine requests, and the parser of each reply when its tool calls are
        parsed (a required or named call enforced by a grammar)."""
        tools, common = req.tools, req.common
        prompt_ids = ctx.chat_prompt(req.messages, tools.template_tools if tools else None, req.prompt_options)
        max_tokens = ctx.max_tokens(len(prompt_ids), common.max_tokens)
        tool_parser, markers = None, frozenset()
        if tools is not None and tools.parses_calls:
            tool_format = ctx.require_tool_format()
            if tools.enforced:
                common = with_constraint(common, tools.constraint(tool_format, ctx.tokenizer.token_to_id))
            tool_parser, markers = functools.partial(tools.parser, tool_format), ctx.tool_markers
        return common, choice_specs(common, [prompt_ids], max_tokens, keep_special=markers), tool_parser

    async def completions(self, request: Request) -> Response:
        req = parse_completion(await read_json(request, self.config.max_request_bytes))
        ctx = self.pool.context(req.common.model)
        prompts = ctx.completion_prompts(req.prompts)
        max_tokens = min(ctx.max_tokens(len(ids), req.common.max_tokens) for ids in prompts)
        echo = tuple(_echoed(ctx, given, ids) for given, ids in zip(req.prompts, prompts)) if req.echo else ()
        fmt = CompletionFormat(
            ctx.tokenizer,
            req.logprobs,
            req.common.include_usage,
            prompt_logprobs=req.common.prompt_logprobs,
            echo=echo,
            n=req.common.n,
        )
        return await self._respond(request, ctx, req.common, choice_specs(req.common, prompts, max_tokens), fmt)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [ctx.card() for ctx in self.pool.contexts()]})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.pool.context(request.path_params["model_id"]).card())

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_request_bytes)
        return JSONResponse(tokenization.tokenize(self._tokenizer_context(body), body))

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_request_bytes)
        return JSONResponse(tokenization.detokenize(self._tokenizer_context(body), body))

    async def tokenizer_info(self, request: Request) -> Response:
        model = request.query_params.get("model")
        return JSONResponse(
            tokenization.tokenizer_info(self.pool.context(model) if model else self.pool.only_context())
        )

    def _tokenizer_context(self, body: dict) -> ModelContext:
        """The model a tokenizer request names, or the only one served (`model` is optional there)."""
        model = tokenization.requested_model(body)
        return self.pool.context(model) if model is not None else self.pool.only_context()

    async def health(self, request: Request) -> Response:
        healthy, body = await self.pool.health()
        if healthy:
            return JSONResponse(body)
        # OpenAI's error JSON, as every failure here, with the engines' states beside it.
        if body["missing_models"]:
            why = "no engine serving " + ", ".join(f"'{m}'" for m in body["missing_models"]) + " is connected"
        else:
            why = "no engine is connected and answering"
        return JSONResponse({**engine_unavailable(why).body(), **body}, status_code=503)

    async def metrics_endpoint(self, request: Request) -> Response:
        await self.pool.refresh_stats()
        self.metrics.observe_engines(self.pool)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # Generation ----------------------------------------------------------------------

    async def _respond(
        self, request: Request, ctx: ModelContext, common: Common, specs: list[ChoiceSpec], fmt: ResponseWriter
    ) -> Response:
        timing = Timing()
        lease = self.pool.route(ctx, specs[0].prompt_token_ids, len(specs))
        self.metrics.routed.labels(lease.handle.address, ctx.name).inc()
        events = merged_choices(lease.client, ctx.tokenizer, specs, timing)
        head = fmt.head(ctx.name)
        usage = Usage(common.n)
        streaming = False
        try:
            if not common.stream:
                choices = await run_unless_disconnected(request, collect(events, len(specs), usage))
                self.metrics.observe_request(timing, usage)
                return JSONResponse(fmt.body(head, choices, usage))
            # The first event before the response starts: an engine refusal still gets its status code.
            first = await run_unless_disconnected(request, anext(events))
            streaming = True
        except ENGINE_ERRORS as exc:
            raise engine_error(exc, fmt.prompt_param) from None
        except StopAsyncIteration:
            raise APIError(500, "the engine produced no output", code="internal_error") from None
        finally:
            if not streaming:  # whatever went wrong, no choice may stay running in the engine
                lease.release()
                await events.aclose()
        chunks = fmt.chunks(head, _prepended(first, events), usage)

        async def end_of_stream() -> None:
            # However the response ends, even cancelled before its first event: the lease is
            # released and every choice still running aborted.
            lease.release()
            await events.aclose()

        return _Stream(self._sse(chunks, events, timing, usage, fmt), end_of_stream)

    async def _sse(
        self,
        chunks: AsyncGenerator[dict, None],
        events: AsyncGenerator[ChoiceEvent, None],
        timing: Timing,
        usage: Usage,
        fmt: ResponseWriter,
    ) -> AsyncIterator[dict]:
        """SSE events: each chunk, then [DONE] where the format ends so. A failure mid-stream (the
        status is sent by now) becomes an error event, the stream's last."""
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield fmt.sse(chunk)
            self.metrics.observe_request(timing, usage)
        except ENGINE_ERRORS as exc:
            yield fmt.sse(fmt.error_chunk(engine_error(exc, fmt.prompt_param)))
        except Exception as exc:  # a bug of ours: the client still gets an error event (and [DONE])
            yield fmt.sse(fmt.error_chunk(internal_error(exc, "a streamed response")))
        finally:
            await events.aclose()  # ends (aborts) every choice still running, the client gone or not
        if fmt.ends_with_done:
            yield {"data": "[DONE]"}


class _Stream(EventSourceResponse):
    """An SSE response that runs `on_end` however it ends: finished, failed, or cancelled
    before its generator ever started (a client gone while the headers were being sent), when
    the generator's own `finally` would never run."""

    def __init__(self, content: AsyncIterator[dict], on_end: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, sep="\n")
        self._on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_end()


def _echoed(ctx: ModelContext, given: str | list[int], ids: list[int]) -> EchoedPrompt:
    """A prompt as echo repeats it: a text prompt as the client sent it, token ids as their text
    (special tokens spelled out, as each token's own entry in the logprobs is)."""
    text = given if isinstance(given, str) else ctx.tokenizer.decode(ids, skip_special_tokens=False)
    return EchoedPrompt(text, ids[0])


async def _prepended(first: ChoiceEvent, rest: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    yield first
    async for event in rest:
        yield event
