"""The sim's wider OpenAI-compatible API over real HTTP, through the official `openai` client
where it has a method: responses, rerank, score, tokenize, moderations, audio and images."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from simtest import StartSim, stats

from corral.backends.sim import SimServer
from corral.backends.sim.media import png

# --- responses ---------------------------------------------------------------------------


async def test_responses_whole_and_deterministic(oai: openai.AsyncOpenAI) -> None:
    first = await oai.responses.create(model="demo", input="tell me about corrals")
    again = await oai.responses.create(model="demo", input="tell me about corrals")
    other = await oai.responses.create(model="demo", input="something else")
    assert first.id.startswith("resp_") and first.id != again.id
    assert first.object == "response" and first.status == "completed"
    assert first.output_text and first.output_text == again.output_text
    assert first.output_text != other.output_text
    assert len(first.output_text.split()) == 16
    assert first.usage is not None and first.usage.output_tokens == 16
    assert first.usage.input_tokens == 5  # "user: tell me about corrals" in words
    capped = await oai.responses.create(model="demo", input="x", max_output_tokens=3)
    assert capped.status == "incomplete" and len(capped.output_text.split()) == 3
    assert capped.incomplete_details is not None
    assert capped.incomplete_details.reason == "max_output_tokens"


async def test_responses_stream(oai: openai.AsyncOpenAI) -> None:
    whole = await oai.responses.create(model="demo", input="stream it", instructions="be terse")
    stream = await oai.responses.create(
        model="demo", input="stream it", instructions="be terse", stream=True
    )
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4:-4] == ["response.output_text.delta"] * 16
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == whole.output_text
    assert final.response.instructions == "be terse"


async def test_responses_chain_get_and_delete(oai: openai.AsyncOpenAI) -> None:
    first = await oai.responses.create(model="demo", input="remember the number 7")
    second = await oai.responses.create(
        model="demo", input="which number?", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    assert second.output_text.startswith(f"[after {first.id}] ")
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens  # it carries the history
    fetched = await oai.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output_text == first.output_text

    await oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        await oai.responses.retrieve(first.id)
    assert info.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        await oai.responses.create(model="demo", input="x", previous_response_id=first.id)
    body: Any = info.value.body
    assert body["code"] == "response_not_found" and body["param"] == "previous_response_id"
    assert first.id in body["message"]

    unstored = await oai.responses.create(model="demo", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(unstored.id)


async def test_response_store_is_bounded(start_sim: StartSim) -> None:
    server = await start_sim(stored_responses=2)
    async with httpx.AsyncClient(base_url=server.url) as client:
        ids = [
            (await client.post("/v1/responses", json={"input": f"n{i}"})).json()["id"]
            for i in range(3)
        ]
        assert (await client.get(f"/v1/responses/{ids[0]}")).status_code == 404
        assert (await client.get(f"/v1/responses/{ids[2]}")).status_code == 200
        wrong = await client.put(f"/v1/responses/{ids[2]}")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, DELETE"
        assert (await client.delete(f"/v1/responses/{ids[2]}")).json()["deleted"] is True
        assert (await client.delete(f"/v1/responses/{ids[2]}")).status_code == 404
        assert (await client.get("/v1/responses/a/input_items")).status_code == 404


# --- rerank, score, tokenize, moderations ------------------------------------------------


async def test_rerank_on_every_path(http: httpx.AsyncClient) -> None:
    body = {
        "model": "demo",
        "query": "fast red car",
        "documents": ["a slow boat", "the red car is fast", {"text": "red paint"}],
        "top_n": 2,
    }
    answers = [(await http.post(path, json=body)).json() for path in ("/v1/rerank", "/rerank")]
    answers.append((await http.post("/v2/rerank", json=body)).json())
    for answer in answers:
        assert answer["model"] == "demo" and answer["id"].startswith("rerank-")
        assert [r["index"] for r in answer["results"]] == [1, 2]
        assert answer["results"][0]["document"] == {"text": "the red car is fast"}
        assert answer["results"][0]["relevance_score"] > answer["results"][1]["relevance_score"]
        assert answer["results"] == answers[0]["results"]


async def test_score(http: httpx.AsyncClient) -> None:
    answer = (
        await http.post(
            "/v1/score", json={"model": "demo", "text_1": "a b", "text_2": ["a b", "c"]}
        )
    ).json()
    assert answer["object"] == "list" and answer["model"] == "demo"
    assert [(d["index"], d["object"], d["score"]) for d in answer["data"]] == [
        (0, "score", 1.0),
        (1, "score", 0.0),
    ]
    assert answer["usage"]["prompt_tokens"] == (2 + 2) + (2 + 1)


async def test_tokenize_and_detokenize(http: httpx.AsyncClient) -> None:
    tokens = (await http.post("/tokenize", json={"model": "demo", "prompt": "hello world"})).json()
    assert tokens["count"] == 3 == len(tokens["tokens"]) and tokens["max_model_len"] == 32768
    text = (await http.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
    assert text == {"prompt": "hello world"}
    chat = {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}
    answer = (await http.post("/tokenize", json=chat)).json()
    assert "".join(answer["token_strs"]) == "user: hi\n"
    assert (await stats(http))["requests"] == 0  # not inference


async def test_moderations(oai: openai.AsyncOpenAI) -> None:
    result = await oai.moderations.create(model="demo", input=["please kill -9 it", "hello"])
    assert result.model == "demo" and result.id.startswith("modr-")
    flagged, clean = result.results
    assert flagged.flagged and flagged.categories.violence and not flagged.categories.hate
    assert flagged.category_scores.violence > 0.5
    assert not clean.flagged and clean.category_scores.violence < 0.01


# --- audio -------------------------------------------------------------------------------


def _wav(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack("<h", 1000) * round(seconds * rate))
    return out.getvalue()


async def test_transcriptions_name_the_uploaded_bytes(oai: openai.AsyncOpenAI) -> None:
    audio = _wav(1.5)
    digest = hashlib.sha256(audio).hexdigest()[:16]
    plain = await oai.audio.transcriptions.create(model="demo", file=("a.wav", audio))
    assert plain.text == f"transcribed {len(audio)} bytes sha256 {digest}"
    verbose = await oai.audio.transcriptions.create(
        model="demo", file=("a.wav", audio), response_format="verbose_json", language="de"
    )
    assert verbose.duration == pytest.approx(1.5) and verbose.language == "de"
    assert verbose.segments is not None and verbose.segments[0].text == plain.text
    text = await oai.audio.transcriptions.create(
        model="demo", file=("a.wav", audio), response_format="text"
    )
    assert text == plain.text


async def test_translations_and_upload_errors(http: httpx.AsyncClient) -> None:
    audio = _wav(0.5)
    files = {"file": ("a.wav", audio, "audio/wav")}
    answer = await http.post("/v1/audio/translations", data={"model": "demo"}, files=files)
    assert answer.status_code == 200
    assert answer.json()["text"].startswith(f"translated {len(audio)} bytes sha256 ")
    missing = await http.post("/v1/audio/transcriptions", data={"model": "demo"}, files={})
    assert missing.status_code == 400
    not_multipart = await http.post("/v1/audio/transcriptions", json={"model": "demo"})
    assert not_multipart.status_code == 400
    assert "multipart/form-data" in not_multipart.json()["error"]["message"]
    other = await http.post("/v1/audio/transcriptions", data={"model": "nope"}, files=files)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


async def test_speech_streams_a_wav_to_a_file(oai: openai.AsyncOpenAI, tmp_path: Path) -> None:
    target = tmp_path / "speech.wav"
    async with oai.audio.speech.with_streaming_response.create(
        model="demo", voice="alloy", input="x" * 150, response_format="wav"
    ) as response:
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers["transfer-encoding"] == "chunked"
        await response.stream_to_file(target)
    with wave.open(str(target)) as w:
        assert w.getframerate() == 24000 and w.getnframes() == 36000  # 1.5 s


async def test_speech_chunks_are_paced(start_sim: StartSim) -> None:
    server = await start_sim(tpot=0.05)
    arrivals: list[float] = []
    async with (
        httpx.AsyncClient(base_url=server.url) as client,
        client.stream("POST", "/v1/audio/speech", json={"input": "y" * 100}) as response,
    ):
        start = time.monotonic()
        data = b""
        async for chunk in response.aiter_raw():
            arrivals.append(time.monotonic() - start)
            data += chunk
    assert len(data) == 44 + 48000  # header and 1 s of audio
    assert len(arrivals) >= 2 and arrivals[-1] - arrivals[0] >= 9 * 0.05 * 0.8


# --- images ------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


async def test_image_generation_and_edit(oai: openai.AsyncOpenAI) -> None:
    made = await oai.images.generate(
        model="demo", prompt="a corral", n=2, size="64x32", response_format="b64_json"
    )
    assert made.data is not None and len(made.data) == 2
    images = [base64.b64decode(d.b64_json or "") for d in made.data]
    assert [_png_size(i) for i in images] == [(64, 32), (64, 32)]
    again = await oai.images.generate(model="demo", prompt="a corral", n=2, size="64x32")
    assert again.data is not None and again.data[0].b64_json == made.data[0].b64_json

    source = png(20, 10, b"\x10\x20\x30", b"\x40\x50\x60")
    edited = await oai.images.edit(model="demo", image=("in.png", source), prompt="add a horse")
    assert edited.data is not None
    assert _png_size(base64.b64decode(edited.data[0].b64_json or "")) == (20, 10)


# --- bad input is a 4xx with an OpenAI error, never a 500 --------------------------------

_BAD_BODIES: list[bytes] = [
    b"{not json",
    b"[]",
    b"{}",
    orjson.dumps({"model": "demo", "input": 5, "query": 3, "prompt": [], "text_1": {}}),
    orjson.dumps({"model": "demo", "documents": "x", "tokens": "x", "messages": "x"}),
]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/responses",
        "/v1/rerank",
        "/v1/score",
        "/v1/moderations",
        "/tokenize",
        "/detokenize",
        "/v1/audio/speech",
        "/v1/images/generations",
        "/v1/audio/transcriptions",
        "/v1/images/edits",
    ],
)
async def test_bad_bodies_get_400(sim: SimServer, path: str) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as client:
        for body in _BAD_BODIES:
            response = await client.post(path, content=body)
            assert response.status_code == 400, (path, body, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"]
        assert (await stats(client))["requests"] == 0
