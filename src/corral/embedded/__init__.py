"""Embedded PostgreSQL and NATS servers run as supervised child processes (`corral up`, tests).

`supervision` spawns, watches and stops one server child; `privileges` lets a server run as an
unprivileged user under root; `postgres` and `nats` are the two servers.
"""

from __future__ import annotations

from corral.embedded.nats import EmbeddedNats
from corral.embedded.postgres import PG_SYSTEM_USER, EmbeddedPostgres
from corral.embedded.supervision import free_port
from corral.errors import EmbeddedError

__all__ = ["PG_SYSTEM_USER", "EmbeddedError", "EmbeddedNats", "EmbeddedPostgres", "free_port"]
