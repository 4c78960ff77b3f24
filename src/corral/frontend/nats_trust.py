"""This frontend's side of NATS authentication: its identity, the callout, revocations.

With `--nats-auth-dir` the frontend connects with the cluster's frontend nkey, answers the
server's auth callout for its own cluster's workers (each node's NATS secret checked against
the digest in PostgreSQL) and cuts the connections of a credential that a re-registration or
a node deletion replaced (a second, system-account connection finds and kicks them). Without
it, the frontend connects as before and warns when the server checks nobody.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from corral.bus.authservice import AuthCallout, WorkerSessions
from corral.bus.client import Bus
from corral.bus.natsauth import NatsAuthDir, NatsCredentials, new_worker_secret
from corral.frontend.auth import digest
from corral.store.registry import Registry

log = logging.getLogger(__name__)


class NatsTrust:
    """Credentials and the auth callout of one frontend (module docstring)."""

    def __init__(
        self, bus: Bus, registry: Registry, *, auth_dir: Path | None, ca_file: Path | None
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.auth_dir = auth_dir
        self.ca_file = ca_file
        self.callout: AuthCallout | None = None
        self.sessions: WorkerSessions | None = None
        self._system: Bus | None = None

    @property
    def enabled(self) -> bool:
        """Whether workers get NATS credentials (the callout answers for them)."""
        return self.auth_dir is not None

    async def connect(self) -> None:
        """Connect the bus with this frontend's identity; with auth on, also the system
        connection and the callout. Warns when the server checks nobody."""
        if self.auth_dir is None:
            if self.ca_file is not None:
                self.bus.credentials = NatsCredentials(ca_file=self.ca_file)
            await self.bus.connect()
            if not self.bus.auth_required:
                log.warning(
                    "NATS at %s requires no authentication: whoever reaches it may publish and "
                    "subscribe on the cluster's subjects (replica events are still checked "
                    "against PostgreSQL before they route anything); start the frontends with "
                    "--nats-auth-dir and configure the server with `corral nats-config` "
                    "(docs/architecture.md, Security)",
                    self.bus.url.rpartition("@")[2],
                )
            return
        keys = NatsAuthDir(self.auth_dir).load_or_create()
        self.bus.credentials = keys.frontend_credentials(self.ca_file)
        await self.bus.connect()
        if not self.bus.auth_required:
            log.warning(
                "NATS at %s requires no authentication although --nats-auth-dir is set: add "
                "the output of `corral nats-config` to its configuration",
                self.bus.url.rpartition("@")[2],
            )
        self._system = Bus(
            self.bus.url,
            prefix=self.bus.subjects.prefix,
            name=f"{self.bus.name}-system",
            credentials=keys.system_credentials(self.ca_file),
        )
        await self._system.connect()
        self.sessions = WorkerSessions(self._system)
        self.callout = AuthCallout(self.bus, keys.issuer, self.verify)
        await self.callout.start()
        log.info("NATS authentication on (keys in %s)", self.auth_dir)

    async def close(self) -> None:
        """Stop answering the callout, cancel pending sweeps, close the system connection."""
        if self.callout is not None:
            await self.callout.stop()
        if self.sessions is not None:
            await self.sessions.close()
        if self._system is not None:
            await self._system.close()

    def issue(self) -> tuple[str, str] | None:
        """A new worker NATS secret and the digest to store (None with auth off)."""
        if not self.enabled:
            return None
        secret = new_worker_secret()
        return secret, digest(secret)

    async def verify(self, node_id: str, secret: str) -> str | None:
        """The node's stored NATS credential digest when `secret` matches it, else None."""
        stored = await self.registry.nodes.nats_credential_hash(node_id)
        if not stored or not hmac.compare_digest(digest(secret).encode(), stored.encode()):
            return None
        return stored

    async def revoke(self, node_id: str, credential_digest: str) -> None:
        """Cut the connections made with a credential whose digest is gone from PostgreSQL."""
        if self.sessions is not None:
            await self.sessions.revoke(node_id, credential_digest)
