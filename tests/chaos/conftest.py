"""Fixtures for chaos tests: a real cluster of corral processes per test (as in tests/e2e)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import Cluster, running_cluster
from natsauth_infra import AuthNats


@pytest.fixture
def cluster(
    database_url: str, cluster_nats: AuthNats, nats_prefix: str, tmp_path: Path
) -> Iterator[Cluster]:
    with running_cluster(database_url, cluster_nats, nats_prefix, tmp_path) as c:
        yield c
