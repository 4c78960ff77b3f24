"""`corral up`: embedded PostgreSQL and NATS, one frontend and one local worker, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from pydantic import SecretStr

from corral.bus.natsauth import NatsAuthDir, auth_config
from corral.config import ADMIN_KEY_FILE, FrontendSettings, WorkerSettings
from corral.embedded import PG_SYSTEM_USER, EmbeddedNats, EmbeddedPostgres
from corral.embedded.privileges import user_exists
from corral.frontend.view import ClusterView
from corral.runner import (
    Frontends,
    install_stop_handler,
    listen,
    make_agent,
    read_or_create_token,
    settle_heap,
)

log = logging.getLogger(__name__)

PRELOAD_WAIT = 120.0  # seconds the banner waits for the models with a minimum to load


def ensure_models_dir(directory: Path) -> Path:
    """Create the models directory with the demo model on first use."""
    if not directory.exists():
        directory.mkdir(parents=True)
        demo = resources.files("corral.demo").joinpath("demo.yaml")
        with resources.as_file(demo) as src:
            shutil.copyfile(src, directory / "demo.yaml")
    return directory


def root_notice(create_user: bool) -> str | None:
    """What running as root means for the embedded PostgreSQL, in plain words (None when this
    process is not root)."""
    if os.geteuid() != 0:
        return None
    if not create_user:
        return (
            "corral: running as root; PostgreSQL refuses to run as root, so it runs as the "
            "owner of the data directory (--no-create-user)"
        )
    verb = "runs as" if user_exists(PG_SYSTEM_USER) else "creates and runs as"
    return (
        f"corral: running as root; PostgreSQL refuses to run as root, so Corral {verb} the "
        f"unprivileged system user '{PG_SYSTEM_USER}' for the embedded PostgreSQL (and lets it "
        "reach the data directory); --no-create-user avoids this"
    )


async def up(
    data_dir: Path,
    *,
    host: str,
    port: int,
    models_dir: Path | None,
    processes: int = 1,
    create_user: bool = True,
) -> None:
    """Run the all-in-one cluster until SIGINT/SIGTERM; leave no process behind.

    `data_dir` must exist (the CLI creates it). With `processes` > 1, that many frontends
    share the port (this process's and children); the worker runs in this process. The port
    is bound first: when it is taken (ListenError), nothing else has started.
    """
    sock = listen(host, port, processes)
    stop = asyncio.Event()
    install_stop_handler(stop)
    notice = root_notice(create_user)
    if notice:
        print(notice, file=sys.stderr, flush=True)
    pg = EmbeddedPostgres(data_dir / "postgres", create_user=create_user)
    nats_auth = NatsAuthDir(data_dir / "nats-auth")
    nats = EmbeddedNats(data_dir / "nats", config=nats_auth.server_config_path)
    try:
        nats_auth.write_server_config(auth_config(nats_auth.load_or_create(), jetstream=True))
        database_url = pg.start()
        nats_url = nats.start()
        token = read_or_create_token(data_dir / "token")
        models = ensure_models_dir(models_dir or data_dir / "models")
        fsettings = FrontendSettings(
            database_url=database_url,
            nats_url=nats_url,
            nats_auth_dir=nats_auth.path,
            host=host,
            port=port,
            models_dir=models,
            token=SecretStr(token),
            processes=processes,
            data_dir=data_dir,
        )
        frontends = Frontends(fsettings, sock=sock)
        await frontends.start()
        try:
            wsettings = WorkerSettings(
                join=f"http://{_client_host(host)}:{frontends.port}",
                token=SecretStr(token),
                name="local",
                data_dir=data_dir / "worker",
            )
            agent = make_agent(wsettings)
            await agent.start()
            settle_heap()
            try:
                frontend = frontends.primary.frontend
                assert frontend is not None
                loading = await _preloaded(frontend.view, stop, timeout=PRELOAD_WAIT)
                if loading:
                    print(f"still loading: {', '.join(loading)}", file=sys.stderr, flush=True)
                _banner(host, frontends.port, sorted(frontend.view.models), data_dir, models)
                await stop.wait()
            finally:
                print("\nstopping corral ...", file=sys.stderr, flush=True)
                await agent.stop(drain=False)
        finally:
            await frontends.stop()
    finally:
        nats.stop()
        pg.stop()
        print("corral stopped; data kept in", data_dir, file=sys.stderr, flush=True)


async def _preloaded(view: ClusterView, stop: asyncio.Event, *, timeout: float) -> list[str]:
    """Wait until every model with a minimum has a loaded replica (the reconciler preloads
    them), at most `timeout` seconds or until stopped; return the models still loading."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        loading = sorted(
            m.name
            for m in view.models.values()
            if m.scheduling.min_replicas > 0 and not view.candidates(m.name)
        )
        left = deadline - loop.time()
        if not loading or left <= 0 or stop.is_set():
            return loading
        with contextlib.suppress(TimeoutError):  # a change of the model, or a poll
            await asyncio.wait_for(view.changed(loading[0]).wait(), min(left, 0.5))


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _banner(host: str, port: int, models: list[str], data_dir: Path, models_dir: Path) -> None:
    url = f"http://{_client_host(host)}:{port}"
    model = models[0] if models else "demo"
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    print(
        f"\nCorral is up: {url}/v1   models: {', '.join(models) or '(none)'}\n"
        f"Try it:\n"
        f"  curl {url}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f"       -d '{body}'\n"
        f"Models: {models_dir}\n"
        f"  add one by writing a YAML file there (copy demo.yaml, change name and backend);\n"
        f"  it is served within seconds, no restart. Check it: corral models --url {url}\n"
        f'Add workers: corral worker --join {url} --token "$(cat {data_dir / "token"})"\n'
        f"Admin key: {data_dir / ADMIN_KEY_FILE} (the admin API, dashboard and CLI use it)\n"
        f"Data: {data_dir}   Press Ctrl-C to stop.\n",
        flush=True,
    )
