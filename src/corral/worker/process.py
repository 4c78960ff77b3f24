"""One backend OS process: spawn in its own process group, log to a file, probe health, kill."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import httpx
import psutil

from corral.domain.entities import ReplicaKey
from corral.errors import ProcessStartError
from corral.proc import die_with_parent

log = logging.getLogger(__name__)

_TAIL_BYTES = 64 * 1024  # how far back from the end of a log `tail` looks
_POLL_TIMEOUT = 1.0  # seconds one health request may take
# Health polls: every 20-50 ms for the first 30 s (a cold request waits on this), then
# backing off to 0.5 s for engines that load for minutes.
_POLL_FIRST, _POLL_EARLY_MAX, _POLL_MAX, _POLL_EARLY = 0.02, 0.05, 0.5, 30.0


class ProcessState(StrEnum):
    """Lifecycle of a supervised backend process."""

    STARTING = "starting"  # spawned; the health endpoint has not answered 200 yet
    READY = "ready"  # the health endpoint answered 200


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How to run one replica's backend. `{port}` and `{host}` in `argv` and in `env` values are
    replaced by the allocated port and the bind host."""

    key: ReplicaKey
    backend: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    health_path: str = "/health"
    ready_timeout: float = 600.0
    bind_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"  # the host other nodes use to reach the backend


@dataclass(frozen=True, slots=True)
class RunningProcess:
    """A snapshot of a supervised backend process."""

    key: ReplicaKey
    backend: str
    pid: int
    port: int
    address: str  # advertise_host:port
    started_at: float  # seconds since the epoch
    state: ProcessState


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_path_for(log_dir: Path, key: ReplicaKey) -> Path:
    """The log file of replica `key` under `log_dir` (the model name made safe for a file name)."""
    model, index = key
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model).lstrip(".") or "_"
    return log_dir / f"{safe}.{index}.log"


def read_tail(path: Path, lines: int, start: int = 0) -> str:
    """The last `lines` lines of `path` at or after byte `start`; "" when there is no file."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            begin = max(start, size - _TAIL_BYTES)
            f.seek(begin)
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def describe_exit(returncode: int) -> str:
    """`exit code 3` or `killed by SIGKILL`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class BackendProcess:
    """One spawned backend process and its process group.

    stdout and stderr go to `log_path` (appended, after a header line); `tail()` reads only what
    this run wrote.
    """

    def __init__(self, spec: LaunchSpec, port: int, log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._log_start = 0
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        return self._require().returncode

    @property
    def address(self) -> str:
        return host_port(self.spec.advertise_host, self.port)

    def substitute(self, text: str) -> str:
        return text.replace("{port}", str(self.port)).replace("{host}", self.spec.bind_host)

    async def start(self) -> None:
        """Spawn the process in a new session (its own process group)."""
        spec = self.spec
        argv = [self.substitute(a) for a in spec.argv]
        env = dict(os.environ)
        env.update({k: self.substitute(v) for k, v in spec.env.items()})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logf:
            header = f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start {spec.backend}: {argv}\n"
            logf.write(header.encode())
            logf.flush()
            self._log_start = logf.tell()
            self.started_at = time.time()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=spec.cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=die_with_parent(),
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise ProcessStartError(f"cannot run {spec.backend} ({argv[0]!r}): {e}") from e
        log.info(
            "started %s for %s as pid %d on port %d", spec.backend, spec.key, self.pid, self.port
        )

    async def wait_ready(self) -> None:
        """Poll the health endpoint until it answers 200; raise `ProcessStartError` (with the log
        tail) when the process exits first or the ready timeout passes. Does not kill anything."""
        proc = self._require()
        spec = self.spec
        host = spec.bind_host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        url = f"http://{host_port(host, self.port)}{spec.health_path}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.ready_timeout
        delay = _POLL_FIRST
        exited = asyncio.ensure_future(proc.wait())
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                while True:
                    if exited.done():
                        raise self._start_error(f"exited ({describe_exit(exited.result())})")
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise self._start_error(
                            f"not ready after {spec.ready_timeout:g}s (GET {url})"
                        )
                    try:
                        resp = await client.get(url, timeout=min(_POLL_TIMEOUT, remaining))
                        if resp.status_code == 200:
                            return
                    except httpx.InvalidURL as e:
                        raise self._start_error(f"has a bad health URL {url!r}: {e}") from e
                    except httpx.HTTPError:
                        pass
                    remaining = deadline - loop.time()
                    await asyncio.wait([exited], timeout=max(0.0, min(delay, remaining)))
                    early = loop.time() < deadline - spec.ready_timeout + _POLL_EARLY
                    delay = min(delay * 2, _POLL_EARLY_MAX if early else _POLL_MAX)
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exited

    async def wait(self) -> int:
        """Wait for the process to exit; return its return code."""
        return await self._require().wait()

    async def terminate(self, grace: float) -> int:
        """SIGTERM the group, give it `grace` seconds to go, then SIGKILL what is left."""
        descendants = self._descendants()
        self._signal(signal.SIGTERM, descendants)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone(descendants), grace)
        return await self._kill(descendants)

    async def kill(self) -> int:
        """SIGKILL the group (and any descendant that left it) at once; wait for the leader."""
        return await self._kill(self._descendants())

    def tail(self, lines: int = 30) -> str:
        """The last `lines` lines this run wrote to its log."""
        return read_tail(self.log_path, lines, self._log_start)

    async def _kill(self, descendants: list[psutil.Process]) -> int:
        proc = self._require()
        self._signal(signal.SIGKILL, descendants)
        return await proc.wait()

    async def _gone(self, descendants: list[psutil.Process]) -> None:
        await self._require().wait()
        # No event tells the exit of a process that is not our child: poll.
        while any(_alive(p) for p in descendants):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _descendants(self) -> list[psutil.Process]:
        proc = self._require()
        if proc.returncode is not None:
            return []
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def _signal(self, sig: signal.Signals, descendants: list[psutil.Process]) -> None:
        """Send `sig` to the process group and to descendants that left it (e.g. via setsid)."""
        proc = self._require()
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        if proc.returncode is None:  # in case the leader left its group
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        for p in descendants:
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(p.pid) != pgid:
                    p.send_signal(sig)  # psutil refuses if the pid was reused meanwhile

    def _start_error(self, what: str) -> ProcessStartError:
        spec = self.spec
        model, index = spec.key
        tail = self.tail(30)
        body = f"\n--- last lines of {self.log_path} ---\n{tail}" if tail else " (log is empty)"
        return ProcessStartError(f"backend {spec.backend} for {model}#{index} {what}{body}")

    def _require(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError("backend process not started")
        return self._proc


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
