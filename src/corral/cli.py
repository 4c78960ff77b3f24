"""The `corral` command line: up, serve, worker, sim, and operator commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from corral import __version__
from corral.bus.natsjwt import NatsAuthError
from corral.config import FrontendSettings, WorkerSettings, default_data_dir, parse_labels
from corral.ctl import cluster as ctl_cluster
from corral.ctl import ops as ctl_ops
from corral.ctl.flags import settings_flags
from corral.errors import ConfigError, EmbeddedError, ListenError
from corral.logs import setup_logging

app = typer.Typer(
    name="corral",
    help="One OpenAI-compatible endpoint in front of a cluster of model servers.",
    no_args_is_help=True,
    add_completion=False,
)

LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR")]
LogFormatOption = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar="CORRAL_LOG_FORMAT",
        help="text, or json: one JSON object per line with a request_id on the lines of a"
        " request (CORRAL_LOG_FORMAT)",
    ),
]


def _logging(level: str, fmt: str) -> None:
    if fmt not in ("text", "json"):
        typer.echo(f"error: --log-format {fmt!r}: give text or json", err=True)
        raise typer.Exit(2)
    setup_logging(level, "json" if fmt == "json" else "text")


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Starting failed for a reason the user can act on: say it in one line, exit 1."""
    try:
        yield
    except (ListenError, EmbeddedError, NatsAuthError) as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _settings(cls: type[Any], **flags: Any) -> Any:
    """Settings from CORRAL_* env, overridden by the flags that were given."""
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        typer.echo(f"error: setting {field}: {first['msg']}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print Corral's version."""
    typer.echo(__version__)


@app.command()
def up(
    data_dir: Annotated[Path | None, typer.Option(help="Where all state lives")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the OpenAI endpoint")] = 8000,
    models_dir: Annotated[Path | None, typer.Option(help="Model YAML files")] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Frontend processes sharing the port (one per core to use)")
    ] = 1,
    create_user: Annotated[
        bool,
        typer.Option(
            "--create-user/--no-create-user",
            envvar="CORRAL_CREATE_USER",
            help="As root: create the unprivileged user 'corral-postgres' for PostgreSQL; "
            "without: PostgreSQL runs as the (non-root) owner of --data-dir",
        ),
    ] = True,
    log_level: LogLevel = "WARNING",
    log_format: LogFormatOption = "text",
) -> None:
    """Run a whole cluster on this machine: PostgreSQL, NATS, a frontend and a worker."""
    from corral.runner import run_async
    from corral.up import up as run_up

    _logging(log_level, log_format)
    directory = data_dir or default_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _one_line_errors():
        run_async(
            lambda: run_up(
                directory,
                host=host,
                port=port,
                models_dir=models_dir,
                processes=processes,
                create_user=create_user,
            )
        )


@app.command()
@settings_flags(FrontendSettings)
def serve(
    database_url: Annotated[str | None, typer.Option(help="postgresql://...")] = None,
    nats_url: Annotated[str | None, typer.Option(help="nats://...")] = None,
    public_nats_url: Annotated[
        str | None, typer.Option(help="NATS URL told to workers (default: --nats-url)")
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    models_dir: Annotated[Path | None, typer.Option(help="Model YAML files")] = None,
    model_store: Annotated[
        Path | None, typer.Option(help="Directory serving relative model artifacts to workers")
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CORRAL_TOKEN", help="Registration token of workers")
    ] = None,
    api_keys: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated admin API keys (CORRAL_API_KEYS); giving any also makes /v1"
            " need a key"
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the frontend keeps its admin key, admin.key (CORRAL_DATA_DIR; default:"
            " the per-user data directory)"
        ),
    ] = None,
    admin_key: Annotated[
        bool | None,
        typer.Option(
            "--admin-key/--no-admin-key",
            help="Create an admin key in --data-dir on first start (mode 600; its path is"
            " printed, never the key) and accept it (CORRAL_ADMIN_KEY; default on)",
        ),
    ] = None,
    metrics_key: Annotated[
        str | None,
        typer.Option(
            help="/metrics then needs 'Authorization: Bearer <it>' or an admin key"
            " (CORRAL_METRICS_KEY; default: /metrics is open)"
        ),
    ] = None,
    wait_budget: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request may wait for a load or a slot unless its model's deadline"
            " or its x-corral-deadline header says otherwise (60)"
        ),
    ] = None,
    placement: Annotated[str | None, typer.Option(help="binpack or spread")] = None,
    nats_prefix: Annotated[str | None, typer.Option(help="NATS subject prefix")] = None,
    reconcile_interval: Annotated[float | None, typer.Option(help="Seconds per tick")] = None,
    forward_headers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated request headers (or prefix*) passed on to backends, besides "
            "x-*, openai-*, traceparent, accept and user-agent (CORRAL_FORWARD_HEADERS)"
        ),
    ] = None,
    unload_grace: Annotated[
        float | None,
        typer.Option(help="Seconds a retired replica is out of routing before it stops"),
    ] = None,
    revision_retry: Annotated[
        float | None,
        typer.Option(help="Seconds a rollout stays halted after its new revision failed"),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Frontend processes sharing the port, each a full frontend (CORRAL_PROCESSES;"
            " default 1). Recommended: one per core, minus the cores workers on this machine"
            " need",
        ),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="Largest request body; 413 past it (CORRAL_MAX_BODY_BYTES)")
    ] = None,
    spool_memory_bytes: Annotated[
        int | None,
        typer.Option(
            help="Bytes of an upload (audio, image edits) kept in memory; the rest is spooled"
            " to a temporary file under $TMPDIR (default 1 MiB)"
        ),
    ] = None,
    response_ttl: Annotated[
        float | None,
        typer.Option(
            help="Seconds a stored response's id keeps routing follow-ups and GET/DELETE to"
            " the replica that created it (default 3600)"
        ),
    ] = None,
    response_map_size: Annotated[
        int | None,
        typer.Option(help="Response ids remembered for routing home, newest kept (100000)"),
    ] = None,
    prefix_share_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds between two batches of routed prompt-prefix hashes sent to the other"
            " frontends (default 0.2)"
        ),
    ] = None,
    prefix_index_size: Annotated[
        int | None,
        typer.Option(help="Prompt-prefix hashes the routing index remembers (default 65536)"),
    ] = None,
    prefix_ttl: Annotated[
        float | None,
        typer.Option(help="Seconds a routed prompt prefix counts as cached on its replica (300)"),
    ] = None,
    header_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds a client has to send request headers; then 408 (default 10)"),
    ] = None,
    body_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a client has to send a request body, renewed while it arrives at"
            " --body-min-rate; then 408 (default 30)"
        ),
    ] = None,
    body_min_rate: Annotated[
        float | None,
        typer.Option(help="Bytes/s a slow request body must average to renew (default 1024)"),
    ] = None,
    keep_alive_timeout: Annotated[
        float | None, typer.Option(help="Seconds an idle client connection stays open (30)")
    ] = None,
    shutdown_timeout: Annotated[
        float | None, typer.Option(help="Seconds requests in progress get at stop (10)")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain: serve HTTPS (CORRAL_TLS_CERT)")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --tls-cert (CORRAL_TLS_KEY)")
    ] = None,
    queue_max_entries: Annotated[
        int | None,
        typer.Option(help="Requests that may wait per model; then 429 queue_full (1024)"),
    ] = None,
    queue_max_bytes: Annotated[
        int | None, typer.Option(help="Bytes of request bodies that may wait per model (64 MiB)")
    ] = None,
    max_deadline: Annotated[
        float | None, typer.Option(help="The longest x-corral-deadline honoured, seconds (600)")
    ] = None,
    key_priorities: Annotated[
        str | None,
        typer.Option(
            help="API keys' priority classes, KEY=high|normal|low,...: a key's default and"
            " the most its x-corral-priority header may ask for (CORRAL_KEY_PRIORITIES)"
        ),
    ] = None,
    load_backoff: Annotated[
        float | None,
        typer.Option(help="Seconds before a failed model load is tried again; doubles (5)"),
    ] = None,
    load_backoff_max: Annotated[
        float | None, typer.Option(help="The most the load backoff grows to, seconds (300)")
    ] = None,
    log_level: LogLevel = "INFO",
    log_format: LogFormatOption = "text",
) -> None:
    """Run a frontend against an existing PostgreSQL and NATS.

    Every option can also be set as a CORRAL_<OPTION> environment variable (e.g.
    CORRAL_HEADER_TIMEOUT); a flag given overrides it.
    """
    from corral.runner import install_stop_handler, run_async, serve_frontend

    _logging(log_level, log_format)
    settings: FrontendSettings = _settings(
        FrontendSettings,
        database_url=database_url,
        nats_url=nats_url,
        public_nats_url=public_nats_url,
        host=host,
        port=port,
        models_dir=models_dir,
        model_store=model_store,
        token=token,
        api_keys=api_keys,
        data_dir=data_dir,
        admin_key=admin_key,
        metrics_key=metrics_key,
        wait_budget=wait_budget,
        placement=placement,
        nats_prefix=nats_prefix,
        reconcile_interval=reconcile_interval,
        forward_headers=forward_headers,
        unload_grace=unload_grace,
        revision_retry=revision_retry,
        processes=processes,
        max_body_bytes=max_body_bytes,
        spool_memory_bytes=spool_memory_bytes,
        response_ttl=response_ttl,
        response_map_size=response_map_size,
        prefix_share_interval=prefix_share_interval,
        prefix_index_size=prefix_index_size,
        prefix_ttl=prefix_ttl,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        body_min_rate=body_min_rate,
        keep_alive_timeout=keep_alive_timeout,
        shutdown_timeout=shutdown_timeout,
        tls_cert=tls_cert,
        tls_key=tls_key,
        queue_max_entries=queue_max_entries,
        queue_max_bytes=queue_max_bytes,
        max_deadline=max_deadline,
        key_priorities=key_priorities,
        load_backoff=load_backoff,
        load_backoff_max=load_backoff_max,
    )
    for path in (settings.tls_cert, settings.tls_key):
        if path is not None and not path.is_file():
            typer.echo(f"error: {path}: no such file", err=True)
            raise typer.Exit(2)
    if settings.token is None:
        typer.echo("warning: no --token/CORRAL_TOKEN: workers cannot join", err=True)
    if settings.data_dir is None:
        settings = settings.model_copy(update={"data_dir": default_data_dir()})

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_handler(stop)
        await serve_frontend(settings, stop)

    with _one_line_errors():
        run_async(main)


@app.command()
@settings_flags(WorkerSettings)
def worker(
    join: Annotated[str | None, typer.Option(help="URL of a frontend")] = None,
    token: Annotated[str | None, typer.Option(envvar="CORRAL_TOKEN", help="Cluster token")] = None,
    name: Annotated[str | None, typer.Option(help="Node name (default: hostname)")] = None,
    labels: Annotated[str | None, typer.Option(help="k=v,k2=v2")] = None,
    advertise_host: Annotated[str | None, typer.Option(help="Host others reach us at")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Identity, backends, logs")] = None,
    nats_url: Annotated[str | None, typer.Option(help="Override the frontend's NATS URL")] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            help="PEM CA an https:// frontend's certificate is checked against"
            " (CORRAL_WORKER_CA_FILE; default: the system's trust store)"
        ),
    ] = None,
    memory_budget: Annotated[str | None, typer.Option(help='"80%" or "12GB"')] = None,
    max_replicas_per_model: Annotated[int | None, typer.Option()] = None,
    backends_dir: Annotated[Path | None, typer.Option(help="Extra backend entries")] = None,
    log_level: LogLevel = "INFO",
    log_format: LogFormatOption = "text",
) -> None:
    """Join a cluster and run backends for it."""
    from corral.runner import install_stop_handler, make_agent, run_async, serve_worker

    _logging(log_level, log_format)
    try:
        parsed_labels = parse_labels(labels) if labels else None
    except ValueError as exc:
        typer.echo(f"error: --labels: {exc}", err=True)
        raise typer.Exit(2) from None
    settings: WorkerSettings = _settings(
        WorkerSettings,
        join=join,
        token=token,
        name=name,
        labels=parsed_labels,
        advertise_host=advertise_host,
        data_dir=data_dir,
        nats_url=nats_url,
        ca_file=ca_file,
        memory_budget=memory_budget,
        max_replicas_per_model=max_replicas_per_model,
        backends_dir=backends_dir,
    )

    try:
        agent = make_agent(settings)  # reads the backend catalogs
    except ConfigError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_handler(stop)
        await serve_worker(agent, stop)

    run_async(main)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def sim(ctx: typer.Context) -> None:
    """Run the simulator backend (see `corral sim --help`)."""
    from corral.backends.sim.__main__ import main as sim_main

    sim_main(list(ctx.args))


@app.command("nats-config")
def nats_config(
    nats_auth_dir: Annotated[
        Path,
        typer.Option(
            envvar="CORRAL_NATS_AUTH_DIR",
            help="Directory of the cluster's NATS keys, as given to `corral serve`; created"
            " when missing (CORRAL_NATS_AUTH_DIR)",
        ),
    ],
) -> None:
    """Print the nats-server configuration that turns on Corral's NATS authentication.

    It holds only public keys: add it to every server of the cluster's NATS, and start every
    frontend with the same --nats-auth-dir (docs/architecture.md, Security).
    """
    from corral.bus.natsauth import NatsAuthDir, auth_config

    with _one_line_errors():
        keys = NatsAuthDir(nats_auth_dir).load_or_create()
    typer.echo(auth_config(keys, jetstream=True), nl=False)


# --- operator commands (corral.ctl) -----------------------------------------------------
ctl_cluster.register(app)
ctl_ops.register(app)


#: click's usage-error base class, whichever click typer uses (its own copy or the package)
_CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def main() -> None:
    """Run the command line; a usage error is one line (`error: ...`, exit 2), like the rest."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        code = app(standalone_mode=False)
    except _CLICK_ERROR as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        if message:
            typer.echo(f"error: {message}", err=True)
        else:  # no command given: the help
            exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
