"""API-key and node-credential checks; secrets are compared as digests in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

from corral.errors import Unauthorized


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(scope: Any) -> str | None:
    """The token of an `Authorization: Bearer ...` header in an ASGI scope, if any."""
    return bearer_of(scope["headers"])


def bearer_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer ...` header among `headers`, if any."""
    for name, value in headers:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def matches_any(secret: str, digests: Iterable[str]) -> bool:
    """True when `secret`'s digest equals one of `digests`; every digest is compared."""
    return match(secret, digests) is not None


def match(secret: str, digests: Iterable[str]) -> str | None:
    """The one of `digests` that is `secret`'s digest (None: none); every one is compared."""
    candidate = digest(secret).encode()
    found = None
    for d in digests:
        if hmac.compare_digest(candidate, d.encode()):
            found = d
    return found


class Authorizer:
    """Checks API keys on the OpenAI and admin APIs; with no key configured, the API is open."""

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self.digests: frozenset[str] = frozenset(digests)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def update(self, digests: Iterable[str]) -> None:
        self.digests = frozenset(digests)

    def check(self, scope: Any) -> None:
        if self.digests:
            self.check_headers(scope["headers"])

    def check_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The digest of the request's valid key (None: the API is open); Unauthorized."""
        if not self.digests:
            return None
        token = bearer_of(headers)
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        found = match(token, self.digests)
        if found is None:
            raise Unauthorized("invalid API key")
        return found
