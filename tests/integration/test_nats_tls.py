"""tls:// NATS URLs with a CA file: the frontend and a worker (through the auth callout) connect
to a TLS nats-server whose certificate a self-made CA signed; another CA is refused."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from corral.bus.authservice import AuthCallout
from corral.bus.client import Bus
from corral.bus.natsauth import NatsCredentials, ServerTls, worker_credentials
from natsauth_infra import (
    AuthNats,
    CredentialStore,
    auth_nats_server,
    collect,
    connect,
    publish_until_seen,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate it signed for 127.0.0.1, and an unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(root / "server.pem"))
    cert.private_key_pem.write_to_path(str(root / "server.key"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(root / "other-ca.pem"))
    return root


@pytest.fixture(scope="module")
def server(pki: Path) -> Iterator[AuthNats]:
    with auth_nats_server(tls=ServerTls(pki / "server.pem", pki / "server.key")) as s:
        yield s


@pytest.fixture
async def frontend(server: AuthNats, pki: Path, nats_prefix: str) -> AsyncIterator[Bus]:
    bus = Bus(
        server.url,
        prefix=nats_prefix,
        name="frontend",
        credentials=server.keys.frontend_credentials(ca_file=pki / "ca.pem"),
    )
    await bus.connect()
    yield bus
    await bus.close()


async def test_frontend_and_worker_connect_over_tls(
    server: AuthNats, pki: Path, frontend: Bus
) -> None:
    assert server.url.startswith("tls://")
    assert frontend.nc.connected_url is not None and frontend.nc.connected_url.scheme == "tls"
    store = CredentialStore()
    callout = AuthCallout(frontend, server.keys.issuer, store.verify)
    await callout.start()
    try:
        creds = worker_credentials(
            frontend.subjects.prefix, "n1", store.issue("n1"), ca_file=pki / "ca.pem"
        )
        worker = await connect(server.url, creds)
        try:
            subject = frontend.subjects.install_progress("n1")
            got = await collect(frontend, frontend.subjects.all_install_progress)
            await publish_until_seen(worker.nc, subject, got, b"over tls")
            assert worker.errors == []
        finally:
            await worker.nc.close()
    finally:
        await callout.stop()


@pytest.mark.parametrize("ca", ["other-ca.pem", None])
async def test_a_server_certificate_from_another_ca_is_refused(
    server: AuthNats, pki: Path, ca: str | None
) -> None:
    creds = NatsCredentials(
        nkey_seed=server.keys.frontend.seed, ca_file=pki / ca if ca is not None else None
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        await connect(server.url, creds)
