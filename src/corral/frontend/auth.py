"""API-key and node-credential checks; secrets are compared as digests in constant time."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from corral.domain.access import ADMIN, Grant
from corral.errors import Forbidden, Unauthorized


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
    candidate = digest(secret).encode()
    found = False
    for d in digests:
        found |= hmac.compare_digest(candidate, d.encode())
    return found


def is_loopback(client: Any) -> bool:
    """True when an ASGI scope's `client` (host, port) is this machine's loopback address."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


NO_ADMIN_KEY = (
    "the admin API answers only on loopback while no admin key is configured: give the "
    "frontend an admin key (corral serve creates one in its --data-dir as admin.key; or "
    "--api-keys / CORRAL_API_KEYS) and send it as 'Authorization: Bearer <key>'"
)


class Authorizer:
    """Checks API keys: which credential may use the admin API, /v1 and /metrics.

    The rule (stated in the README): the admin API needs an admin key; while the frontend
    knows none, it answers only on loopback. /v1 is open until the operator gives keys
    (`--api-keys`) or a key is stored through the API; from then on it needs a key of either
    role, and a model-limited key only its models. The data dir's admin key opens and closes
    nothing: it only is an admin key.
    """

    def __init__(
        self,
        static: Iterable[str] = (),
        admin: Iterable[str] = (),
        metrics: Iterable[str] = (),
    ) -> None:
        self.static = frozenset(static)  # digests of --api-keys: admin keys, closing /v1
        self.admin_only = frozenset(admin)  # digests of the data dir's admin key
        self.metrics_digests = frozenset(metrics)  # digests that may read /metrics
        self.stored: dict[str, Grant] = {}
        self.grants: dict[str, Grant] = dict.fromkeys(self.static | self.admin_only, ADMIN)

    @property
    def inference_open(self) -> bool:
        """True while /v1 needs no key: no --api-keys and no stored key."""
        return not self.static and not self.stored

    @property
    def admin_configured(self) -> bool:
        return bool(self.static or self.admin_only) or any(g.admin for g in self.stored.values())

    def set_admin(self, digests: Iterable[str]) -> None:
        """Take the digests of the data dir's admin key."""
        self.admin_only = frozenset(digests)
        self.update(self.stored)

    def update(self, stored: Mapping[str, Grant]) -> None:
        """Take the keys stored in the registry (their digests and grants)."""
        self.stored = dict(stored)
        self.grants = {**dict.fromkeys(self.static | self.admin_only, ADMIN), **self.stored}

    def grant_of(self, token: str) -> Grant | None:
        """What `token` grants, if it is a key; every digest is compared in constant time."""
        candidate = digest(token).encode()
        found: Grant | None = None
        for d, grant in self.grants.items():
            if hmac.compare_digest(candidate, d.encode()):
                found = grant
        return found

    def inference(self, headers: Iterable[tuple[bytes, bytes]]) -> Grant | None:
        """The grant of a /v1 request (None while /v1 is open); Unauthorized without a key."""
        if self.inference_open:
            return None
        token = bearer_of(headers)
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        grant = self.grant_of(token)
        if grant is None:
            raise Unauthorized("invalid API key")
        return grant

    def check_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        self.inference(headers)

    def check(self, scope: Any) -> None:
        """A /v1 request outside the proxy (GET /v1/models)."""
        self.inference(scope["headers"])

    def admin(self, scope: Any) -> None:
        """An admin API request: an admin key, or loopback while no admin key is configured."""
        token = bearer(scope)
        grant = self.grant_of(token) if token is not None else None
        if grant is not None and not grant.admin:
            raise Forbidden(
                "this is an inference key: it may use /v1 only; the admin API needs an admin key"
            )
        if not self.admin_configured:
            if is_loopback(scope.get("client")):
                return
            raise Forbidden(NO_ADMIN_KEY)
        if token is None:
            raise Unauthorized(
                "missing API key: the admin API needs an admin key as 'Authorization: Bearer <key>'"
            )
        if grant is None:
            raise Unauthorized("invalid API key")

    def metrics(self, scope: Any) -> None:
        """/metrics: open, or (with a metrics key) that key or an admin key."""
        if not self.metrics_digests:
            return
        token = bearer(scope)
        if token is None:
            raise Unauthorized("missing metrics key: send 'Authorization: Bearer <key>'")
        if matches_any(token, self.metrics_digests):
            return
        grant = self.grant_of(token)
        if grant is None or not grant.admin:
            raise Unauthorized("invalid metrics key")
