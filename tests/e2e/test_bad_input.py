"""No 500 from bad input: values PostgreSQL cannot store are a 400 naming the field, on a
connection that stays usable; schemathesis over the admin API finds no server error."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from cluster import Cluster

pytestmark = pytest.mark.slow

INT32_OVER = 2**31

# (method, path, JSON body or raw bytes, a field the 400's message or param names)
CASES: list[tuple[str, str, Any, str]] = [
    ("DELETE", "/api/replicas/m/2147483648", None, "index"),
    ("DELETE", "/api/replicas/m/-1", None, "index"),
    ("POST", "/api/keys", {"name": "a\u0000b"}, "name"),
    ("POST", "/api/keys", b'{"name": "a\\ud800b"}', "name"),
    ("POST", "/api/keys", {"name": "k", "models": ["x\u0000"]}, "models"),
    ("PUT", "/api/models/n", {"backend": "sim", "options": {"x": "a\u0000b"}}, "options.x"),
    ("PUT", "/api/models/n", {"backend": "sim", "options": {"a\u0000": 1}}, "options.a"),
    ("PUT", "/api/models/n", {"backend": "sim", "memory": 10**30}, "memory"),
    ("PUT", "/api/models/n", {"backend": "sim", "memory": -1}, "memory"),
    ("PUT", "/api/models/n", {"backend": "sim", "artifact": "a\u0000"}, "artifact"),
    ("PUT", "/api/models/n", {"backend": "s" * 65}, "backend"),
    (
        "PUT",
        "/api/models/n",
        {"backend": "sim", "scheduling": {"min_replicas": INT32_OVER}},
        "min_replicas",
    ),
    ("PUT", "/api/models/m/scheduling", {"min_replicas": INT32_OVER}, "min_replicas"),
    ("PUT", "/api/models/m/scheduling", {"node_selector": {"k": "\u0000"}}, "node_selector.k"),
    ("PUT", "/api/nodes/x/labels", {"labels": {"zone": "a\u0000"}}, "labels.zone"),
    ("PUT", "/api/nodes/x/labels", {"labels": {"zone": "v" * 256}}, "labels"),
    ("GET", "/api/models/a%00b", None, "path"),
    ("GET", "/api/events?limit=1%00", None, "limit"),
]


def _client_port(response: httpx.Response) -> int:
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


def test_bad_admin_input_is_a_400_naming_the_field_on_a_usable_connection(
    cluster: Cluster,
) -> None:
    cluster.write_model("m", options={"tokens": 2})
    cluster.start_frontend()
    limits = httpx.Limits(max_connections=1)
    with httpx.Client(base_url=cluster.url(), headers=cluster.admin_headers, limits=limits) as c:
        port = _client_port(c.get("/api/models"))
        for method, path, body, field in CASES:
            if isinstance(body, bytes):
                headers = {"content-type": "application/json"}
                r = c.request(method, path, content=body, headers=headers)
            else:
                r = c.request(method, path, json=body)
            assert r.status_code == 400, (method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error", error
            assert field in f"{error['param']} {error['message']}", (path, body, error)
            assert _client_port(r) == port, "the connection stays open"
        assert c.get("/api/models/m").status_code == 200  # and usable
        assert _client_port(c.get("/healthz")) == port
    assert [m["name"] for m in cluster.api("GET", "/api/models")["models"]] == ["m"]


def test_schemathesis_finds_no_server_error_in_the_admin_api(cluster: Cluster) -> None:
    cluster.write_model("m", options={"tokens": 2})
    cluster.start_frontend()
    cluster.start_worker("w")
    url, admin = cluster.url(), cluster.admin_headers
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=admin)
    failures: list[str] = []
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/drain") or operation.path == "/api/nodes/{node_id}/deregister":
            continue  # would take the only worker away (with waits); its input is an id only

        @settings(
            max_examples=6,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy())
        def call(case: Any) -> None:
            nonlocal tried
            tried += 1
            response = case.call(base_url=url, headers=admin, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

        call()
    assert tried > 60, tried
    assert not failures, failures
