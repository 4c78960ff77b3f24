"""The sim's engine model, fingerprint, peak concurrency and /metrics over real HTTP.

Timing assertions are lower bounds only (a loaded machine makes things slower, never faster)
and state is polled with a deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import orjson
from simtest import CHAT, StartSim, chat, raw, stats

from corral.backends.sim import SimConfig, SimServer
from infra import apoll_until


def _metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value} for the model_name="demo" samples."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            name, labels = sample.split("{", 1)
            assert labels == 'model_name="demo"}'
            out[name] = float(value)
    return out


async def _engine(client: httpx.AsyncClient) -> dict[str, Any]:
    engine: dict[str, Any] = (await stats(client))["engine"]
    return engine


# --- the engine model --------------------------------------------------------------------


async def test_requests_queue_behind_the_slots(start_sim: StartSim) -> None:
    server = await start_sim(slots=1, decode_base=0.05, tokens=4)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        start = time.monotonic()
        calls = [asyncio.create_task(client.post(CHAT, json=chat(f"q{i}"))) for i in range(3)]

        async def queued() -> bool:
            engine = await _engine(client)
            return engine["running"] == 1 and engine["waiting"] == 2

        await apoll_until(queued)
        gauges = _metrics((await client.get("/metrics")).text)
        assert gauges["vllm:num_requests_running"] == 1.0
        assert gauges["vllm:num_requests_waiting"] == 2.0
        assert gauges["vllm:kv_cache_usage_perc"] > 0
        assert gauges["vllm:gpu_cache_usage_perc"] == gauges["vllm:kv_cache_usage_perc"]
        answers = await asyncio.gather(*calls)
        elapsed = time.monotonic() - start
        assert all(a.status_code == 200 for a in answers)
        assert elapsed >= 3 * 3 * 0.05 * 0.9  # one at a time: 3 decode steps each
        after = await stats(client)
        assert after["engine"]["peak_running"] == 1 and after["peak_inflight"] == 3
        assert after["engine"]["finished"] == 3 and after["requests"] == 3
        assert (after["engine"]["running"], after["engine"]["waiting"]) == (0, 0)
        reset = (await client.post("/admin/reset-peak")).json()
        assert reset["peak_inflight"] == 0 and reset["engine"]["peak_running"] == 0


async def test_prefix_cache_hits_show_in_usage_stats_and_metrics(start_sim: StartSim) -> None:
    server = await start_sim(slots=2, block_tokens=4, prefill_per_token=0.001)
    system = {"role": "system", "content": "You are a helpful corral assistant. " * 8}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        first = await client.post(
            CHAT, json={"messages": [system, {"role": "user", "content": "first question"}]}
        )
        second = await client.post(
            CHAT, json={"messages": [system, {"role": "user", "content": "another one"}]}
        )
        u1, u2 = first.json()["usage"], second.json()["usage"]
        assert u1["prompt_tokens_details"] == {"cached_tokens": 0}
        shared = len(f"system: {system['content']}\nuser: ".encode()) // 16 * 4  # whole blocks
        assert u2["prompt_tokens_details"]["cached_tokens"] == shared > 0
        rendered = f"system: {system['content']}\nuser: first question\n".encode()
        assert u1["prompt_tokens"] == -(-len(rendered) // 4)  # 4 bytes = 1 token
        engine = await _engine(client)
        assert engine["prefix_cache_hits"] == shared
        assert engine["prefix_cache_queries"] == u1["prompt_tokens"] + u2["prompt_tokens"]
        assert (engine["prefix_cache_requests"], engine["prefix_cache_hit_requests"]) == (2, 1)
        assert engine["prefix_cache_hit_rate"] == shared / engine["prefix_cache_queries"]
        counters = _metrics((await client.get("/metrics")).text)
        assert counters["vllm:prefix_cache_hits_total"] == shared
        assert counters["vllm:prefix_cache_queries_total"] == engine["prefix_cache_queries"]


async def test_prefill_time_and_nothing_sent_before_the_first_token(start_sim: StartSim) -> None:
    server = await start_sim(slots=4, prefill_per_token=0.0005, decode_base=0.02, tokens=5)
    prompt = "z" * 4000  # about 1000 tokens: 0.5 s of prefill
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        start = time.monotonic()
        async with client.stream("POST", CHAT, json=chat(prompt, stream=True)) as response:
            headers_after = time.monotonic() - start
            body = (await response.aread()).decode()
        cold = time.monotonic() - start
        assert headers_after >= 0.45  # the head went out with the first token
        assert body.count('"content":"') == 5 + 1 and body.endswith("data: [DONE]\n\n")
        start = time.monotonic()
        warm = await client.post(CHAT, json=chat(prompt))
        assert time.monotonic() - start < cold  # the prompt is cached now
        assert warm.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 900


async def test_completions_responses_and_embeddings_go_through_the_engine(
    start_sim: StartSim,
) -> None:
    server = await start_sim(slots=1, tokens=3)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        text = await client.completions.create(model="demo", prompt="once upon a time")
        assert text.usage is not None and text.usage.prompt_tokens == 4  # 16 bytes
        streamed = await client.completions.create(model="demo", prompt="once", stream=True)
        assert len([c async for c in streamed]) == 3 + 1
        response = await client.responses.create(model="demo", input="hello")
        assert response.usage is not None and response.usage.output_tokens == 3
        stream = await client.responses.create(model="demo", input="hello", stream=True)
        kinds = [e.type async for e in stream]
        assert kinds.count("response.output_text.delta") == 3
        assert kinds[-1] == "response.completed"
        vectors = await client.embeddings.create(model="demo", input=["a", "b"])
        assert len(vectors.data) == 2
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=server.url) as http:
        engine = await _engine(http)
    assert engine["finished"] == 5  # the embeddings request too, as a prefill only


async def test_clients_that_leave_free_their_place(start_sim: StartSim) -> None:
    server = await start_sim(slots=1, decode_base=0.05, tokens=400)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        writers = []
        # Streams: the server takes a client's EOF for a half-close and notices that the
        # client is gone at its next write (a queued stream writes once it takes a slot).
        for text in ("long", "queued"):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(raw("POST", CHAT, orjson.dumps(chat(text, stream=True))))
            writers.append(writer)

        async def both_in() -> bool:
            engine = await _engine(client)
            return engine["running"] == 1 and engine["waiting"] == 1

        await apoll_until(both_in)
        for writer in reversed(writers):  # the queued client first, then the running one
            writer.close()
            await writer.wait_closed()

        async def empty() -> bool:
            s = await stats(client)
            return s["inflight"] == 0 and s["engine"]["running"] == s["engine"]["waiting"] == 0

        await apoll_until(empty)
        quick = await client.post(CHAT, json=chat("next", max_tokens=1))
        assert quick.status_code == 200
        assert (await _engine(client))["finished"] == 1


# --- peak concurrency without the engine model -------------------------------------------


async def test_peak_inflight_and_its_reset(start_sim: StartSim) -> None:
    server = await start_sim(ttft=0.2)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await stats(client))["peak_inflight"] == 0
        await asyncio.gather(*(client.post(CHAT, json=chat(str(i))) for i in range(3)))
        assert (await stats(client))["peak_inflight"] == 3
        assert (await client.post("/admin/reset-peak")).json()["peak_inflight"] == 0
        await client.post(CHAT, json=chat("one"))
        assert (await stats(client))["peak_inflight"] == 1
        gauges = _metrics((await client.get("/metrics")).text)
        assert gauges["vllm:num_requests_running"] == 0.0
        assert gauges["vllm:request_success_total"] == 4.0


async def test_instant_answers_count_a_peak_of_one(http: httpx.AsyncClient) -> None:
    await http.post(CHAT, json=chat("x"))
    assert (await stats(http))["peak_inflight"] == 1


async def test_metrics_format(http: httpx.AsyncClient) -> None:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    for name, kind in (
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
    ):
        assert f"# TYPE {name} {kind}" in lines
    assert _metrics(response.text)["vllm:prefix_cache_queries_total"] == 0.0


# --- the fingerprint ---------------------------------------------------------------------


async def test_fingerprint_in_bodies_chunks_and_headers(
    sim: SimServer, oai: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    expected = SimConfig().system_fingerprint
    messages: Any = [{"role": "user", "content": "x"}]
    whole = await oai.chat.completions.create(model="demo", messages=messages)
    assert whole.system_fingerprint == expected
    chunks = [
        c
        async for c in await oai.chat.completions.create(
            model="demo", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert {c.system_fingerprint for c in chunks} == {expected}
    text = await oai.completions.create(model="demo", prompt="x")
    assert text.system_fingerprint == expected
    pieces = [c async for c in await oai.completions.create(model="demo", prompt="x", stream=True)]
    assert {c.system_fingerprint for c in pieces} == {expected}
    for response in (
        await http.post(CHAT, json=chat("x")),
        await http.post(CHAT, json=chat("x", stream=True)),
        await http.get("/health"),
        await http.post(CHAT, content=b"{bad"),
        await http.post("/v1/audio/speech", json={"input": "x"}),
        await http.get("/metrics"),
    ):
        assert response.headers["x-sim-fingerprint"] == expected


async def test_fingerprint_reveals_the_options(start_sim: StartSim) -> None:
    named = await start_sim(fingerprint="rev-2")
    other = await start_sim(tokens=5)
    plain = await start_sim()
    seen = []
    for server in (named, other, plain):
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post(CHAT, json=chat("x"))
        assert response.headers["x-sim-fingerprint"] == response.json()["system_fingerprint"]
        seen.append(response.json()["system_fingerprint"])
    assert seen[0] == "rev-2" and len(set(seen)) == 3
