"""The systems under test: sim backends, a Corral cluster, the LiteLLM proxy and vllm-router."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import yaml
from procs import Proc, pin, wait_http

from corral.embedded import EmbeddedNats, EmbeddedPostgres, free_port

BENCH = Path(__file__).resolve().parent
TOKEN = "bench-cluster-token"
THROWAWAY_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def start_sim(
    log_dir: Path,
    name: str,
    *,
    model: str = "bench",
    cpus: Sequence[int] | None = None,
    slots: int | None = None,
    **options: float | int,
) -> tuple[Proc, str]:
    """A sim (or bench/qsim.py with `slots`) on a free port; returns it and its URL."""
    argv = [sys.executable]
    argv += (
        [str(BENCH / "qsim.py"), "--slots", str(slots)] if slots else ["-m", "corral.backends.sim"]
    )
    argv += ["--host", "127.0.0.1", "--port", "0", "--model", model]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    proc = Proc(name, argv, log_dir / f"{name}.log", cpus=cpus, capture_stdout=True)
    m = proc.read_line(r"listening on (http://\S+)", 30)
    return proc, m.group(1)


# --- Corral ----------------------------------------------------------------------------


class Infra:
    """One private PostgreSQL and one NATS server (via corral.embedded) for every Corral."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg = EmbeddedPostgres(root / "pg", database="postgres", settings=THROWAWAY_PG)
        self.nats = EmbeddedNats(root / "nats")

    def start(self, cpus: Sequence[int] | None) -> None:
        self.pg.start()
        self.nats.start()
        for server in (self.pg, self.nats):
            if server.pid is not None:
                pin(server.pid, cpus)

    def stop(self) -> None:
        self.nats.stop()
        self.pg.stop()

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.pg.url, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.pg.url.rsplit("/", 1)[0] + f"/{name}"


def sim_override(directory: Path, *, slots: int, **timing: float) -> Path:
    """A worker backends dir whose `sim` entry runs bench/qsim.py with fixed timing."""
    directory.mkdir(parents=True, exist_ok=True)
    command = ["{python}", str(BENCH / "qsim.py"), "--slots", str(slots)]
    command += ["--host", "{host}", "--port", "{port}", "--model", "{model}"]
    for key, value in timing.items():
        command += [f"--{key}", str(value)]
    entry = {
        "name": "sim",
        "version": "builtin",
        "requirements": [],
        "command": command,
        "options": "flags",
        "capabilities": ["chat", "completions", "embeddings"],
        "health": "/health",
        "memory": "64MB",
        "gpu": False,
    }
    (directory / "sim.yaml").write_text(yaml.safe_dump({"backends": [entry]}))
    return directory


class Corral:
    """One frontend process and its workers, on their own database and NATS subject prefix."""

    def __init__(
        self,
        infra: Infra,
        root: Path,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        frontend_cpus: Sequence[int] | None = None,
        other_cpus: Sequence[int] | None = None,
    ) -> None:
        self.infra = infra
        self.root = root / name
        self.name = name
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env or {})
        self.frontend_cpus = frontend_cpus
        self.other_cpus = other_cpus
        self.frontend: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.port = 0
        self.database_url = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_model(self, name: str, **fields: Any) -> None:
        data = {"name": name, "backend": "sim", **fields}
        (self.models_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(
            {
                "CORRAL_DATABASE_URL": self.database_url,
                "CORRAL_NATS_URL": self.infra.nats.url,
                "CORRAL_NATS_PREFIX": f"bench{self.name}",
                "CORRAL_TOKEN": TOKEN,
                "CORRAL_DATA_DIR": str(self.root / "frontend"),  # its admin key: admin_headers
                "PYTHONUNBUFFERED": "1",
                **self.extra_env,
            }
        )
        return env

    async def start(self, timeout: float = 90) -> None:
        self.database_url = await self.infra.create_database(f"bench_{self.name}")
        self.port = free_port()
        self._start_frontend(timeout)

    def _start_frontend(
        self,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cpus: Sequence[int] | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "corral", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--models-dir", str(self.models_dir)]
        argv += ["--log-level", "WARNING"]
        self.frontend = Proc(
            f"{self.name}-frontend",
            argv,
            self.root / "logs" / "frontend.log",
            env={**self._env(), **(env or {})},
            cpus=cpus or self.frontend_cpus,
        )
        wait_http(self.url + "/healthz", timeout, self.frontend)
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/healthz", timeout=5).json().get("status") != "ok":
            if time.monotonic() > deadline:
                raise RuntimeError("frontend never became ready")
            time.sleep(0.1)

    def restart_frontend(
        self, env: Mapping[str, str], cpus: Sequence[int] | None, timeout: float = 90
    ) -> None:
        """Replace the frontend (same port, same database) with one run with `env`, and wait
        until each of its CORRAL_PROCESSES processes answers."""
        if self.frontend is not None:
            self.frontend.stop(grace=15)
        self._start_frontend(timeout, env, cpus)
        if self.frontend is not None and cpus is not None:
            pin(self.frontend.pid, cpus)  # its children too
        want = int(env.get("CORRAL_PROCESSES", "1"))
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while len(seen) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)} of {want} frontend processes answer")
            with httpx.Client(timeout=5) as client:  # a fresh connection each time
                seen.add(client.get(self.url + "/healthz").json()["frontend_id"])
        if self.frontend is not None and cpus is not None:
            pin(self.frontend.pid, cpus)

    def start_variant(self, kind: str, timeout: float = 90) -> tuple[Proc, str]:
        """One more frontend of this cluster, under another HTTP server (bench/servers.py)."""
        port = free_port()
        env = self._env()
        env.update({"CORRAL_HOST": "127.0.0.1", "CORRAL_PORT": str(port)})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH", "")) if p)
        proc = Proc(
            f"{self.name}-frontend-{kind}",
            [sys.executable, str(BENCH / "servers.py"), kind],
            self.root / "logs" / f"frontend-{kind}.log",
            env=env,
            cpus=self.frontend_cpus,
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", timeout, proc)
        return proc, url

    def start_worker(
        self,
        name: str,
        *,
        labels: str,
        backends_dir: Path | None = None,
        max_replicas_per_model: int | None = None,
        timeout: float = 60,
    ) -> Proc:
        argv = [sys.executable, "-m", "corral", "worker", "--join", self.url, "--name", name]
        argv += ["--data-dir", str(self.root / "workers" / name), "--labels", labels]
        argv += ["--log-level", "WARNING"]
        if backends_dir is not None:
            argv += ["--backends-dir", str(backends_dir)]
        if max_replicas_per_model is not None:
            argv += ["--max-replicas-per-model", str(max_replicas_per_model)]
        proc = Proc(
            f"{self.name}-{name}",
            argv,
            self.root / "logs" / f"{name}.log",
            env=self._env(),
            cpus=self.other_cpus,
        )
        self.workers[name] = proc
        deadline = time.monotonic() + timeout
        while not any(n["name"] == name and n["status"] == "healthy" for n in self.nodes()):
            if not proc.alive():
                raise RuntimeError(f"worker {name} exited:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} not healthy after {timeout}s:\n{proc.tail()}")
            time.sleep(0.1)
        return proc

    @property
    def admin_headers(self) -> dict[str, str]:
        """The admin key the frontend created in its data dir, as a header (none: a frontend
        from before admin keys)."""
        path = self.root / "frontend" / "admin.key"
        return {"authorization": f"Bearer {path.read_text().strip()}"} if path.exists() else {}

    def api(self, path: str) -> Any:
        auth = self.admin_headers
        keys = self.extra_env.get("CORRAL_API_KEYS", "")
        if not auth and keys:
            auth = {"authorization": f"Bearer {keys.split(',')[0]}"}
        r = httpx.get(self.url + path, timeout=10, headers=auth)
        r.raise_for_status()
        return r.json()

    def nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self.api("/api/nodes")["nodes"]
        return nodes

    def replicas(self, model: str, state: str = "loaded") -> list[dict[str, Any]]:
        return [
            r
            for r in self.api("/api/replicas")["replicas"]
            if r["model"] == model and (state is None or r["state"] == state)
        ]

    def wait_replicas(self, model: str, n: int, timeout: float) -> list[dict[str, Any]]:
        """Loaded replicas of `model` once there are `n`; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            found = self.replicas(model)
            if len(found) >= n and all(r.get("address") for r in found):
                return found
            time.sleep(0.2)
        raise TimeoutError(f"{model}: {len(found)}/{n} replicas loaded after {timeout:.0f}s")

    def pin_backends(self, cpus: Sequence[int] | None) -> None:
        for worker in self.workers.values():
            pin(worker.pid, cpus)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop(grace=8)
        if self.frontend is not None:
            self.frontend.stop(grace=10)


def replica_url(replica: Mapping[str, Any]) -> str:
    return f"http://{replica['address']}"


# --- the other gateways ----------------------------------------------------------------


def bench_bin(name: str) -> str:
    """A tool of bench/.venv, or from PATH when there is no bench/.venv (--no-install)."""
    path = BENCH / ".venv" / "bin" / name
    if not path.exists():
        import shutil

        found = shutil.which(name)
        if found:
            return found
    return str(path)


def start_litellm(
    log_dir: Path,
    deployments: Mapping[str, Sequence[str]],
    *,
    cpus: Sequence[int] | None,
    routing: str = "simple-shuffle",
    timeout: float = 180,
) -> tuple[Proc, str]:
    """LiteLLM proxy (one worker, no database, no telemetry): model name -> backend URLs."""
    model_list = [
        {
            "model_name": name,
            "litellm_params": {"model": f"openai/{name}", "api_base": f"{u}/v1", "api_key": "none"},
        }
        for name, urls in deployments.items()
        for u in urls
    ]
    config = {
        "model_list": model_list,
        "router_settings": {"routing_strategy": routing, "num_retries": 0},
        "litellm_settings": {"telemetry": False, "drop_params": True, "num_retries": 0},
        "general_settings": {"disable_spend_logs": True},
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg = log_dir / "litellm.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL",)}
    env.update(
        {
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
            "LITELLM_LOG": "ERROR",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "VIRTUAL_ENV": str(BENCH / ".venv"),
        }
    )
    argv = [bench_bin("litellm"), "--config", str(cfg), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", "1"]
    proc = Proc("litellm", argv, log_dir / "litellm.log", env=env, cpus=cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", timeout, proc)
    return proc, url


def start_vllm_router(
    log_dir: Path,
    backends: Sequence[str],
    *,
    cpus: Sequence[int] | None,
    policy: str = "round_robin",
    name: str = "vllm-router",
    timeout: float = 60,
    env: Mapping[str, str] | None = None,
) -> tuple[Proc, str]:
    port = free_port()
    argv = [bench_bin("vllm-router"), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--worker-urls", *backends, "--policy", policy, "--log-level", "warning"]
    argv += ["--max-concurrent-requests", "1024", "--prometheus-host", "127.0.0.1"]
    argv += ["--prometheus-port", str(free_port())]
    proc = Proc(name, argv, log_dir / f"{name}.log", cpus=cpus, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", timeout, proc)
    return proc, url
