"""`corral serve --tls-cert/--tls-key`: the official openai client over HTTPS with a test CA;
a worker joins that frontend checking its certificate against the CA (`--ca-file`)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from cluster import Cluster, wait_for

pytestmark = pytest.mark.slow


def test_openai_client_over_https(cluster: Cluster, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)

    cluster.write_model("chat", options={"tokens": 6})
    cluster.start_frontend()  # plain HTTP: the cluster's admin helpers use it
    secure = cluster.start_frontend(
        wait=False, CORRAL_TLS_CERT=str(cert_file), CORRAL_TLS_KEY=str(key_file)
    )
    url = cluster.url(secure)
    assert url.startswith("https://")
    wait_for(
        lambda: httpx.get(url + "/healthz", verify=trusted, timeout=2).json()["status"] == "ok",
        timeout=60,
        what="the HTTPS frontend",
    )
    # a worker that does not trust the CA cannot join the HTTPS frontend; with it, it can
    doubting = cluster.start_worker("doubter", frontend=secure, wait=False)
    wait_for(
        lambda: "CERTIFICATE_VERIFY_FAILED" in doubting.output(),
        timeout=60,
        what="the worker refusing the unknown certificate",
    )
    assert cluster.node("doubter") is None
    doubting.stop(timeout=20)
    cluster.start_worker("w", frontend=secure, args=["--ca-file", str(ca_file)])

    with openai.OpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(verify=trusted, timeout=60),
    ) as client:
        messages = [{"role": "user", "content": "over TLS"}]
        answer = client.chat.completions.create(model="chat", messages=messages)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens == 6
        chunks = list(
            client.chat.completions.create(model="chat", messages=messages, stream=True)  # type: ignore[arg-type]
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"

    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
        httpx.get(url + "/healthz", timeout=5)
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is refused
        httpx.get(f"http://127.0.0.1:{cluster.ports[secure]}/healthz", timeout=5)
