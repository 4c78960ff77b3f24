"""Operator commands on the audit log, API keys, usage and backend installs: events, keys,
usage, backends."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import typer

from corral.ctl.client import Admin, fail, seg
from corral.ctl.cluster import DEFAULT_URL, AdminUrl, ApiKey, NodeRef
from corral.ctl.tables import ago, clock, last_line, show

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
backends_app = typer.Typer(help="Backend installs on worker nodes.", no_args_is_help=True)

EVENT_LINE = "{:<19}  {:<20}  {:<24}  {}"
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _event_line(e: dict[str, Any]) -> str:
    return EVENT_LINE.format(clock(e["at"]), e["kind"], e.get("subject") or "-", e["message"])


def events(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many of the newest")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events as they happen")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls (follow)")] = 1.0,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print the audit log (oldest first): node, model, replica and key changes."""
    admin = Admin(url, api_key)
    recent = list(reversed(admin.call("GET", "/api/events", params={"limit": limit})["events"]))
    typer.echo(EVENT_LINE.format("TIME", "KIND", "SUBJECT", "MESSAGE"))
    for e in recent:
        typer.echo(_event_line(e))
    if not follow:
        return
    last = max((e["id"] for e in recent), default=0)
    try:
        while True:
            time.sleep(interval)  # polling: the admin API has no event stream
            newer = admin.call("GET", "/api/events", params={"after": last, "limit": 1000})
            for e in newer["events"]:
                typer.echo(_event_line(e))
                last = max(last, e["id"])
    except KeyboardInterrupt:
        return


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for")],
    role: Annotated[
        str | None, typer.Option(help="admin or inference (where the frontend has key roles)")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models the key may use (all if unset)")
    ] = None,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Create an API key; its secret is printed once, only its digest is stored."""
    body: dict[str, Any] = {"name": name}
    if role is not None:
        body["role"] = role
    if models is not None:
        body["models"] = [m for m in (s.strip() for s in models.split(",")) if m]
    key = Admin(url, api_key).call("POST", "/api/keys", json=body)
    show(
        ("id", "name", "role", "key"),
        [(key["id"], key["name"], key.get("role", ""), key["key"])],
    )
    typer.echo("The key is shown only now: store it.", err=True)


@keys_app.command("list")
def keys_list(url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the stored API keys (not their secrets)."""
    found = Admin(url, api_key).call("GET", "/api/keys")["keys"]
    rows = [
        (
            k["id"],
            k["name"],
            k.get("role", ""),
            ",".join(k.get("models") or []),
            _created(k.get("created_at")),
        )
        for k in found
    ]
    show(("id", "name", "role", "models", "created"), rows)


def _created(value: Any) -> str:
    if isinstance(value, int | float):
        return ago(value)
    return str(value or "")[:19].replace("T", " ")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `corral keys list`)")],
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    Admin(url, api_key).call("DELETE", f"/api/keys/{seg(key_id)}")
    typer.echo(f"revoked {key_id}")


@keys_app.command("limits")
def keys_limits(
    key_id: Annotated[str, typer.Argument(help="The key's id (see `corral keys list`)")],
    requests_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Set the requests-per-minute limit")
    ] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option(min=1, help="Set the tokens-per-day limit (UTC days)")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove both limits")] = False,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Show an API key's limits, or change the ones given (the other stays); past a limit
    the key gets 429 rate_limited."""
    admin = Admin(url, api_key)
    path = f"/api/keys/{seg(key_id)}/limits"
    limits = admin.call("GET", path)
    if clear or requests_per_minute is not None or tokens_per_day is not None:
        body = {
            "requests_per_minute": None if clear else limits.get("requests_per_minute"),
            "tokens_per_day": None if clear else limits.get("tokens_per_day"),
        }
        if requests_per_minute is not None:
            body["requests_per_minute"] = requests_per_minute
        if tokens_per_day is not None:
            body["tokens_per_day"] = tokens_per_day
        limits = admin.call("PUT", path, json=body)
    row = (
        key_id,
        limits.get("requests_per_minute") or "none",
        limits.get("tokens_per_day") or "none",
    )
    show(("id", "requests/minute", "tokens/day"), [row])


def _when(text: str | None, option: str) -> float | None:
    """Epoch seconds from "1700000000" or from an age like "90m", "24h", "7d"."""
    if text is None:
        return None
    match = DURATION.match(text.strip())
    if match:
        return time.time() - float(match.group(1)) * UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        fail(f"{option} {text!r}: give epoch seconds or an age like 30m, 24h, 7d", 2)


def usage(
    key: Annotated[str | None, typer.Option(help="Only this API key's id")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model")] = None,
    since: Annotated[str, typer.Option(help="Start: epoch seconds or an age (24h, 7d)")] = "24h",
    until: Annotated[str | None, typer.Option(help="End: epoch seconds or an age")] = None,
    group_by: Annotated[
        str,
        typer.Option(help="Comma-separated: key, model, and at most one of minute, hour, day"),
    ] = "key,model",
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Requests and tokens per API key and model over a window (GET /api/usage)."""
    params = {
        "key": key,
        "model": model,
        "since": _when(since, "--since"),
        "until": _when(until, "--until"),
        "group_by": group_by,
    }
    data = Admin(url, api_key).call(
        "GET",
        "/api/usage",
        params={k: int(v) if isinstance(v, float) else v for k, v in params.items()},
        missing=f"{url} has no usage API (GET /api/usage): this frontend does not count usage",
    )
    found = data.get("usage") or []
    timed = any("bucket" in u for u in found)
    headers = ["key", "model", "requests", "errors", "limited", "prompt", "completion", "total"]
    rows = []
    for u in found:
        named = u.get("key_name") or u.get("key_id") or "no key"
        key_cell = named if "key_id" in u else ""  # "": not grouped by key
        row = [
            key_cell,
            u.get("model", ""),
            u.get("requests"),
            u.get("errors"),
            u.get("limited"),
            u.get("prompt_tokens"),
            u.get("completion_tokens"),
            u.get("total_tokens"),
        ]
        rows.append([clock(u["bucket"]) if "bucket" in u else "", *row] if timed else row)
    show(["time", *headers] if timed else headers, rows)


@backends_app.command("list")
def backends_list(node: NodeRef, url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Show the backends of a node and their install state."""
    data = Admin(url, api_key).call("GET", f"/api/nodes/{seg(node)}/backends")
    rows = []
    for name, b in data["backends"].items():
        pct = f"{b['percent']:.0f}%" if b.get("percent") is not None else ""
        error = last_line(b.get("error"))
        rows.append((name, b["state"], pct, error))
    show(("backend", "state", "progress", "error"), rows)


@backends_app.command("install")
def backends_install(
    node: NodeRef,
    name: Annotated[str, typer.Argument(help="Backend name, e.g. llama-cpp")],
    force: Annotated[bool, typer.Option(help="Reinstall even when installed")] = False,
    upgrade: Annotated[
        bool, typer.Option(help="Stop the backend's replicas and reinstall it")
    ] = False,
    wait: Annotated[float, typer.Option(help="Seconds to follow the progress")] = 3600,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Install (or upgrade) a backend on a node, with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    admin = Admin(url, api_key)
    path = f"/api/nodes/{seg(node)}/backends"
    query = {"force": str(force).lower(), "upgrade": str(upgrade).lower()}
    admin.call("POST", f"{path}/{seg(name)}/install", params=query)
    deadline = time.monotonic() + wait
    state: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"))
    with Progress(*columns, TimeElapsedColumn()) as bar:
        task = bar.add_task(f"{name} on {node}", total=100, state="installing")
        while time.monotonic() < deadline:
            time.sleep(0.5)
            state = admin.call("GET", path)["backends"].get(name, {})
            bar.update(task, completed=state.get("percent") or 0, state=state.get("state", "?"))
            if state.get("state") in ("installed", "failed", "builtin"):
                if state.get("state") != "failed":
                    bar.update(task, completed=100)
                break
    if state.get("state") == "failed":
        fail(f"install failed: {state.get('error')}")
    if state.get("state") not in ("installed", "builtin"):
        fail(f"still {state.get('state', 'installing')} after {wait:g}s")


def register(app: typer.Typer) -> None:
    app.command()(events)
    app.command()(usage)
    app.add_typer(keys_app, name="keys")
    app.add_typer(backends_app, name="backends")
