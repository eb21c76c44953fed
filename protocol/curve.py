"""Authenticated, encrypted engine sockets across hosts: ZeroMQ CURVE, with pyzmq's key files.

    splitinfer-keys keys/ engine          # keys/engine.key (public) and keys/engine.key_secret
    splitinfer-keys keys/allowed/ server  # one pair per server; its .key goes to the engine
    splitinfer-engine ... --address tcp://0.0.0.0:5555 \\
        --curve-secret-key keys/engine.key_secret --curve-allowed-keys keys/allowed/
    splitinfer-server --engine tcp://host:5555 \\
        --curve-secret-key keys/allowed/server.key_secret --curve-engine-key keys/engine.key

The engine holds its key pair and a directory of the public keys of the clients it serves;
a client (a server) holds its own pair and the engine's public key. A client whose key is
not allowed never completes the handshake, so nothing it sends reaches the engine, and the
engine logs each refused key once (`AllowedKeys`). The directory is read again at each
handshake, so allowing or revoking a server needs no engine restart.

An engine refuses to bind a `tcp://` address other than loopback without keys unless told
`--insecure` (`require_keys_for`): anyone who reaches such a socket could use the engine.
`ipc://` sockets are protected by their file's mode (0600) instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from splitinfer.protocol.addresses import parse_address

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # Z85 text, as pyzmq's key files hold it
    secret: bytes


def load_key_pair(path: str | Path) -> KeyPair:
    """A key pair from a `.key_secret` file; ValueError naming the file if it holds none."""
    public, secret = _load(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key: give the .key_secret file that splitinfer-keys wrote")
    return KeyPair(public, secret)


def load_public_key(path: str | Path) -> bytes:
    public, _ = _load(path)
    return public


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key file {path}: {exc}") from None


def is_loopback(address: str) -> bool:
    """Whether a tcp:// address binds only this host's loopback interface."""
    host = parse_address(address).host
    if host is None:  # ipc
        return True
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # '*' or a host name: reachable from elsewhere


def require_keys_for(address: str, has_keys: bool, insecure: bool) -> None:
    """Refuse (ValueError) an engine address others can reach without keys, unless `insecure`."""
    if has_keys or insecure or is_loopback(address):
        return
    raise ValueError(
        f"{address} can be reached from other hosts, and without CURVE keys anyone who reaches it could use "
        "the engine: give --curve-secret-key and --curve-allowed-keys (make keys with splitinfer-keys), bind a "
        "loopback or ipc:// address, or pass --insecure to serve it unauthenticated"
    )


# The engine's side ---------------------------------------------------------------------


class AllowedKeys:
    """The ZAP credentials provider: a client key is allowed if its public key file is in
    `directory`, read again at each handshake (handshakes are rare: a connection's first
    moment), so adding a key lets its server in and removing one keeps it out of new
    connections, with no restart. A file that does not read as a key (half copied, garbled)
    is skipped and logged; each refused key is logged once."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"the allowed-keys directory {self.directory} does not exist")
        self._lock = threading.Lock()
        self._unreadable: set[str] = set()  # files logged as not keys
        self._allowed = self._read(frozenset())
        self._refused: set[bytes] = set()
        if not self._allowed:
            logger.warning("no public keys in %s: every client will be refused", self.directory)

    def _read(self, previous: frozenset[bytes]) -> frozenset[bytes]:
        """The public keys of the directory's .key files (`previous` if it cannot be listed).
        Never raises: an exception here would end pyzmq's authenticator thread, and every later
        handshake would hang."""
        keys = set()
        try:
            files = sorted(self.directory.glob("*.key"))
        except OSError as exc:
            logger.error("cannot list the allowed keys in %s (%s): keeping the keys read before", self.directory, exc)
            return previous
        for file in files:
            try:
                keys.add(zmq.auth.load_certificate(str(file))[0])
            except (OSError, ValueError) as exc:
                if file.name not in self._unreadable:
                    self._unreadable.add(file.name)
                    logger.warning("skipping %s: not a CURVE public key file (%s)", file, exc)
        return frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator's thread with the client's Z85 public key."""
        with self._lock:
            self._allowed = self._read(self._allowed)
            if key in self._allowed:
                return True
            if key not in self._refused:
                self._refused.add(key)
                logger.warning(
                    "refused a client with the CURVE key %s: not among the public keys in %s (logged once per key)",
                    key.decode(),
                    self.directory,
                )
            return False


def secure_server_socket(
    sock: zmq.Socket, keys: KeyPair, allowed: AllowedKeys, context: zmq.Context
) -> ThreadAuthenticator:
    """Make `sock` (not yet bound) a CURVE server that admits only `allowed` clients. The
    returned authenticator thread must be stopped when the socket closes."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=allowed)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return authenticator


@dataclass(frozen=True, slots=True)
class EngineKeys:
    """An engine's CURVE settings: its key pair and the clients it admits."""

    own: KeyPair
    allowed: AllowedKeys

    @classmethod
    def load(cls, secret_key_file: str | Path, allowed_keys_dir: str | Path) -> EngineKeys:
        return cls(load_key_pair(secret_key_file), AllowedKeys(allowed_keys_dir))


class HandshakeWatch:
    """Logs a client that fails the handshake for another reason than its key (it speaks no
    CURVE, or has the wrong engine key): once, since the socket cannot say who it was; each
    later one at debug. Refused keys are logged by `AllowedKeys`. A thread of its own reads
    the socket's monitor, so the engine's loop pays nothing."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

    def __init__(self, sock: zmq.Socket) -> None:
        self._monitor = sock.get_monitor_socket(self.EVENTS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="curve-handshakes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        logged = False
        try:
            while not self._stop.is_set():
                if not self._monitor.poll(200):
                    continue
                event = recv_monitor_message(self._monitor)
                if not logged:
                    logger.warning(
                        "a client failed the CURVE handshake (it has no keys, or not this engine's public key): "
                        "nothing it sends is processed; further failures are logged at debug only"
                    )
                    logged = True
                else:
                    logger.debug("CURVE handshake failed: %s", event)
        finally:
            self._monitor.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# The client's side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client needs to reach a CURVE engine: its own pair and the engine's public key."""

    own: KeyPair
    engine_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Before `connect`."""
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_serverkey = self.engine_public


# splitinfer-keys -----------------------------------------------------------------------


def make_key_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """`directory/name.key` (public) and `directory/name.key_secret` (readable by its owner only)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = (Path(p) for p in zmq.auth.create_certificates(str(directory), name))
    os.chmod(secret, 0o600)
    return public, secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="splitinfer-keys",
        description="Make a CURVE key pair for an engine or a server: DIR/NAME.key (the public key, to share) and "
        "DIR/NAME.key_secret (the pair, mode 0600, to keep). An engine takes its .key_secret with "
        "--curve-secret-key and a directory of the servers' .key files with --curve-allowed-keys; a server takes "
        "its own .key_secret with --curve-secret-key and the engine's .key with --curve-engine-key.",
    )
    parser.add_argument("directory", help="Where the two files go (created if missing).")
    parser.add_argument("name", help="The files' name, e.g. engine or server-1.")
    parser.add_argument("--force", action="store_true", help="Overwrite an existing pair of that name.")
    args = parser.parse_args(argv)
    existing = [
        p for p in (Path(args.directory) / f"{args.name}.key", Path(args.directory) / f"{args.name}.key_secret")
    ]
    if any(p.exists() for p in existing) and not args.force:
        parser.error(f"{existing[0]} exists; pass --force to replace it (its old key stops working)")
    public, secret = make_key_pair(args.directory, args.name)
    print(f"public key (share it): {public}\nkey pair (keep it):    {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
