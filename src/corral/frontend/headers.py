"""Which request headers the proxy forwards to a backend: a per-name rule, cached per name.

Forwarded: `accept`, `user-agent`, W3C trace context (`traceparent`, `tracestate`, `baggage`),
every `x-*` header but Corral's own `x-corral-*` control headers, every `openai-*` header, and
the names (or `prefix*` patterns) an operator adds with `--forward-headers`. Never forwarded,
whatever is configured: hop-by-hop headers (RFC 9110 7.6.1, also those the request's
`Connection` header names), the client's credentials for Corral (`authorization`,
`proxy-authorization`, `x-api-key`), and the framing the proxy writes itself (`host`,
`content-length`, `content-type`, `expect`).

The decision per name is cached (names repeat from request to request), so filtering a request
costs one dictionary lookup per header.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Headers that never leave the proxy towards a backend.
NEVER = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"authorization",
        b"proxy-authorization",
        b"x-api-key",
        b"host",
        b"content-length",
        b"content-type",
        b"expect",
    }
)
#: Headers forwarded by name.
DEFAULT_NAMES = frozenset(
    {b"accept", b"user-agent", b"traceparent", b"tracestate", b"baggage", b"x-request-id"}
)
#: Headers forwarded by prefix.
DEFAULT_PREFIXES = (b"x-", b"openai-")
#: Corral's own control headers: read by Corral, never passed on.
OWN_PREFIX = b"x-corral-"
_CACHE_LIMIT = 4096  # distinct names remembered; past it the cache starts over
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})  # name nothing


class HeaderFilter:
    """Picks the request headers to forward; `extra` adds names or `prefix*` patterns."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        wanted = [e.strip().lower().encode("latin-1") for e in extra if e.strip()]
        self.names = DEFAULT_NAMES | {w for w in wanted if not w.endswith(b"*")}
        self.prefixes = DEFAULT_PREFIXES + tuple(w[:-1] for w in wanted if w.endswith(b"*"))
        self._decided: dict[bytes, bool] = {}

    def allows(self, name: bytes) -> bool:
        """Whether a header called `name` (lower case, as ASGI gives it) is forwarded."""
        decided = self._decided.get(name)
        if decided is None:
            decided = self._decide(name)
        return decided

    def __call__(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The headers of a request to forward, in their order.

        One comprehension with a dictionary lookup per header; only names seen for the first
        time, and a `Connection` header, take a function call."""
        decided = self._decided
        named: list[bytes] = []
        kept = [
            (k, v)
            for k, v in headers
            if decided.get(k) or (k not in decided and self._slow(k, v, named))
        ]
        if named:
            kept = [(k, v) for k, v in kept if k not in named]
        return kept

    def _slow(self, name: bytes, value: bytes, named: list[bytes]) -> bool:
        if name == b"connection":  # never cached: its value names per-connection headers
            if value not in _PLAIN_CONNECTION:
                tokens = (t.strip().lower() for t in value.split(b","))
                named.extend(t for t in tokens if t not in NEVER)
            return False
        return self._decide(name)

    def _decide(self, name: bytes) -> bool:
        if name == b"connection":
            return False  # not cached: `__call__` reads its value on every request
        if len(self._decided) >= _CACHE_LIMIT:
            self._decided.clear()
        decided = self._decided[name] = (
            name not in NEVER
            and not name.startswith(OWN_PREFIX)
            and (name in self.names or name.startswith(self.prefixes))
        )
        return decided
