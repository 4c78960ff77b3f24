"""Real-process clusters for end-to-end tests: frontends and workers as separate OS processes."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from corral.embedded import free_port
from infra import poll_until
from natsauth_infra import AuthNats

TOKEN = "test-cluster-token"

#: Short intervals so tests see heartbeats, ticks and resyncs quickly.
FAST_FRONTEND_ENV = {
    "CORRAL_HEARTBEAT_INTERVAL": "0.5",
    "CORRAL_RESYNC_INTERVAL": "2",
    "CORRAL_RECONCILE_INTERVAL": "1",
    "CORRAL_OFFLINE_AFTER": "4",
    "CORRAL_UNHEALTHY_AFTER": "2",
    "CORRAL_CAPACITY_COOLDOWN": "2",
    "CORRAL_ORPHAN_GRACE": "3",
    "CORRAL_WAIT_BUDGET": "30",
}


#: `poll_until` for checks that talk to processes still starting (their errors mean "not yet").
wait_for = functools.partial(poll_until, ignore=(httpx.HTTPError, OSError, KeyError, ValueError))


class Proc:
    """One corral process with its log file; stopped (and its whole tree) on teardown."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """This process and all its descendants."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL what is left of the tree; returns the exit code."""
        if self.popen is None:
            return None
        tree = self.tree()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL this process only (its children are left to their own fate)."""
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(10)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Cluster:
    """Frontends and workers against one PostgreSQL database and one NATS subject prefix."""

    def __init__(
        self, database_url: str, nats_url: str, nats_prefix: str, root: Path, **env: str
    ) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.nats_prefix = nats_prefix
        self.root = root
        self.models_dir = root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = env
        self.frontends: list[Proc] = []
        self.workers: list[Proc] = []
        self.ports: dict[Proc, int] = {}
        self.https: set[Proc] = set()  # frontends serving HTTPS
        self.api_key: str | None = None  # sent by api(); default: the frontends' admin key
        self.data_dir = root / "frontend"  # the frontends' data dir: their admin key

    # --- processes ------------------------------------------------------------------------
    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(
            {
                "CORRAL_DATABASE_URL": self.database_url,
                "CORRAL_NATS_URL": self.nats_url,
                "CORRAL_NATS_PREFIX": self.nats_prefix,
                "CORRAL_TOKEN": TOKEN,
                "CORRAL_DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
                **FAST_FRONTEND_ENV,
                **self.extra_env,
                **extra,
            }
        )
        return env

    def start_frontend(
        self, *, wait: bool = True, args: list[str] | None = None, **env: str
    ) -> Proc:
        port = free_port()
        n = len(self.frontends)
        proc = Proc(
            f"frontend{n}",
            [
                sys.executable,
                "-m",
                "corral",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--models-dir",
                str(self.models_dir),
                "--log-level",
                "INFO",
                *(args or []),
            ],
            self._env(env),
            self.root / "logs" / f"frontend{n}.log",
        ).start()
        self.frontends.append(proc)
        self.ports[proc] = port
        if "CORRAL_TLS_CERT" in env:
            self.https.add(proc)
        if wait:
            self.wait_healthy(proc)
        return proc

    def url(self, frontend: Proc | None = None) -> str:
        frontend = frontend or self.frontends[0]
        scheme = "https" if frontend in self.https else "http"
        return f"{scheme}://127.0.0.1:{self.ports[frontend]}"

    def wait_healthy(self, frontend: Proc, timeout: float = 60.0) -> None:
        def ok() -> bool:
            if not frontend.alive():
                raise AssertionError(f"{frontend.name} exited:\n{frontend.output()[-3000:]}")
            r = httpx.get(self.url(frontend) + "/healthz", timeout=2)
            return r.status_code == 200 and r.json()["status"] == "ok"

        wait_for(ok, timeout=timeout, what=f"{frontend.name} healthy")

    def start_worker(
        self,
        name: str,
        *,
        labels: str | None = None,
        frontend: Proc | None = None,
        wait: bool = True,
        data_dir: Path | None = None,
        args: list[str] | None = None,
        **env: str,
    ) -> Proc:
        data = data_dir or self.root / "workers" / name
        argv = [
            sys.executable,
            "-m",
            "corral",
            "worker",
            "--join",
            self.url(frontend),
            "--name",
            name,
            "--data-dir",
            str(data),
            "--log-level",
            "INFO",
            *(["--labels", labels] if labels else []),
            *(args or []),
        ]
        proc = Proc(name, argv, self._env(env), self.root / "logs" / f"{name}.log").start()
        self.workers.append(proc)
        if wait:
            wait_for(
                lambda: self.node(name, status="healthy"),
                timeout=60,
                what=f"worker {name} healthy",
            )
        return proc

    def stop(self) -> None:
        for proc in [*self.workers, *self.frontends]:
            proc.stop(timeout=20)

    # --- admin helpers -------------------------------------------------------------------
    @property
    def admin_key(self) -> str:
        """The admin key the first frontend created in the data dir."""
        return (self.data_dir / "admin.key").read_text().strip()

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key or self.admin_key}"}

    def api(self, method: str, path: str, frontend: Proc | None = None, **kw: Any) -> Any:
        kw.setdefault("headers", {}).update(self.admin_headers)
        r = httpx.request(method, self.url(frontend) + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.api("GET", "/api/nodes")["nodes"]
        return nodes

    def node(self, name: str, status: str | None = None) -> dict[str, Any] | None:
        for n in self.nodes():
            if n["name"] == name and (status is None or n["status"] == status):
                return n
        return None

    def replicas(self, model: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("GET", "/api/replicas")["replicas"]
        return [r for r in found if model is None or r["model"] == model]

    def write_model(self, name: str, backend: str = "sim", **fields: Any) -> Path:
        path = self.models_dir / f"{name.replace('/', '_')}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "backend": backend, **fields}))
        return path


@contextlib.contextmanager
def running_cluster(
    database_url: str, nats: AuthNats, nats_prefix: str, root: Path, **env: str
) -> Iterator[Cluster]:
    """A cluster on `nats`, with Corral's NATS authentication on (as `corral up` runs it)."""
    cluster = Cluster(
        database_url, nats.url, nats_prefix, root, CORRAL_NATS_AUTH_DIR=str(nats.auth_dir), **env
    )
    try:
        yield cluster
    finally:
        cluster.stop()
