"""Backend installs seen from the frontend: trigger them on a node, follow their progress.

An install can take many minutes: the command is sent in the background and a request
timeout only means "still installing". Progress comes from the node's install events; the
durable state from its heartbeats (`backend_installs`, written by the actuator).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from corral.backends.catalog import Catalog
from corral.bus.client import Bus, decode
from corral.bus.messages import InstallBackendCommand, InstallBackendReply, InstallProgress
from corral.domain.entities import Node
from corral.errors import NodeUnreachable, NotFound
from corral.store.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_INSTALL_TIMEOUT = 1800.0  # seconds, for backends only the node's catalog knows


class InstallController:
    """Starts installs and upgrades on nodes and merges what is known about them."""

    def __init__(self, *, registry: Registry, bus: Bus, catalog: Catalog) -> None:
        self.registry = registry
        self.bus = bus
        self.catalog = catalog
        self.live: dict[tuple[str, str], InstallProgress] = {}
        self.outcome: dict[tuple[str, str], dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def on_progress(self, node_id: str, payload: bytes) -> None:
        """A worker's install progress; the node is the one its subject names."""
        event = decode(payload, InstallProgress)
        if event is not None:
            event = event.model_copy(update={"node_id": node_id})
            self.live[(node_id, event.backend)] = event

    def request(self, node: Node, backend: str, *, force: bool, upgrade: bool) -> dict[str, Any]:
        """Send the install (or upgrade) command in the background; return at once.

        The backend must be in the node's own catalog (it may come from the node's
        --backends-dir, unknown to the frontend).
        """
        if backend not in node.backends:
            raise NotFound(f"node {node.name} has no backend {backend!r}", param="backend")
        entry = self.catalog.get(backend)
        timeout = entry.install_timeout if entry is not None else DEFAULT_INSTALL_TIMEOUT
        node_id = node.id
        key = (node_id, backend)
        self.outcome.pop(key, None)
        self.live[key] = InstallProgress(node_id=node_id, backend=backend, state="resolving")
        subject = (
            self.bus.subjects.backend_upgrade(node_id)
            if upgrade
            else self.bus.subjects.backend_install(node_id)
        )
        task = asyncio.create_task(
            self._send(key, subject, InstallBackendCommand(backend=backend, force=force), timeout)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"node_id": node_id, "backend": backend, "state": "installing"}

    async def _send(
        self, key: tuple[str, str], subject: str, command: InstallBackendCommand, timeout: float
    ) -> None:
        try:
            reply = await self.bus.request(subject, command, InstallBackendReply, timeout=timeout)
        except NodeUnreachable as exc:
            if exc.extra.get("timed_out"):
                log.info("install of %s on %s still running after %gs", key[1], key[0], timeout)
                return  # still installing; heartbeats will tell how it ends
            self.outcome[key] = {"state": "failed", "error": exc.message, "at": time.time()}
            return
        self.outcome[key] = {
            "state": "installed" if reply.ok else "failed",
            "error": reply.error,
            "at": time.time(),
        }

    async def status(self, node_id: str, backends: list[str]) -> dict[str, dict[str, Any]]:
        """Per backend: the reported state, overridden by newer live progress or outcomes."""
        reported = await self.registry.installs.of_node(node_id)
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(set(backends) | set(reported)):
            entry = self.catalog.get(name)
            state: dict[str, Any] = {
                "state": "builtin" if entry is not None and not entry.needs_install else "missing",
                "percent": None,
                "error": None,
                **reported.get(name, {}),
            }
            live = self.live.get((node_id, name))
            if live is not None:
                state.update(state=live.state, percent=live.percent, error=live.error)
            outcome = self.outcome.get((node_id, name))
            if outcome is not None:
                state.update(state=outcome["state"], error=outcome["error"])
                if outcome["state"] == "installed":
                    state["percent"] = 100.0
            out[name] = state
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
