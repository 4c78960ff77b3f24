"""Fixtures of the in-process tier: one cluster (frontends, fake workers) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from harness import InProcessCluster


@pytest.fixture
async def cluster(
    database_url: str, nats_url: str, nats_prefix: str
) -> AsyncIterator[InProcessCluster]:
    c = InProcessCluster(database_url, nats_url, nats_prefix)
    await c.events.open()
    try:
        yield c
    finally:
        await c.close()
