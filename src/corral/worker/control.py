"""The worker's HTTP client to a frontend: register, heartbeat, report exits, deregister."""

from __future__ import annotations

from typing import Any

import httpx

from corral.errors import Forbidden, FrontendUnreachable, NotFound, Unauthorized


class ControlClient:
    """Talks to the frontend at `join_url` as one node."""

    def __init__(self, join_url: str, *, timeout: float = 10.0) -> None:
        self.join_url = join_url.rstrip("/")
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.join_url, timeout=self.timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def register(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post("/api/nodes/register", token, body)

    async def heartbeat(
        self, node_id: str, credential: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._post(f"/api/nodes/{node_id}/heartbeat", credential, body)

    async def replica_exited(
        self, node_id: str, credential: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return await self._post(f"/api/nodes/{node_id}/replica-exited", credential, body)

    async def drain(self, node_id: str, credential: str) -> dict[str, Any]:
        return await self._post(f"/api/nodes/{node_id}/self-drain", credential, {})

    async def deregister(self, node_id: str, credential: str) -> dict[str, Any]:
        return await self._post(f"/api/nodes/{node_id}/deregister", credential, {})

    async def _post(self, path: str, secret: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.client.post(
                path, json=body, headers={"authorization": f"Bearer {secret}"}
            )
        except httpx.HTTPError as exc:
            raise FrontendUnreachable(f"frontend {self.join_url} unreachable: {exc!r}") from None
        if response.status_code < 300:
            data: dict[str, Any] = response.json()
            return data
        message = _message(response)
        if response.status_code == 401:
            raise Unauthorized(message)
        if response.status_code == 403:
            raise Forbidden(message)
        if response.status_code == 404:
            raise NotFound(message)
        raise FrontendUnreachable(f"frontend answered {response.status_code}: {message}")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
