"""Operator commands on nodes, models and replicas: nodes, models, ps, label, scale, drain,
undrain. Each takes a node's name or id and prints a table with a header."""

from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any

import typer

from corral.ctl.client import Admin, fail, model_path, seg
from corral.ctl.tables import ago, gib, last_line, pairs, show

AdminUrl = Annotated[
    str, typer.Option("--url", envvar="CORRAL_URL", help="A frontend's URL (CORRAL_URL)")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CORRAL_API_KEY",
        help="Admin API key (CORRAL_API_KEY; default: the admin.key file in $CORRAL_DATA_DIR or"
        " the per-user data directory, which corral serve and corral up create)",
    ),
]
NodeRef = Annotated[str, typer.Argument(help="Node name or id")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")]
DEFAULT_URL = "http://127.0.0.1:8000"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _names(admin: Admin) -> dict[str, str]:
    """Node id -> name."""
    return {n["id"]: n["name"] for n in admin.call("GET", "/api/nodes")["nodes"]}


def nodes(url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the nodes: status, address, resources, replicas, labels, last heartbeat."""
    admin = Admin(url, api_key)
    found = admin.call("GET", "/api/nodes")["nodes"]
    if as_json:
        print_json({"nodes": found})
        return
    per_node = Counter(r["node_id"] for r in admin.call("GET", "/api/replicas")["replicas"])
    rows = []
    for n in found:
        r = n.get("resources") or {}
        gpus = r.get("gpus") or []
        rows.append(
            (
                n["name"],
                n["id"],
                n["status"],
                n["address"],
                r.get("cpu_count") or "",
                f"{gib(r.get('ram_free'))}/{gib(r.get('ram_total'))}" if r.get("ram_total") else "",
                len(gpus) or "",
                n.get("memory_budget", ""),
                per_node.get(n["id"], 0),
                pairs(n.get("labels") or {}),
                ago(n.get("last_heartbeat")),
            )
        )
    show(
        (
            "name",
            "id",
            "status",
            "address",
            "cpus",
            "ram free",
            "gpus",
            "budget",
            "replicas",
            "labels",
            "heartbeat",
        ),
        rows,
    )


def models(url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the declared models with their scheduling, replica counts by state, revision and
    rollout (a halted one says why), then the errors of broken model files."""
    admin = Admin(url, api_key)
    data = admin.call("GET", "/api/models")
    if as_json:
        print_json(data)
        return
    states: dict[str, Counter[str]] = {}
    for r in admin.call("GET", "/api/replicas")["replicas"]:
        states.setdefault(r["model"], Counter())[r["state"]] += 1
    rows = []
    halted = []
    for m in data["models"]:
        s = m["scheduling"]
        counts = states.get(m["name"], Counter())
        rollout = m.get("rollout") or {}
        phase = rollout.get("phase", "")
        if phase == "rolling":
            phase = f"rolling ({rollout.get('old')} old, {rollout.get('current')} new)"
        if phase == "halted" and rollout.get("last_error"):
            halted.append((m["name"], last_line(rollout["last_error"])))
        starting = sum(counts[k] for k in ("scheduled", "staging", "loading"))
        rows.append(
            (
                m["name"],
                m["backend"],
                s["min_replicas"],
                s["max_replicas"] or "-",
                counts["loaded"],
                starting,
                counts["unloading"],
                counts["failed"],
                pairs(s.get("node_selector") or {}),
                m.get("revision", ""),
                phase,
            )
        )
    headers = ("name", "backend", "min", "max", "loaded", "starting", "unloading", "failed")
    show((*headers, "selector", "revision", "rollout"), rows)
    for name, error in halted:
        typer.echo(f"{name} halted: {error}")
    errors = data.get("errors") or []
    if errors:
        typer.echo(f"\n{len(errors)} model file error(s):")
        for e in errors:
            typer.echo(f"  {e['message']}")


def ps(
    model: Annotated[str | None, typer.Option(help="Only this model's replicas")] = None,
    node: Annotated[
        str | None, typer.Option(help="Only the replicas on this node (name or id)")
    ] = None,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List the replicas: model, node, state, requests in flight, last use, address."""
    admin = Admin(url, api_key)
    names = _names(admin)
    node_id = None
    if node is not None:
        node_id = node if node in names else admin.call("GET", f"/api/nodes/{seg(node)}")["id"]
    replicas = [
        r
        for r in admin.call("GET", "/api/replicas")["replicas"]
        if (model is None or r["model"] == model) and (node_id is None or r["node_id"] == node_id)
    ]
    replicas.sort(key=lambda r: (r["model"], r["index"]))
    if as_json:
        print_json({"replicas": replicas})
        return
    rows = [
        (
            r["model"],
            r["index"],
            names.get(r["node_id"], r["node_id"]),
            r["state"],
            r.get("inflight", ""),
            ago(r.get("last_used")),
            r.get("address") or "",
            last_line(r.get("load_error")),
        )
        for r in replicas
    ]
    show(("model", "#", "node", "state", "in-flight", "last used", "address", "error"), rows)


def label(
    node: NodeRef,
    changes: Annotated[
        list[str], typer.Argument(help="key=value sets a label, key- removes it", min=1)
    ],
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Set or remove labels of a node; the labels not named stay."""
    patch: dict[str, str | None] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if sep and key:
            patch[key] = value
        elif not sep and change.endswith("-") and len(change) > 1:
            patch[change[:-1]] = None
        else:
            fail(f"{change!r}: give key=value to set a label or key- to remove it", 2)
    admin = Admin(url, api_key)
    data = admin.call("PATCH", f"/api/nodes/{seg(node)}/labels", json={"labels": patch})
    show(("node", "id", "labels"), [(data["name"], data["node_id"], pairs(data["labels"]))])


def scale(
    model: Annotated[str, typer.Argument(help="Model name")],
    min_replicas: Annotated[
        int | None, typer.Option("--min", min=0, help="Replicas to keep loaded at least")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option("--max", min=0, help="Replicas at most (0: no cap)")
    ] = None,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Change how many replicas a model keeps; the rest of its scheduling stays."""
    patch: dict[str, Any] = {}
    if min_replicas is not None:
        patch["min_replicas"] = min_replicas
    if max_replicas is not None:
        patch["max_replicas"] = max_replicas
    if not patch:
        fail("give --min, --max or both", 2)
    admin = Admin(url, api_key)
    s = admin.call("PATCH", f"/api/models/{model_path(model)}/scheduling", json=patch)
    show(
        ("model", "min", "max", "selector"),
        [(model, s["min_replicas"], s["max_replicas"] or "-", pairs(s["node_selector"]))],
    )


def drain(
    node: NodeRef,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Return once every replica is moved")
    ] = True,
    url: AdminUrl = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Move every replica off a node, then stop them there; it takes no new ones until undrain."""
    admin = Admin(url, api_key)
    data = admin.call(
        "POST",
        f"/api/nodes/{seg(node)}/drain",
        params={"wait": str(wait).lower()},
        timeout=600 if wait else 30,
    )
    if as_json:
        print_json(data)
        return
    stopped = data.get("stopped_replicas", "")
    show(
        ("node", "id", "status", "stopped"),
        [(data["name"], data["node_id"], data["status"], stopped)],
    )


def undrain(node: NodeRef, url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """End a drain: the node takes new replicas again."""
    data = Admin(url, api_key).call("POST", f"/api/nodes/{seg(node)}/undrain")
    show(("node", "id", "status"), [(data["name"], data["node_id"], data["status"])])


def delete_node(node: NodeRef, url: AdminUrl = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Forget a node: its credentials (HTTP and NATS) stop working at once and its replica
    rows go (drain it first to move them); its worker may join again with the cluster token."""
    data = Admin(url, api_key).call("DELETE", f"/api/nodes/{seg(node)}")
    show(("node", "id", "deleted"), [(data["name"], data["deleted"], "yes")])


def register(app: typer.Typer) -> None:
    for command in (nodes, models, ps, label, scale, drain, undrain):
        app.command()(command)
    app.command("delete-node")(delete_node)
