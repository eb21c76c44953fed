"""The engines one server serves: any number, any models, joining and leaving by themselves.

    pool = EnginePool(["ipc:///run/a.sock", "tcp://10.0.0.2:5555"], client_factory)
    await pool.start()                    # connects in the background; never waits for an engine
    ctx = pool.context("llama-8b")        # the model's ModelContext (404 / 503 when it has none)
    lease = pool.route(ctx, prompt_ids, n)
    ... lease.client.generate(...) ...
    lease.release()

Each configured address has one `EngineClient`, which reconnects by itself when its engine
dies or restarts. An engine says which model it serves in its `HelloReply`, so the models
a server offers are simply those of its live engines: starting an engine loads a model into
every server configured with it, stopping it unloads it, within the time the connection
takes to notice (at once for a killed process, `TRANSPORT_TIMEOUT_S` for a lost host).

Engines that report the same model name are replicas and must be identical (tokenizer,
templates, limits): a prompt is tokenized once, with the model's context, and then routed
(`router.py`). A replica that differs is left out with an error in the log, as its outputs
would not match its prompts. A background task asks every live engine for its stats twice
a second: the router's view of the other servers' load, and the per-engine metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitinfer.protocol import StatsReply
from splitinfer.server.engine_client import EngineClient, EngineUnavailable, Health
from splitinfer.server.errors import APIError, engine_unavailable
from splitinfer.server.model_context import ModelContext, served_name
from splitinfer.server.router import Candidate, Router

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5
STATS_TIMEOUT_S = 2.0


@dataclass(eq=False)
class EngineHandle:
    """One configured engine address, its client and what the server knows of its load."""

    address: str
    client: EngineClient
    inflight: int = 0  # engine requests this server has sent it and not yet seen end
    others: int = 0  # other servers' requests in it, as its last stats showed
    stats: StatsReply | None = None
    stats_engine_id: str | None = None  # the instance the stats came from

    @property
    def live(self) -> bool:
        return self.client.health is Health.READY and self.client.info is not None

    @property
    def engine_id(self) -> str | None:
        return self.client.info.engine_id if self.client.info is not None else None

    @property
    def current_stats(self) -> StatsReply | None:
        """The last stats, if they came from the instance connected now."""
        if self.live and self.stats is not None and self.stats_engine_id == self.engine_id:
            return self.stats
        return None

    @property
    def load(self) -> int:
        return self.inflight + self.others


class Lease:
    """One request's hold on the engine it was routed to; `release` when its choices end."""

    __slots__ = ("handle", "_count")

    def __init__(self, handle: EngineHandle, count: int) -> None:
        self.handle = handle
        self._count = count
        handle.inflight += count

    @property
    def client(self) -> EngineClient:
        return self.handle.client

    def release(self) -> None:
        """Idempotent: the request's paths may each end it."""
        self.handle.inflight -= self._count
        self._count = 0


class EnginePool:
    def __init__(
        self,
        addresses: Sequence[str],
        client_factory: Callable[[str], EngineClient],
        served_model_name: str | None = None,
        tool_call_parser: str = "auto",
        router: Router | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("an engine pool needs at least one engine address")
        if len(set(addresses)) != len(addresses):
            raise ValueError("an engine address is given twice")
        if served_model_name is not None and len(addresses) > 1:
            raise ValueError("a served model name applies to one engine; name each engine's model with its own flag")
        self.handles = [EngineHandle(address, client_factory(address)) for address in addresses]
        self.router = router or Router()
        self._served_model_name = served_model_name
        self._tool_call_parser = tool_call_parser
        self._contexts: dict[str, ModelContext] = {}  # engine id -> its context
        # The model each address served when last connected: the models this server is configured
        # with (an engine restarted with another model no longer counts for the old one).
        self._last_model: dict[str, str] = {}
        self._refused: set[str] = set()  # engine ids left out as conflicting replicas (logged once)
        self._identities: dict[str, str] = {}  # model -> the identity its serving replicas share
        self._tasks: list[asyncio.Task] = []

    # Lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every engine in the background (none needs to be up) and poll stats."""
        for handle in self.handles:
            self._tasks.append(asyncio.create_task(self._connect(handle), name=f"connect {handle.address}"))
        self._tasks.append(asyncio.create_task(self._poll_stats(), name="engine-stats"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(handle.client.close() for handle in self.handles), return_exceptions=True)

    async def _connect(self, handle: EngineHandle) -> None:
        """Until the first handshake; after it the client reconnects by itself."""
        backoff = 0.1
        while True:
            try:
                info = await handle.client.start()
                logger.info(
                    "engine %s at %s ready: model %s, max_model_len %d",
                    info.engine_id,
                    handle.address,
                    info.model_name,
                    info.max_model_len,
                )
                return
            except EngineUnavailable as exc:
                logger.warning("%s; retrying in %.1f s", exc, backoff)
            except Exception:  # a bug of ours must not silently stop this engine's connecting
                logger.exception("connecting to the engine at %s failed; retrying in %.1f s", handle.address, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def _poll_stats(self) -> None:
        while True:
            try:
                await self.refresh_stats()
            except Exception:  # a bug of ours must not freeze the load the router sees
                logger.exception("polling the engines' stats failed")
            await asyncio.sleep(STATS_INTERVAL_S)

    async def refresh_stats(self) -> None:
        """Ask every live engine for its stats now (a metrics scrape wants them fresh)."""
        await asyncio.gather(*(self._refresh(handle) for handle in self.handles if handle.live))

    async def _refresh(self, handle: EngineHandle) -> None:
        sent_with = handle.inflight
        engine_id = handle.engine_id
        try:
            stats = await handle.client.stats(timeout_s=STATS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return  # a long step: the last stats stand
        except EngineUnavailable:
            handle.stats = None  # gone: nothing is known of it now
            return
        handle.stats, handle.stats_engine_id = stats, engine_id
        handle.others = max(0, stats.running + stats.waiting - sent_with)

    # Models ------------------------------------------------------------------------------

    def _context_of(self, handle: EngineHandle) -> ModelContext:
        info = handle.client.info
        context = self._contexts.get(info.engine_id)
        if context is None:
            context = self._contexts[info.engine_id] = ModelContext.from_hello(
                info, self._served_model_name, self._tool_call_parser
            )
            # Contexts of instances no longer connected are rebuilt if they ever come back.
            live_ids = {h.engine_id for h in self.handles if h.live}
            for engine_id in [e for e in self._contexts if e not in live_ids]:
                del self._contexts[engine_id]
        return context

    def _serving(self) -> dict[str, list[tuple[EngineHandle, ModelContext]]]:
        """Each model with a live engine: its replicas, in configuration order. A model's
        replicas share the identity of the ones already serving it (`_identities`, kept while
        any of them is live); an engine that joins under the name with another identity is
        left out and logged once."""
        live: dict[str, list[tuple[EngineHandle, ModelContext]]] = {}
        for handle in self.handles:
            if handle.live:
                context = self._context_of(handle)
                live.setdefault(context.name, []).append((handle, context))
                self._last_model[handle.address] = context.name
        models: dict[str, list[tuple[EngineHandle, ModelContext]]] = {}
        for name, candidates in live.items():
            identity = self._identities.get(name)
            if identity is None or all(c.identity != identity for _, c in candidates):
                identity = self._identities[name] = candidates[0][1].identity
            for handle, context in candidates:
                if context.identity == identity:
                    models.setdefault(name, []).append((handle, context))
                elif handle.engine_id not in self._refused:
                    self._refused.add(handle.engine_id)
                    logger.error(
                        "engine %s at %s serves %r unlike that model's other engines (a different checkpoint, "
                        "tokenizer, template or limits); it gets no requests until it matches",
                        handle.engine_id,
                        handle.address,
                        name,
                    )
        return models

    def contexts(self) -> list[ModelContext]:
        """One context per model a live engine serves, in the order of the engines."""
        return [replicas[0][1] for replicas in self._serving().values()]

    def context(self, model: str) -> ModelContext:
        """`model`'s context: 404 if no engine serves it, 503 if its engines are down or an
        engine that might serve it has not connected yet."""
        serving = self._serving()
        if model in serving:
            return serving[model][0][1]
        if model in self._last_model.values():
            raise engine_unavailable(f"no engine serving the model '{model}' is connected now")
        if any(handle.client.info is None for handle in self.handles):
            waiting = [h.address for h in self.handles if h.client.info is None]
            raise engine_unavailable(
                f"no connected engine serves the model '{model}', and the engines at {', '.join(waiting)} have not "
                "connected yet"
            )
        served = ", ".join(f"'{name}'" for name in serving) or "none while its engines are down"
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves {served}",
            param="model",
            code="model_not_found",
        )

    def only_context(self) -> ModelContext:
        """The model, for requests that may leave `model` out (the tokenizer endpoints): a 400
        when the server serves several."""
        contexts = self.contexts()
        if len(contexts) == 1:
            return contexts[0]
        if not contexts:
            raise engine_unavailable("no engine is connected")
        names = ", ".join(f"'{c.name}'" for c in contexts)
        raise APIError(400, f"'model' is required: this server serves {names}", param="model")

    # Routing -----------------------------------------------------------------------------

    def route(self, context: ModelContext, prompt_token_ids: list[int], count: int) -> Lease:
        """A lease on the replica of `context`'s model for a prompt with `count` choices."""
        replicas = [h for h, c in self._serving().get(context.name, ()) if c.identity == context.identity]
        if not replicas:
            raise engine_unavailable(f"no engine serving the model '{context.name}' is connected now")
        by_id = {h.engine_id: h for h in replicas}
        candidates = [
            Candidate(h.engine_id, h.load, h.current_stats.kv_usage if h.current_stats else 0.0) for h in replicas
        ]
        chosen = self.router.choose(candidates, prompt_token_ids, context.info.block_size)
        return Lease(by_id[chosen], count)

    # Health ----------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict]:
        """Healthy while at least one engine answers a ping and every configured model (`_last_model`)
        has a live engine."""
        live = [h for h in self.handles if h.live]

        async def answers(handle: EngineHandle) -> bool:
            with contextlib.suppress(EngineUnavailable, asyncio.TimeoutError):
                await handle.client.ping(timeout_s=1.0)
                return True
            return False

        answering = dict(zip(live, await asyncio.gather(*(answers(h) for h in live))))
        serving = self._serving()
        missing = sorted(set(self._last_model.values()) - set(serving))
        engines = []
        for handle in self.handles:
            state = handle.client.health.value if handle.client.info is not None else "connecting"
            if handle.live and not answering.get(handle, False):
                state = "not answering"
            entry = {"address": handle.address, "state": state, "engine_id": handle.engine_id}
            if handle.client.info is not None:
                entry["model"] = self.model_name(handle)
            engines.append(entry)
        healthy = any(answering.values()) and not missing
        body = {
            "status": "ok" if healthy else "unavailable",
            "models": {name: len(replicas) for name, replicas in serving.items()},
            "missing_models": missing,
            "engines": engines,
            "checked_at": time.time(),
        }
        return healthy, body

    def model_name(self, handle: EngineHandle) -> str:
        """The name clients use for the model of a handle that has connected."""
        return served_name(handle.client.info, self._served_model_name)
