"""Every OpenAI-compatible endpoint through Corral to real sim backend processes, with the
official openai client where it has a method: the Responses API (whole, streamed, follow-ups
that land on the replica holding the state among three, through the other frontend), audio
both ways, images, rerank, score, moderations, tokenize; a 20 MB upload with the frontend's
peak memory measured; an endpoint the model does not serve; in-flight counts back to zero after
each endpoint, and after clients that leave mid-upload and mid-answer."""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import struct
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from cluster import Cluster, Proc, wait_for

pytestmark = pytest.mark.slow

UPLOAD_BYTES = 20 * 1000 * 1000


def client(cluster: Cluster, frontend: Proc | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=cluster.url(frontend) + "/v1", api_key="-", max_retries=0, timeout=120
    )


def loaded(cluster: Cluster, model: str, n: int) -> list[dict[str, Any]]:
    def found() -> list[dict[str, Any]] | None:
        ready = [r for r in cluster.replicas(model) if r["state"] == "loaded"]
        return ready if len(ready) == n else None

    result: list[dict[str, Any]] = wait_for(found, timeout=120, what=f"{n} loaded of {model}")
    return result


def idle(cluster: Cluster, frontend: Proc | None = None) -> None:
    """Wait until no replica has a request in flight (as `frontend` counts them)."""

    def quiet() -> bool:
        replicas = cluster.api("GET", "/api/replicas", frontend)["replicas"]
        return all(r["inflight"] == 0 for r in replicas)

    wait_for(quiet, timeout=10, what="in-flight back to 0")


def stored_on(replica: dict[str, Any], response_id: str) -> bool:
    """Whether the sim behind `replica` holds the stored response (asked directly)."""
    answer = httpx.get(f"http://{replica['address']}/v1/responses/{response_id}", timeout=10)
    return answer.status_code == 200


def test_responses_follow_ups_land_on_the_replica_holding_them(cluster: Cluster) -> None:
    three = {"min_replicas": 3, "max_replicas": 3}
    cluster.write_model("m", options={"tokens": 6}, scheduling=three)
    one = cluster.start_frontend()
    other = cluster.start_frontend()
    cluster.start_worker("w")
    with client(cluster, one) as c1, client(cluster, other) as c2:
        first = c1.responses.create(model="m", input="hello")  # the cold load
        replicas = loaded(cluster, "m", 3)  # the minimum, once the model has loaded once
        assert first.object == "response" and first.output_text

        # streamed: the id arrives in response.created; the text matches the deltas
        events = list(c1.responses.create(model="m", input="count to three", stream=True))
        assert events[0].type == "response.created"
        started = events[0].response.id
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == deltas

        # follow-ups alternate frontends, each continuing the one before
        for root in (first.id, started):
            chain = [root]
            for turn in range(4):
                c = (c2, c1)[turn % 2]
                follow = c.responses.create(
                    model="m", input=f"and then {turn}", previous_response_id=chain[-1]
                )
                assert follow.output_text.startswith(f"[after {chain[-1]}]")
                assert follow.previous_response_id == chain[-1]
                chain.append(follow.id)
            holders = [r["index"] for r in replicas if all(stored_on(r, i) for i in chain)]
            assert len(holders) == 1, f"the chain from {root} is split over replicas"
        # a streamed follow-up through the other frontend, at once
        streamed = list(
            c2.responses.create(model="m", input="more", previous_response_id=started, stream=True)
        )
        assert streamed[-1].response.output_text.startswith(f"[after {started}]")

        # GET and DELETE by id through the frontend that did not create it
        assert c2.responses.retrieve(first.id).id == first.id
        c2.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            c1.responses.retrieve(first.id)
        assert gone.value.code == "response_not_found"

        # the replica holding a conversation is stopped: its follow-ups get the 404
        (home,) = [r for r in replicas if stored_on(r, started)]
        cluster.api("DELETE", f"/api/replicas/m/{home['index']}")
        wait_for(
            lambda: all(r["address"] != home["address"] for r in cluster.replicas("m")),
            what="the stopped replica gone",
        )
        with pytest.raises(openai.NotFoundError) as lost:
            c2.responses.create(model="m", input="again", previous_response_id=started)
        assert lost.value.code == "response_not_found" and started in str(lost.value)
    idle(cluster, one)
    idle(cluster, other)


# --- every other endpoint ---------------------------------------------------------------------


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    samples = b"".join(
        struct.pack("<h", (i * 37) % 20000 - 10000) for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples)
    return out.getvalue()


def fingerprint(data: bytes, verb: str = "transcribed") -> str:
    """What the sim answers for an upload: its length and SHA-256, so the bytes arrived intact."""
    return f"{verb} {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def peak_growth(pid: int, action: Any) -> tuple[int, Any]:
    """(bytes by which the process's peak resident memory rose over its resident memory
    before `action()`, what `action` returned). The kernel's high-water mark is reset first
    (/proc/PID/clear_refs), so the peak is the action's own."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = psutil.Process(pid).memory_info().rss
    result = action()
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return peak - before, result


def raw_upload(port: int, model: str, sent: int, declared: int, *, leave: bool) -> bytes:
    """Start a multipart upload of `declared` bytes and send `sent` of them; then disconnect
    (`leave`) or wait for the answer (the first bytes of it: b"" if none came)."""
    boundary = b"parts"
    head = (
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + model.encode()
        + b"\r\n--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: multipart/form-data; boundary=" + boundary + b"\r\n"
            b"content-length: %d\r\n\r\n" % declared + head
        )
        if sent > len(head):
            s.sendall(b"\0" * (sent - len(head)))
        return b"" if leave else s.recv(65536)


def test_every_endpoint_through_corral(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_model(
        "m",
        options={"tokens": 4, "tpot": 0.04, "max_body": 32 * 1024 * 1024},
        scheduling={"max_replicas": 1},  # one sim: its counters see every request
    )
    cluster.write_model("chat-only", capabilities=["chat"])
    # a body that stops arriving is cut off after two windows of 2 s
    frontend = cluster.start_frontend(CORRAL_BODY_TIMEOUT="2")
    cluster.start_worker("w")
    base = cluster.url()
    with client(cluster) as c:
        chat = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content
        (replica,) = loaded(cluster, "m", 1)
        sim = f"http://{replica['address']}"
        idle(cluster)

        # /v1/models lists what each model serves
        cards = {m.id: m.model_extra for m in c.models.list().data}
        assert cards["chat-only"] is not None and cards["chat-only"]["capabilities"] == ["chat"]
        assert cards["m"] is not None and "speech" in cards["m"]["capabilities"]

        # audio in: a generated WAV, and the sim names the bytes it got
        audio = wav_bytes(0.5)
        text = c.audio.transcriptions.create(model="m", file=("a.wav", audio, "audio/wav"))
        assert text.text == fingerprint(audio)
        translated = httpx.post(  # the client's translations method is deprecated
            base + "/v1/audio/translations",
            data={"model": "m"},
            files={"file": ("a.wav", audio, "audio/wav")},
            timeout=30,
        )
        assert translated.json()["text"] == fingerprint(audio, "translated")
        idle(cluster)

        # audio out, streamed to a file: chunks arrive while the sim still produces them
        target = tmp_path / "speech.wav"
        arrivals: list[float] = []
        with (
            c.audio.speech.with_streaming_response.create(
                model="m", voice="alloy", input="a" * 100, response_format="wav"
            ) as speech,
            target.open("wb") as out,
        ):
            started = time.monotonic()
            for piece in speech.iter_bytes():
                arrivals.append(time.monotonic() - started)
                out.write(piece)
        with wave.open(str(target)) as w:
            assert w.getnframes() == 24000  # 1 s at 24 kHz: the whole WAV arrived
        assert len(arrivals) >= 5 and arrivals[0] < arrivals[-1] - 0.2, arrivals
        idle(cluster)

        # images
        image = c.images.generate(model="m", prompt="a horse in a corral", n=1)
        assert image.data is not None and image.data[0].b64_json is not None
        assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG\r\n\x1a\n")
        moderation = c.moderations.create(model="m", input="hello")
        assert moderation.results and moderation.results[0].flagged in (True, False)
        idle(cluster)

    # the rest through httpx: rerank (three spellings), score, tokenize
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        ranked = httpx.post(
            base + path,
            json={"model": "m", "query": "horse", "documents": ["a cat", "a horse", "horse"]},
            timeout=30,
        )
        assert ranked.status_code == 200, ranked.text
        direct = httpx.post(
            sim + path,
            json={"model": "m", "query": "horse", "documents": ["a cat", "a horse", "horse"]},
            timeout=30,
        )
        assert _without_ids(ranked.json()) == _without_ids(direct.json())
    score = httpx.post(
        base + "/v1/score", json={"model": "m", "text_1": "a b", "text_2": ["a b", "c"]}
    )
    assert score.status_code == 200 and len(score.json()["data"]) == 2
    tokens = httpx.post(base + "/tokenize", json={"model": "m", "prompt": "hello world"}).json()
    text_back = httpx.post(
        base + "/detokenize", json={"model": "m", "tokens": tokens["tokens"]}
    ).json()
    assert text_back["prompt"] == "hello world"
    idle(cluster)

    # an endpoint the model does not serve: 400 naming both, and no load is started
    with client(cluster) as c, pytest.raises(openai.BadRequestError) as refused:
        c.audio.speech.create(model="chat-only", voice="alloy", input="hi")
    assert refused.value.code == "unsupported_endpoint"
    assert "chat-only" in str(refused.value) and "/v1/audio/speech" in str(refused.value)
    assert cluster.replicas("chat-only") == []
    loads = cluster.api("GET", "/api/loads")
    assert "chat-only" not in loads["progress"]
    assert all(j["model"] != "chat-only" for j in loads["jobs"])

    # a 20 MB upload: the frontend spools it (1 MiB in memory, the rest on disk)
    audio = wav_bytes(UPLOAD_BYTES / 32000)
    assert len(audio) >= UPLOAD_BYTES
    with client(cluster) as c:
        growth, text = peak_growth(
            frontend.pid,
            lambda: c.audio.transcriptions.create(model="m", file=("big.wav", audio, "audio/wav")),
        )
    assert text.text == fingerprint(audio)
    # what a body held whole costs: the same size as JSON, refused after it was read and parsed
    held, refusal = peak_growth(
        frontend.pid,
        lambda: httpx.post(
            base + "/v1/embeddings",
            content=b'{"model":"nobody","input":"' + b"x" * UPLOAD_BYTES + b'"}',
            headers={"content-type": "application/json"},
            timeout=60,
        ),
    )
    assert refusal.status_code == 404
    print(f"frontend peak RSS growth: upload {growth / 1e6:.1f} MB, whole JSON {held / 1e6:.1f} MB")
    assert held > UPLOAD_BYTES, "the measurement sees a body held in memory"
    # measured 2.4-2.5 MB: the spool's 1 MiB, the connection's 1 MiB read buffer, pieces on
    # their way to the disk; the bound leaves room for the allocator's own slack
    assert growth < 6_000_000, f"a 20 MB upload grew the frontend by {growth} bytes"
    idle(cluster)

    # clients that leave: mid-upload (before any replica was chosen) and mid-answer; an upload
    # that stalls gets 408 at the body deadline, one past --max-body-bytes 413 at once
    requests_before = httpx.get(sim + "/admin/stats").json()["requests"]
    port = cluster.ports[frontend]
    raw_upload(port, "m", sent=2 * 1024 * 1024, declared=UPLOAD_BYTES, leave=True)
    stalled = raw_upload(port, "m", sent=100_000, declared=UPLOAD_BYTES, leave=False)
    assert stalled.startswith(b"HTTP/1.1 408") and b"request_timeout" in stalled, stalled
    too_big = raw_upload(port, "m", sent=0, declared=64 * 1024 * 1024, leave=False)
    assert too_big.startswith(b"HTTP/1.1 413") and b"payload_too_large" in too_big, too_big
    with httpx.stream(
        "POST",
        base + "/v1/audio/speech",
        json={"model": "m", "voice": "alloy", "input": "b" * 300},
        timeout=30,
    ) as leaving:
        next(leaving.iter_bytes())  # the first chunk, then hang up
    idle(cluster)
    wait_for(
        lambda: httpx.get(sim + "/admin/stats").json()["inflight"] == 0,
        what="the sim's answer aborted",
    )
    assert httpx.get(sim + "/admin/stats").json()["requests"] == requests_before + 1
    assert frontend.alive()
    ok = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "still here"}]},
    )
    assert ok.status_code == 200


def _without_ids(answer: dict[str, Any]) -> Any:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}
