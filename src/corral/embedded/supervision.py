"""Supervision of one embedded server child process: spawn, readiness, ownership, stop.

Every server keeps its state under one data directory, so stopping and starting again with
the same directory finds the same data. Children are tied to the parent:

* each child runs in its own session (`start_new_session=True`), so a Ctrl-C in the terminal
  reaches only the parent, which then stops the children in order;
* on Linux each child asks the kernel for a parent-death signal (PR_SET_PDEATHSIG) before it
  execs, so a parent killed with SIGKILL does not leave servers behind. The kernel sends that
  signal when the *thread* that forked the child exits, not the process: call `start()` from a
  long-lived thread (normally the main thread), never from `asyncio.to_thread` or a pool
  worker, or the server dies when that worker thread is retired.

A record beside the data (`<kind>.owner.json`) names the server's process and the process that
started it, so a server left running by a dead owner is stopped, and a live one is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import psutil

from corral.embedded.privileges import RunAs
from corral.errors import EmbeddedError
from corral.proc import die_with_parent

logger = logging.getLogger(__name__)

_POLL_INTERVAL = 0.05
_LOG_ROTATE_BYTES = 16 * 1024 * 1024
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "*"})


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (another process may still take it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def url_host(host: str) -> str:
    """The host to put in a client URL for a server listening on `host`."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host:
        return f"[{host}]"
    return host


def connect_host(host: str) -> str:
    """The host to connect to for a server listening on `host` (no URL brackets)."""
    return url_host(host).strip("[]")


def child_env() -> dict[str, str]:
    """The environment for server children: ours without PG* variables, C messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _alive(pid: int, create_time: float | None = None) -> psutil.Process | None:
    """The process `pid` if it runs (zombies do not count) and, if given, started then."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return None
    except psutil.Error:
        return None
    return proc


def kill_and_wait(procs: Sequence[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL `procs` and wait until they are gone (reaped or reparented)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(procs), timeout=timeout)


def _stop_foreign(proc: psutil.Process, sig: signal.Signals, timeout: float) -> None:
    """Stop a process we did not spawn: `sig`, then SIGKILL after `timeout`, with its children."""
    try:
        children = proc.children(recursive=True)
        proc.send_signal(sig)
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        kill_and_wait([proc])
    except psutil.Error:
        return
    kill_and_wait([c for c in children if _alive(c.pid) is not None])


def log_tail(path: Path, offset: int, lines: int = 40) -> str:
    """The last `lines` lines written to the log at `path` after `offset`."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def open_log(path: Path) -> tuple[IO[bytes], int]:
    """Open the log for appending (rotating it once it is large); return it and its offset."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > _LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    log = path.open("ab")
    return log, log.tell()


@dataclass(frozen=True)
class _OwnerRecord:
    """Which process runs a server on a data directory, and which process started it."""

    pid: int
    create_time: float
    owner_pid: int
    owner_create_time: float

    @classmethod
    def load(cls, path: Path) -> _OwnerRecord | None:
        try:
            raw = json.loads(path.read_text())
            return cls(
                int(raw["pid"]),
                float(raw["create_time"]),
                int(raw["owner_pid"]),
                float(raw["owner_create_time"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def of(cls, pid: int) -> _OwnerRecord:
        me = psutil.Process()
        return cls(pid, psutil.Process(pid).create_time(), me.pid, me.create_time())

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(path)


class _PortTaken(Exception):
    """The server could not bind its port (it was taken between free_port() and the bind)."""


class EmbeddedServer:
    """Spawn, watch and stop one server child process that keeps its state in `data_dir`."""

    _kind = "server"
    _stop_signal = signal.SIGTERM
    _death_signal = signal.SIGTERM

    def __init__(
        self, data_dir: Path, *, host: str, port: int | None, start_timeout: float
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._bound_port: int | None = None
        self._url: str | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The client URL; raises EmbeddedError before start()."""
        if self._url is None:
            raise EmbeddedError(f"embedded {self._kind} is not started")
        return self._url

    @property
    def pid(self) -> int | None:
        """The server process id while it runs, else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def bound_port(self) -> int | None:
        """The port the server listens on while started, else None."""
        return self._bound_port

    def start(self) -> str:
        """Start the server, wait until it serves, and return its URL.

        Call it from a long-lived thread (see the module docstring). When no port was given,
        a free one is picked and the start is retried if another process takes it first.
        """
        if self._proc is not None:
            if self._proc.poll() is None:
                raise EmbeddedError(f"embedded {self._kind} is already started")
            self.stop()  # it died since; reap it and start afresh
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "embedded %s started from thread %s: it receives its parent-death signal "
                "when that thread exits",
                self._kind,
                threading.current_thread().name,
            )
        began = time.monotonic()
        self._root.mkdir(parents=True, exist_ok=True)
        self._prepare()
        attempts = 1 if self.port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self.port if self.port is not None else free_port(self.host)
            try:
                self._launch(port)
                break
            except _PortTaken as exc:
                if attempt == attempts:
                    raise EmbeddedError(
                        f"embedded {self._kind} could not bind {self.host}:{port}: {exc}"
                    ) from None
                logger.info("port %d was taken, retrying %s on another port", port, self._kind)
        try:
            self._url = self._after_ready()
        except BaseException:
            self.stop()
            raise
        logger.info(
            "embedded %s (pid %s) serves %s after %.2fs",
            self._kind,
            self.pid,
            self._url,
            time.monotonic() - began,
        )
        return self._url

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server: its stop signal, then SIGKILL after `timeout`; wait for the exit."""
        proc = self._proc
        if proc is None:
            return
        forced = False
        try:
            if proc.poll() is None:
                try:
                    children = psutil.Process(proc.pid).children(recursive=True)
                except psutil.Error:
                    children = []
                proc.send_signal(self._stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    forced = True
                    logger.warning(
                        "embedded %s (pid %d) ignored %s for %.0fs; killing it",
                        self._kind,
                        proc.pid,
                        self._stop_signal.name,
                        timeout,
                    )
                    proc.kill()
                    proc.wait()
                kill_and_wait([c for c in children if _alive(c.pid) is not None])
            else:
                forced = True
                logger.warning(
                    "embedded %s (pid %d) had already exited with code %s",
                    self._kind,
                    proc.pid,
                    proc.returncode,
                )
            if forced:
                self._after_crash()
            self._owner_file.unlink(missing_ok=True)
        finally:
            self._proc = None
            self._bound_port = None
            self._url = None
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- for subclasses -------------------------------------------------------------------

    @property
    def _root(self) -> Path:
        """The data directory as an absolute path (children run with it as their cwd)."""
        return self.data_dir.absolute()

    @property
    def _log_file(self) -> Path:
        return self._root / f"{self._kind}.log"

    @property
    def _owner_file(self) -> Path:
        return self._root / f"{self._kind}.owner.json"

    def _prepare(self) -> None:
        """Get the data directory ready; by default only clear a leftover server."""
        self._clear_leftover()

    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _run_as(self) -> RunAs | None:
        return None

    def _is_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        raise NotImplementedError

    def _after_ready(self) -> str:
        raise NotImplementedError

    def _after_crash(self) -> None:
        """Clean up after a server that died or had to be killed."""

    def _port_taken(self, log_tail: str) -> bool:
        return "address already in use" in log_tail.lower()

    # -- internals ------------------------------------------------------------------------

    def _clear_leftover(self) -> None:
        """Stop a server a dead owner left running on this data directory; refuse a live one."""
        record = _OwnerRecord.load(self._owner_file)
        if record is None:
            return
        child = _alive(record.pid, record.create_time)
        if child is not None:
            owner = _alive(record.owner_pid, record.owner_create_time)
            if owner is not None:
                raise EmbeddedError(
                    f"an embedded {self._kind} (pid {child.pid}, started by pid {owner.pid}) "
                    f"already runs on {self.data_dir}; stop it first"
                )
            logger.warning(
                "stopping leftover embedded %s (pid %d) on %s", self._kind, child.pid, self.data_dir
            )
            _stop_foreign(child, self._stop_signal, 20.0)
        self._owner_file.unlink(missing_ok=True)

    def _spawn(self, argv: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        user = self._run_as()
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self._root,
            env=child_env(),
            start_new_session=True,
            preexec_fn=die_with_parent(self._death_signal),
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )

    def _launch(self, port: int) -> None:
        """Spawn the server on `port` and wait until it is ready; raise _PortTaken to retry."""
        log, offset = open_log(self._log_file)
        try:
            proc = self._spawn(self._argv(port), log)
        except OSError as exc:
            log.close()
            raise EmbeddedError(f"cannot run embedded {self._kind}: {exc}") from exc
        self._proc, self._log = proc, log
        try:
            self._wait_ready(proc, port, offset)
        except BaseException:
            if proc.poll() is None:
                self.stop()
            else:
                self._proc, self._log = None, None
                log.close()
            raise
        self._bound_port = port
        _OwnerRecord.of(proc.pid).save(self._owner_file)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self._is_ready(proc, port):
            code = proc.poll()
            if code is not None:
                tail = log_tail(self._log_file, offset)
                if self._port_taken(tail):
                    raise _PortTaken(tail.splitlines()[-1] if tail else "address in use")
                raise EmbeddedError(
                    f"embedded {self._kind} exited with code {code} while starting; "
                    f"log {self._log_file}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"embedded {self._kind} was not ready after {self.start_timeout:.0f}s; "
                    f"log {self._log_file}:\n{log_tail(self._log_file, offset)}"
                )
            time.sleep(_POLL_INTERVAL)
