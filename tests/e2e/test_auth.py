"""API keys: once one exists, every /v1 and /api request needs it; secrets are stored as digests."""

from __future__ import annotations

import httpx
import openai
import pytest

from cluster import Cluster

pytestmark = pytest.mark.slow


def test_api_keys_lock_the_openai_and_admin_apis(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 2})
    cluster.start_frontend(CORRAL_API_KEYS="static-key-1")
    cluster.api_key = "static-key-1"
    cluster.start_worker("w")
    url = cluster.url()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
    wrong = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/api/nodes").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401

    static = {"authorization": "Bearer static-key-1"}
    created = httpx.post(url + "/api/keys", json={"name": "ci"}, headers=static).json()
    secret = created["key"]
    listed = httpx.get(url + "/api/keys", headers=static).json()["keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert secret not in str(listed)  # only the digest is kept

    with openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0) as client:
        answer = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
    assert httpx.get(url + "/healthz").status_code == 200  # health stays open

    httpx.delete(url + f"/api/keys/{created['id']}", headers=static)
    revoked = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"}
    )
    assert revoked.status_code == 401
