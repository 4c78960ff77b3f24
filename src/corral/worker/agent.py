"""The worker agent: joins the cluster, heartbeats, and executes replica and backend commands.

Commands arrive over NATS on subjects of this node only; each runs in its own task, and
backend upgrades have their own subscription, so nothing slow blocks anything else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from corral.backends.catalog import BackendEntry, Catalog
from corral.bus.client import Bus
from corral.bus.messages import (
    InstallBackend,
    InstallBackendReply,
    InstallProgress,
    ListReplicas,
    ListReplicasReply,
    LoadProgress,
    Message,
    ProcessInfo,
    StartReplica,
    StartReplicaReply,
    StopReplica,
    StopReplicaReply,
    resources_to_wire,
)
from corral.config import WorkerSettings
from corral.domain.entities import Resources
from corral.errors import (
    CorralError,
    Forbidden,
    FrontendUnreachable,
    InstallError,
    NotFound,
    Unauthorized,
)
from corral.worker.artifacts import ArtifactStager, StageProgress
from corral.worker.control import ControlClient
from corral.worker.identity import Identity, load_identity, save_identity
from corral.worker.installs import BackendInstaller
from corral.worker.ports import PortAllocator
from corral.worker.process import LaunchSpec, RunningProcess
from corral.worker.resources import probe_resources
from corral.worker.supervisor import Supervisor

log = logging.getLogger(__name__)


class Installer(Protocol):
    """What the agent needs from the backend installer (corral.worker.installs)."""

    async def ensure(self, entry: BackendEntry, *, force: bool = False) -> str: ...

    async def upgrade(self, entry: BackendEntry) -> str: ...

    def survey(self, entries: Iterable[BackendEntry]) -> Mapping[str, Any]: ...

    async def close(self) -> None: ...


class Stager(Protocol):
    """What the agent needs from the artifact stager (corral.worker.artifacts)."""

    async def stage(
        self,
        ref: str,
        *,
        url: str | None = None,
        digest: str | None = None,
        size: int | None = None,
        headers: Mapping[str, str] | None = None,
        progress: Callable[[StageProgress], Awaitable[None]] | None = None,
    ) -> Path: ...

    def held(self) -> list[str]: ...

    async def close(self) -> None: ...


class Agent:
    """One worker process."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        catalog: Catalog,
        installer: Installer | None = None,
        stager: Stager | None = None,
        resources: Callable[[Path], Resources] = probe_resources,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        data = settings.data_dir
        self.installer: Installer = installer or BackendInstaller(
            settings.backends_root or data / "backends", publish=self._publish_install
        )
        self.stager: Stager = stager or ArtifactStager(data / "artifacts")
        self.probe = resources
        self.control = ControlClient(settings.join)
        self.identity: Identity | None = None
        self.bus: Bus | None = None
        self.supervisor = Supervisor(
            PortAllocator(self.bind_host, settings.port_low, settings.port_high),
            settings.data_dir / "logs",
            stop_grace=settings.stop_grace,
            on_exit=self._on_exit,
        )
        self.heartbeat_interval = 5.0
        self.has_gpu = False
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._pending: dict[tuple[str, int], tuple[ProcessInfo, int]] = {}  # starts under way

    # --- addresses ----------------------------------------------------------------------
    @property
    def advertise_host(self) -> str:
        if self.settings.advertise_host:
            return self.settings.advertise_host
        return guess_advertise_host(self.settings.join)

    @property
    def bind_host(self) -> str:
        if self.settings.bind_host:
            return self.settings.bind_host
        return "127.0.0.1" if _is_loopback(self.advertise_host) else "0.0.0.0"

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
        bus = Bus(
            self.settings.nats_url or reply["nats_url"],
            prefix=reply.get("nats_prefix", "corral"),
            name=f"corral-worker-{self.node_id[:8]}",
        )
        await bus.connect()
        self.bus = bus
        s = bus.subjects
        nid = self.node_id
        await bus.serve(s.replica_start(nid), StartReplica, self._start, error_reply=_start_error)
        await bus.serve(s.replica_stop(nid), StopReplica, self._stop, error_reply=_stop_error)
        await bus.serve(s.replicas_list(nid), ListReplicas, self._list, error_reply=_list_error)
        await bus.serve(
            s.backend_install(nid), InstallBackend, self._install, error_reply=_install_error
        )
        await bus.serve(
            s.backend_upgrade(nid), InstallBackend, self._upgrade, error_reply=_install_error
        )
        await bus.flush()
        await self.heartbeat_once()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        log.info(
            "worker %s joined %s as %s (backends at %s)",
            self.settings.name or socket.gethostname(),
            self.settings.join,
            self.node_id,
            self.advertise_host,
        )

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
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
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
    def _register_body(self) -> dict[str, Any]:
        return {
            "name": self.settings.name or socket.gethostname(),
            "address": self.advertise_host,
            "labels": self.settings.labels,
            "memory_budget": self.settings.memory_budget,
            "max_replicas_per_model": self.settings.max_replicas_per_model,
            "backends": self.catalog.runnable(self.has_gpu),
        }

    async def register(self) -> dict[str, Any]:
        token = self.settings.token.get_secret_value() if self.settings.token else ""
        body = self._register_body()
        saved = load_identity(self.settings.data_dir)
        if saved is not None:
            body["node_id"] = saved.node_id
            body["credential"] = saved.credential
        reply = await self.control.register(token, body)
        credential = reply.get("credential") or (saved.credential if saved else None)
        if credential is None:
            raise Forbidden("the frontend issued no credential")
        self.identity = Identity(node_id=reply["node_id"], credential=credential)
        if saved != self.identity:
            save_identity(self.settings.data_dir, self.identity)
        self.heartbeat_interval = float(reply.get("heartbeat_interval", 5.0))
        return reply

    async def _register_until_done(self) -> dict[str, Any]:
        delay = 0.5
        while True:
            try:
                return await self.register()
            except FrontendUnreachable as exc:
                log.warning("cannot register yet (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def heartbeat_once(self) -> dict[str, Any]:
        assert self.identity is not None
        resources = await asyncio.to_thread(self.probe, self.settings.data_dir)
        body = {
            "resources": resources_to_wire(resources),
            "processes": [p.model_dump() for p in self.reported_processes()],
            "backends": self.catalog.runnable(bool(resources.gpus)),
            "artifacts": self.stager.held(),
            "installs": {
                name: dict(status.as_dict())
                for name, status in self.installer.survey(self.catalog.entries.values()).items()
            },
        }
        try:
            return await self.control.heartbeat(self.node_id, self.identity.credential, body)
        except NotFound:
            log.warning("the frontend forgot this node; registering again")
            await self.register()
            return await self.control.heartbeat(self.node_id, self.identity.credential, body)

    def reported_processes(self) -> list[ProcessInfo]:
        """The backends we run, plus the starts still installing or staging (state "staging"):
        the frontend must see that a start it asked for is under way, not lost."""
        running = [process_info(p) for p in self.supervisor.running()]
        keys = {(p.model, p.index) for p in running}
        return running + [p for key, (p, _) in self._pending.items() if key not in keys]

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

    # --- command handlers -----------------------------------------------------------------
    async def _start(self, cmd: StartReplica) -> Message:
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

    async def _start_process(self, entry: BackendEntry, cmd: StartReplica) -> Message:
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

    async def _stage(self, cmd: StartReplica) -> str:
        """The local path of the model's artifact; store artifacts come from the frontend."""
        assert cmd.artifact is not None
        assert self.identity is not None
        url = cmd.artifact_url
        if url is not None and url.startswith("/"):
            url = self.settings.join.rstrip("/") + url  # a path on the frontend we joined

        async def progress(event: StageProgress) -> None:
            await self._publish_load(
                LoadProgress(
                    model=cmd.model,
                    state="staging",
                    phase=event.phase,
                    percent=event.percent,
                    node_id=self.node_id,
                    index=cmd.index,
                    error=event.error,
                    origin=self.node_id,
                )
            )

        path = await self.stager.stage(
            cmd.artifact,
            url=url,
            digest=cmd.artifact_digest,
            size=cmd.artifact_size,
            headers={"authorization": f"Bearer {self.identity.credential}"},
            progress=progress,
        )
        return str(path)

    async def _publish_load(self, event: LoadProgress) -> None:
        if self.bus is not None:
            await self.bus.publish(self.bus.subjects.load_events(event.model), event)

    async def _publish_install(self, event: InstallProgress) -> None:
        if self.bus is not None and self.identity is not None:
            event = event.model_copy(update={"node_id": self.node_id})
            await self.bus.publish(self.bus.subjects.install_events, event)

    def _launch_spec(
        self, entry: BackendEntry, cmd: StartReplica, python: str, model_path: str | None
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
        return LaunchSpec(
            key=(cmd.model, cmd.index),
            backend=entry.name,
            argv=argv,
            env=env,
            health_path=entry.health,
            ready_timeout=min(cmd.ready_timeout, self.settings.ready_timeout),
            bind_host=self.bind_host,
            advertise_host=self.advertise_host,
        )

    async def _stop(self, cmd: StopReplica) -> Message:
        stopped = await self.supervisor.stop((cmd.model, cmd.index), cmd.address)
        return StopReplicaReply(ok=True, stopped=stopped)

    async def _list(self, _: ListReplicas) -> Message:
        return ListReplicasReply(processes=[process_info(p) for p in self.supervisor.running()])

    async def _install(self, cmd: InstallBackend) -> Message:
        """Install a backend (shared with identical concurrent installs); slow is fine."""
        entry = self.catalog.get(cmd.backend)
        if entry is None:
            return InstallBackendReply(ok=False, state="failed", error="unknown backend")
        try:
            await self.installer.ensure(entry, force=cmd.force)
        except InstallError as exc:
            return InstallBackendReply(ok=False, state="failed", error=exc.message)
        return InstallBackendReply(ok=True, state="installed")

    async def _upgrade(self, cmd: InstallBackend) -> Message:
        """Stop every process of the backend, reinstall it; the frontends restart replicas."""
        entry = self.catalog.get(cmd.backend)
        if entry is None:
            return InstallBackendReply(ok=False, state="failed", error="unknown backend")
        for process in self.supervisor.running():
            if process.backend == entry.name:
                await self.supervisor.stop(process.key, process.address)
                await self._on_exit(process, 0)
        try:
            if entry.needs_install:
                await self.installer.upgrade(entry)
        except InstallError as exc:
            return InstallBackendReply(ok=False, state="failed", error=exc.message)
        return InstallBackendReply(ok=True, state="installed")

    async def _on_exit(self, process: RunningProcess, returncode: int) -> None:
        """A backend died on its own: tell the frontend now rather than at the next tick."""
        log.warning("backend %s#%d (pid %d) exited with %d", *process.key, process.pid, returncode)
        if self.identity is None or self._stopping.is_set():
            return
        body = {
            "model": process.key[0],
            "index": process.key[1],
            "address": process.address,
            "returncode": returncode,
            "log_tail": self.supervisor.log_tail(process.key, 20),
        }
        try:
            await self.control.replica_exited(self.node_id, self.identity.credential, body)
        except CorralError as exc:
            log.warning("reporting the exit failed: %s", exc.message)


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


def guess_advertise_host(join_url: str) -> str:
    """The local address other machines reach us at: the one that routes to the frontend."""
    host = urlparse(join_url).hostname or "127.0.0.1"
    if _is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            addr: str = s.getsockname()[0]
            return addr
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _start_error(text: str) -> Message:
    return StartReplicaReply(ok=False, error=text)


def _stop_error(text: str) -> Message:
    return StopReplicaReply(ok=False, error=text)


def _list_error(text: str) -> Message:
    return ListReplicasReply(ok=False)


def _install_error(text: str) -> Message:
    return InstallBackendReply(ok=False, state="failed", error=text)


OnExit = Callable[[RunningProcess, int], Awaitable[None]]
