"""The engine process: one EngineCore served to many clients over a ZeroMQ ROUTER socket.

The loop blocks in `poll` while there is nothing to compute (no sleep-polling), and never
waits while there is: each iteration drains what the clients sent (without blocking),
expires silent clients, runs one engine step and sends one `Outputs` message per client
that has news. A signal wakes the poll at once through a self-pipe.

Clients are HTTP servers. Each owns its requests (see `clients.py`): a client whose lease
runs out, whose socket is gone (ROUTER_MANDATORY makes a send to it fail instead of
vanishing), that says Goodbye, or that comes back under the same id with a new nonce has
everything it owned aborted, which frees the KV blocks in the same step. A message that
cannot be decoded or is refused gets an `Error` reply to its sender and one log line;
everyone else keeps being served.

On SIGTERM or SIGINT the engine stops accepting requests, ends the in-flight ones with
finish reason "abort", tells every client it is going away, removes its socket file and
returns (exit status 0).

Nothing a client sends can end the process: a message that makes its handler raise gets
an `internal` Error reply (its traceback goes to the log), and a request the engine
core fails on while computing it (see engine_core.py) ends with finish reason "error",
alone. Only a device that can compute nothing at all (`EngineDeadError`) stops the
engine, by the same path as SIGTERM, after which `run` raises it (exit status 1).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq
from msgspec.structs import force_setattr
from zmq.auth.thread import ThreadAuthenticator

from splitinfer.engine.clients import ClientRegistry, ClientSession
from splitinfer.engine.config import EngineConfig
from splitinfer.engine.engine_core import EngineCore
from splitinfer.engine.errors import ConfigError, ContextLengthError, EngineDeadError, RequestError
from splitinfer.protocol import (
    DEFAULT_LIMITS,
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
    Shutdown,
    Stats,
    StatsReply,
    decode,
    encode,
    parse_address,
)
from splitinfer.protocol.chat_template import (
    ChatTemplateError,
    compile_chat_template,
    find_chat_template,
    find_tool_chat_template,
)
from splitinfer.protocol.curve import EngineKeys, HandshakeWatch, secure_server_socket
from splitinfer.protocol.tokenizer import read_tokenizer_files

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 5.0
# Most messages read from the socket between two engine steps, so a flood cannot starve the GPU.
MAX_MESSAGES_PER_STEP = 1024
LOOP_REPORT_INTERVAL_S = 60.0


@dataclass(slots=True)
class LoopTimes:
    """Where the loop's time went since the last report: the engine step versus socket work."""

    steps: int = 0
    step_s: float = 0.0
    receive_s: float = 0.0  # recv, decode, admission
    send_s: float = 0.0  # encode, send

    def report(self) -> str:
        per = lambda total: 1e3 * total / max(self.steps, 1)  # noqa: E731
        return (
            f"{self.steps} steps: {per(self.step_s):.2f} ms/step in the engine, {per(self.receive_s):.3f} ms "
            f"receiving, {per(self.send_s):.3f} ms encoding and sending"
        )


class TokenRates:
    """Prompt and generated tokens per second over the last few seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, int]] = deque()

    def record(self, now: float, prompt_tokens: int, generated_tokens: int) -> None:
        if self._samples and now - self._samples[-1][0] < 0.25:
            return
        self._samples.append((now, prompt_tokens, generated_tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window_s:
            self._samples.popleft()

    def rates(self, now: float, prompt_tokens: int, generated_tokens: int) -> tuple[float, float]:
        if not self._samples:
            return 0.0, 0.0
        t0, p0, g0 = self._samples[0]
        elapsed = max(now - t0, 1e-9)
        return (prompt_tokens - p0) / elapsed, (generated_tokens - g0) / elapsed


def claim_ipc_path(path: Path) -> None:
    """Make `path` free for a new socket: refuse if an engine listens there, remove a stale file."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # left behind by a process that died: nobody listens
        logger.info("removed the stale socket file %s", path)
        return
    except OSError as exc:
        raise OSError(
            f"{path} exists and is not a socket we can probe ({exc}); remove it or pick another --address"
        ) from exc
    finally:
        probe.close()
    raise OSError(f"another engine is already serving on ipc://{path}; stop it or pick another --address")


def served_chat_template(config: EngineConfig) -> str | None:
    """The chat template the engine sends its clients: --chat-template's, else the checkpoint's
    (`find_chat_template`); None when there is neither. It is compiled here, in the servers'
    own environment, so that a template that cannot work stops the engine at start instead of
    failing every chat request.

    Raises `ConfigError` (field `chat_template`) for a --chat-template that is neither a file
    nor a template and for a template that does not compile, `TokenizerFilesError` for a
    checkpoint whose template files cannot be read.
    """
    option = config.chat_template
    source = chat_template_option(option) if option is not None else find_chat_template(config.model)
    from_flag = option is not None
    if source is None:
        logger.info("no chat template: servers use Llama 3's format for a Llama 3 tokenizer and refuse chat otherwise")
        return None
    try:
        compile_chat_template(source)
    except ChatTemplateError as exc:
        where, remedy = (
            ("--chat-template", "") if from_flag else (config.model, "; pass one that works with --chat-template")
        )
        raise ConfigError(f"{where}: {exc}{remedy}", "chat_template") from None
    logger.info(
        "chat template: %s (%d characters)", "--chat-template's" if from_flag else "the checkpoint's", len(source)
    )
    return source


def served_tool_chat_template(config: EngineConfig) -> str | None:
    """The checkpoint's "tool_use" template, which servers render requests with tools with (as
    transformers does); None without one, and with --chat-template, which then renders every
    chat. Compiled here like the main one; raises `ConfigError` when it does not compile."""
    if config.chat_template is not None:
        return None
    source = find_tool_chat_template(config.model)
    if source is None:
        return None
    try:
        compile_chat_template(source)
    except ChatTemplateError as exc:
        raise ConfigError(
            f"{config.model}: the template named 'tool_use': {exc}; pass one that works with --chat-template",
            "chat_template",
        ) from None
    logger.info("chat template for requests with tools: the checkpoint's 'tool_use' (%d characters)", len(source))
    return source


def chat_template_option(value: str) -> str:
    """--chat-template's template: the contents of the file `value` names, else `value` itself
    when it looks like a Jinja template; raises `ConfigError` when it is neither."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # an inline template longer than a file name may be
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template {value}: cannot read the file: {exc}", "chat_template") from None
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(
        f"--chat-template {value!r:.200}: no such file, nor an inline Jinja template (no '{{{{' or '{{%' in it)",
        "chat_template",
    )


class EngineService:
    def __init__(
        self,
        core: EngineCore,
        sock: zmq.Socket,
        address: str,
        ipc_path: Path | None,
        lease_s: float,
        served_model_name: str,
        limits: Limits,
        chat_template: str | None,
        tool_chat_template: str | None = None,
        guards: tuple[ThreadAuthenticator, HandshakeWatch] | None = None,
    ) -> None:
        self.core = core
        self.socket = sock
        self._guards = guards  # CURVE's authenticator and handshake log, stopped with the socket
        self.address = address
        self.ipc_path = ipc_path
        self.limits = limits
        self.clients = ClientRegistry(lease_s)
        self.engine_id = uuid.uuid4().hex
        self.hello_reply = self._build_hello_reply(served_model_name, lease_s, chat_template, tool_chat_template)
        # engine-core request id -> (owning session, the client's request id)
        self._owners: dict[str, tuple[ClientSession, str]] = {}
        self._next_id = itertools.count()
        self._stopping = False
        self._times = LoopTimes()
        self._last_report = time.monotonic()
        self._rates = TokenRates()
        self._rates.record(time.monotonic(), 0, 0)  # rates count from the start
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        core.on_tp_failure = self._wake  # a tensor-parallel worker's death must not wait for a message

    # Start-up ------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        config: EngineConfig,
        address: str,
        lease_s: float = DEFAULT_LEASE_S,
        served_model_name: str | None = None,
        max_frame_bytes: int | None = None,
        keys: EngineKeys | None = None,
    ) -> EngineService:
        """Check the address, load the model, bind (as a CURVE server with `keys`), and log `ready`."""
        started = time.perf_counter()
        parsed = parse_address(address)
        limits = (
            DEFAULT_LIMITS
            if max_frame_bytes is None
            else Limits(max_frame_bytes=max_frame_bytes, max_prompt_tokens=DEFAULT_LIMITS.max_prompt_tokens)
        )
        ipc_path = Path(parsed.path) if parsed.path is not None else None
        if ipc_path is not None:
            claim_ipc_path(ipc_path)  # before the (slow) model load: fail fast on a busy address
        chat_template = served_chat_template(config)  # and on a chat template that cannot work
        tool_chat_template = served_tool_chat_template(config)
        core = EngineCore(config)
        sock, guards = cls._bind(address, ipc_path, limits, keys)
        service = cls(
            core,
            sock,
            address,
            ipc_path,
            lease_s,
            served_model_name or Path(config.model).resolve().name,
            limits,
            chat_template,
            tool_chat_template,
            guards,
        )
        kv = core.stats().kv
        logger.info(
            "ready on %s%s in %.1f s (pid %d): model %s, KV cache %d blocks = %d tokens, max_model_len %d",
            address,
            f" (CURVE, clients' keys in {keys.allowed.directory})" if keys is not None else "",
            time.perf_counter() - started,
            os.getpid(),
            service.hello_reply.model_name,
            kv.total_blocks,
            kv.total_blocks * core.config.block_size,
            core.max_model_len,
        )
        return service

    @staticmethod
    def _bind(
        address: str, ipc_path: Path | None, limits: Limits, keys: EngineKeys | None
    ) -> tuple[zmq.Socket, tuple[ThreadAuthenticator, HandshakeWatch] | None]:
        context = zmq.Context.instance()
        sock = context.socket(zmq.ROUTER)
        guards = None
        if keys is not None:
            guards = (secure_server_socket(sock, keys.own, keys.allowed, context), HandshakeWatch(sock))
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished client raises, not drops
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting under its routing id takes it over
        sock.setsockopt(zmq.LINGER, 1000)
        # A hard cap far above the protocol limit: bigger frames close the connection before they
        # fill memory; frames between the two get a proper Error reply from decode().
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * limits.max_frame_bytes)
        old_umask = os.umask(0o077) if ipc_path is not None else None  # the socket file is 0600 from birth
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            _close(sock, guards, linger_ms=0)
            raise OSError(f"cannot bind {address}: {exc}") from exc
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if ipc_path is not None:
            os.chmod(ipc_path, 0o600)
        return sock, guards

    def _build_hello_reply(
        self, served_model_name: str, lease_s: float, chat_template: str | None, tool_chat_template: str | None
    ) -> HelloReply:
        c = self.core.model_config
        files = read_tokenizer_files(c.path)
        kv = self.core.stats().kv
        return HelloReply(
            engine_id=self.engine_id,
            model_name=served_model_name,
            max_model_len=self.core.max_model_len,
            vocab_size=c.vocab_size,
            eos_token_ids=list(c.eos_token_ids),
            chat_template=chat_template,
            tokenizer_files=files,
            kv_capacity_tokens=kv.total_blocks * self.core.config.block_size,
            block_size=self.core.config.block_size,
            lease_s=lease_s,
            tool_chat_template=tool_chat_template,
        )

    # The loop ------------------------------------------------------------------------

    def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        logger.info("%s received: finishing in-flight requests with 'abort' and stopping", signal.Signals(signum).name)
        self.request_stop()

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler or another thread)."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        """Wake the loop from its wait for messages (safe from another thread)."""
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already woken

    def run(self) -> None:
        """Serve until `request_stop`; raises `EngineDeadError` (after shutting down just as
        cleanly) if the device stops computing."""
        reason = "the engine is stopping"
        try:
            while not self._stopping:
                self.run_once()
        except EngineDeadError as exc:
            logger.critical("stopping: %s", exc)
            reason = f"the engine failed and is stopping: {exc}"
            raise
        finally:
            self.shutdown(reason)

    def run_once(self) -> None:
        """One iteration: receive (blocking only when idle), expire leases, step, send."""
        self.core.check_workers()  # a tensor-parallel worker may have exited (the watchdog woke us)
        busy = self.core.has_unfinished()
        start = time.perf_counter()
        self._receive(timeout_ms=0 if busy else int(1000 * self.clients.lease_s / 4))
        now = time.monotonic()
        for session in self.clients.expired(now):
            logger.warning(
                "client %s (pid %d) silent for over %.1f s: aborting its %d request(s)",
                session.client_id,
                session.pid,
                self.clients.lease_s,
                len(session.requests),
            )
            self._abort_session(session)
        received = time.perf_counter()
        if not self.core.has_unfinished():
            return
        outputs = self.core.step()
        stepped = time.perf_counter()
        self._send_outputs(outputs)
        sent = time.perf_counter()
        t = self._times
        t.steps += 1
        t.receive_s += received - start
        t.step_s += stepped - received
        t.send_s += sent - stepped
        stats = self.core.stats()
        self._rates.record(now, stats.prompt_tokens, stats.generated_tokens)
        if now - self._last_report > LOOP_REPORT_INTERVAL_S:
            logger.info("loop: %s", t.report())
            self._times, self._last_report = LoopTimes(), now

    def _receive(self, timeout_ms: int) -> None:
        events = dict(self._poller.poll(timeout_ms))
        if self._wake_r.fileno() in events:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        for _ in range(MAX_MESSAGES_PER_STEP):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                identity = frames[0] if frames else b""
                self._reply_error(
                    identity,
                    None,
                    ErrorCode.BAD_MESSAGE,
                    f"expected one message frame after the routing id, got {len(frames) - 1}",
                )
                continue
            self._handle(frames[0], frames[1])

    def _handle(self, identity: bytes, data: bytes) -> None:
        try:
            message = decode(data, self.limits)
        except ProtocolError as exc:
            self._reply_error(identity, exc.request_id, exc.code, exc.message, param=exc.field)
            return
        try:
            self._dispatch(identity, message)
        except Exception as exc:  # a bug of ours; the sender learns of it and everyone else is served
            logger.error("handling %s from %s failed", type(message).__name__, identity.hex(), exc_info=exc)
            self._reply_error(
                identity,
                getattr(message, "request_id", None),
                ErrorCode.INTERNAL,
                f"the engine failed to handle this {type(message).__name__} ({type(exc).__name__}); "
                "the engine's log has the details",
            )

    def _dispatch(self, identity: bytes, message: object) -> None:
        now = time.monotonic()
        if isinstance(message, Hello):
            self._hello(identity, message, now)
            return
        session = self.clients.touch(identity, now)
        if session is None:
            self._reply_error(
                identity,
                getattr(message, "request_id", None),
                ErrorCode.NO_SESSION,
                "say Hello first (or again: the engine may have expired this client's lease)",
            )
            return
        if isinstance(message, Generate):
            self._generate(session, message)
        elif isinstance(message, Abort):
            self._abort(session, message)
        elif isinstance(message, Ping):
            self._send(identity, Pong(nonce=message.nonce, sent_at=message.sent_at))
        elif isinstance(message, Stats):
            self._send(identity, self._stats_reply())
        elif isinstance(message, Goodbye):
            logger.info("client %s said goodbye; aborting its %d request(s)", session.client_id, len(session.requests))
            self.clients.drop(session)
            self._abort_session(session)
        else:
            self._reply_error(
                identity, None, ErrorCode.BAD_MESSAGE, f"{type(message).__name__} is not a message the engine accepts"
            )

    def _hello(self, identity: bytes, hello: Hello, now: float) -> None:
        replaced = self.clients.hello(identity, hello.client_id, hello.nonce, hello.pid, now)
        if replaced is not None:
            logger.warning(
                "client %s restarted (new instance): aborting the %d request(s) of its old instance",
                hello.client_id,
                len(replaced.requests),
            )
            self._abort_session(replaced)
        logger.info("client %s connected (pid %d, %d client(s))", hello.client_id, hello.pid, len(self.clients))
        self._send(identity, self.hello_reply)

    def _generate(self, session: ClientSession, msg: Generate) -> None:
        if self._stopping:
            self._reply_error(
                session.identity, msg.request_id, ErrorCode.SHUTTING_DOWN, "the engine is shutting down", retryable=True
            )
            return
        if msg.request_id in session.requests:
            self._reply_error(
                session.identity,
                msg.request_id,
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request id {msg.request_id!r} is already in use by this client",
            )
            return
        rid = str(next(self._next_id))
        try:
            self.core.add_request(rid, msg.prompt_token_ids, msg.params)
        except RequestError as exc:
            code = (
                ErrorCode.CONTEXT_LENGTH_EXCEEDED if isinstance(exc, ContextLengthError) else ErrorCode.INVALID_REQUEST
            )
            self._reply_error(session.identity, msg.request_id, code, str(exc), param=exc.field)
            return
        session.requests[msg.request_id] = rid
        self._owners[rid] = (session, msg.request_id)

    def _abort(self, session: ClientSession, msg: Abort) -> None:
        unknown = []
        for request_id in msg.request_ids:
            rid = session.requests.pop(request_id, None)
            if rid is not None:
                self.core.abort(rid)
            else:
                unknown.append(request_id)
        if unknown:
            # Usually a race (the request finished before the Abort arrived): the client may
            # ignore the reply, and the log mentions it at debug level only.
            self._reply_error(
                session.identity,
                unknown[0] if len(unknown) == 1 else None,
                ErrorCode.UNKNOWN_REQUEST,
                f"no running request with id(s) {', '.join(map(repr, unknown[:5]))}",
                log_level=logging.DEBUG,
            )

    def _abort_session(self, session: ClientSession) -> None:
        """Abort every request a departed client owned; their blocks are freed now."""
        for rid in session.requests.values():
            self.core.abort(rid)
        session.requests.clear()

    def _stats_reply(self) -> StatsReply:
        stats = self.core.stats()
        prompt_rate, generation_rate = self._rates.rates(time.monotonic(), stats.prompt_tokens, stats.generated_tokens)
        kv = stats.kv
        return StatsReply(
            waiting=stats.waiting,
            running=stats.running,
            kv_total_blocks=kv.total_blocks,
            kv_used_blocks=kv.used_blocks,
            kv_cached_blocks=kv.cached_blocks,
            kv_usage=kv.used_blocks / kv.total_blocks,
            prefix_hit_rate=kv.prefix_hit_rate,
            prompt_tokens_per_s=prompt_rate,
            generation_tokens_per_s=generation_rate,
            num_preemptions=stats.num_preemptions,
            num_clients=len(self.clients),
        )

    # Sending -------------------------------------------------------------------------

    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        """One `Outputs` per client with news, each entry under the client's own request id."""
        by_session: dict[int, tuple[ClientSession, list[RequestOutput]]] = {}
        for out in outputs:
            owner = self._owners.get(out.request_id)
            if owner is None:
                continue
            session, request_id = owner
            if out.finish_reason is not None:
                del self._owners[out.request_id]
                if session.requests.get(request_id) == out.request_id:
                    del session.requests[request_id]
            if self.clients.get(session.identity) is not session:
                continue  # its client is gone: the request was aborted for that reason
            entries = by_session.setdefault(id(session), (session, []))[1]
            entries.append(for_client(out, request_id))
        for session, entries in by_session.values():
            self._send(session.identity, Outputs(outputs=entries))

    def _send(self, identity: bytes, message: object) -> None:
        try:
            self.socket.send_multipart([identity, encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            session = self.clients.get(identity)
            if session is not None:
                # EHOSTUNREACH: its socket is gone. EAGAIN: it stopped reading and its queue is full.
                logger.warning(
                    "client %s is unreachable (%s): aborting its %d request(s)",
                    session.client_id,
                    exc.strerror,
                    len(session.requests),
                )
                self.clients.drop(session)
                self._abort_session(session)

    def _reply_error(
        self,
        identity: bytes,
        request_id: str | None,
        code: str,
        message: str,
        retryable: bool = False,
        param: str | None = None,
        log_level: int = logging.WARNING,
    ) -> None:
        session = self.clients.get(identity)
        who = session.client_id if session is not None else identity.hex()
        logger.log(
            log_level, "client %s: %s%s: %s", who, code, f" (request {request_id})" if request_id else "", message
        )
        self._send(identity, Error(request_id=request_id, code=code, message=message, retryable=retryable, param=param))

    # Shutdown ------------------------------------------------------------------------

    def shutdown(self, reason: str = "the engine is stopping") -> None:
        """End in-flight requests with 'abort', tell the clients (why), close, remove the socket file."""
        for rid in list(self.core.requests):
            self.core.abort(rid)
        while self.core.has_unfinished():  # reports the aborts (no forward runs for them)
            self._send_outputs(self.core.step())
        for session in self.clients.sessions():
            self._send(session.identity, Shutdown(message=reason))
        _close(self.socket, self._guards, linger_ms=1000)
        self.core.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.ipc_path is not None:
            try:
                self.ipc_path.unlink()
            except FileNotFoundError:
                pass
        logger.info("stopped")


def _close(sock: zmq.Socket, guards: tuple[ThreadAuthenticator, HandshakeWatch] | None, linger_ms: int) -> None:
    """Close the socket and, with CURVE, its handshake log before and its authenticator after."""
    if guards is not None:
        guards[1].stop()
    sock.close(linger=linger_ms)
    if guards is not None:
        guards[0].stop()


def for_client(out: RequestOutput, request_id: str) -> RequestOutput:
    """`out` under its client's own request id. Renamed in place rather than copied: the core
    built this entry for one request of one client and keeps no reference to it, and a copy
    per request per step cost more than building the entries (scripts/bench_codec.py)."""
    force_setattr(out, "request_id", request_id)
    return out
