"""The openai-proxy backend, a real process, in front of a standalone sim and of a tiny upstream.

The tiny upstream runs in the test's own event loop, so a test can hold an answer (or wait for
an upload) until it has seen what the proxy passed on: that is how these tests tell streaming
from buffering, both ways. Every endpoint kind goes through: JSON, server-sent events,
multipart uploads (model field renamed on the way), binary audio, GET/DELETE by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fixtures.backend_procs import backend, tail

pytestmark = pytest.mark.slow

GATE_TIMEOUT = 30.0  # seconds the upstream holds an answer for the test (a failure if reached)


# --- a standalone sim upstream --------------------------------------------------------------


@contextlib.asynccontextmanager
async def sim_server(model: str, log: Path) -> AsyncIterator[str]:
    """A standalone `python -m corral.backends.sim --port 0`; yields its base URL."""
    with log.open("wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.backends.sim",
            "--port",
            "0",
            "--model",
            model,
            "--tokens",
            "6",
            "--log-level",
            "INFO",
            stdout=asyncio.subprocess.PIPE,
            stderr=logf,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        m = re.search(r"sim listening on (http://\S+)", line.decode())
        assert m, f"unexpected sim output {line!r}: {tail(log)}"
        yield m.group(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def test_openai_proxy_in_front_of_a_standalone_sim(tmp_path: Path) -> None:
    async with sim_server("upstream-model", tmp_path / "sim.log") as sim_url:
        options = {"upstream": sim_url + "/v1", "upstream_model": "upstream-model"}
        async with backend(
            "openai-proxy", tmp_path / "proxy.log", model="remote", options=options
        ) as base:
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k")
            try:
                models = await client.models.list()
                assert [m.id for m in models.data] == ["remote"]
                chat = await client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}]
                )
                assert chat.choices[0].message.content
                assert chat.usage is not None and chat.usage.completion_tokens == 6
                pieces = []
                stream = await client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for chunk in stream:
                    pieces += [c.delta.content for c in chunk.choices if c.delta.content]
                assert len(pieces) == 6
                assert "".join(pieces) == chat.choices[0].message.content
                completion = await client.completions.create(model="remote", prompt="hi")
                assert completion.choices[0].text
                emb = await client.embeddings.create(model="remote", input=["a", "b"])
                assert len(emb.data) == 2
                with pytest.raises(openai.NotFoundError) as info:
                    await client.chat.completions.create(
                        model="not-this-one", messages=[{"role": "user", "content": "hi"}]
                    )
                assert info.value.code == "model_not_found"
            finally:
                await client.close()


# --- a tiny upstream in the test's event loop -----------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """An OpenAI-ish server recording every request; gates let a test hold answers."""

    seen: list[Seen] = field(default_factory=list)
    sse_gate: asyncio.Event = field(default_factory=asyncio.Event)
    audio_gate: asyncio.Event = field(default_factory=asyncio.Event)
    upload_started: asyncio.Event = field(default_factory=asyncio.Event)
    gate_timeouts: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        post = ["POST"]
        return Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=post),
                Route("/v1/responses", self.responses, methods=post),
                Route("/v1/responses/{rid}", self.echo, methods=["GET", "DELETE"]),
                Route("/v1/audio/speech", self.speech, methods=post),
                Route("/v1/audio/transcriptions", self.upload, methods=post),
                Route("/v1/images/edits", self.upload, methods=post),
                *[
                    Route(path, self.echo, methods=post)
                    for path in (
                        "/v1/rerank",
                        "/rerank",
                        "/v2/rerank",
                        "/v1/score",
                        "/score",
                        "/v1/moderations",
                        "/v1/images/generations",
                        "/tokenize",
                        "/detokenize",
                        "/v1/audio/translations",
                    )
                ],
            ]
        )

    def record(self, request: Request, body: bytes) -> Seen:
        seen = Seen(
            request.method,
            request.url.path,
            dict(request.query_params),
            dict(request.headers),
            body,
        )
        self.seen.append(seen)
        return seen

    async def gate(self, event: asyncio.Event, name: str) -> None:
        try:
            await asyncio.wait_for(event.wait(), GATE_TIMEOUT)
        except TimeoutError:
            self.gate_timeouts.append(name)

    async def models(self, request: Request) -> Response:
        self.record(request, b"")
        return JSONResponse({"object": "list", "data": [{"id": "up", "object": "model"}]})

    async def echo(self, request: Request) -> Response:
        seen = self.record(request, await request.body())
        payload = json.loads(seen.body) if seen.body else {}
        return JSONResponse(
            {"path": seen.path, "method": seen.method, "model": payload.get("model")},
            headers={"x-upstream": "tiny"},
        )

    async def chat(self, request: Request) -> Response:
        body = await request.body()
        self.record(request, body)
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": json.loads(body).get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "captured"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def responses(self, request: Request) -> Response:
        body = await request.body()
        self.record(request, body)
        payload = json.loads(body)
        if not payload.get("stream"):
            return JSONResponse({"object": "response", "model": payload.get("model")})

        async def events() -> AsyncIterator[bytes]:
            yield b'event: response.created\ndata: {"type":"response.created"}\n\n'
            await self.gate(self.sse_gate, "sse")  # until the test has seen the first event
            yield b'event: response.completed\ndata: {"type":"response.completed"}\n\n'

        return StreamingResponse(events(), media_type="text/event-stream")

    async def speech(self, request: Request) -> Response:
        self.record(request, await request.body())

        async def audio() -> AsyncIterator[bytes]:
            yield b"ID3" + bytes(range(256)) * 128
            await self.gate(self.audio_gate, "audio")  # until the test has the first bytes
            yield bytes(range(255, -1, -1)) * 128

        return StreamingResponse(audio(), media_type="audio/mpeg")

    async def upload(self, request: Request) -> Response:
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                self.upload_started.set()
        except ClientDisconnect:
            self.record(request, bytes(body))
            raise
        seen = self.record(request, bytes(body))
        m = re.search(rb'name="model"\r\n\r\n([^\r]*)\r\n', seen.body)
        return JSONResponse(
            {
                "text": "transcribed",
                "model": m.group(1).decode() if m else None,
                "sha256": hashlib.sha256(seen.body).hexdigest(),
            }
        )


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """`app` on a free loopback port in this event loop; yields (base URL, server)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the upstream did not start"
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
        finally:
            server.should_exit = True
            await task


@contextlib.asynccontextmanager
async def proxied(
    tmp_path: Path, upstream: Upstream, **options: Any
) -> AsyncIterator[tuple[str, uvicorn.Server, Path]]:
    """The upstream, and an openai-proxy process (model `remote`) in front of it."""
    env = options.pop("env", None)
    async with serving(upstream.app()) as (url, server):
        log = tmp_path / "proxy.log"
        async with backend(
            "openai-proxy", log, model="remote", options={"upstream": url, **options}, env=env
        ) as base:
            yield base, server, log


# --- every endpoint kind --------------------------------------------------------------------

JSON_PATHS = [
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/score",
    "/score",
    "/v1/moderations",
    "/v1/images/generations",
    "/tokenize",
    "/detokenize",
]


async def test_json_endpoints_and_responses_by_id_go_upstream_renamed(tmp_path: Path) -> None:
    upstream = Upstream()
    async with (
        proxied(tmp_path, upstream, upstream_model="up") as (base, _, _),
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        for path in JSON_PATHS:
            r = await http.post(path, json={"model": "remote", "input": "x"})
            assert r.status_code == 200, (path, r.text)
            assert r.json() == {"path": path, "method": "POST", "model": "up"}, path
            assert r.headers["x-upstream"] == "tiny"  # answer headers pass through
        created = await http.post("/v1/responses", json={"model": "remote", "input": "hi"})
        assert created.json() == {"object": "response", "model": "up"}
        got = await http.get("/v1/responses/resp_7", params={"include": "usage"})
        deleted = await http.delete("/v1/responses/resp_7")
        assert got.json() == {"path": "/v1/responses/resp_7", "method": "GET", "model": None}
        assert deleted.json()["method"] == "DELETE"
        # the upstream's own name works too; another model, or a path that is no endpoint, not
        r = await http.post("/v1/score", json={"model": "up", "text_1": "a", "text_2": "b"})
        assert r.json()["model"] == "up"
        r = await http.post("/v1/rerank", json={"model": "other", "query": "q"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await http.post("/admin/stats", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    by_path = {(s.method, s.path): s for s in upstream.seen}
    assert by_path[("GET", "/v1/responses/resp_7")].query == {"include": "usage"}
    assert ("POST", "/admin/stats") not in by_path
    assert all(s.path != "/v1/rerank" or b'"other"' not in s.body for s in upstream.seen)


async def test_server_sent_events_pass_through_as_they_come(tmp_path: Path) -> None:
    upstream = Upstream()
    async with (
        proxied(tmp_path, upstream, upstream_model="up") as (base, _, _),
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):
        events: list[str] = []
        async with http.stream(
            "POST", "/v1/responses", json={"model": "remote", "input": "hi", "stream": True}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                    upstream.sse_gate.set()  # the upstream sends the rest only now
    assert events == ["response.created", "response.completed"]
    assert upstream.gate_timeouts == [], "the first event was held back by the proxy"


async def test_binary_audio_streams_back_as_it_arrives(tmp_path: Path) -> None:
    upstream = Upstream()
    async with (
        proxied(tmp_path, upstream, upstream_model="up") as (base, _, _),
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):
        audio = bytearray()
        body = {"model": "remote", "input": "hello", "voice": "alloy"}
        async with http.stream("POST", "/v1/audio/speech", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "audio/mpeg"
            async for chunk in r.aiter_bytes():
                audio += chunk
                upstream.audio_gate.set()  # the upstream sends the second half only now
    expected = b"ID3" + bytes(range(256)) * 128 + bytes(range(255, -1, -1)) * 128
    assert bytes(audio) == expected
    assert upstream.gate_timeouts == [], "the first bytes were held back by the proxy"
    (speech,) = [s for s in upstream.seen if s.path == "/v1/audio/speech"]
    assert json.loads(speech.body)["model"] == "up"


BOUNDARY = "corral-test-boundary-42"
FILE = bytes(range(256)) * 2048  # 512 KiB of "audio"


def upload_parts(model: str, *, model_first: bool) -> tuple[bytes, bytes]:
    """(head, rest) of a multipart upload: the head ends inside the file."""
    model_part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
    ).encode()
    file_head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    end = f"\r\n--{BOUNDARY}--\r\n".encode()
    if model_first:
        return model_part + file_head + FILE[:4096], FILE[4096:] + end
    return file_head + FILE[:4096], FILE[4096:] + b"\r\n" + model_part[:-2] + end


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "model-last"])
async def test_multipart_uploads_stream_upstream_with_the_model_renamed(
    tmp_path: Path, model_first: bool
) -> None:
    upstream = Upstream()
    head, rest = upload_parts("remote", model_first=model_first)
    held: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield head
        try:  # the rest only once the upstream has bytes: the proxy does not wait for all
            await asyncio.wait_for(upstream.upload_started.wait(), GATE_TIMEOUT)
        except TimeoutError:
            held.append("upload")
        yield rest

    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    async with (
        proxied(tmp_path, upstream, upstream_model="up") as (base, _, _),
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):
        r = await http.post(
            "/v1/audio/transcriptions", content=body(), headers={"content-type": content_type}
        )
        assert r.status_code == 200, r.text
        # the OpenAI SDK's own multipart body too
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        try:
            sdk = await client.audio.transcriptions.create(
                model="remote", file=("a.wav", FILE, "audio/wav")
            )
        finally:
            await client.close()
    assert held == [], "the proxy held the upload back until it had all of it"
    answer = r.json()
    assert answer["model"] == "up"
    sent = head + rest
    expected = sent.replace(b"\r\n\r\nremote\r\n", b"\r\n\r\nup\r\n")
    assert expected != sent
    assert answer["sha256"] == hashlib.sha256(expected).hexdigest()  # every other byte intact
    assert sdk.text == "transcribed"
    uploads = [s for s in upstream.seen if s.path == "/v1/audio/transcriptions"]
    assert len(uploads) == 2 and FILE in uploads[1].body
    assert b'name="model"\r\n\r\nup\r\n' in uploads[1].body


async def test_multipart_upload_for_another_model_is_refused(tmp_path: Path) -> None:
    upstream = Upstream()
    head, rest = upload_parts("someone-else", model_first=False)
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    async with (
        proxied(tmp_path, upstream) as (base, _, _),
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):
        r = await http.post(
            "/v1/images/edits", content=head + rest, headers={"content-type": content_type}
        )
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "model_not_found"
        # without a rename the body keeps its length and goes through as it is
        head, rest = upload_parts("remote", model_first=True)
        r = await http.post(
            "/v1/images/edits", content=head + rest, headers={"content-type": content_type}
        )
        assert r.status_code == 200 and r.json()["model"] == "remote"
    edits = [s for s in upstream.seen if s.path == "/v1/images/edits" and b"remote" in s.body]
    assert edits and edits[-1].headers.get("content-length") == str(len(head + rest))
    assert not any(
        b"someone-else" in s.body and len(s.body) == len(head + rest) for s in upstream.seen
    )


# --- credentials and health -----------------------------------------------------------------


async def test_openai_proxy_sends_its_api_key_upstream_and_never_logs_it(tmp_path: Path) -> None:
    upstream = Upstream()
    secret = "sk-test-very-secret-4711"
    async with proxied(
        tmp_path,
        upstream,
        upstream_model="up",
        api_key_env="CORRAL_TEST_UPSTREAM_KEY",
        log_level="DEBUG",
        env={"CORRAL_TEST_UPSTREAM_KEY": secret},
    ) as (base, _, log):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="client-key-for-corral")
        try:
            chat = await client.chat.completions.create(
                model="remote", messages=[{"role": "user", "content": "hi"}]
            )
        finally:
            await client.close()
        assert chat.choices[0].message.content == "captured"
    chats = [s for s in upstream.seen if s.path == "/v1/chat/completions"]
    health = [s for s in upstream.seen if s.path == "/v1/models"]
    assert len(chats) == 1 and health
    assert chats[0].headers["authorization"] == f"Bearer {secret}"
    assert all(s.headers["authorization"] == f"Bearer {secret}" for s in health)
    assert chat.model == "up"  # the upstream saw (and answered for) its own model name
    assert secret not in log.read_text(errors="replace")
    assert "client-key-for-corral" not in json.dumps([s.headers for s in upstream.seen])


async def test_openai_proxy_health_follows_the_upstream(tmp_path: Path) -> None:
    async with (
        proxied(tmp_path, Upstream()) as (base, server, _),
        httpx.AsyncClient(base_url=base, trust_env=False) as client,
    ):
        server.should_exit = True  # the upstream goes away
        deadline = time.monotonic() + 30
        while True:
            r = await client.get("/health")
            if r.status_code == 503:
                break
            assert time.monotonic() < deadline, "health never noticed the upstream left"
            await asyncio.sleep(0.1)
        r = await client.post("/v1/chat/completions", json={"model": "remote", "messages": []})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "upstream_error"
