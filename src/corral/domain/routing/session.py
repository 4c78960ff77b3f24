"""Session affinity: which replica served a session last, bounded and expiring.

A session is named by the `x-session-id` header or, failing that, the body's `user` field;
`session_key(model, header, user)` turns them into a key (None: no session). Pure: every call
takes `now`. Call contract for a frontend: `get(key, now)` before the pick (the replica to
favour, or None), `record(key, replica, now)` after it, `forget(replica)` when a replica goes
away. The table is local to a frontend; the session scorer's load guard (see `route`) keeps a
hot session from pinning an overloaded replica.
"""

from __future__ import annotations

from collections import OrderedDict

from corral.domain.entities import ReplicaKey

MAX_SESSION_CHARS = 256


def session_key(model: str, header: str | None, user: str | None) -> int | None:
    """The session a request belongs to, per model (None when it names none)."""
    raw = header or user
    if not raw:
        return None
    return hash((model, raw[:MAX_SESSION_CHARS]))


class SessionTable:
    """Session key -> (replica, last seen), least recently seen dropped past `max_entries`."""

    def __init__(self, max_entries: int = 100_000, ttl: float = 1800.0) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[int, tuple[ReplicaKey, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session: int | None, now: float) -> ReplicaKey | None:
        """The replica that served `session` last, if within the TTL."""
        if session is None:
            return None
        entry = self._entries.get(session)
        if entry is None or now - entry[1] > self.ttl:
            return None
        return entry[0]

    def record(self, session: int | None, replica: ReplicaKey, now: float) -> None:
        """`replica` serves `session` now."""
        if session is None:
            return
        entries = self._entries
        entries[session] = (replica, now)
        entries.move_to_end(session)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def forget(self, replica: ReplicaKey) -> None:
        """`replica` went away: its sessions start over (one pass; replicas go rarely)."""
        gone = [s for s, (r, _) in self._entries.items() if r == replica]
        for s in gone:
            del self._entries[s]
