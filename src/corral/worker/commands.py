"""The worker's command handlers: start, stop and list replicas, install and upgrade backends.

Commands arrive over NATS on subjects of this node only; each runs in its own task, and
backend upgrades have their own subscription, so nothing slow blocks anything else. A start
counts as a process under way (state "staging") from the moment it arrives, so the heartbeat
tells the frontends that it is being worked on while its backend installs or its artifact
stages.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable

from corral.backends.catalog import BackendEntry, Catalog
from corral.bus.client import Bus
from corral.bus.messages import (
    InstallBackendCommand,
    InstallBackendReply,
    ListReplicasCommand,
    ListReplicasReply,
    LoadProgress,
    Message,
    ProcessInfo,
    StartReplicaCommand,
    StartReplicaReply,
    StopReplicaCommand,
    StopReplicaReply,
)
from corral.config import WorkerSettings
from corral.errors import CorralError, InstallError
from corral.worker.artifacts import ArtifactStager, StageProgress
from corral.worker.identity import Identity
from corral.worker.installs import BackendInstaller
from corral.worker.process import LaunchSpec, RunningProcess
from corral.worker.supervisor import Supervisor

#: Called when a backend stops without a stop command (it died, or an upgrade stopped it).
OnExit = Callable[[RunningProcess, int], Awaitable[None]]


class NodeCommands:
    """Answers the NATS commands addressed to one node."""

    def __init__(
        self,
        *,
        settings: WorkerSettings,
        catalog: Catalog,
        installer: BackendInstaller,
        stager: ArtifactStager,
        supervisor: Supervisor,
        hosts: tuple[str, str],  # (bind host, advertise host) of the backends
        on_exit: OnExit,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.installer = installer
        self.stager = stager
        self.supervisor = supervisor
        self.hosts = hosts
        self.on_exit = on_exit
        self.has_gpu = False
        self.identity: Identity | None = None
        self.bus: Bus | None = None
        self._pending: dict[tuple[str, int], tuple[ProcessInfo, int]] = {}  # starts under way

    async def serve(self, bus: Bus, identity: Identity, *, has_gpu: bool) -> None:
        """Subscribe to this node's command subjects."""
        self.bus, self.identity, self.has_gpu = bus, identity, has_gpu
        s, nid = bus.subjects, identity.node_id
        await bus.serve(s.replica_start(nid), StartReplicaCommand, self.start, error_reply=_start)
        await bus.serve(s.replica_stop(nid), StopReplicaCommand, self.stop, error_reply=_stop)
        await bus.serve(s.replicas_list(nid), ListReplicasCommand, self.listing, error_reply=_list)
        install, upgrade = s.backend_install(nid), s.backend_upgrade(nid)
        await bus.serve(install, InstallBackendCommand, self.install, error_reply=_install)
        await bus.serve(upgrade, InstallBackendCommand, self.upgrade, error_reply=_install)

    def reported_processes(self) -> list[ProcessInfo]:
        """The backends we run, plus the starts still installing or staging (state "staging"):
        the frontend must see that a start it asked for is under way, not lost."""
        running = [process_info(p) for p in self.supervisor.running()]
        keys = {(p.model, p.index) for p in running}
        return running + [p for key, (p, _) in self._pending.items() if key not in keys]

    # --- replicas -------------------------------------------------------------------------
    async def start(self, cmd: StartReplicaCommand) -> Message:
        entry = self.catalog.get(cmd.backend)
        if entry is None:
            return StartReplicaReply(ok=False, error=f"unknown backend {cmd.backend!r}")
        if entry.gpu and not self.has_gpu:
            return StartReplicaReply(ok=False, error=f"backend {cmd.backend} needs a GPU")
        key = (cmd.model, cmd.index)
        info, count = self._pending.get(key) or (
            ProcessInfo(
                model=cmd.model,
                index=cmd.index,
                backend=entry.name,
                state="staging",
                started_at=time.time(),
            ),
            0,
        )
        self._pending[key] = (info, count + 1)  # identical concurrent starts share one entry
        try:
            return await self._start_process(entry, cmd)
        finally:
            info, count = self._pending[key]
            if count > 1:
                self._pending[key] = (info, count - 1)
            else:
                del self._pending[key]

    async def _start_process(self, entry: BackendEntry, cmd: StartReplicaCommand) -> Message:
        try:
            python = await self._python_for(entry)
            model_path = None
            if cmd.artifact:
                model_path = await self._stage(cmd)
            spec = self._launch_spec(entry, cmd, python, model_path)
            process = await self.supervisor.start(spec)
        except CorralError as exc:
            return StartReplicaReply(ok=False, error=exc.message)
        return StartReplicaReply(ok=True, address=process.address, pid=process.pid)

    async def _python_for(self, entry: BackendEntry) -> str:
        if not entry.needs_install:
            return sys.executable
        return await self.installer.ensure(entry)

    async def _stage(self, cmd: StartReplicaCommand) -> str:
        """The local path of the model's artifact; store artifacts come from the frontend."""
        assert cmd.artifact is not None
        assert self.identity is not None
        node_id = self.identity.node_id
        url = cmd.artifact_url
        if url is not None and url.startswith("/"):
            url = self.settings.join.rstrip("/") + url  # a path on the frontend we joined

        async def progress(event: StageProgress) -> None:
            if self.bus is None:
                return
            message = LoadProgress(
                model=cmd.model,
                state="staging",
                phase=event.phase,
                percent=event.percent,
                node_id=node_id,
                index=cmd.index,
                error=event.error,
                origin=node_id,
            )
            await self.bus.publish(self.bus.subjects.load_progress(node_id, cmd.model), message)

        path = await self.stager.stage(
            cmd.artifact,
            url=url,
            digest=cmd.artifact_digest,
            size=cmd.artifact_size,
            headers={"authorization": f"Bearer {self.identity.credential}"},
            progress=progress,
        )
        return str(path)

    def _launch_spec(
        self, entry: BackendEntry, cmd: StartReplicaCommand, python: str, model_path: str | None
    ) -> LaunchSpec:
        argv = entry.argv(  # {host} and {port} stay for the supervisor to fill in
            python=python,
            host="{host}",
            port="{port}",
            model=cmd.model,
            model_path=model_path,
            options=cmd.options,
        )
        env = dict(entry.env)
        env.update({str(k): str(v) for k, v in (cmd.options.get("env") or {}).items()})
        bind, advertise = self.hosts
        return LaunchSpec(
            key=(cmd.model, cmd.index),
            backend=entry.name,
            argv=argv,
            env=env,
            health_path=entry.health,
            ready_timeout=min(cmd.ready_timeout, self.settings.ready_timeout),
            bind_host=bind,
            advertise_host=advertise,
        )

    async def stop(self, cmd: StopReplicaCommand) -> Message:
        stopped = await self.supervisor.stop((cmd.model, cmd.index), cmd.address)
        return StopReplicaReply(ok=True, stopped=stopped)

    async def listing(self, _: ListReplicasCommand) -> Message:
        return ListReplicasReply(processes=[process_info(p) for p in self.supervisor.running()])

    # --- backends -------------------------------------------------------------------------
    async def install(self, cmd: InstallBackendCommand) -> Message:
        """Install a backend (shared with identical concurrent installs); slow is fine."""
        entry = self.catalog.get(cmd.backend)
        if entry is None:
            return InstallBackendReply(ok=False, state="failed", error="unknown backend")
        try:
            await self.installer.ensure(entry, force=cmd.force)
        except InstallError as exc:
            return InstallBackendReply(ok=False, state="failed", error=exc.message)
        return InstallBackendReply(ok=True, state="installed")

    async def upgrade(self, cmd: InstallBackendCommand) -> Message:
        """Stop every process of the backend, reinstall it; the frontends restart replicas."""
        entry = self.catalog.get(cmd.backend)
        if entry is None:
            return InstallBackendReply(ok=False, state="failed", error="unknown backend")
        for process in self.supervisor.running():
            if process.backend == entry.name:
                await self.supervisor.stop(process.key, process.address)
                await self.on_exit(process, 0)
        try:
            if entry.needs_install:
                await self.installer.upgrade(entry)
        except InstallError as exc:
            return InstallBackendReply(ok=False, state="failed", error=exc.message)
        return InstallBackendReply(ok=True, state="installed")


def process_info(p: RunningProcess) -> ProcessInfo:
    return ProcessInfo(
        model=p.key[0],
        index=p.key[1],
        backend=p.backend,
        address=p.address,
        pid=p.pid,
        state=p.state.value,
        started_at=p.started_at,
    )


def _start(text: str) -> Message:
    return StartReplicaReply(ok=False, error=text)


def _stop(text: str) -> Message:
    return StopReplicaReply(ok=False, error=text)


def _list(text: str) -> Message:
    return ListReplicasReply(ok=False)


def _install(text: str) -> Message:
    return InstallBackendReply(ok=False, state="failed", error=text)
