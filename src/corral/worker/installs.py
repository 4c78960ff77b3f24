"""Backend installs: one virtualenv per backend version, built aside and swapped in atomically."""

from __future__ import annotations

import ast
import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import psutil

from corral.backends.catalog import BackendEntry
from corral.bus.messages import InstallProgress
from corral.errors import InstallError
from corral.proc import die_with_parent

log = logging.getLogger(__name__)

#: Receives every progress event of an install (phase changes, success, failure).
Publish = Callable[[InstallProgress], Awaitable[None]]

#: Written into a virtualenv as the very last step; a directory without it is never used.
MARKER = "corral-backend.json"

_TAIL_LINES = 40  # installer output lines kept for the error message
_TMP, _OLD = ".tmp-", ".old-"  # prefixes of directories being built / being replaced
_FIXUP_MAX = 1 << 20  # larger files in bin/ are binaries, never scripts naming the venv


class InstallState(StrEnum):
    """Where the install of one backend stands on this node."""

    MISSING = "missing"  # not installed here (or only another version)
    RESOLVING = "resolving"  # creating the virtualenv, resolving requirements
    DOWNLOADING = "downloading"  # fetching (and building) distributions
    INSTALLING = "installing"  # unpacking distributions into the virtualenv
    INSTALLED = "installed"  # ready: the virtualenv is in place with its marker
    FAILED = "failed"  # the last attempt failed; asking again retries after a backoff


#: Installer output lines (pip's and uv's) that start a phase.
_PHASE_LINES = (
    (
        re.compile(r"^\s*(Resolved \d+ package|Downloading |Downloaded |Building |Built )"),
        InstallState.DOWNLOADING,
    ),
    (
        re.compile(r"^\s*(Prepared \d+ package|Installing collected packages|Installed \d+)"),
        InstallState.INSTALLING,
    ),
)
#: What uv says when an --offline install needs something its cache does not hold, or cannot
#: resolve from it (a local index may know the package but not the version asked for). A
#: failed build is not among them: it would fail online too, and builds can take long.
_UV_OFFLINE_MISS = re.compile(
    r"network (was|is) disabled|network connectivity is disabled|"
    r"(not|n't) found in the cache|--offline|no solution found when resolving",
    re.IGNORECASE,
)
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


@dataclass(frozen=True, slots=True)
class PipSettings:
    """The package sources pip is configured with, so that uv installs from the same ones.

    uv reads neither pip.conf nor PIP_* variables; without these a uv install could pick other
    distributions than pip would (e.g. a CUDA torch from PyPI instead of a local CPU wheel).
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    constraints: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    cert: str | None = None
    no_index: bool = False

    @classmethod
    def parse(cls, config_list: str) -> PipSettings:
        """From the output of `pip config list` (`scope.key='value'` per line; the `:env:`
        scope, from PIP_* variables, wins over `install.`, which wins over `global.`)."""
        rank = {":env:": 3, "install": 2, "global": 1}
        best: dict[str, tuple[int, str]] = {}
        for line in config_list.splitlines():
            m = re.match(r"^(:env:|[a-z]+)\.([a-z-]+)=(.*)$", line.strip())
            if m is None or m.group(1) not in rank:
                continue
            scope, key, raw = m.groups()
            try:
                value = str(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                value = raw.strip("'\"")
            if key not in best or rank[scope] >= best[key][0]:
                best[key] = (rank[scope], value)

        def many(key: str) -> tuple[str, ...]:
            return tuple(best[key][1].split()) if key in best else ()

        def one(key: str) -> str | None:
            return best[key][1].strip() or None if key in best else None

        return cls(
            index_url=one("index-url"),
            extra_index_urls=many("extra-index-url"),
            find_links=many("find-links"),
            constraints=many("constraint"),
            trusted_hosts=many("trusted-host"),
            cert=one("cert"),
            no_index=(one("no-index") or "").lower() in ("1", "true", "yes", "on"),
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PipSettings:
        """From PIP_* variables only (when pip itself cannot be asked)."""
        lines = [
            f":env:.{key[4:].lower().replace('_', '-')}={value!r}"
            for key, value in env.items()
            if key.startswith("PIP_")
        ]
        return cls.parse("\n".join(lines))

    def uv_args(self) -> list[str]:
        """The `uv pip install` options that select the same sources as pip."""
        args: list[str] = ["--no-index"] if self.no_index else []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for path in self.constraints:
            args += ["--constraint", path]
        for host in self.trusted_hosts:
            args += ["--allow-insecure-host", host]
        if self.extra_index_urls or self.find_links:
            # pip takes the best version across all sources; uv's default takes the first
            # index that knows a package. Match pip.
            args += ["--index-strategy", "unsafe-best-match"]
        return args

    def uv_env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": self.cert} if self.cert else {}


def version_hash(entry: BackendEntry) -> str:
    """Names the virtualenv of `entry`: changes with its version, requirements and the Python
    it is built for."""
    ident = {
        "version": entry.version,
        "requirements": list(entry.requirements),
        "python": f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}",
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    """The interpreter of the virtualenv at `venv`."""
    if sys.platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


class BackendInstaller:
    """Builds and tracks the virtualenvs of backends under `root/<name>/<version hash>/`.

    A virtualenv is built in a temporary directory beside its final place, its marker file is
    written last, and the directory is renamed into place: a crashed or killed install leaves
    only a temporary directory, never used and removed by the next install of that backend.
    One lock per backend; different backends install concurrently; identical concurrent
    `ensure` calls share one install. A failed install is retried only after a backoff
    (`backoff` seconds, doubling per failure up to `backoff_max`).

    `use_uv`: True requires uv, False uses `python -m venv` + pip, None uses uv when found
    (next to the running interpreter or on PATH). With uv, pip's configured package sources
    (`pip config list`: index, extra indexes, find-links, constraints) are passed on.
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
        self._use_uv = use_uv
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[str]] = {}
        self._status: dict[str, InstallStatus] = {}
        self._retry_at: dict[str, float] = {}  # backend → clock time a retry is allowed
        self._building: set[str] = set()  # names of our temporary directories in use
        self._pip_settings: PipSettings | None = None

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
        venv = self._backend_dir(entry.name) / version_hash(entry)
        python = venv_python(venv)
        try:
            marker = json.loads((venv / MARKER).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(marker, dict) and marker.get("requirements") == list(entry.requirements)
        return str(python) if ok and python.exists() else None

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
                python = await self._build(entry, force)
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

    async def _build(self, entry: BackendEntry, force: bool) -> str:
        parent = self._backend_dir(entry.name)
        parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._remove_stale, parent)
        vhash = version_hash(entry)
        final = parent / vhash
        tmp = parent / f"{_TMP}{vhash}-{os.getpid()}-{secrets.token_hex(4)}"
        self._building.add(tmp.name)
        try:
            uv = self._uv()
            log_path = parent / "install.log"
            with log_path.open("w") as logf:
                async with asyncio.timeout(entry.install_timeout):
                    if uv is not None:
                        await self._install_uv(uv, entry, tmp, logf, offline_first=not force)
                    else:
                        await self._install_pip(entry, tmp, logf)
            await asyncio.to_thread(_fix_paths, tmp, final)
            marker = {
                "backend": entry.name,
                "version": entry.version,
                "requirements": list(entry.requirements),
                "installer": "uv" if uv else "pip",
                "installed_at": time.time(),
            }
            (tmp / f"{MARKER}.part").write_text(json.dumps(marker, indent=2))
            (tmp / f"{MARKER}.part").rename(tmp / MARKER)
            await asyncio.to_thread(_swap, tmp, final)
        except TimeoutError:
            raise InstallError(
                f"install of backend {entry.name} timed out after {entry.install_timeout:g}s",
                backend=entry.name,
            ) from None
        finally:
            self._building.discard(tmp.name)
            if tmp.exists():
                await asyncio.to_thread(shutil.rmtree, tmp, True)
        return str(venv_python(final))

    async def _install_uv(
        self, uv: str, entry: BackendEntry, venv: Path, logf: Any, *, offline_first: bool
    ) -> None:
        """uv venv + uv pip install. Unless upgrading, first from uv's cache alone (--offline):
        uv revalidates cached sdists over HTTP, and a mirror or proxy that does not answer
        revalidations with "not modified" makes it drop the wheel it built (llama-cpp-python:
        13+ minutes to rebuild). Online only when the cache lacks something."""
        settings = await self._pip_config()
        env = {**os.environ, **settings.uv_env()}
        env.pop("VIRTUAL_ENV", None)
        await self._run(
            entry.name,
            [uv, "venv", "--relocatable", "--python", sys.executable, str(venv)],
            env,
            logf,
        )
        python = str(venv_python(venv))
        argv = [uv, "pip", "install", "--python", python, *settings.uv_args()]
        requirements = ["--", *entry.requirements]
        if offline_first:
            try:
                await self._run(entry.name, [*argv, "--offline", *requirements], env, logf)
                return
            except InstallError as e:
                if not _UV_OFFLINE_MISS.search(e.message):
                    raise  # a real failure: online would fail the same way
                logf.write("# not all in uv's cache: installing online\n")
        await self._run(entry.name, [*argv, *requirements], env, logf)

    async def _install_pip(self, entry: BackendEntry, venv: Path, logf: Any) -> None:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("VIRTUAL_ENV", None)
        await self._run(entry.name, [sys.executable, "-m", "venv", str(venv)], env, logf)
        argv = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "off"]
        await self._run(entry.name, [*argv, "--", *entry.requirements], env, logf)

    async def _run(self, name: str, argv: list[str], env: dict[str, str], logf: Any) -> None:
        """Run one installer step; follow its output for progress; InstallError on failure."""
        logf.write(f"$ {' '.join(argv)}\n")
        logf.flush()
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip()
                logf.write(line + "\n")
                tail.append(line)
                for pattern, phase in _PHASE_LINES:
                    if pattern.match(line):
                        await self._advance(name, phase)
            rc = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled or timed out: kill the whole group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        logf.flush()
        if rc != 0:
            output = "\n".join(tail)
            raise InstallError(
                f"install of backend {name} failed: {Path(argv[0]).name} {argv[1]} exited "
                f"with code {rc}\n{output}",
                backend=name,
            )

    def _uv(self) -> str | None:
        if self._use_uv is False:
            return None
        beside = Path(sys.executable).with_name("uv")
        found = str(beside) if beside.exists() else shutil.which("uv")
        if found is None and self._use_uv:
            raise InstallError("uv was asked for but is not installed")
        return found

    async def _pip_config(self) -> PipSettings:
        if self._pip_settings is None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pip",
                "config",
                "list",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await proc.communicate()
            if proc.returncode == 0:
                self._pip_settings = PipSettings.parse(out.decode(errors="replace"))
            else:  # no pip beside Corral: its environment variables still count
                self._pip_settings = PipSettings.from_env(os.environ)
        return self._pip_settings

    def _remove_stale(self, parent: Path) -> None:
        """Remove temporary and replaced directories left by dead or finished installs."""
        for path in parent.iterdir():
            if not path.name.startswith((_TMP, _OLD)) or path.name in self._building:
                continue
            try:
                pid = int(path.name.rsplit("-", 2)[1])
            except (IndexError, ValueError):
                pid = 0
            if pid != os.getpid() and pid > 0 and psutil.pid_exists(pid):
                continue  # another live process is building it
            log.info("removing leftover install directory %s", path)
            shutil.rmtree(path, ignore_errors=True)

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


def _fix_paths(tmp: Path, final: Path) -> None:
    """Make the scripts of a virtualenv built at `tmp` name `final` instead (pip writes absolute
    shebangs; uv's --relocatable scripts need nothing, and then nothing matches)."""
    old, new = str(tmp).encode(), str(final).encode()
    candidates = [tmp / "pyvenv.cfg"]
    for bindir in (tmp / "bin", tmp / "Scripts"):
        if bindir.is_dir():
            candidates += list(bindir.iterdir())
    for path in candidates:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _FIXUP_MAX:
            continue
        data = path.read_bytes()
        if old in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)


def _swap(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first, then removed."""
    if not final.exists():
        tmp.rename(final)
        return
    aside = final.with_name(f"{_OLD}{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)
