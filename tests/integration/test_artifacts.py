"""Artifact transfer from a frontend model store to a worker, over real HTTP (uvicorn)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from corral.errors import ArtifactError, BadRequest, NotFound
from corral.frontend.artifacts_api import (
    ArtifactStore,
    artifact_info,
    artifact_router,
    parse_range,
    resolve_artifact,
)
from corral.worker.artifacts import ArtifactStager, StageProgress
from infra import apoll_until

SIZE = 3 * 1024 * 1024 + 123  # several 1 MiB chunks, not a multiple of one
CUT = 300_000  # where a dropped transfer breaks off


@dataclass
class Behaviour:
    """What the test server does to the next responses (set by a test, reset per test)."""

    drop_after: list[int] = field(default_factory=list)  # per response: bytes sent, then drop
    corrupt: bool = False  # flip a byte in every body (digest header unchanged)
    ignore_range: bool = False  # act as a server without Range support
    requests: list[dict[str, str | None]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


class Faulty:
    """ASGI middleware that records requests and can break or corrupt response bodies."""

    def __init__(self, app: Any, behaviour: Behaviour) -> None:
        self.app = app
        self.b = behaviour

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.b.requests.append(
            {
                "path": scope["path"],
                "range": headers.get("range"),
                "if-range": headers.get("if-range"),
            }
        )
        if self.b.ignore_range:
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0].lower() != b"range"]}
        drop = self.b.drop_after.pop(0) if self.b.drop_after else None
        sent = 0
        flipped = False

        async def wrapped(message: Any) -> None:
            nonlocal sent, flipped
            if message["type"] == "http.response.start":
                self.b.statuses.append(message["status"])
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if self.b.corrupt and body and not flipped:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                    flipped = True
                    message = {**message, "body": body}
                if drop is not None and sent + len(body) > drop:
                    await send({**message, "body": body[: drop - sent], "more_body": True})
                    raise ConnectionAbortedError("test server drops the connection")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, wrapped)


@dataclass
class StoreServer:
    url: str
    store: Path
    behaviour: Behaviour
    data: bytes
    digest: str

    def file_url(self, rel: str = "models/tiny.gguf") -> str:
        return f"{self.url}/api/artifacts/{rel}"


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StoreServer]:
    store = tmp_path_factory.mktemp("store")
    (store / "models").mkdir()
    data = os.urandom(SIZE)
    (store / "models" / "tiny.gguf").write_bytes(data)
    (store / "small.bin").write_bytes(b"0123456789")
    behaviour = Behaviour()
    app = FastAPI()
    app.include_router(artifact_router(store))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(Faulty(app, behaviour), log_level="critical", lifespan="off")
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    await apoll_until(lambda: srv.started, timeout=10, interval=0.01, what="the test server")
    try:
        yield StoreServer(
            f"http://127.0.0.1:{port}", store, behaviour, data, hashlib.sha256(data).hexdigest()
        )
    finally:
        srv.should_exit = True
        await task
        sock.close()


@pytest.fixture
def srv(server: StoreServer) -> StoreServer:
    b = server.behaviour
    b.drop_after.clear()
    b.requests.clear()
    b.statuses.clear()
    b.corrupt = False
    b.ignore_range = False
    return server


def stager(tmp_path: Path, **kwargs: Any) -> ArtifactStager:
    return ArtifactStager(tmp_path / "cache", headroom=0, **kwargs)


async def test_stage_downloads_verifies_and_caches_by_digest(
    srv: StoreServer, tmp_path: Path
) -> None:
    events: list[StageProgress] = []

    async def publish(e: StageProgress) -> None:
        events.append(e)

    s = stager(tmp_path, publish=publish, progress_interval=0.0)
    path = await s.stage(
        "models/tiny.gguf", url=srv.file_url(), digest=srv.digest, size=len(srv.data)
    )
    assert path == tmp_path / "cache" / "blobs" / srv.digest / "tiny.gguf"
    assert path.read_bytes() == srv.data
    assert s.held() == [srv.digest]
    assert not list((tmp_path / "cache" / "partial").iterdir())
    assert len(srv.behaviour.requests) == 1
    downloading = [e for e in events if e.phase == "downloading"]
    assert downloading and downloading[-1].total == SIZE
    assert events[-1].phase == "staged" and events[-1].percent == 100.0

    # A cached digest is never fetched again, also by a new stager (a restarted worker).
    again = await stager(tmp_path).stage(
        "models/tiny.gguf", url=srv.file_url(), digest="sha256:" + srv.digest, size=None
    )
    assert again == path
    assert len(srv.behaviour.requests) == 1


async def test_interrupted_transfer_resumes_with_range(srv: StoreServer, tmp_path: Path) -> None:
    srv.behaviour.drop_after.append(CUT)
    path = await stager(tmp_path).stage(
        "models/tiny.gguf", url=srv.file_url(), digest=srv.digest, size=SIZE
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == srv.digest
    first, second = srv.behaviour.requests
    assert first["range"] is None
    assert second["range"] is not None
    offset = int(second["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= CUT
    assert second["if-range"] == f'"{srv.digest}"'
    assert srv.behaviour.statuses == [200, 206]


async def test_server_without_range_support_means_starting_over(
    srv: StoreServer, tmp_path: Path
) -> None:
    srv.behaviour.drop_after.append(CUT)
    srv.behaviour.ignore_range = True
    path = await stager(tmp_path).stage("models/tiny.gguf", url=srv.file_url(), digest=srv.digest)
    assert path.read_bytes() == srv.data
    assert srv.behaviour.statuses == [200, 200]
    assert srv.behaviour.requests[1]["range"] is not None  # asked, but got the whole file


async def test_whole_partial_file_is_verified_without_a_transfer(
    srv: StoreServer, tmp_path: Path
) -> None:
    """A worker that died between download and commit: the next stage only checks."""
    partial = tmp_path / "cache" / "partial" / srv.digest
    partial.parent.mkdir(parents=True)
    partial.write_bytes(srv.data)
    path = await stager(tmp_path).stage(
        "models/tiny.gguf", url=srv.file_url(), digest=srv.digest, size=SIZE
    )
    assert path.read_bytes() == srv.data
    assert srv.behaviour.requests[0]["range"] == f"bytes={SIZE}-"
    assert srv.behaviour.statuses == [416]


async def test_partial_file_survives_a_failed_stage_and_is_resumed_later(
    srv: StoreServer, tmp_path: Path
) -> None:
    srv.behaviour.drop_after.append(CUT)
    with pytest.raises(ArtifactError, match="bytes kept to resume"):
        await stager(tmp_path, retries=0).stage(
            "models/tiny.gguf", url=srv.file_url(), digest=srv.digest
        )
    partial = tmp_path / "cache" / "partial" / srv.digest
    kept = partial.stat().st_size
    assert 0 < kept <= CUT
    # A new stager (the worker restarted) resumes where the file ends.
    path = await stager(tmp_path).stage("models/tiny.gguf", url=srv.file_url(), digest=srv.digest)
    assert path.read_bytes() == srv.data
    assert srv.behaviour.requests[-1]["range"] == f"bytes={kept}-"
    assert not partial.exists()


async def test_digest_mismatch_leaves_no_blob(srv: StoreServer, tmp_path: Path) -> None:
    srv.behaviour.corrupt = True
    s = stager(tmp_path)
    with pytest.raises(ArtifactError, match="does not match"):
        await s.stage("models/tiny.gguf", url=srv.file_url(), digest=srv.digest, size=SIZE)
    assert s.blob(srv.digest) is None
    assert s.held() == []
    assert not (tmp_path / "cache" / "partial" / srv.digest).exists()


async def test_digest_the_frontend_no_longer_has_is_refused_before_download(
    srv: StoreServer, tmp_path: Path
) -> None:
    other = hashlib.sha256(b"another version").hexdigest()
    s = stager(tmp_path)
    with pytest.raises(ArtifactError, match="changed on the frontend"):
        await s.stage("models/tiny.gguf", url=srv.file_url(), digest=other)
    assert s.held() == []
    partial = tmp_path / "cache" / "partial" / other
    assert not partial.exists() or partial.stat().st_size == 0


@pytest.mark.parametrize("known_size", [True, False])
async def test_not_enough_disk_fails_before_writing(
    srv: StoreServer, tmp_path: Path, known_size: bool
) -> None:
    asked: list[Path] = []

    def free_space(path: Path) -> int:
        asked.append(path)
        return 1_000_000

    s = ArtifactStager(tmp_path / "cache", headroom=1000, free_space=free_space)
    with pytest.raises(ArtifactError, match=r"needs 3\.1 MB .* 1\.0 MB free") as info:
        await s.stage(
            "models/tiny.gguf",
            url=srv.file_url(),
            digest=srv.digest,
            size=SIZE if known_size else None,
        )
    assert "not enough disk space" in str(info.value)
    assert asked
    # Known size: refused before any request; unknown: after the headers, before a byte.
    assert len(srv.behaviour.requests) == (0 if known_size else 1)
    partial = tmp_path / "cache" / "partial" / srv.digest
    assert not partial.exists()


async def test_identical_concurrent_stages_share_one_download(
    srv: StoreServer, tmp_path: Path
) -> None:
    s = stager(tmp_path)
    paths = await asyncio.gather(
        *(s.stage("models/tiny.gguf", url=srv.file_url(), digest=srv.digest) for _ in range(4))
    )
    assert len(set(paths)) == 1
    assert len(srv.behaviour.requests) == 1


async def test_shared_storage_paths_are_used_in_place(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    s = stager(tmp_path)
    assert await s.stage(str(f)) == f
    with pytest.raises(ArtifactError, match="does not exist"):
        await s.stage(str(tmp_path / "missing.bin"))
    with pytest.raises(ArtifactError, match="absolute path"):
        await s.stage("relative/model.bin")
    with pytest.raises(ArtifactError, match="invalid hub reference"):
        await s.stage("hf://only-an-org")
    assert s.held() == []


# --- the frontend's endpoint on its own -----------------------------------------------------


async def test_endpoint_ranges_etag_and_head(srv: StoreServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as client:
        head = await client.head("/api/artifacts/small.bin")
        digest = hashlib.sha256(b"0123456789").hexdigest()
        assert head.status_code == 200
        assert head.headers["content-length"] == "10"
        assert head.headers["x-corral-digest"] == digest
        assert head.headers["etag"] == f'"{digest}"'
        assert head.content == b""

        r = await client.get("/api/artifacts/small.bin", headers={"Range": "bytes=2-4"})
        assert (r.status_code, r.content, r.headers["content-range"]) == (
            206,
            b"234",
            "bytes 2-4/10",
        )
        r = await client.get("/api/artifacts/small.bin", headers={"Range": "bytes=-3"})
        assert (r.status_code, r.content) == (206, b"789")
        r = await client.get("/api/artifacts/small.bin", headers={"Range": "bytes=7-"})
        assert (r.status_code, r.content) == (206, b"789")
        r = await client.get("/api/artifacts/small.bin", headers={"Range": "bytes=10-"})
        assert (r.status_code, r.headers["content-range"]) == (416, "bytes */10")
        # If-Range with another version: the whole file.
        r = await client.get(
            "/api/artifacts/small.bin", headers={"Range": "bytes=2-4", "If-Range": '"old"'}
        )
        assert (r.status_code, r.content) == (200, b"0123456789")
        r = await client.get(
            "/api/artifacts/small.bin", headers={"Range": "bytes=2-4", "If-Range": f'"{digest}"'}
        )
        assert r.status_code == 206


async def test_endpoint_refuses_paths_outside_the_store(srv: StoreServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = srv.store / "escape.txt"
    if not link.exists():
        link.symlink_to(secret)
    async with httpx.AsyncClient(base_url=srv.url) as client:
        for path in ("/api/artifacts/%2e%2e/secret.txt", "/api/artifacts/models/%2e%2e/%2e%2e/x"):
            r = await client.get(path)
            assert r.status_code == 400, path
            assert r.json()["error"]["code"] == "invalid_request"
        for path in ("/api/artifacts/escape.txt", "/api/artifacts/models", "/api/artifacts/nope"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert b"secret" not in r.content


async def test_artifact_info_and_store_digest_cache(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    assert artifact_info(tmp_path, "a.bin") == (3, hashlib.sha256(b"abc").hexdigest())
    store = ArtifactStore(tmp_path)
    first = await store.info("a.bin")
    assert first.digest == hashlib.sha256(b"abc").hexdigest()
    f.write_bytes(b"abcd")  # another size (and mtime): digested again
    assert (await store.info("a.bin")).digest == hashlib.sha256(b"abcd").hexdigest()
    with pytest.raises(BadRequest):
        resolve_artifact(tmp_path, "../a.bin")
    with pytest.raises(NotFound):
        resolve_artifact(tmp_path, "b.bin")


def test_parse_range() -> None:
    cases: list[tuple[str | None, tuple[int, int] | None]] = [
        (None, None),
        ("bytes=0-0", (0, 0)),
        ("bytes=5-", (5, 9)),
        ("bytes=5-100", (5, 9)),
        ("bytes=-4", (6, 9)),
        ("bytes=-100", (0, 9)),
        ("bytes=0-1,3-4", None),  # several ranges: whole file
        ("items=0-1", None),
        ("bytes=4-2", None),
    ]
    for header, expected in cases:
        assert parse_range(header, 10) == expected, header
