"""Backend virtualenvs on disk: where they live, whether one is complete, and how one is built.

A virtualenv is built in a temporary directory beside its final place (uv when present, pip
otherwise), its marker file is written last, and the directory is renamed into place: a
crashed or killed build leaves only a temporary directory, never used and removed by the next
build of that backend.
"""

from __future__ import annotations

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import psutil

from corral.backends.catalog import BackendEntry
from corral.errors import InstallError
from corral.proc import die_with_parent
from corral.worker.pipconfig import PipSettings, read_pip_settings

log = logging.getLogger(__name__)

#: Written into a virtualenv as the very last step; a directory without it is never used.
MARKER = "corral-backend.json"

#: A phase of a build the installer's output reveals.
Phase = Literal["downloading", "installing"]
#: Told each phase the build reaches (in order; a phase may be told more than once).
OnPhase = Callable[[Phase], Awaitable[None]]

_TAIL_LINES = 40  # installer output lines kept for the error message
_TMP, _OLD = ".tmp-", ".old-"  # prefixes of directories being built / being replaced
_FIXUP_MAX = 1 << 20  # larger files in bin/ are binaries, never scripts naming the venv

#: Installer output lines (pip's and uv's) that start a phase.
_PHASE_LINES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    (
        re.compile(r"^\s*(Resolved \d+ package|Downloading |Downloaded |Building |Built )"),
        "downloading",
    ),
    (
        re.compile(r"^\s*(Prepared \d+ package|Installing collected packages|Installed \d+)"),
        "installing",
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


def complete_python(venv: Path, entry: BackendEntry) -> str | None:
    """The interpreter of the virtualenv at `venv` when its marker says it holds `entry`."""
    python = venv_python(venv)
    try:
        marker = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(marker, dict) and marker.get("requirements") == list(entry.requirements)
    return str(python) if ok and python.exists() else None


class VenvBuilder:
    """Builds virtualenvs with uv or pip.

    `use_uv`: True requires uv, False uses `python -m venv` + pip, None uses uv when found
    (next to the running interpreter or on PATH). With uv, pip's configured package sources
    (`pip config list`: index, extra indexes, find-links, constraints) are passed on.
    """

    def __init__(self, *, use_uv: bool | None = None) -> None:
        self._use_uv = use_uv
        self._building: set[str] = set()  # names of our temporary directories in use
        self._pip_settings: PipSettings | None = None

    async def build(
        self, entry: BackendEntry, parent: Path, *, offline_first: bool, on_phase: OnPhase
    ) -> str:
        """Build `entry`'s virtualenv as `parent/<version hash>` (replacing one there) and
        return its interpreter. InstallError with the installer's output tail on failure."""
        await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
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
                        await self._install_uv(uv, entry, tmp, logf, offline_first, on_phase)
                    else:
                        await self._install_pip(entry, tmp, logf, on_phase)
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
        self,
        uv: str,
        entry: BackendEntry,
        venv: Path,
        logf: Any,
        offline_first: bool,
        on_phase: OnPhase,
    ) -> None:
        """uv venv + uv pip install. Unless upgrading, first from uv's cache alone (--offline):
        uv revalidates cached sdists over HTTP, and a mirror or proxy that does not answer
        revalidations with "not modified" makes it drop the wheel it built (llama-cpp-python:
        13+ minutes to rebuild). Online only when the cache lacks something."""
        if self._pip_settings is None:
            self._pip_settings = await read_pip_settings()
        settings = self._pip_settings
        env = {**os.environ, **settings.uv_env()}
        env.pop("VIRTUAL_ENV", None)
        name = entry.name
        venv_argv = [uv, "venv", "--relocatable", "--python", sys.executable, str(venv)]
        await _run(name, venv_argv, env, logf, on_phase)
        python = str(venv_python(venv))
        argv = [uv, "pip", "install", "--python", python, *settings.uv_args()]
        requirements = ["--", *entry.requirements]
        if offline_first:
            try:
                await _run(name, [*argv, "--offline", *requirements], env, logf, on_phase)
                return
            except InstallError as e:
                if not _UV_OFFLINE_MISS.search(e.message):
                    raise  # a real failure: online would fail the same way
                logf.write("# not all in uv's cache: installing online\n")
        await _run(name, [*argv, *requirements], env, logf, on_phase)

    async def _install_pip(
        self, entry: BackendEntry, venv: Path, logf: Any, on_phase: OnPhase
    ) -> None:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("VIRTUAL_ENV", None)
        await _run(entry.name, [sys.executable, "-m", "venv", str(venv)], env, logf, on_phase)
        argv = [str(venv_python(venv)), "-m", "pip", "install", "--progress-bar", "off"]
        await _run(entry.name, [*argv, "--", *entry.requirements], env, logf, on_phase)

    def _uv(self) -> str | None:
        if self._use_uv is False:
            return None
        beside = Path(sys.executable).with_name("uv")
        found = str(beside) if beside.exists() else shutil.which("uv")
        if found is None and self._use_uv:
            raise InstallError("uv was asked for but is not installed")
        return found

    def _remove_stale(self, parent: Path) -> None:
        """Remove temporary and replaced directories left by dead or finished builds."""
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


async def _run(
    name: str, argv: list[str], env: dict[str, str], logf: Any, on_phase: OnPhase
) -> None:
    """Run one installer step; follow its output for phases; InstallError on failure."""
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
                    await on_phase(phase)
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
