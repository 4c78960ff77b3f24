"""The simulator backend over real HTTP: OpenAI shapes, SSE framing, errors, admin, HTTP/1.1."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from simtest import CHAT, StartSim
from simtest import chat as _chat
from simtest import raw as _raw
from simtest import read_response as _read_response
from simtest import stats as _stats

from corral.backends.sim import SimConfig, SimServer
from corral.backends.sim.engine import decode_base64
from infra import apoll_until

# --- chat --------------------------------------------------------------------------------


async def test_chat_with_the_openai_client(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "tell me about corrals"}]
    first = await oai.chat.completions.create(model="demo", messages=messages)
    again = await oai.chat.completions.create(model="demo", messages=messages)
    other = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "something else"}]
    )
    assert first.object == "chat.completion" and first.model == "demo"
    assert first.id.startswith("chatcmpl-") and first.id != again.id
    text = first.choices[0].message.content
    assert text and text == again.choices[0].message.content
    assert text != other.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    assert first.choices[0].message.role == "assistant"
    assert first.usage is not None
    assert first.usage.prompt_tokens == 4
    assert first.usage.completion_tokens == 16 == len(text.split())
    assert first.usage.total_tokens == 20


async def test_max_tokens_caps_output(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "x"}]
    full = await oai.chat.completions.create(model="demo", messages=messages)
    short = await oai.chat.completions.create(model="demo", messages=messages, max_tokens=5)
    newer = await oai.chat.completions.create(
        model="demo", messages=messages, max_completion_tokens=3
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5
    assert newer.usage is not None and newer.usage.completion_tokens == 3
    full_text = full.choices[0].message.content or ""
    assert full_text.startswith(short.choices[0].message.content or "-")


async def test_seed_changes_text(start_sim: StartSim) -> None:
    texts = []
    for seed in (1, 2):
        server = await start_sim(seed=seed)
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post(CHAT, json=_chat("same"))
        texts.append(response.json()["choices"][0]["message"]["content"])
    assert texts[0] != texts[1]


# --- streaming ---------------------------------------------------------------------------


async def test_stream_with_the_openai_client(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "stream please"}]
    plain = await oai.chat.completions.create(model="demo", messages=messages, max_tokens=6)
    stream = await oai.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


async def test_sse_framing_exactly(http: httpx.AsyncClient) -> None:
    response = await http.post(CHAT, json=_chat("frame", stream=True, max_tokens=3))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    raw = response.content
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    events = events[:-1]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 1 + 3 + 1  # role, tokens, finish; no usage chunk unless asked
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("content" in c["choices"][0]["delta"] for c in chunks[1:4])
    assert chunks[4]["choices"][0]["delta"] == {}
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1

    with_usage = await http.post(
        CHAT,
        json=_chat("frame", stream=True, max_tokens=3, stream_options={"include_usage": True}),
    )
    events = with_usage.content.split(b"\n\n")[:-1]
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 4


async def test_stream_timing(start_sim: StartSim) -> None:
    server = await start_sim(ttft=0.2, tpot=0.05, tokens=5)
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", CHAT, json=_chat("t", stream=True)) as response,
    ):
        start = time.monotonic()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5
    assert arrivals[0] >= 0.15  # ttft before the first token
    assert arrivals[-1] - arrivals[0] >= 4 * 0.05 * 0.8  # tpot between tokens


async def test_port_in_use_raises(sim: SimServer) -> None:
    clash = SimServer(SimConfig(port=sim.port, load_time=30))
    with pytest.raises(OSError):
        await clash.start()
    await clash.stop()  # a server that never started stops as a no-op
    assert sim.stats()["loaded"] is True


async def test_non_stream_timing(start_sim: StartSim) -> None:
    server = await start_sim(ttft=0.1, tpot=0.05, tokens=3)
    async with httpx.AsyncClient(base_url=server.url) as client:
        start = time.monotonic()
        response = await client.post(CHAT, json=_chat("t"))
        elapsed = time.monotonic() - start
    assert response.status_code == 200
    assert elapsed >= 0.19  # ttft + 2 * tpot


# --- completions and embeddings ----------------------------------------------------------


async def test_completions(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.completions.create(model="demo", prompt="once upon a time", max_tokens=4)
    assert plain.object == "text_completion"
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.prompt_tokens == 4
    assert plain.usage.completion_tokens == 4
    stream = await oai.completions.create(
        model="demo", prompt="once upon a time", max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_embeddings(oai: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    # The openai client asks for base64 and decodes it itself.
    result = await oai.embeddings.create(model="demo", input=["hello", "world"])
    assert [d.index for d in result.data] == [0, 1]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] != vectors[1]
    assert result.usage.prompt_tokens == 2

    floats = (await http.post("/v1/embeddings", json={"model": "demo", "input": "hello"})).json()
    b64 = (
        await http.post(
            "/v1/embeddings",
            json={"model": "demo", "input": "hello", "encoding_format": "base64"},
        )
    ).json()
    plain = floats["data"][0]["embedding"]
    assert decode_base64(b64["data"][0]["embedding"]) == pytest.approx(plain, rel=1e-6, abs=1e-7)
    assert vectors[0] == pytest.approx(plain, rel=1e-6, abs=1e-7)

    small = await oai.embeddings.create(model="demo", input=[[1, 2, 3]], dimensions=8)
    assert len(small.data[0].embedding) == 8
    assert small.usage.prompt_tokens == 3


# --- errors ------------------------------------------------------------------------------


async def test_bad_requests(http: httpx.AsyncClient) -> None:
    cases: list[tuple[str, bytes]] = [
        (CHAT, b"{not json"),
        (CHAT, b"[]"),
        (CHAT, b'{"model": "demo"}'),
        ("/v1/completions", b'{"model": "demo"}'),
        ("/v1/embeddings", b'{"model": "demo"}'),
        (CHAT, orjson.dumps(_chat("x", max_tokens="lots"))),
    ]
    for path, body in cases:
        response = await http.post(path, content=body)
        assert response.status_code == 400, (path, body)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    stats = await _stats(http)
    assert stats["requests"] == 0


async def test_openai_client_sees_bad_request(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(model="demo", messages=[])
    assert info.value.status_code == 400


async def test_unknown_path_and_wrong_method(http: httpx.AsyncClient) -> None:
    missing = await http.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = await http.get(CHAT)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert (await http.post("/health")).status_code == 405


async def test_body_too_large(start_sim: StartSim, http: httpx.AsyncClient) -> None:
    default_limit = await http.post(CHAT, content=b"x" * (16 * 1024 * 1024 + 1))
    assert default_limit.status_code == 413
    assert default_limit.json()["error"]["code"] == "payload_too_large"
    # The connection stays usable after the refused body.
    assert (await http.get("/health")).status_code == 200

    small = await start_sim(max_body=100)
    async with httpx.AsyncClient(base_url=small.url) as client:
        assert (await client.post(CHAT, json=_chat("ok"))).status_code == 200
        refused = await client.post(CHAT, json=_chat("x" * 200))
        assert refused.status_code == 413


async def test_model_mismatch(http: httpx.AsyncClient, oai: openai.AsyncOpenAI) -> None:
    response = await http.post(CHAT, json={**_chat("x"), "model": "other"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert "'demo'" in error["message"] and "'other'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        await oai.embeddings.create(model="other", input="x")


async def test_chunked_request_body(http: httpx.AsyncClient) -> None:
    payload = orjson.dumps(_chat("chunked body"))

    async def parts() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    chunked = await http.post(CHAT, content=parts())
    plain = await http.post(CHAT, content=payload)
    assert chunked.status_code == 200
    assert chunked.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


# --- lifecycle and admin -----------------------------------------------------------------


async def test_load_time(start_sim: StartSim) -> None:
    server = await start_sim(load_time=0.5)
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = await client.post(CHAT, json=_chat("x"))
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "model_loading"
        assert (await client.get("/v1/models")).json()["data"] == []

        async def healthy() -> bool:
            return (await client.get("/health")).status_code == 200

        await apoll_until(healthy, timeout=5, interval=0.01)
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.post(CHAT, json=_chat("x"))).status_code == 200


async def test_unload_and_load_switch(http: httpx.AsyncClient, oai: openai.AsyncOpenAI) -> None:
    models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("demo", "model", "corral-sim")
    ]

    assert (await http.post("/admin/unload")).json()["loaded"] is False
    assert (await http.get("/health")).status_code == 200  # a live process, no model
    assert (await http.get("/v1/models")).json()["data"] == []
    refused = await http.post(CHAT, json=_chat("x"))
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "model_not_found"
    assert refused.json()["error"]["message"] == "model 'demo' is not loaded"
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="demo", prompt="x")
    assert (await _stats(http))["loaded"] is False

    assert (await http.post("/admin/load")).json()["loaded"] is True
    assert (await http.post(CHAT, json=_chat("x"))).status_code == 200
    assert len((await http.get("/v1/models")).json()["data"]) == 1


async def test_starts_unloaded(start_sim: StartSim) -> None:
    server = await start_sim(unloaded=True)
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.post(CHAT, json=_chat("x"))).status_code == 404
        assert (await _stats(client))["loaded"] is False


async def test_stats_counts_successful_inference(http: httpx.AsyncClient) -> None:
    before = await _stats(http)
    assert before == {
        "model": "demo",
        "loaded": True,
        "loading": False,
        "requests": 0,
        "inflight": 0,
        "peak_inflight": 0,
        "fingerprint": SimConfig().system_fingerprint,
        "engine": None,
    }
    await http.post(CHAT, json=_chat("a"))
    await http.post(CHAT, json=_chat("a", stream=True))
    await http.post("/v1/completions", json={"prompt": "a"})
    await http.post("/v1/embeddings", json={"input": "a"})
    await http.post(CHAT, json={**_chat("a"), "model": "nope"})  # 404: not counted
    await http.get("/health")  # not inference
    assert (await _stats(http))["requests"] == 4


# --- HTTP/1.1 behaviour ------------------------------------------------------------------


async def test_keep_alive_many_requests_one_connection(sim: SimServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        body = orjson.dumps(_chat("keep"))
        texts = set()
        for _ in range(50):
            writer.write(_raw("POST", CHAT, body))
            status, headers, payload = await _read_response(reader)
            assert status == 200 and "connection" not in headers
            texts.add(orjson.loads(payload)["choices"][0]["message"]["content"])
        assert len(texts) == 1
        assert sim.open_connections == 1  # one connection served all fifty
    finally:
        writer.close()
        await writer.wait_closed()


async def test_connection_close_is_honoured(sim: SimServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(_raw("GET", "/health", headers="Connection: close\r\n"))
        status, headers, _ = await _read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed its side
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("ttft", [0.0, 0.05])
async def test_pipelined_requests_answer_in_order(start_sim: StartSim, ttft: float) -> None:
    server = await start_sim(ttft=ttft)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            _raw("POST", CHAT, orjson.dumps(_chat("first")))
            + _raw("POST", CHAT, orjson.dumps(_chat("second", stream=True, max_tokens=2)))
            + _raw("GET", "/health")
            + _raw("POST", "/v1/completions", orjson.dumps({"prompt": "third"}))
        )
        first = await _read_response(reader)
        second = await _read_response(reader)
        third = await _read_response(reader)
        fourth = await _read_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()
    assert orjson.loads(first[2])["object"] == "chat.completion"
    assert second[1]["content-type"] == "text/event-stream"
    assert second[2].endswith(b"data: [DONE]\n\n")
    assert orjson.loads(third[2]) == {"status": "ok"}
    assert orjson.loads(fourth[2])["object"] == "text_completion"


async def test_malformed_http_gets_400_and_close(sim: SimServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(b"NOT-HTTP\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 400 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_client_disconnect_mid_stream(
    start_sim: StartSim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = await start_sim(tpot=0.05, tokens=200)
    async with httpx.AsyncClient(base_url=server.url) as admin:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_raw("POST", CHAT, orjson.dumps(_chat("long", stream=True))))
        await reader.readuntil(b'"content":"')  # streaming has begun
        assert (await _stats(admin))["inflight"] == 1
        writer.close()
        await writer.wait_closed()

        async def drained() -> bool:
            inflight: int = (await _stats(admin))["inflight"]
            return inflight == 0

        await apoll_until(drained, timeout=5, interval=0.01)

        async def closed() -> bool:
            return server.open_connections == 1  # only the admin client's

        await apoll_until(closed, timeout=5, interval=0.01)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_stop_with_a_stream_in_flight(start_sim: StartSim) -> None:
    server = await start_sim(tpot=0.05, tokens=200)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    idle_writer.write(_raw("GET", "/health"))
    assert (await _read_response(idle_reader))[0] == 200  # now an idle keep-alive connection
    writer.write(_raw("POST", CHAT, orjson.dumps(_chat("long", stream=True))))
    await reader.readuntil(b'"content":"')
    assert server.open_connections == 2
    await asyncio.wait_for(server.stop(), 5)
    assert server.stats()["inflight"] == 0 and server.open_connections == 0
    assert await asyncio.wait_for(reader.read(), 5)  # rest of what was sent, then EOF
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    for w in (writer, idle_writer):
        w.close()
        await w.wait_closed()


async def test_http10_and_expect_continue(sim: SimServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"

        body = orjson.dumps(_chat("continue"))
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: sim\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert (await _read_response(reader))[0] == 200

        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


# --- the command line --------------------------------------------------------------------


async def test_cli_process_serves_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.backends.sim",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--model",
        "cli-model",
        "--tokens",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("sim listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post(
                CHAT, json={"model": "cli-model", "messages": [{"role": "user", "content": "x"}]}
            )
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert b"Traceback" not in await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
