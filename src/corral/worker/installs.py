"""Backend installs: when to (re)build a backend's virtualenv, and where each install stands.

The virtualenvs themselves are `corral.worker.venvs`' business; pip's package sources are
`corral.worker.pipconfig`'s.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from corral.backends.catalog import BackendEntry
from corral.bus.messages import InstallProgress
from corral.errors import InstallError
from corral.worker.venvs import VenvBuilder, complete_python, version_hash

log = logging.getLogger(__name__)

#: Receives every progress event of an install (phase changes, success, failure).
Publish = Callable[[InstallProgress], Awaitable[None]]


class InstallState(StrEnum):
    """Where the install of one backend stands on this node."""

    MISSING = "missing"  # not installed here (or only another version)
    RESOLVING = "resolving"  # creating the virtualenv, resolving requirements
    DOWNLOADING = "downloading"  # fetching (and building) distributions
    INSTALLING = "installing"  # unpacking distributions into the virtualenv
    INSTALLED = "installed"  # ready: the virtualenv is in place with its marker
    FAILED = "failed"  # the last attempt failed; asking again retries after a backoff


_PHASE_ORDER = [InstallState.RESOLVING, InstallState.DOWNLOADING, InstallState.INSTALLING]
_ProgressState = Literal["resolving", "downloading", "installing", "installed", "failed"]
_PROGRESS: dict[InstallState, _ProgressState] = {
    InstallState.RESOLVING: "resolving",
    InstallState.DOWNLOADING: "downloading",
    InstallState.INSTALLING: "installing",
    InstallState.INSTALLED: "installed",
    InstallState.FAILED: "failed",
}


@dataclass(frozen=True, slots=True)
class InstallStatus:
    """The state of one backend's install, as the worker reports it."""

    state: InstallState
    error: str | None = None  # the last failure's message (installer output tail included)
    attempts: int = 0  # failed attempts since the last success
    updated_at: float = 0.0  # wall-clock time of the last change
    python: str | None = None  # the interpreter to launch the backend with, once installed
    retry_in: float | None = None  # seconds until a failed install may be retried

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data


class BackendInstaller:
    """Builds and tracks the virtualenvs of backends under `root/<name>/<version hash>/`.

    Building a virtualenv is `corral.worker.venvs`' job; this class decides when to build and
    keeps what is known about each install. One lock per backend; different backends install
    concurrently; identical concurrent `ensure` calls share one install. A failed install is
    retried only after a backoff (`backoff` seconds, doubling per failure up to `backoff_max`).

    `use_uv`: see `VenvBuilder`.
    """

    def __init__(
        self,
        root: Path,
        *,
        publish: Publish | None = None,
        node_id: str = "",
        use_uv: bool | None = None,
        backoff: float = 10.0,
        backoff_max: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._publish = publish
        self._node_id = node_id
        self._builder = VenvBuilder(use_uv=use_uv)
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[str]] = {}
        self._status: dict[str, InstallStatus] = {}
        self._retry_at: dict[str, float] = {}  # backend → clock time a retry is allowed

    # --- public API -----------------------------------------------------------------------

    async def ensure(self, entry: BackendEntry, *, force: bool = False) -> str:
        """The interpreter to launch `entry` with, installing the backend first when needed.

        Entries without requirements run under Corral's own interpreter. `force` reinstalls
        even when installed (and ignores the backoff). Raises `InstallError` with the
        installer's output tail; within the backoff after a failure it re-raises that failure
        at once. Cancelling a caller does not cancel an install other callers share.
        """
        if not entry.needs_install:
            return sys.executable
        key = (entry.name, version_hash(entry))
        task = self._inflight.get(key)
        if task is None:
            if not force:
                python = self.installed(entry)
                if python is not None:
                    self._note_installed(entry.name, python)
                    return python
                self._check_backoff(entry.name)
            task = asyncio.create_task(self._install(entry, force), name=f"install {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._install_done(key, t))
        return await asyncio.shield(task)

    async def upgrade(self, entry: BackendEntry) -> str:
        """Reinstall `entry` into a fresh virtualenv, swap it in, and remove the backend's other
        versions. The caller stops the backend's processes first."""
        python = await self.ensure(entry, force=True)
        if entry.needs_install:
            keep = version_hash(entry)
            async with self._lock(entry.name):
                for path in self._backend_dir(entry.name).iterdir():
                    if path.is_dir() and not path.name.startswith(".") and path.name != keep:
                        await asyncio.to_thread(shutil.rmtree, path, True)
        return python

    def installed(self, entry: BackendEntry) -> str | None:
        """The interpreter of `entry`'s virtualenv when it is fully installed, else None."""
        if not entry.needs_install:
            return sys.executable
        return complete_python(self._backend_dir(entry.name) / version_hash(entry), entry)

    def status(self) -> dict[str, InstallStatus]:
        """The install status of every backend this installer was asked about."""
        now = self._clock()
        out: dict[str, InstallStatus] = {}
        for name, st in self._status.items():
            retry_at = self._retry_at.get(name)
            if st.state is InstallState.FAILED and retry_at is not None:
                st = replace(st, retry_in=max(0.0, retry_at - now))
            out[name] = st
        return out

    def survey(self, entries: Iterable[BackendEntry]) -> dict[str, InstallStatus]:
        """`status()` for every entry: those never asked about are INSTALLED when their
        virtualenv is on disk (from an earlier run), else MISSING; entries without
        requirements are always INSTALLED. For a worker's heartbeat."""
        out = self.status()
        for entry in entries:
            if entry.name not in out:
                python = self.installed(entry)
                state = InstallState.MISSING if python is None else InstallState.INSTALLED
                out[entry.name] = InstallStatus(state, python=python)
        return out

    async def close(self) -> None:
        """Cancel installs in progress (their installer processes are killed)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- one install ----------------------------------------------------------------------

    def _install_done(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # the callers get it; retrieved here so it is never unobserved

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _backend_dir(self, name: str) -> Path:
        return self._root / name

    def _check_backoff(self, name: str) -> None:
        st = self._status.get(name)
        retry_at = self._retry_at.get(name)
        if st is None or st.state is not InstallState.FAILED or retry_at is None:
            return
        wait = retry_at - self._clock()
        if wait > 0:
            raise InstallError(
                f"{st.error}\n(attempt {st.attempts} failed; next retry in {wait:.0f}s)",
                retry_after=wait,
                backend=name,
            )

    async def _install(self, entry: BackendEntry, force: bool) -> str:
        name = entry.name
        async with self._lock(name):
            if not force and (python := self.installed(entry)) is not None:
                self._note_installed(name, python)
                return python
            await self._set(name, InstallState.RESOLVING)
            started = time.monotonic()
            try:
                python = await self._builder.build(
                    entry,
                    self._backend_dir(name),
                    offline_first=not force,
                    on_phase=lambda phase: self._advance(name, InstallState(phase)),
                )
            except asyncio.CancelledError:  # shutdown: not a failure to back off from
                await self._set(name, InstallState.MISSING, error="install was cancelled")
                raise
            except InstallError as e:
                await self._fail(name, e.message)
                raise
            except OSError as e:
                error = f"install of backend {name} failed: {e}"
                await self._fail(name, error)
                raise InstallError(error, backend=name) from e
            log.info("installed backend %s in %.1fs (%s)", name, time.monotonic() - started, python)
            self._retry_at.pop(name, None)
            await self._set(name, InstallState.INSTALLED, python=python, attempts=0)
            return python

    # --- status and progress --------------------------------------------------------------

    def _note_installed(self, name: str, python: str) -> None:
        st = self._status.get(name)
        if st is None or st.state is not InstallState.INSTALLED or st.python != python:
            self._status[name] = InstallStatus(
                InstallState.INSTALLED, python=python, updated_at=time.time()
            )

    async def _set(self, name: str, state: InstallState, **fields: Any) -> None:
        prev = self._status.get(name, InstallStatus(InstallState.MISSING))
        updates: dict[str, Any] = {"error": None, "python": None, **fields}
        if state is InstallState.FAILED:
            updates.pop("python")
        self._status[name] = replace(prev, state=state, updated_at=time.time(), **updates)
        percent = 100.0 if state is InstallState.INSTALLED else None
        await self._emit(name, state, percent, fields.get("error"))

    async def _advance(self, name: str, phase: InstallState) -> None:
        st = self._status.get(name)
        if st is None or st.state not in _PHASE_ORDER:
            return
        if _PHASE_ORDER.index(phase) > _PHASE_ORDER.index(st.state):
            await self._set(name, phase)

    async def _fail(self, name: str, error: str) -> None:
        attempts = self._status.get(name, InstallStatus(InstallState.MISSING)).attempts + 1
        wait = min(self._backoff * 2 ** (attempts - 1), self._backoff_max)
        self._retry_at[name] = self._clock() + wait
        log.warning("backend %s install failed (attempt %d): %s", name, attempts, error)
        await self._set(name, InstallState.FAILED, error=error, attempts=attempts)

    async def _emit(
        self, name: str, state: InstallState, percent: float | None, error: str | None
    ) -> None:
        progress_state = _PROGRESS.get(state)
        if self._publish is None or progress_state is None:
            return
        event = InstallProgress(
            node_id=self._node_id, backend=name, state=progress_state, percent=percent, error=error
        )
        try:
            await self._publish(event)
        except Exception:
            log.exception("publishing install progress of %s failed", name)
