"""The headers a backend sees: what a client sends through the proxy, as a tiny backend records
them (custom and trace headers pass; credentials, hop-by-hop and Corral's own do not)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
from harness import InProcessCluster, client, declare

from factories import model

ANSWER = orjson.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
    }
)


class RecordingBackend:
    """An OpenAI-shaped HTTP/1.1 server that answers every request alike and keeps the headers
    of each POST it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in filter(None, lines):
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                if request_line.startswith("GET /v1/models"):
                    body = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'
                else:
                    self.seen.append(headers)
                    body = ANSWER
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def recording_backend() -> AsyncIterator[RecordingBackend]:
    backend = RecordingBackend()
    try:
        yield backend
    finally:
        await backend.close()


async def test_the_backend_sees_custom_headers_but_no_credentials_or_control_headers(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend(forward_headers=["anthropic-version"])
    worker = await cluster.worker(fe, "n1")
    async with recording_backend() as backend:
        address = await backend.start()

        async def run(model: str, index: int, options: object = None) -> str:
            return address

        worker.run = run  # type: ignore[method-assign]
        await declare(fe, model("m"))
        sent = {
            "authorization": "Bearer sk-client-secret",
            "x-api-key": "sk-client-secret",
            "x-session-id": "s-42",
            "x-stainless-lang": "python",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "openai-organization": "org-1",
            "anthropic-version": "2023-06-01",
            "x-corral-priority": "high",
            "x-hop": "1",
            "connection": "keep-alive, x-hop",
            "cookie": "session=1",
        }
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with client(fe) as c:
            answer = await c.post("/v1/chat/completions", json=body, headers=sent)
        assert answer.status_code == 200, answer.text
    (seen,) = backend.seen
    for name in (
        "x-session-id",
        "x-stainless-lang",
        "traceparent",
        "openai-organization",
        "anthropic-version",
    ):
        assert seen.get(name) == sent[name], name
    for name in ("authorization", "x-api-key", "x-corral-priority", "x-hop", "cookie"):
        assert name not in seen, name
    assert seen["content-type"] == "application/json"
    assert "sk-client-secret" not in repr(seen)
