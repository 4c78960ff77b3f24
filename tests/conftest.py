"""Shared pytest fixtures, one marked section per part of the test suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import infra
from natsauth_infra import AuthNats, auth_nats_server

# === infrastructure: PostgreSQL and NATS (helpers in tests/infra.py) ========================
# Set CORRAL_TEST_DATABASE_URL / CORRAL_TEST_NATS_URL to use running servers instead of
# embedded ones started for the session.


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of the session's PostgreSQL server (connect to its `postgres` database)."""
    with infra.postgres_server() as url:
        yield url


@pytest.fixture
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """URL of a fresh, empty database for this test only; dropped afterwards."""
    url = await infra.create_database(pg_server_url)
    try:
        yield url
    finally:
        await infra.drop_database(pg_server_url, url)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of the session's NATS server (JetStream enabled)."""
    with infra.nats_server() as url:
        yield url


@pytest.fixture(scope="session")
def cluster_nats() -> Iterator[AuthNats]:
    """The NATS server of the process clusters (tests/e2e, tests/chaos): always a private one
    with Corral's NATS authentication on, as `corral up` runs it (tests/natsauth_infra.py)."""
    with auth_nats_server(auth_timeout=2.0) as server:
        yield server


@pytest.fixture
def nats_prefix() -> str:
    """A subject prefix unique to this test, so tests sharing a NATS server stay apart."""
    return infra.unique_prefix()


# === end of infrastructure ==================================================================
