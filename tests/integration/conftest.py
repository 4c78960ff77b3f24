"""Fixtures of the integration tests: in-process sim servers and clients for them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from simtest import StartSim

from corral.backends.sim import SimConfig, SimServer


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    servers: list[SimServer] = []

    async def start(**kw: Any) -> SimServer:
        server = SimServer(SimConfig(port=0, **kw))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def sim(start_sim: StartSim) -> SimServer:
    return await start_sim()


@pytest.fixture
async def http(sim: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as client:
        yield client


@pytest.fixture
async def oai(sim: SimServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    yield client
    await client.close()
