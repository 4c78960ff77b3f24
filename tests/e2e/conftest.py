"""Fixtures for end-to-end tests: a real cluster of corral processes per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import infra
from cluster import Cluster, running_cluster
from natsauth_infra import AuthNats


@pytest.fixture
def cluster(
    database_url: str, cluster_nats: AuthNats, nats_prefix: str, tmp_path: Path
) -> Iterator[Cluster]:
    with running_cluster(database_url, cluster_nats, nats_prefix, tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
async def module_database(pg_server_url: str) -> AsyncIterator[str]:
    """A database of its own for a module's shared cluster, dropped after the module."""
    url = await infra.create_database(pg_server_url)
    try:
        yield url
    finally:
        await infra.drop_database(pg_server_url, url)
