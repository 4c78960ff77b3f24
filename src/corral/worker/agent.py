"""The worker agent's life: join the cluster, heartbeat, leave cleanly; commands are in `commands`.

`start` registers (retrying until a frontend answers), connects to the NATS URL the frontend
gives, answers this node's commands (`corral.worker.commands`) and heartbeats its resources
and processes. `stop` drains the node through the frontend, stops every backend and
deregisters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from corral.backends.catalog import Catalog
from corral.bus.client import Bus
from corral.bus.contracts import (
    ExitReport,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
)
from corral.bus.messages import InstallProgress, resources_to_wire
from corral.bus.natsauth import NatsCredentials, worker_credentials
from corral.config import WorkerSettings
from corral.domain.entities import Resources
from corral.errors import CorralError, Forbidden, FrontendUnreachable, NotFound, Unauthorized
from corral.worker.artifacts import ArtifactStager
from corral.worker.commands import NodeCommands
from corral.worker.control import ControlClient
from corral.worker.identity import Identity, load_identity, save_identity
from corral.worker.installs import BackendInstaller
from corral.worker.network import advertise_host, bind_host
from corral.worker.ports import PortAllocator
from corral.worker.process import RunningProcess
from corral.worker.resources import probe_resources
from corral.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


class Agent:
    """One worker process."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        catalog: Catalog,
        installer: BackendInstaller | None = None,
        stager: ArtifactStager | None = None,
        resources: Callable[[Path], Resources] = probe_resources,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        data = settings.data_dir
        self.installer = installer or BackendInstaller(
            settings.backends_root or data / "backends", publish=self._publish_install
        )
        self.stager = stager or ArtifactStager(data / "artifacts", ca_file=settings.ca_file)
        self.probe = resources
        self.control = ControlClient(settings.join, ca_file=settings.ca_file)
        self.identity: Identity | None = None
        self.bus: Bus | None = None
        self.advertise_host = advertise_host(settings)
        self.bind_host = bind_host(settings)
        self.supervisor = Supervisor(
            PortAllocator(self.bind_host, settings.port_low, settings.port_high),
            settings.data_dir / "logs",
            stop_grace=settings.stop_grace,
            on_exit=self._on_exit,
        )
        self.commands = NodeCommands(
            settings=settings,
            catalog=catalog,
            installer=self.installer,
            stager=self.stager,
            supervisor=self.supervisor,
            hosts=(self.bind_host, self.advertise_host),
            on_exit=self._on_exit,
        )
        self.heartbeat_interval = 5.0
        self.has_gpu = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def node_id(self) -> str:
        assert self.identity is not None
        return self.identity.node_id

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Register (retrying until the frontend answers), connect to NATS, start loops."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        resources = await asyncio.to_thread(self.probe, self.settings.data_dir)
        self.has_gpu = bool(resources.gpus)
        reply = await self._register_until_done()
        await self._connect_bus(reply)
        await self.heartbeat_once()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        log.info(
            "worker %s joined %s as %s (backends at %s)",
            self.settings.name or socket.gethostname(),
            self.settings.join,
            self.node_id,
            self.advertise_host,
        )

    async def _connect_bus(self, reply: RegisterReply) -> None:
        """Connect to NATS as this node, with the credential the registration just issued,
        and serve its command subjects; close the previous connection (its credential was
        revoked by the new registration)."""
        assert self.identity is not None
        url = self.settings.nats_url or reply.nats_url
        ca = self.settings.nats_ca_file or (
            self.settings.ca_file if url.startswith("tls://") else None
        )
        credentials: NatsCredentials | None = None
        if reply.nats_credential:
            credentials = worker_credentials(
                reply.nats_prefix, self.node_id, reply.nats_credential, ca_file=ca
            )
        elif ca is not None:
            credentials = NatsCredentials(ca_file=ca)
        bus = Bus(
            url,
            prefix=reply.nats_prefix,
            name=f"corral-worker-{self.node_id[:8]}",
            credentials=credentials,
        )
        await bus.connect()
        await self.commands.serve(bus, self.identity, has_gpu=self.has_gpu)
        await bus.flush()
        old, self.bus = self.bus, bus
        if old is not None:
            await old.close()

    async def stop(self, *, drain: bool = True) -> None:
        """Leave the cluster: drain (bounded), stop every backend, deregister, disconnect.

        Heartbeats go on while the frontend moves the replicas away (a silent draining node
        would be judged offline and lose its replicas before their replacements are up); the
        last one completes before the deregistration, so none can bring the node back after it.
        """
        if drain and self.identity is not None and self.supervisor.running():
            await self._drain_self()
        self._stopping.set()
        await self._stop_loops()
        await self.supervisor.stop_all()
        await self.installer.close()
        await self.stager.close()
        if self.identity is not None:
            try:
                await self.control.deregister(self.node_id, self.identity.credential)
            except CorralError as exc:
                log.warning("deregister failed: %s", exc.message)
        if self.bus is not None:
            await self.bus.close()
        await self.control.close()

    async def _stop_loops(self) -> None:
        """Let the loops see `_stopping` and finish their current step; cancel stragglers."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(self._tasks, timeout=self.control.timeout + 1)
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _drain_self(self) -> None:
        """Ask the frontend to move our replicas away, then wait until they are stopped."""
        assert self.identity is not None
        try:
            await self.control.drain(self.node_id, self.identity.credential)
        except CorralError as exc:
            log.warning("self-drain request failed: %s", exc.message)
            return
        deadline = time.monotonic() + self.settings.drain_timeout
        while self.supervisor.running() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # the frontend stops them over NATS; poll our table

    # --- registration and heartbeats -------------------------------------------------------
    def _register_body(self) -> RegisterRequest:
        saved = load_identity(self.settings.data_dir)
        return RegisterRequest(
            name=self.settings.name or socket.gethostname(),
            address=self.advertise_host,
            labels=self.settings.labels,
            memory_budget=self.settings.memory_budget,
            max_replicas_per_model=self.settings.max_replicas_per_model,
            backends=self.catalog.runnable(self.has_gpu),
            node_id=saved.node_id if saved else None,
            credential=saved.credential if saved else None,
        )

    async def register(self) -> RegisterReply:
        token = self.settings.token.get_secret_value() if self.settings.token else ""
        body = self._register_body()
        reply = await self.control.register(token, body)
        credential = reply.credential or body.credential
        if credential is None:
            raise Forbidden("the frontend issued no credential")
        self.identity = Identity(node_id=reply.node_id, credential=credential)
        if (body.node_id, body.credential) != (reply.node_id, credential):  # new or changed
            save_identity(self.settings.data_dir, self.identity)
        self.heartbeat_interval = reply.heartbeat_interval
        return reply

    async def _register_until_done(self) -> RegisterReply:
        delay = 0.5
        while True:
            try:
                return await self.register()
            except FrontendUnreachable as exc:
                log.warning("cannot register yet (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def heartbeat_once(self) -> HeartbeatReply:
        assert self.identity is not None
        resources = await asyncio.to_thread(self.probe, self.settings.data_dir)
        body = HeartbeatRequest(
            resources=resources_to_wire(resources),
            processes=self.commands.reported_processes(),
            backends=self.catalog.runnable(bool(resources.gpus)),
            artifacts=self.stager.held(),
            installs={
                name: dict(status.as_dict())
                for name, status in self.installer.survey(self.catalog.entries.values()).items()
            },
        )
        try:
            return await self.control.heartbeat(self.node_id, self.identity.credential, body)
        except NotFound:
            log.warning("the frontend forgot this node; registering again")
            reply = await self.register()
            await self._connect_bus(reply)
            return await self.control.heartbeat(self.node_id, self.identity.credential, body)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.heartbeat_interval)
                return
            except TimeoutError:
                pass
            try:
                await self.heartbeat_once()
            except (Unauthorized, Forbidden) as exc:
                log.error("heartbeat refused: %s", exc.message)
            except CorralError as exc:
                log.warning("heartbeat failed: %s", exc.message)
            except Exception:
                log.exception("heartbeat failed")

    async def _publish_install(self, event: InstallProgress) -> None:
        if self.bus is not None and self.identity is not None:
            event = event.model_copy(update={"node_id": self.node_id})
            await self.bus.publish(self.bus.subjects.install_progress(self.node_id), event)

    async def _on_exit(self, process: RunningProcess, returncode: int) -> None:
        """A backend died on its own: tell the frontend now rather than at the next tick."""
        log.warning("backend %s#%d (pid %d) exited with %d", *process.key, process.pid, returncode)
        if self.identity is None or self._stopping.is_set():
            return
        body = ExitReport(
            model=process.key[0],
            index=process.key[1],
            address=process.address,
            returncode=returncode,
            log_tail=self.supervisor.log_tail(process.key, 20),
        )
        try:
            await self.control.replica_exited(self.node_id, self.identity.credential, body)
        except CorralError as exc:
            log.warning("reporting the exit failed: %s", exc.message)
