"""The HTTP servers' connection to the engine: an asyncio client on a ZeroMQ DEALER socket.

    client = EngineClient("ipc:///run/user/1000/splitinfer-engine.sock")
    await client.start()                     # connect and handshake; client.info is the HelloReply
    async for out in client.generate("req-1", prompt_ids, SamplingParams(max_tokens=32)):
        ...                                  # protocol RequestOutput: new tokens, finish reason, counts
    await client.close()                     # says Goodbye

One background task receives every message and routes `Outputs` to per-request queues by
request id; another heartbeats (Ping) well inside the engine's lease. When the engine goes
away, says it is shutting down, or comes back as a new instance, every in-flight request
fails with a retryable `EngineUnavailable`, the health state turns `unavailable`, and the
client reconnects by itself with backoff (a fresh socket, so nothing sent to the dead
engine is replayed to the new one).

"Goes away" is judged by the connection, not by the engine's answers: one engine step can
take seconds (a long prefill on CPU) during which its loop answers nothing, yet nothing is
wrong. ZeroMQ's own heartbeats (ZMTP PING/PONG, answered by the engine's I/O thread even
mid-step) close a connection unreachable for TRANSPORT_TIMEOUT_S; a socket monitor turns a
closed connection, a killed engine's at once, into `unavailable`. A loop that answers
nothing for `stall_timeout_s` (an engine alive but wedged) counts as gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from splitinfer.protocol import (
    Abort,
    Error,
    ErrorCode,
    Generate,
    Goodbye,
    Hello,
    HelloReply,
    Limits,
    Outputs,
    Ping,
    Pong,
    ProtocolError,
    RequestOutput,
    SamplingParams,
    Shutdown,
    Stats,
    StatsReply,
    decode,
    encode,
)
from splitinfer.protocol.curve import ClientKeys

logger = logging.getLogger(__name__)

# Replies from the engine can be large (HelloReply carries the tokenizer files).
ENGINE_REPLY_LIMITS = Limits(max_frame_bytes=512 * 2**20, max_prompt_tokens=2**31 - 1)
# Transport (ZMTP) heartbeats: every second, and a connection silent for 3 s is closed.
# They are answered by the engine's I/O thread, busy loop or not, so only an unreachable
# engine (host gone, network cut, process frozen) misses them.
TRANSPORT_HEARTBEAT_S = 1.0
TRANSPORT_TIMEOUT_S = 3.0
# Messages either way that may wait in the socket (requests sent during a long engine step).
SOCKET_QUEUE_MESSAGES = 100_000
# What the socket monitor reports: a closed connection, and a handshake the engine refused.
HANDSHAKE_FAILURES = frozenset(
    {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}
)
WATCHED_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# How long the engine's loop may answer nothing before it counts as wedged: far above any
# single step (a CPU prefill of a full token budget on a large model takes minutes).
DEFAULT_STALL_TIMEOUT_S = 300.0


class Health(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    UNAVAILABLE = "unavailable"


class EngineUnavailable(Exception):
    """The engine cannot be reached or went away; the request may be retried (HTTP 503)."""


class EngineRequestError(Exception):
    """The engine refused a request (bad parameters, too long, ...: the caller's fault, HTTP 400)
    or failed while computing it (code `internal`: ours, HTTP 500)."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.code = error.code
        self.param = error.param
        self.retryable = error.retryable


class _Stream:
    """One request's outputs, in order, ending with a finish reason or an exception."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


class EngineClient:
    def __init__(
        self,
        address: str,
        client_id: str | None = None,
        connect_timeout_s: float = 10.0,
        max_backoff_s: float = 2.0,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        keys: ClientKeys | None = None,
    ) -> None:
        self.address = address
        self.keys = keys  # CURVE: our key pair and the engine's public key
        self.client_id = client_id or f"server-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # A new nonce per process: the engine aborts what an earlier process under this id left.
        self.nonce = uuid.uuid4().hex
        self.connect_timeout_s = connect_timeout_s
        self.max_backoff_s = max_backoff_s
        self.stall_timeout_s = stall_timeout_s
        self.info: HelloReply | None = None
        self.health = Health.CONNECTING
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._streams: dict[str, _Stream] = {}
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._stats: deque[asyncio.Future[StatsReply]] = deque()
        self._hello: asyncio.Future[HelloReply] | None = None
        self._ping_ids = itertools.count()
        self._last_heard = 0.0
        self._tasks: list[asyncio.Task] = []
        self._reconnecting: asyncio.Task | None = None
        self._closed = False
        self._handshake_logged = False  # a refused handshake is logged once per outage

    # Connection ----------------------------------------------------------------------

    async def start(self) -> HelloReply:
        """Connect and handshake; raises EngineUnavailable if the engine does not answer in time."""
        info = await self._connect(self.connect_timeout_s)
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="engine-heartbeat"))
        return info

    async def _connect(self, timeout_s: float) -> HelloReply:
        self._open_socket()
        sock = self._socket
        self._hello = asyncio.get_running_loop().create_future()
        try:
            info = await asyncio.wait_for(self._handshake(), timeout_s)
        except asyncio.TimeoutError:
            if self._socket is sock:  # not if another attempt has replaced (and maybe connected) it
                self.health = Health.UNAVAILABLE
            raise EngineUnavailable(f"the engine at {self.address} did not answer within {timeout_s:.1f} s") from None
        if self.info is not None and info.engine_id != self.info.engine_id:
            logger.warning("connected to a new engine instance %s (was %s)", info.engine_id, self.info.engine_id)
        self.info = info
        self._last_heard = time.monotonic()
        self._handshake_logged = False
        self.health = Health.READY
        logger.info("connected to engine %s at %s: model %s", info.engine_id, self.address, info.model_name)
        return info

    async def _handshake(self) -> HelloReply:
        hello = encode(Hello(client_id=self.client_id, nonce=self.nonce, pid=os.getpid()))
        self._send_now(hello)  # queued until the connection is up
        return await asyncio.shield(self._hello)

    def _open_socket(self) -> None:
        per_socket = ("engine-receive", "engine-connection")
        for task in self._tasks:
            if task.get_name() in per_socket:
                task.cancel()
        self._tasks = [t for t in self._tasks if t.get_name() not in per_socket]
        self._close_socket()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Not IMMEDIATE: with it, libzmq drops what was received but not yet read when the
        # connection closes (a stopping engine's last Outputs). What is queued for a dead
        # engine dies with this socket, which `_lost` replaces.
        sock.setsockopt(zmq.SNDHWM, SOCKET_QUEUE_MESSAGES)
        sock.setsockopt(zmq.RCVHWM, SOCKET_QUEUE_MESSAGES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(1000 * self.max_backoff_s))
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(1000 * TRANSPORT_HEARTBEAT_S))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * TRANSPORT_TIMEOUT_S))
        # A name of our own: pyzmq's default is named by the socket's file descriptor, which
        # the next socket reuses while the last one's monitor may still be connected to it.
        monitor = sock.get_monitor_socket(WATCHED_EVENTS, addr=f"inproc://engine-monitor-{uuid.uuid4().hex}")
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.address)
        self._socket, self._monitor = sock, monitor
        self._tasks.append(asyncio.create_task(self._receive(sock), name="engine-receive"))
        self._tasks.append(asyncio.create_task(self._watch_connection(sock, monitor), name="engine-connection"))

    def _close_socket(self) -> None:
        """Close the current socket and its monitor here, not in the tasks that read them: a
        task cancelled before it first ran never reaches its `finally`."""
        if self._socket is None:
            return
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self._socket = self._monitor = None

    def _send(self, message: object) -> None:
        if self._socket is None or self._closed:
            # Closed: after our Goodbye, anything more (a heartbeat, a late Abort) would only
            # make the engine log a message from a client it no longer knows.
            raise EngineUnavailable(f"the engine client is {'closed' if self._closed else 'not started'}")
        try:
            self._send_now(encode(message))
        except zmq.Again:
            raise EngineUnavailable(
                f"the engine at {self.address} is not reading: {SOCKET_QUEUE_MESSAGES} messages are waiting for it"
            ) from None

    def _send_now(self, data: bytes) -> None:
        """Send without waiting; raises zmq.Again if the send queue is full.

        Through the asyncio socket itself, never a second (shadow) socket: ZeroMQ's file
        descriptor is edge-triggered, and pyzmq re-checks pending receives after each of its
        own sends; a send behind its back can swallow the edge and stall the receive task.
        With NOBLOCK the returned future is already resolved, so its error is read here.
        """
        future = self._socket.send(data, zmq.NOBLOCK)
        error = future.exception()
        if error is not None:
            raise error

    async def close(self) -> None:
        """Say Goodbye (the engine aborts whatever is left) and stop every task."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(zmq.ZMQError):
            if self.health is Health.READY:
                self._send_now(encode(Goodbye(client_id=self.client_id)))
                await asyncio.sleep(0.01)  # let the frame leave before the socket closes
        tasks = self._tasks + ([self._reconnecting] if self._reconnecting else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_all(EngineUnavailable("the engine client was closed"))
        self._close_socket()

    # Background tasks ----------------------------------------------------------------

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            data = await sock.recv()
            self._last_heard = time.monotonic()
            try:
                message = decode(data, ENGINE_REPLY_LIMITS)
            except ProtocolError as exc:
                logger.error("undecodable message from the engine: %s", exc)
                continue
            self._dispatch(message)

    async def _watch_connection(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Turn the connection's closing (the engine exited or was killed, or the transport
        heartbeats timed out) into `unavailable`."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] in HANDSHAKE_FAILURES:
                self._handshake_failed(event["event"])
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED and sock is self._socket:
                await self._let_receive_drain(sock)
                if sock is self._socket:
                    self._lost("the connection to the engine closed")

    def _handshake_failed(self, event: int) -> None:
        """Say once per outage why the engine does not answer: it refused the handshake."""
        if self._handshake_logged:
            return
        self._handshake_logged = True
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = "it does not allow this server's CURVE key (add its .key file to the engine's --curve-allowed-keys)"
        elif self.keys is None:
            why = (
                "the handshake failed; if the engine wants CURVE keys, start the server with --curve-secret-key and "
                "--curve-engine-key"
            )
        else:
            why = (
                "the CURVE handshake failed: the engine may not use CURVE, or --curve-engine-key is not its public key"
            )
        logger.error("the engine at %s refuses this server: %s; retrying", self.address, why)

    @staticmethod
    async def _let_receive_drain(sock: zmq.asyncio.Socket) -> None:
        """Give the receive task what arrived before the connection closed (a stopping engine's
        last Outputs and its Shutdown), so that in-flight requests end as the engine ended them.

        Reading EVENTS through the asyncio socket makes pyzmq hand pending messages to the
        receive task, which takes all that are there at once; once the socket is dry, one more
        turn of the loop lets it dispatch the last."""
        deadline = time.monotonic() + 1.0
        while sock.get(zmq.EVENTS) & zmq.POLLIN and time.monotonic() < deadline:
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    def _dispatch(self, message: object) -> None:
        if isinstance(message, Outputs):
            for out in message.outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted by us, or from an earlier connection
                if out.finish_reason == "error":  # the engine failed while computing it (alone)
                    stream.queue.put_nowait(
                        EngineRequestError(
                            Error(
                                out.request_id,
                                ErrorCode.INTERNAL,
                                out.error or "the engine failed while computing this request",
                            )
                        )
                    )
                else:
                    stream.queue.put_nowait(out)
                if out.finish_reason is not None:
                    del self._streams[out.request_id]
        elif isinstance(message, Pong):
            future = self._pings.pop(message.nonce, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter() - message.sent_at)
        elif isinstance(message, StatsReply):
            while self._stats:
                future = self._stats.popleft()
                if not future.done():
                    future.set_result(message)
                    break
        elif isinstance(message, HelloReply):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(message)
        elif isinstance(message, Error):
            self._on_error(message)
        elif isinstance(message, Shutdown):
            self._lost(f"the engine is shutting down: {message.message}")
        else:
            logger.warning("unexpected %s from the engine", type(message).__name__)

    def _on_error(self, error: Error) -> None:
        if error.code == ErrorCode.NO_SESSION:
            self._lost("the engine no longer knows this client (restarted, or our lease ran out)")
            return
        stream = self._streams.pop(error.request_id, None) if error.request_id is not None else None
        if stream is not None:
            stream.queue.put_nowait(EngineUnavailable(error.message) if error.retryable else EngineRequestError(error))
        elif error.code != ErrorCode.UNKNOWN_REQUEST:  # an Abort racing a finish is expected
            logger.warning("engine error %s: %s", error.code, error.message)

    async def _heartbeat(self) -> None:
        # Started once the first handshake has set `info`, which is never unset: the lease is
        # always the one the engine granted (a new instance's reply replaces it), never a guess.
        assert self.info is not None
        while True:
            # Four per lease: one that comes late (a busy event loop) does not let the lease run out.
            await asyncio.sleep(self.info.lease_s / 4)
            if self.health is not Health.READY:
                continue
            # Renews our lease in the engine; its Pong is not awaited (a step may be long).
            with contextlib.suppress(EngineUnavailable):
                self._send(Ping(nonce=next(self._ping_ids), sent_at=time.perf_counter()))
            silent = time.monotonic() - self._last_heard
            if silent > self.stall_timeout_s:
                self._lost(f"the engine's loop has answered nothing for {silent:.0f} s")

    def _lost(self, why: str) -> None:
        """The engine is gone: fail in-flight requests (retryable) and reconnect in the background.
        Only from READY: while connecting, the loop that connects retries by itself (a refused
        handshake closes the connection too, and a second loop would race the first)."""
        if self._closed or self.health is not Health.READY:
            return
        logger.warning("engine unavailable: %s; %d in-flight request(s) failed; reconnecting", why, len(self._streams))
        self.health = Health.UNAVAILABLE
        self._fail_all(EngineUnavailable(f"the engine became unavailable ({why}); retry the request"))
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect(), name="engine-reconnect")

    async def _reconnect(self) -> None:
        backoff = 0.05
        while not self._closed:
            try:
                await self._connect(timeout_s=max(backoff, 0.5))
                return
            except EngineUnavailable:
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(exc)
        self._streams.clear()
        for future in [*self._pings.values(), *self._stats]:
            if not future.done():
                future.set_exception(exc)
        self._pings.clear()
        self._stats.clear()

    # Requests ------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes. Leaving the loop early
        (the HTTP client disconnected, a stop string matched) aborts it in the engine."""
        if self.health is not Health.READY:
            raise EngineUnavailable(f"the engine at {self.address} is {self.health.value}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        try:
            message = Generate(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params)
        except ProtocolError as exc:  # e.g. a token id past the wire's 32 bits: refused as the engine would
            raise EngineRequestError(
                Error(request_id, ErrorCode.INVALID_REQUEST, exc.message, param=exc.field)
            ) from None
        stream = _Stream()
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(message)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                with contextlib.suppress(EngineUnavailable):
                    self._send(Abort(request_ids=[request_id], reason="client stopped reading"))

    async def stats(self, timeout_s: float = 5.0) -> StatsReply:
        future: asyncio.Future[StatsReply] = asyncio.get_running_loop().create_future()
        self._stats.append(future)
        self._send(Stats())
        return await asyncio.wait_for(future, timeout_s)

    async def ping(self, timeout_s: float = 5.0) -> float:
        """Round-trip time to the engine in seconds."""
        nonce = next(self._ping_ids)
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = future
        try:
            self._send(Ping(nonce=nonce, sent_at=time.perf_counter()))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pings.pop(nonce, None)  # answered, or given up on: no Pong will be awaited
