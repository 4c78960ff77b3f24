"""Unit tables of the sim's pure endpoint logic: multipart, WAV/PNG, rerank/score/moderation,
tokenize, the Responses API objects and store, and the config and command line."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import wave
import zlib
from typing import Any

import orjson
import pytest

from corral.backends.sim import extras, media
from corral.backends.sim.__main__ import parse_args
from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import Generation, Prompt, SimEngine
from corral.backends.sim.multipart import Form, boundary, parse
from corral.backends.sim.responses import (
    ResponseStore,
    StoredResponse,
    draft,
    parse_request,
    prompt_text,
    response_object,
    stream_events,
)
from corral.errors import BadRequest, ConfigError

# --- multipart ---------------------------------------------------------------------------


def _form(*parts: tuple[str, str | None, bytes], b: bytes = b"XyZ") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--" + b + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + b + b"--\r\n"


def test_multipart_keeps_binary_data_exactly() -> None:
    blob = bytes(range(256)) + b"\r\n--XyZ-not-a-boundary\r\n" + b"\r\n\r\n"
    body = _form(("model", None, b"demo"), ("file", "a b.wav", blob))
    parts = parse(body, b"XyZ")
    assert [(p.name, p.filename) for p in parts] == [("model", None), ("file", "a b.wav")]
    assert parts[1].data == blob
    assert parts[1].content_type == "application/octet-stream"
    form = Form.parse(body, b'multipart/form-data; boundary="XyZ"')
    assert form.text("model") == "demo" and form.text("absent", "x") == "x"
    assert form.file("image", "file").data == blob


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"multipart/form-data; boundary=abc", b"abc"),
        (b'Multipart/Form-Data; charset=utf-8; boundary="a;b c"', b"a;b c"),
    ],
)
def test_boundary(content_type: bytes, expected: bytes) -> None:
    assert boundary(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [b"", b"application/json", b"multipart/form-data", b"multipart/form-data; boundary="],
)
def test_bad_content_type(content_type: bytes) -> None:
    with pytest.raises(BadRequest):
        boundary(content_type)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no boundary here",
        b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nunterminated',
        b"--XyZ\r\nContent-Type: text/plain\r\n\r\nno name\r\n--XyZ--",
        b'--XyZ\r\nContent-Disposition: attachment; name="a"\r\n\r\nx\r\n--XyZ--',
        b'--XyZ\r\nContent-Disposition: form-data; name="a"',
    ],
)
def test_malformed_multipart(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse(body, b"XyZ")


def test_missing_file_and_non_utf8_field() -> None:
    form = Form.parse(_form(("prompt", None, b"\xff\xfe")), b"multipart/form-data; boundary=XyZ")
    with pytest.raises(BadRequest) as info:
        form.file("file")
    assert info.value.extra["param"] == "file"
    with pytest.raises(BadRequest):
        form.text("prompt")


# --- WAV and PNG -------------------------------------------------------------------------


def test_speech_is_a_valid_wav_whose_length_follows_the_input() -> None:
    short = media.speech({"input": "hi"})
    long = media.speech({"input": "x" * 100, "voice": "echo"})
    assert short.content_type == b"audio/wav"
    for speech, seconds in ((short, 0.2), (long, 1.0)):
        data = b"".join(speech.events.head + speech.events.tokens)
        with wave.open(io.BytesIO(data)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
            assert w.getnframes() / w.getframerate() == pytest.approx(seconds)
        assert media.wav_duration(data) == pytest.approx(seconds)
    assert len(long.events.tokens) == 10  # 0.1 s chunks
    assert media.speech({"input": "x" * 100, "speed": 2.0}).events.tokens.__len__() == 5
    pcm = media.speech({"input": "hi", "response_format": "pcm"})
    assert pcm.content_type == b"audio/pcm" and pcm.events.head == []
    assert b"".join(pcm.events.tokens) == b"".join(short.events.tokens)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": "x" * 5000}, "input"),
        ({"input": "x", "response_format": "mp3"}, "response_format"),
        ({"input": "x", "speed": 9}, "speed"),
        ({"input": "x", "stream_format": "sse"}, "stream_format"),
    ],
)
def test_bad_speech(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        media.speech(body)
    assert info.value.extra["param"] == param


def test_wav_duration_of_other_bytes() -> None:
    assert media.wav_duration(b"not audio") is None
    assert media.wav_duration(b"RIFF\0\0\0\0WAVE") is None


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack_from(">II", data, 16)
    pos, idat = 8, b""
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + size]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + size)
        assert zlib.crc32(chunk, zlib.crc32(kind)) == crc
        if kind == b"IDAT":
            idat += chunk
        pos += 12 + size
    return width, height, zlib.decompress(idat)


def test_png_gradient() -> None:
    width, height, raw = _png_pixels(media.png(3, 2, b"\x00\x00\x00", b"\xff\x80\x10"))
    assert (width, height) == (3, 2)
    assert raw == b"\0" + b"\0\0\0" * 3 + b"\0" + b"\xff\x80\x10" * 3
    assert media.png_size(media.png(5, 7, b"abc", b"abc")) == (5, 7)
    assert media.png_size(b"GIF89a") is None


def test_image_generations_are_deterministic() -> None:
    body = {"prompt": "a cat", "n": 2, "size": "8x4"}
    first = orjson.loads(media.generations(body, 1))
    assert first == orjson.loads(media.generations(body, 1))
    images = [d["b64_json"] for d in first["data"]]
    assert len(images) == 2 and images[0] != images[1]
    assert _png_pixels(base64.b64decode(images[0]))[:2] == (8, 4)
    other = orjson.loads(media.generations({**body, "prompt": "a dog"}, 1))
    assert other["data"][0]["b64_json"] != images[0]
    url = orjson.loads(media.generations({**body, "response_format": "url"}, 1))
    assert url["data"][0]["url"] == "data:image/png;base64," + images[0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "size": "big"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "response_format": "png"}, "response_format"),
        ({"prompt": "x", "output_format": "jpeg"}, "output_format"),
    ],
)
def test_bad_image_requests(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        media.generations(body, 1)
    assert info.value.extra["param"] == param


def test_transcription_formats() -> None:
    ct = b"multipart/form-data; boundary=XyZ"
    audio = media.wav_header(32000) + b"\x01" * 32000  # 32000 bytes at 48000 B/s
    form = Form.parse(_form(("file", "a.wav", audio), ("response_format", None, b"text")), ct)
    body, content_type = media.transcription(form, "transcribe")
    assert content_type.startswith(b"text/plain")
    assert body.decode() == (
        f"transcribed {len(audio)} bytes sha256 {hashlib.sha256(audio).hexdigest()[:16]}"
    )
    verbose = Form.parse(
        _form(("file", "a.wav", audio), ("response_format", None, b"verbose_json")), ct
    )
    answer = orjson.loads(media.transcription(verbose, "translate")[0])
    assert answer["task"] == "translate" and answer["text"].startswith("translated ")
    assert answer["duration"] == pytest.approx(32000 / 48000)
    raw = Form.parse(_form(("file", "x.bin", b"\0" * 64000)), ct)
    assert orjson.loads(media.transcription(raw, "transcribe")[0])["usage"]["seconds"] == 2
    bad = Form.parse(_form(("file", "x", b"1"), ("response_format", None, b"srt")), ct)
    with pytest.raises(BadRequest):
        media.transcription(bad, "transcribe")


# --- rerank, score, moderations, tokenize ------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "score"),
    [
        ("a b", "a b", 1.0),
        ("a b", "B A!", 1.0),
        ("a b", "b c", 0.5),
        ("a", "a b c d", 0.5),
        ("a", "", 0.0),
        ("x y", "z", 0.0),
    ],
)
def test_overlap(a: str, b: str, score: float) -> None:
    assert extras.overlap(a, b) == pytest.approx(score)


def test_rerank_orders_cuts_and_hides_documents() -> None:
    body = {"query": "red apple", "documents": ["green pear", {"text": "red apple pie"}, "apple"]}
    answer = orjson.loads(extras.rerank(body, "m", "rerank-1"))
    assert [r["index"] for r in answer["results"]] == [1, 2, 0]
    assert answer["results"][0]["document"] == {"text": "red apple pie"}
    assert answer["model"] == "m" and answer["usage"]["total_tokens"] > 0
    top = orjson.loads(extras.rerank({**body, "top_n": 1, "return_documents": False}, "m", "r"))
    assert top["results"] == [{"index": 1, "relevance_score": pytest.approx(0.816, abs=1e-3)}]
    empty = orjson.loads(extras.rerank({"query": "q", "documents": []}, "m", "r"))
    assert empty["results"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"documents": ["a"]},
        {"query": "q"},
        {"query": "q", "documents": [1]},
        {"query": "q", "documents": ["a"], "top_n": -1},
        {"query": "q", "documents": ["a"], "return_documents": "yes"},
    ],
)
def test_bad_rerank(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        extras.rerank(body, "m", "r")


def test_score_pairs() -> None:
    one_to_many = orjson.loads(extras.score({"text_1": "a b", "text_2": ["a", "c"]}, "m", "s", 1))
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx([0.7071, 0.0], abs=1e-4)
    assert one_to_many["data"][0] == {
        "index": 0,
        "object": "score",
        "score": pytest.approx(0.7071, abs=1e-4),
    }
    pairwise = orjson.loads(extras.score({"text_1": ["a", "b"], "text_2": ["a", "a"]}, "m", "s", 1))
    assert [d["score"] for d in pairwise["data"]] == [1.0, 0.0]
    for bad in ({"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, {"text_1": "a"}, {"text_2": 3}):
        with pytest.raises(BadRequest):
            extras.score(bad, "m", "s", 1)


def test_moderations() -> None:
    body = {"input": ["I will kill the process", "a nice day"]}
    answer = orjson.loads(extras.moderations(body, "m", "modr-1"))
    flagged, clean = answer["results"]
    assert flagged["flagged"] and flagged["categories"]["violence"]
    assert not flagged["categories"]["hate"] and flagged["category_scores"]["violence"] == 0.9
    assert not clean["flagged"] and all(s < 0.01 for s in clean["category_scores"].values())
    assert answer == orjson.loads(extras.moderations(body, "m", "modr-1"))
    parts = {"input": [{"type": "text", "text": "gore"}, {"type": "image_url", "image_url": {}}]}
    (multi,) = orjson.loads(extras.moderations(parts, "m", "x"))["results"]
    assert multi["categories"]["violence/graphic"]
    assert multi["category_applied_input_types"]["violence"] == ["text", "image"]
    with pytest.raises(BadRequest):
        extras.moderations({"input": 5}, "m", "x")


@pytest.mark.parametrize("text", ["", "abc", "abcd", "hello world", "héllo wörld ✓", "a\0b"])
def test_tokenize_round_trip(text: str) -> None:
    answer = orjson.loads(extras.tokenize({"prompt": text, "return_token_strs": True}, 99))
    assert answer["count"] == len(answer["tokens"]) == -(-len(text.encode()) // 4)
    assert answer["max_model_len"] == 99 and len(answer["token_strs"]) == answer["count"]
    back = orjson.loads(extras.detokenize({"tokens": answer["tokens"]}))
    assert back == {"prompt": text}


def test_tokenize_chat_and_errors() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    answer = orjson.loads(extras.tokenize(chat, 10))
    assert answer["count"] == 3  # "user: hi\n" is 9 bytes
    for bad in ({}, {"prompt": 3}, {"messages": []}):
        with pytest.raises(BadRequest):
            extras.tokenize(bad, 10)
    for tokens in (None, [1, "2"], [-1], [1 << 32], [True]):
        with pytest.raises(BadRequest):
            extras.detokenize({"tokens": tokens})


# --- the Responses API -------------------------------------------------------------------


def test_parse_request_forms() -> None:
    assert parse_request({"input": "hi"}).input_text == "user: hi\n"
    items = {
        "input": [
            {"role": "developer", "content": "be short"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {"type": "reasoning", "summary": []},
        ],
        "instructions": "sys",
        "max_output_tokens": 5,
        "store": False,
    }
    request = parse_request(items)
    assert request.input_text == "developer: be short\nuser: q\ntool: 42\n"
    assert (request.instructions, request.max_output_tokens, request.store) == ("sys", 5, False)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [3]}, "input"),
        ({"input": [{"role": "user", "content": 3}]}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
        ({"input": "x", "store": "no"}, "store"),
        ({"input": "x", "instructions": 3}, "instructions"),
        ({"input": "x", "previous_response_id": 3}, "previous_response_id"),
        ({"input": "x", "metadata": []}, "metadata"),
    ],
)
def test_bad_responses_request(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body)
    assert info.value.extra["param"] == param


def _gen(tokens: int, cap: int | None = None) -> Generation:
    return SimEngine(SimConfig(tokens=tokens)).generate(Prompt("p", 1), cap)


def test_response_object_events_and_chaining() -> None:
    first_req = parse_request({"input": "hello", "instructions": "sys"})
    text = prompt_text(first_req, None)
    assert text == "system: sys\nuser: hello\n"
    d = draft("resp_1", 5, "m", first_req, None, _gen(3), 7)
    done = response_object(d, done=True, cached=2)
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == d.text
    assert done["usage"]["input_tokens_details"]["cached_tokens"] == 2
    assert done["usage"]["total_tokens"] == 7 + 3
    events = stream_events(d, done)
    lines = [e.split(b"\ndata: ", 1) for e in events.head + events.tokens + events.tail]
    kinds = [orjson.loads(data)["type"] for _, data in lines]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(head == b"event: " + k.encode() for (head, _), k in zip(lines, kinds, strict=True))
    seqs = [orjson.loads(data)["sequence_number"] for _, data in lines]
    assert seqs == list(range(len(seqs)))

    follow = parse_request(
        {"input": "more", "previous_response_id": "resp_1", "instructions": "sys"}
    )
    stored = StoredResponse(done, d.context)
    assert prompt_text(follow, stored).startswith(text)  # the chain is a growing prefix
    d2 = draft("resp_2", 6, "m", follow, stored, _gen(3), 9)
    assert d2.text.startswith("[after resp_1] ") and len(d2.deltas) == 4
    assert d2.context.startswith(d.context)


def test_capped_response_is_incomplete() -> None:
    d = draft("resp_1", 5, "m", parse_request({"input": "x"}), None, _gen(5, cap=2), 1)
    done = response_object(d, done=True)
    assert done["status"] == "incomplete"
    assert done["incomplete_details"] == {"reason": "max_output_tokens"}
    last = stream_events(d, done).tail[-1]
    assert last.startswith(b"event: response.incomplete\n")


def test_store_is_bounded() -> None:
    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put(f"r{i}", StoredResponse({"id": i}, ""))
    assert store.get("r0") is None and store.get("r2") is not None and len(store) == 2
    assert store.delete("r1") and not store.delete("r1")
    off = ResponseStore(capacity=0)
    off.put("x", StoredResponse({}, ""))
    assert off.get("x") is None


# --- config and command line -------------------------------------------------------------


def test_fingerprint_follows_the_options_not_the_address() -> None:
    base = SimConfig()
    assert base.system_fingerprint.startswith("fp_")
    assert SimConfig(host="0.0.0.0", port=9).system_fingerprint == base.system_fingerprint
    assert SimConfig(tokens=3).system_fingerprint != base.system_fingerprint
    assert SimConfig(slots=2).system_fingerprint != base.system_fingerprint
    assert SimConfig(fingerprint="v2").system_fingerprint == "v2"


@pytest.mark.parametrize(
    "bad",
    [
        {"slots": -1},
        {"prefill_per_token": -1.0},
        {"decode_base": -1.0},
        {"decode_slope": -0.5},
        {"cache_blocks": -1},
        {"block_tokens": 0},
        {"max_model_len": 0},
        {"stored_responses": -1},
        {"fingerprint": "two\nlines"},
        {"fingerprint": "x" * 201},
    ],
)
def test_new_config_validation(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SimConfig(**bad).validate()


def test_command_line_engine_flags_and_slowdown() -> None:
    config = parse_args(
        [
            "--slots", "4", "--prefill-per-token", "0.001", "--decode-base", "0.01",
            "--decode-slope", "0.002", "--cache-blocks", "64", "--block-tokens", "8",
            "--tpot", "0.1", "--slowdown", "2", "--fingerprint", "rev-2",
            "--stored-responses", "5", "--max-model-len", "100",
        ]
    )  # fmt: skip
    assert config.engine_model and config.slots == 4
    assert (config.prefill_per_token, config.decode_base) == (0.002, 0.02)
    assert (config.decode_slope, config.tpot) == (0.004, 0.2)
    assert (config.cache_blocks, config.block_tokens) == (64, 8)
    assert (config.fingerprint, config.stored_responses, config.max_model_len) == ("rev-2", 5, 100)
    assert not parse_args([]).engine_model


def test_unknown_flags_still_stop_the_process() -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--no-such-option", "1"])
    assert info.value.code == 2
