"""The engine process's view of its clients (the HTTP servers): sessions, leases, request ownership.

A client says `Hello` with its id and an instance nonce; the session lives while the client
keeps heartbeating within its lease. Every request belongs to one session, so that a client
that vanishes (silent past the lease, its socket gone, or back under the same id with a new
nonce after a restart) has everything it owned aborted and its KV blocks freed.

Each admitted request gets a fresh engine-core id (never derived from the client's names),
so an aborted request still being reported can never be confused with a new request that
reuses its client id, by the same client or by its restarted successor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ClientSession:
    client_id: str
    nonce: str
    pid: int
    identity: bytes  # the ZeroMQ routing id of the client's DEALER socket
    last_seen: float
    # The client's own ids of its live requests -> their engine-core ids.
    requests: dict[str, str] = field(default_factory=dict)


class ClientRegistry:
    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError(f"the client lease must be positive, got {lease_s}")
        self.lease_s = lease_s
        self._by_id: dict[str, ClientSession] = {}
        self._by_identity: dict[bytes, ClientSession] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def sessions(self) -> list[ClientSession]:
        return list(self._by_id.values())

    def hello(self, identity: bytes, client_id: str, nonce: str, pid: int, now: float) -> ClientSession | None:
        """Open (or resume) a session. Returns the session it replaces when the same client id
        comes back with a new nonce (a restarted client): the caller aborts its requests."""
        old = self._by_id.get(client_id)
        if old is not None and old.nonce == nonce:
            # The same instance reconnected (e.g. after an engine restart or a new socket): keep it.
            self._by_identity.pop(old.identity, None)
            old.identity, old.last_seen, old.pid = identity, now, pid
            self._by_identity[identity] = old
            return None
        replaced = self.drop(old) if old is not None else None
        stale = self._by_identity.get(identity)
        if stale is not None:  # the routing id was reused by another client id
            self.drop(stale)
        session = ClientSession(client_id, nonce, pid, identity, now)
        self._by_id[client_id] = session
        self._by_identity[identity] = session
        return replaced

    def get(self, identity: bytes) -> ClientSession | None:
        return self._by_identity.get(identity)

    def touch(self, identity: bytes, now: float) -> ClientSession | None:
        """The session of a routing id that just sent something, its lease renewed."""
        session = self._by_identity.get(identity)
        if session is not None:
            session.last_seen = now
        return session

    def expired(self, now: float) -> list[ClientSession]:
        """Sessions silent for longer than the lease (removed from the registry)."""
        gone = [s for s in self._by_id.values() if now - s.last_seen > self.lease_s]
        for session in gone:
            self.drop(session)
        return gone

    def drop(self, session: ClientSession) -> ClientSession:
        self._by_id.pop(session.client_id, None)
        if self._by_identity.get(session.identity) is session:
            del self._by_identity[session.identity]
        return session
