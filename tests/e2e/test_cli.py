"""Every operator command of `corral` against one real cluster (a frontend, two workers),
shared by the tests of this module: tables with headers, node names or ids, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import infra
from cluster import Cluster, running_cluster, wait_for
from corral.cli import app
from natsauth_infra import AuthNats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(
    module_database: str, cluster_nats: AuthNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cli-cluster")
    with running_cluster(module_database, cluster_nats, infra.unique_prefix(), root) as c:
        c.write_model("chat", options={"tokens": 4}, scheduling={"min_replicas": 1})
        c.write_model(
            "emb",
            options={"embedding_dim": 8},
            scheduling={"node_selector": {"zone": "a"}, "max_replicas": 1},
        )
        c.start_frontend(CORRAL_LOG_FORMAT="json")
        c.start_worker("w1", labels="zone=a")
        c.start_worker("w2")
        wait_for(
            lambda: any(r["state"] == "loaded" for r in c.replicas("chat")),
            timeout=60,
            what="chat loaded (min_replicas 1)",
        )
        yield c


def corral(c: Cluster, *args: str, key: str | None = None) -> tuple[int, str, str]:
    """Run `corral ARGS --url <frontend>` in this process with the frontends' data dir (so the
    CLI finds their admin key file), or with `key`; (exit code, stdout, stderr)."""
    env = {"CORRAL_DATA_DIR": str(c.data_dir), "CORRAL_API_KEY": key}
    result = CliRunner().invoke(app, [*args, "--url", c.url()], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ok(c: Cluster, *args: str, key: str | None = None) -> list[str]:
    code, out, err = corral(c, *args, key=key)
    assert code == 0, (args, out, err)
    return out.splitlines()


def rows(lines: list[str]) -> list[list[str]]:
    return [line.split() for line in lines[1:]]


def test_nodes_table_with_names_status_and_labels(shared: Cluster) -> None:
    lines = ok(shared, "nodes")
    assert lines[0].split()[:4] == ["NAME", "ID", "STATUS", "ADDRESS"]
    by_name = {r[0]: r for r in rows(lines)}
    ids = {n["name"]: n["id"] for n in shared.nodes()}
    assert set(by_name) == {"w1", "w2"}
    assert by_name["w1"][1] == ids["w1"] and by_name["w1"][2] == "healthy"
    assert "zone=a" in by_name["w1"]


def test_models_table_counts_replicas(shared: Cluster) -> None:
    lines = ok(shared, "models")
    assert lines[0].split()[:6] == ["NAME", "BACKEND", "MIN", "MAX", "LOADED", "STARTING"]
    by_name = {r[0]: r for r in rows(lines)}
    assert by_name["chat"][:4] == ["chat", "sim", "1", "-"], "min 1, no cap"
    assert int(by_name["chat"][4]) >= 1, "a replica loaded"
    assert "emb" in by_name and "zone=a" in by_name["emb"]


def test_ps_shows_replicas_with_node_names(shared: Cluster) -> None:
    lines = ok(shared, "ps")
    assert lines[0].split() == [
        "MODEL",
        "#",
        "NODE",
        "STATE",
        "IN-FLIGHT",
        "LAST",
        "USED",
        "ADDRESS",
        "ERROR",
    ]
    chat = [r for r in rows(lines) if r[0] == "chat"]
    replica = next(r for r in shared.replicas("chat") if r["state"] == "loaded")
    node = next(n["name"] for n in shared.nodes() if n["id"] == replica["node_id"])
    assert [node, "loaded"] in [r[2:4] for r in chat]
    assert any(replica["address"] in r for r in chat)
    only = ok(shared, "ps", "--node", node, "--model", "chat")
    assert {r[2] for r in rows(only)} == {node}


def test_label_merges_and_removes_by_name_and_id(shared: Cluster) -> None:
    lines = ok(shared, "label", "w2", "tier=gold", "rack=7")
    assert lines[0].split() == ["NODE", "ID", "LABELS"]
    assert rows(lines)[0][2] == "rack=7,tier=gold"
    w2 = shared.node("w2")
    assert w2 is not None
    lines = ok(shared, "label", w2["id"], "rack-", "tier=silver")
    assert rows(lines)[0][:3] == ["w2", w2["id"], "tier=silver"]
    assert shared.node("w2")["labels"] == {"tier": "silver"}  # type: ignore[index]
    assert shared.node("w1")["labels"] == {"zone": "a"}  # type: ignore[index]


def test_scale_changes_only_the_replica_bounds(shared: Cluster) -> None:
    lines = ok(shared, "scale", "emb", "--max", "2")
    assert lines[0].split() == ["MODEL", "MIN", "MAX", "SELECTOR"]
    assert rows(lines)[0] == ["emb", "0", "2", "zone=a"]
    scheduling = shared.api("GET", "/api/models/emb/scheduling")
    assert scheduling["node_selector"] == {"zone": "a"}, "the selector stays"
    assert (scheduling["min_replicas"], scheduling["max_replicas"]) == (0, 2)


def test_drain_and_undrain_by_name(shared: Cluster) -> None:
    lines = ok(shared, "drain", "w2")
    assert lines[0].split() == ["NODE", "ID", "STATUS", "STOPPED"]
    assert rows(lines)[0][0] == "w2" and rows(lines)[0][2] == "drained"
    assert shared.node("w2")["status"] == "draining"  # type: ignore[index]
    lines = ok(shared, "undrain", "w2")
    assert rows(lines)[0][2] == "healthy"
    wait_for(lambda: shared.node("w2", status="healthy"), timeout=10, what="w2 healthy")


def test_events_name_nodes_and_follow_prints_new_ones(shared: Cluster) -> None:
    lines = ok(shared, "events", "--limit", "200")
    assert lines[0].split() == ["TIME", "KIND", "SUBJECT", "MESSAGE"]
    w2 = shared.node("w2")
    assert w2 is not None
    assert any("node.draining" in line and f"w2 ({w2['id']})" in line for line in lines)
    names = {f"{n['name']} ({n['id']})" for n in shared.nodes()}
    loads = [line for line in lines if "replica.loaded" in line and "chat#" in line]
    assert loads and all(any(f"on {name} at" in line for name in names) for line in loads)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CORRAL_API_KEY": shared.admin_key}
    argv = [sys.executable, "-m", "corral", "events", "-f", "--limit", "1", "--interval", "0.2"]
    follow = subprocess.Popen(
        [*argv, "--url", shared.url()], stdout=subprocess.PIPE, text=True, env=env
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follow.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: len(seen) >= 2, timeout=30, what="the header and the newest event")
        ok(shared, "label", "w1", "followed=yes")
        wait_for(
            lambda: any("node.labels" in s and "followed=yes" in s for s in seen),
            timeout=30,
            what="the label change printed by events --follow",
        )
    finally:
        follow.terminate()
        follow.wait(timeout=10)
        reader.join(timeout=10)
        follow.stdout.close()  # type: ignore[union-attr]
    ok(shared, "label", "w1", "followed-")


def test_usage_per_key_and_model(shared: Cluster) -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(shared.url() + "/v1/chat/completions", json=chat, timeout=30)
    assert answer.status_code == 200, answer.text
    tokens = answer.json()["usage"]

    lines = ok(shared, "usage", "--since", "1h", "--model", "chat")
    assert lines[0].split() == [
        "KEY",
        "MODEL",
        "REQUESTS",
        "ERRORS",
        "LIMITED",
        "PROMPT",
        "COMPLETION",
        "TOTAL",
    ]
    (row,) = rows(lines)
    assert row[:3] == ["no", "key", "chat"], "the API is open: requests without a key"
    assert int(row[3]) >= 1 and int(row[-1]) >= tokens["total_tokens"]

    timed = ok(shared, "usage", "--since", "1h", "--group-by", "model,hour")
    assert timed[0].split()[:3] == ["TIME", "KEY", "MODEL"]
    assert any("chat" in r for r in rows(timed))


def test_errors_are_one_line_and_exit_non_zero(shared: Cluster, tmp_path: Path) -> None:
    for args, code, text in (
        (("drain", "ghost"), 1, "node 'ghost' not found"),
        (("label", "w1", "novalue"), 2, "give key=value to set a label or key- to remove it"),
        (("scale", "chat"), 2, "give --min, --max or both"),
        (("scale", "ghost", "--max", "1"), 1, "model 'ghost' not found"),
        (("keys", "revoke", "key-nope"), 1, "API key key-nope not found (HTTP 404)"),
        (("usage", "--since", "yesterday"), 2, "--since 'yesterday'"),
    ):
        got, out, err = corral(shared, *args)
        assert got == code, (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert text in err, err
    closed = CliRunner().invoke(app, ["nodes", "--url", "http://127.0.0.1:9"])
    assert closed.exit_code == 1
    assert closed.stderr.startswith("error: cannot reach http://127.0.0.1:9")


def test_keys_create_list_revoke(shared: Cluster, tmp_path: Path) -> None:
    lines = ok(shared, "keys", "create", "app", "--role", "inference", "--models", "chat,emb")
    assert lines[0].split() == ["ID", "NAME", "ROLE", "KEY"]
    key_id, _, role, secret = rows(lines)[0]
    assert (role, secret[:10]) == ("inference", "sk-corral-")

    listed = ok(shared, "keys", "list")
    assert listed[0].split() == ["ID", "NAME", "ROLE", "MODELS", "CREATED"]
    assert [key_id, "app", "inference", "chat,emb"] in [r[:4] for r in rows(listed)]

    code, _, err = corral(shared, "keys", "list", key=secret)  # an inference key
    assert code == 1 and "(HTTP 403)" in err and "admin API needs an admin key" in err
    nokey = CliRunner().invoke(
        app, ["nodes", "--url", shared.url()], env={"CORRAL_DATA_DIR": str(tmp_path)}
    )
    assert nokey.exit_code == 1
    assert "(HTTP 401)" in nokey.stderr and "--api-key" in nokey.stderr

    code, _, err = corral(shared, "keys", "create", "ops", "--role", "admin", "--models", "chat")
    assert code == 1 and "an admin key cannot be limited to models" in err

    limits = ok(shared, "keys", "limits", key_id, "--requests-per-minute", "60")
    assert limits[0].split() == ["ID", "REQUESTS/MINUTE", "TOKENS/DAY"]
    assert rows(limits) == [[key_id, "60", "none"]]
    both = ok(shared, "keys", "limits", key_id, "--tokens-per-day", "1000")
    assert rows(both) == [[key_id, "60", "1000"]], "the other limit stays"
    assert rows(ok(shared, "keys", "limits", key_id, "--clear")) == [[key_id, "none", "none"]]
    code, _, err = corral(shared, "keys", "limits", "key-nope")
    assert code == 1 and "API key key-nope not found (HTTP 404)" in err

    assert ok(shared, "keys", "revoke", key_id) == [f"revoked {key_id}"]
    assert key_id not in "\n".join(ok(shared, "keys", "list"))


def test_request_ids_are_echoed_and_on_the_json_log_lines(shared: Cluster) -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    served = httpx.post(
        shared.url() + "/v1/chat/completions",
        json=chat,
        headers={"x-request-id": "cli-e2e-ok"},
        timeout=30,
    )
    assert served.status_code == 200, served.text
    assert served.headers.get_list("x-request-id") == ["cli-e2e-ok"]
    missing = httpx.post(
        shared.url() + "/v1/chat/completions",
        json={**chat, "model": "ghost"},
        headers={"x-request-id": "cli-e2e-404"},
        timeout=30,
    )
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] == "cli-e2e-404"
    made = httpx.get(shared.url() + "/api/nodes", headers=shared.admin_headers, timeout=30).headers[
        "x-request-id"
    ]
    assert made and made != "cli-e2e-404"

    def logged() -> dict[str, str] | None:
        for line in shared.frontends[0].output().splitlines():
            if line.startswith("{") and '"cli-e2e-404"' in line:
                record: dict[str, str] = json.loads(line)
                return record
        return None

    record = wait_for(logged, timeout=10, what="the 404's JSON log line")
    assert record["request_id"] == "cli-e2e-404"
    assert record["level"] == "INFO"
    assert "404 model_not_found" in record["message"]
