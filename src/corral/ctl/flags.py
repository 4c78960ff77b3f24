"""Every setting a flag: the settings a command does not declare itself become --flags.

`settings_flags(FrontendSettings, HELP)` adds to a command one option per settings field it
lacks; a flag given is put in the field's CORRAL_* environment variable before the command
runs, so the settings (built from the environment) take it, over any value already there.
"""

from __future__ import annotations

import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import SecretStr
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

F = TypeVar("F", bound=Callable[..., Any])

#: Help of the settings that have no hand-written option in the commands.
HELP: dict[str, str] = {
    # frontend
    "nats_auth_dir": "Directory of the cluster's NATS keys (created on first start; the same"
    " for every frontend): turns per-role NATS credentials on (`corral nats-config` prints"
    " the server configuration)",
    "nats_ca_file": "PEM CA a tls:// NATS server's certificate is checked against",
    "frontend_id": "This frontend's id in events and the reconciler lease (default: random)",
    "start_timeout": "Seconds a replica start may take on its node",
    "load_job_ttl": "Seconds a load job's claim lives without renewal",
    "health_ttl": "Seconds a successful backend probe stays valid",
    "request_timeout": "Seconds a backend may take to answer a request",
    "max_inflight": "Requests in flight per frontend; 0 = unlimited, else 429 past it",
    "load_report_interval": "Seconds between in-flight reports to other frontends",
    "resync_interval": "Seconds between full snapshot refreshes from PostgreSQL",
    "last_used_flush_interval": "Seconds between writes of replicas' last-used times",
    "usage_flush_interval": "Seconds between usage flushes to PostgreSQL; per-key limits hold"
    " across frontends within one interval",
    "heartbeat_interval": "Seconds between worker heartbeats (told to workers)",
    "unhealthy_after": "Heartbeat intervals missed before a node is unhealthy",
    "offline_after": "Seconds without a heartbeat before a node is offline",
    "capacity_cooldown": "Seconds a model waits after no node had room for it",
    "orphan_grace": "Seconds an unknown backend process may live before it is stopped",
    "drain_timeout": "Seconds a drained replica's requests may take to finish",
    # worker
    "bind_host": "Address backends listen on (default: the advertised host)",
    "backends_root": "Where backend virtualenvs live (default: under --data-dir)",
    "stop_grace": "Seconds a backend gets to exit after SIGTERM",
    "ready_timeout": "Seconds a backend may take to become ready",
    "port_low": "Lowest port a backend may listen on",
    "port_high": "Highest port a backend may listen on",
}


def flag_type(annotation: Any) -> type:
    """The type a flag parses for a settings field: its own when simple, str otherwise (the
    settings parse it, as they parse the environment variable)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else str
    if annotation in (int, float, Path):
        return annotation  # type: ignore[no-any-return]
    return str


def env_name(settings: type[BaseSettings], field: str) -> str:
    return f"{settings.model_config.get('env_prefix', '')}{field}".upper()


def _help(settings: type[BaseSettings], name: str, help: Mapping[str, str]) -> str:
    field = settings.model_fields[name]
    text = help.get(name) or field.description or name.replace("_", " ").capitalize()
    default = field.default
    if default is not PydanticUndefined and default is not None and field.default_factory is None:
        shown = "set" if isinstance(default, SecretStr) else default
        text += f" (default {shown})"
    return f"{text} [{env_name(settings, name)}]"


def settings_flags(
    settings: type[BaseSettings], help: Mapping[str, str] = HELP
) -> Callable[[F], F]:
    """Decorate a command: one --flag per field of `settings` it does not declare."""

    def wrap(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        added: dict[str, str] = {}  # parameter -> environment variable
        params = list(signature.parameters.values())
        for name, field in settings.model_fields.items():
            if name in signature.parameters:
                continue
            option = typer.Option(f"--{name.replace('_', '-')}", help=_help(settings, name, help))
            kind = flag_type(field.annotation)
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[kind | None, option],
                )
            )
            added[name] = env_name(settings, name)

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            for name, env in added.items():
                value = kwargs.pop(name, None)
                if value is not None:
                    os.environ[env] = str(value)
            return command(*args, **kwargs)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return wrap
