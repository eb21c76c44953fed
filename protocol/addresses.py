"""Engine addresses: where the engine's ROUTER socket binds and the servers connect.

Two forms, both ZeroMQ endpoint strings:

- `ipc:///absolute/path.sock`: a Unix socket file, for engine and servers on one host.
  The default is `$XDG_RUNTIME_DIR/splitinfer-engine.sock` (a per-user directory that
  only its owner can enter), or `/tmp/splitinfer-engine-<uid>.sock` when that is unset.
- `tcp://host:port`: across hosts. `host` is a name, an IPv4 address, `[IPv6]`, or `*`
  (bind on every interface).

`parse_address` checks an address before any socket sees it, so a typo is one clear
`ValueError` at start-up instead of a ZeroMQ error (or a socket nobody connects to).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

# sun_path holds 108 bytes including the terminating NUL; longer paths fail in bind/connect.
MAX_IPC_PATH_BYTES = 107
DEFAULT_SOCKET_NAME = "splitinfer-engine.sock"
_HOST = re.compile(r"\*|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


@dataclass(frozen=True, slots=True)
class Address:
    """A checked engine address: `path` is set for ipc, `host` and `port` for tcp."""

    scheme: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        """The ZeroMQ endpoint string."""
        if self.scheme == "ipc":
            return f"ipc://{self.path}"
        return f"tcp://{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def default_engine_address() -> str:
    """`ipc://$XDG_RUNTIME_DIR/splitinfer-engine.sock`, or a per-user file under /tmp."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime_dir):
        return f"ipc://{runtime_dir.rstrip('/')}/{DEFAULT_SOCKET_NAME}"
    # /tmp is shared by every user: the uid keeps two users' engines from claiming one path.
    return f"ipc:///tmp/splitinfer-engine-{os.getuid()}.sock"


def parse_address(address: str) -> Address:
    """Check an engine address (`ipc:///path` or `tcp://host:port`); raise ValueError saying
    what is wrong with it."""
    if not isinstance(address, str):
        raise ValueError(f"an engine address is a string, got {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise ValueError(f"engine address {address!r} has no scheme: use ipc:///path/to/engine.sock or tcp://host:port")
    if any(c.isspace() for c in address) or "\0" in address:
        raise ValueError(f"engine address {address!r} contains whitespace or NUL")
    if scheme == "ipc":
        return _parse_ipc(address, rest)
    if scheme == "tcp":
        return _parse_tcp(address, rest)
    raise ValueError(f"engine address {address!r} has scheme {scheme!r}; only ipc:// and tcp:// are supported")


def _parse_ipc(address: str, path: str) -> Address:
    if path.startswith("@"):
        raise ValueError(f"engine address {address!r}: abstract sockets are not supported; use a file path")
    if not path.startswith("/"):
        # A relative path would resolve against each process's own working directory.
        raise ValueError(f"engine address {address!r}: the ipc path must be absolute (ipc:///dir/engine.sock)")
    if path.endswith("/"):
        raise ValueError(f"engine address {address!r}: the ipc path names a directory, not a socket file")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_IPC_PATH_BYTES:
        raise ValueError(
            f"engine address {address!r}: the ipc path is {size} bytes; Unix sockets allow at most {MAX_IPC_PATH_BYTES}"
        )
    return Address("ipc", path=path)


def _parse_tcp(address: str, rest: str) -> Address:
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"engine address {address!r}: expected tcp://host:port")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"engine address {address!r}: the port must be a number in [1, 65535], got {port_text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"engine address {address!r}: {host} is not an IPv6 address") from None
    elif not _HOST.fullmatch(host):
        raise ValueError(f"engine address {address!r}: {host!r} is not a host name, an IP address, [IPv6] or *")
    return Address("tcp", host=host, port=int(port_text))
