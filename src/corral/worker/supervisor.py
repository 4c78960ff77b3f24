"""Runs one backend process per replica: port, readiness, stop, and noticing unexpected exits."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from corral.domain.entities import ReplicaKey
from corral.errors import Conflict, ProcessStartError
from corral.worker.ports import PortAllocator
from corral.worker.process import (
    BackendProcess,
    LaunchSpec,
    ProcessState,
    RunningProcess,
    describe_exit,
    log_path_for,
    read_tail,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Called with the process's last snapshot and its return code when it exits on its own.
OnExit = Callable[[RunningProcess, int], Awaitable[None] | None]


class _Slot:
    """The supervisor's record of one replica key, from the start call until it is gone."""

    def __init__(self, spec: LaunchSpec, backend: BackendProcess) -> None:
        self.spec = spec
        self.backend = backend
        self.info: RunningProcess | None = None  # set once the process is spawned
        self.launch: asyncio.Task[RunningProcess] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.stopper: asyncio.Task[None] | None = None
        self.stop_owns_process = False  # stop() terminates the process; the launch must not
        self.forgotten = False
        self.closed = asyncio.Event()  # set once the slot left the table and its port is free

    def stopping(self) -> bool:
        """True once stop() began (a method, so checks after an await are not narrowed away)."""
        return self.stopper is not None


class Supervisor:
    """Starts, watches and stops backend processes, one per `ReplicaKey`.

    Every call must come from the event loop thread (PR_SET_PDEATHSIG ties a backend's life to
    the thread that spawned it). A start keeps running when its caller is cancelled, so identical
    concurrent starts can share it; `stop()` ends a start in progress.
    """

    def __init__(
        self,
        ports: PortAllocator,
        log_dir: Path,
        *,
        stop_grace: float = 10.0,
        on_exit: OnExit | None = None,
    ) -> None:
        self._ports = ports
        self._log_dir = log_dir
        self._stop_grace = stop_grace
        self._on_exit = on_exit
        self._slots: dict[ReplicaKey, _Slot] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references to our tasks

    async def start(self, spec: LaunchSpec) -> RunningProcess:
        """Run `spec` and return once its health endpoint answers 200.

        Returns the running process when the same spec already runs or is starting (the caller
        then shares that start). Raises `Conflict` when the key runs with another spec,
        `NoCapacity` when no port is free, and `ProcessStartError` (with the log tail) when the
        process exits or is not ready within `spec.ready_timeout`.
        """
        while (slot := self._slots.get(spec.key)) is not None:
            if slot.stopping():
                await slot.closed.wait()
                continue
            if slot.spec != spec:
                model, index = spec.key
                raise Conflict(
                    f"replica {model}#{index} already runs with a different launch spec",
                    address=slot.backend.address,
                )
            return await self._await_launch(slot)
        port = self._ports.allocate()
        backend = BackendProcess(spec, port, log_path_for(self._log_dir, spec.key))
        slot = _Slot(spec, backend)
        self._slots[spec.key] = slot
        slot.launch = self._spawn_task(self._launch(slot), f"start {spec.key}")
        return await self._await_launch(slot)

    async def stop(self, key: ReplicaKey, expected_address: str | None = None) -> bool:
        """Stop replica `key` (SIGTERM to its group, SIGKILL after the grace) and free its port.

        Returns False, stopping nothing, when no process runs for `key` or when
        `expected_address` is given and is not the address of the one that runs. A start in
        progress for `key` fails with `ProcessStartError`. Concurrent stops share one.
        """
        slot = self._slots.get(key)
        if slot is None:
            return False
        if expected_address is not None and expected_address != slot.backend.address:
            return False
        if slot.stopper is None:
            slot.stopper = self._spawn_task(self._stop(slot), f"stop {key}")
        await asyncio.shield(slot.stopper)
        return True

    async def stop_all(self) -> None:
        """Stop every process concurrently (on worker exit)."""
        await asyncio.gather(*(self.stop(key) for key in list(self._slots)))

    def running(self) -> list[RunningProcess]:
        """Snapshots of every spawned process, starting or ready."""
        return [s.info for s in self._slots.values() if s.info is not None]

    def log_path(self, key: ReplicaKey) -> Path:
        """The log file of replica `key` (kept after the process is gone)."""
        return log_path_for(self._log_dir, key)

    def log_tail(self, key: ReplicaKey, lines: int = 30) -> str:
        """The last `lines` lines of the replica's log: of the current run while it has a
        process, else of the whole file."""
        slot = self._slots.get(key)
        if slot is not None and slot.info is not None:
            return slot.backend.tail(lines)
        return read_tail(self.log_path(key), lines)

    # --- internals -------------------------------------------------------------------------

    def _spawn_task(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here; the awaiting callers get it too

    async def _await_launch(self, slot: _Slot) -> RunningProcess:
        assert slot.launch is not None
        await asyncio.shield(slot.launch)
        assert slot.info is not None
        return slot.info

    async def _launch(self, slot: _Slot) -> RunningProcess:
        backend = slot.backend
        spawned = False
        try:
            await backend.start()
            spawned = True
            slot.info = RunningProcess(
                key=slot.spec.key,
                backend=slot.spec.backend,
                pid=backend.pid,
                port=backend.port,
                address=backend.address,
                started_at=backend.started_at,
                state=ProcessState.STARTING,
            )
            if not slot.stopping():
                await backend.wait_ready()
            if slot.stopping():
                raise _stopped_while_starting(slot.spec.key)
            slot.info = replace(slot.info, state=ProcessState.READY)
            slot.watcher = self._spawn_task(self._watch(slot), f"watch {slot.spec.key}")
            log.info("%s ready at %s (pid %d)", slot.spec.key, backend.address, backend.pid)
            return slot.info
        except BaseException as e:
            if not slot.stop_owns_process:
                if spawned:
                    await backend.kill()
                self._forget(slot)
            if slot.stopping() and isinstance(e, ProcessStartError):
                raise _stopped_while_starting(slot.spec.key) from e
            if isinstance(e, ProcessStartError):
                log.warning("start of %s failed: %s", slot.spec.key, e.message)
            raise

    async def _stop(self, slot: _Slot) -> None:
        launch = slot.launch
        assert launch is not None
        if slot.info is not None:
            slot.stop_owns_process = True
            rc = await slot.backend.terminate(self._stop_grace)
            log.info("stopped %s (%s)", slot.spec.key, describe_exit(rc))
        await asyncio.wait([launch])  # a start in progress fails, and kills what it spawned
        if slot.watcher is not None:
            await asyncio.wait([slot.watcher])
        self._forget(slot)

    async def _watch(self, slot: _Slot) -> None:
        backend = slot.backend
        rc = await backend.wait()
        if slot.stopping():
            return
        await backend.kill()  # whatever the backend left behind in its group
        if slot.stopping():
            return
        self._forget(slot)
        info = slot.info
        assert info is not None
        log.warning(
            "%s (pid %d) exited unexpectedly: %s\n%s",
            info.key,
            info.pid,
            describe_exit(rc),
            backend.tail(30),
        )
        if self._on_exit is None:
            return
        try:
            result = self._on_exit(info, rc)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_exit callback failed for %s", info.key)

    def _forget(self, slot: _Slot) -> None:
        """Drop the slot from the table and free its port, once."""
        if slot.forgotten:
            return
        slot.forgotten = True
        if self._slots.get(slot.spec.key) is slot:
            del self._slots[slot.spec.key]
        self._ports.release(slot.backend.port)
        slot.closed.set()


def _stopped_while_starting(key: ReplicaKey) -> ProcessStartError:
    model, index = key
    return ProcessStartError(f"backend for {model}#{index} was stopped while starting")
