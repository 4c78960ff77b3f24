"""API keys by role: admin keys for the admin API, inference keys (optionally limited to some
models) for /v1 only; the admin API on loopback only while no admin key is configured."""

from __future__ import annotations

import re
import socket
from typing import Any

import httpx
import openai
import pytest

from cluster import Cluster

pytestmark = pytest.mark.slow

HI: Any = [{"role": "user", "content": "hi"}]
CHAT = {"messages": HI}


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _admin_operations(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """Every admin API operation, its path parameters filled with a placeholder."""
    found = []
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            if "admin" in operation.get("tags", []):
                found.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return found


def test_inference_keys_use_v1_only_and_model_limited_keys_only_their_models(
    cluster: Cluster,
) -> None:
    cluster.write_model("chat", options={"tokens": 2})
    cluster.write_model("other", options={"tokens": 2})
    cluster.start_frontend()
    cluster.start_worker("w")
    url = cluster.url()
    admin = cluster.admin_headers

    # no stored key: /v1 is open; the admin API needs the data dir's admin key, even here
    assert httpx.post(url + "/v1/chat/completions", json={"model": "chat", **CHAT}).is_success
    refused = httpx.get(url + "/api/nodes")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/openapi.json").status_code == 401

    made = httpx.post(url + "/api/keys", json={"name": "app"}, headers=admin).json()
    assert made["role"] == "inference" and made["models"] is None  # unless asked otherwise
    limited = httpx.post(
        url + "/api/keys", json={"name": "chat-app", "models": ["chat"]}, headers=admin
    ).json()
    inference, chat_only = made["key"], limited["key"]

    # a stored key closes /v1 on every frontend; both keys serve their models
    no_key = httpx.post(url + "/v1/chat/completions", json={"model": "chat", **CHAT})
    assert no_key.status_code == 401
    with openai.OpenAI(base_url=url + "/v1", api_key=inference, max_retries=0) as client:
        for model in ("chat", "other"):
            answer = client.chat.completions.create(model=model, messages=HI)
            assert answer.choices[0].message.content
        assert sorted(m.id for m in client.models.list()) == ["chat", "other"]
    with openai.OpenAI(base_url=url + "/v1", api_key=chat_only, max_retries=0) as client:
        assert client.chat.completions.create(model="chat", messages=HI).choices
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model="other", messages=HI)
        assert denied.value.code == "model_not_allowed"
        assert [m.id for m in client.models.list()] == ["chat"]
        with pytest.raises(openai.PermissionDeniedError):
            client.models.retrieve("other")

    # every admin operation refuses both inference keys with an OpenAI-style 403
    operations = _admin_operations(httpx.get(url + "/openapi.json", headers=admin).json())
    assert len(operations) > 15, operations
    for key in (inference, chat_only):
        for method, path in operations:
            r = httpx.request(method, url + path, headers=_bearer(key), json={})
            assert r.status_code == 403, (method, path, r.text)
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("permission_error", "forbidden"), error
            assert "inference key" in error["message"]
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(url + path, headers=_bearer(key)).status_code == 403
    assert httpx.get(url + "/docs", headers=admin).status_code == 200

    # an admin asks for an admin key: it may use the admin API and /v1
    second = httpx.post(
        url + "/api/keys", json={"name": "ops", "role": "admin"}, headers=admin
    ).json()
    assert httpx.get(url + "/api/nodes", headers=_bearer(second["key"])).status_code == 200
    chat = {"model": "chat", **CHAT}
    r = httpx.post(url + "/v1/chat/completions", json=chat, headers=_bearer(second["key"]))
    assert r.status_code == 200
    bad = httpx.post(
        url + "/api/keys", json={"name": "x", "role": "admin", "models": ["chat"]}, headers=admin
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "models"
    listed = {k["name"]: k for k in cluster.api("GET", "/api/keys")["keys"]}
    assert {n: (k["role"], k["models"]) for n, k in listed.items()} == {
        "app": ("inference", None),
        "chat-app": ("inference", ["chat"]),
        "ops": ("admin", None),
    }
    assert inference not in str(listed)  # only the digest is kept

    cluster.api("DELETE", f"/api/keys/{made['id']}")
    revoked = httpx.post(url + "/v1/chat/completions", json=chat, headers=_bearer(inference))
    assert revoked.status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200  # health stays open


def test_operator_keys_are_admin_keys_and_close_v1(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 2})
    cluster.start_frontend(CORRAL_API_KEYS="static-key-1", CORRAL_METRICS_KEY="scrape")
    cluster.api_key = "static-key-1"
    cluster.start_worker("w")
    url = cluster.url()
    body = {"model": "chat", **CHAT}

    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    wrong = httpx.post(url + "/v1/chat/completions", json=body, headers=_bearer("nope"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    ok = httpx.post(url + "/v1/chat/completions", json=body, headers=_bearer("static-key-1"))
    assert ok.status_code == 200
    for key in ("static-key-1", cluster.admin_key):  # both are admin keys
        assert httpx.get(url + "/api/nodes", headers=_bearer(key)).status_code == 200

    # /metrics behind its key (or an admin key)
    assert httpx.get(url + "/metrics").status_code == 401
    assert "corral_inflight" in httpx.get(url + "/metrics", headers=_bearer("scrape")).text
    assert httpx.get(url + "/metrics", headers=_bearer("static-key-1")).status_code == 200


def _outward_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            address: str = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_without_an_admin_key_the_admin_api_answers_only_on_loopback(cluster: Cluster) -> None:
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    frontend = cluster.start_frontend(CORRAL_ADMIN_KEY="false", args=["--host", "0.0.0.0"])
    port = cluster.ports[frontend]
    assert not (cluster.data_dir / "admin.key").exists()

    local = httpx.get(f"http://127.0.0.1:{port}/api/nodes")
    assert local.status_code == 200
    remote = httpx.get(f"http://{address}:{port}/api/nodes")
    assert remote.status_code == 403
    assert "--api-keys" in remote.json()["error"]["message"]
    assert httpx.get(f"http://{address}:{port}/openapi.json").status_code == 403
    anonymous = httpx.post(f"http://{address}:{port}/api/keys", json={"name": "lockout"})
    assert anonymous.status_code == 403  # nobody remote locks the cluster with a key
    assert httpx.get(f"http://{address}:{port}/healthz").status_code == 200
