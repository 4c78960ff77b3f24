"""The simulator's audio and image endpoints: WAV and PNG encoders and the bodies of
transcriptions, translations, speech and images (pure, deterministic).

- speech: a sine tone, 10 ms per input character (at least 0.2 s, divided by `speed`), 24 kHz
  16-bit mono like OpenAI's pcm, as WAV (default) or raw pcm, in 0.1 s chunks;
- transcriptions/translations: the text names the upload's length and the start of its
  SHA-256, so a test can tell the bytes arrived unchanged; its duration is the WAV's own when
  the upload is one, else its length at 16 kHz 16-bit mono;
- images: PNGs with a vertical gradient between two colours taken from a digest of the prompt
  (and, for edits, of the uploaded image).
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import sys
import zlib
from array import array
from typing import Any, NamedTuple

import orjson

from corral.backends.sim.engine import StreamEvents
from corral.backends.sim.multipart import Form
from corral.errors import BadRequest

SAMPLE_RATE = 24000
_CHUNK_SECONDS = 0.1
_SECONDS_PER_CHAR = 0.01
_MAX_SPEECH_INPUT = 4096
_MAX_IMAGE_SIDE = 2048
_MAX_IMAGES = 10


# --- WAV ---------------------------------------------------------------------------------


def wav_header(data_bytes: int, rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte RIFF/WAVE header for 16-bit mono PCM of `data_bytes` bytes."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        rate,
        rate * 2,
        2,
        16,
        b"data",
        data_bytes,
    )


def tone(seconds: float, period: int, rate: int = SAMPLE_RATE) -> bytes:
    """A sine tone of `period` samples per cycle as 16-bit little-endian PCM."""
    n = max(1, round(seconds * rate))
    cycle = array("h", (round(12000 * math.sin(2 * math.pi * i / period)) for i in range(period)))
    samples = (cycle * (n // period + 1))[:n]
    if sys.byteorder == "big":  # pragma: no cover
        samples.byteswap()
    return samples.tobytes()


def wav_duration(data: bytes) -> float | None:
    """The duration of a PCM WAV file from its header and data chunk, None if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate = 12, 0
    while pos + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, pos)
        if chunk == b"fmt " and size >= 16 and pos + 24 <= len(data):
            byte_rate = struct.unpack_from("<I", data, pos + 16)[0]
        elif chunk == b"data":
            size = min(size, len(data) - pos - 8)
            return size / byte_rate if byte_rate else None
        pos += 8 + size + (size & 1)
    return None


# --- PNG ---------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(width: int, height: int, top: bytes, bottom: bytes) -> bytes:
    """An RGB PNG fading from colour `top` to `bottom` (3 bytes each), row by row."""
    rows = []
    for y in range(height):
        t = y / (height - 1) if height > 1 else 0.0
        pixel = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows.append(b"\0" + pixel * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height of a PNG, None if the bytes are not one."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return width, height


# --- speech ------------------------------------------------------------------------------


class Speech(NamedTuple):
    content_type: bytes
    events: StreamEvents  # head: the WAV header; tokens: the audio in 0.1 s chunks


def speech(body: dict[str, Any]) -> Speech:
    """The audio of a `/v1/audio/speech` request."""
    text = body.get("input")
    if not isinstance(text, str) or not text:
        raise BadRequest("'input' is required and must be a non-empty string", param="input")
    if len(text) > _MAX_SPEECH_INPUT:
        raise BadRequest(f"'input' exceeds {_MAX_SPEECH_INPUT} characters", param="input")
    voice = body.get("voice", "alloy")
    if not isinstance(voice, str | dict):
        raise BadRequest("'voice' must be a string", param="voice")
    fmt = body.get("response_format") or "wav"
    if fmt not in ("wav", "pcm"):
        raise BadRequest(
            f"response_format '{fmt}' is not supported here: use wav or pcm",
            param="response_format",
        )
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or isinstance(speed, bool) or not 0.25 <= speed <= 4:
        raise BadRequest("'speed' must be a number from 0.25 to 4.0", param="speed")
    if body.get("stream_format", "audio") != "audio":
        raise BadRequest("only stream_format 'audio' is supported", param="stream_format")
    seconds = max(0.2, _SECONDS_PER_CHAR * len(text)) / speed
    period = 40 + hashlib.sha256(orjson.dumps(voice)).digest()[0] % 70  # 218 to 600 Hz
    pcm = tone(seconds, period)
    step = round(_CHUNK_SECONDS * SAMPLE_RATE) * 2
    chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    if fmt == "pcm":
        return Speech(b"audio/pcm", StreamEvents([], chunks, []))
    return Speech(b"audio/wav", StreamEvents([wav_header(len(pcm))], chunks, []))


# --- transcriptions and translations -----------------------------------------------------


def transcription(form: Form, task: str) -> tuple[bytes, bytes]:
    """(body, content type) answering a transcription (`task` "transcribe") or translation."""
    audio = form.file("file").data
    fmt = form.text("response_format", "json")
    if fmt not in ("json", "text", "verbose_json"):
        raise BadRequest(
            "'response_format' must be json, text or verbose_json", param="response_format"
        )
    digest = hashlib.sha256(audio).hexdigest()[:16]
    verb = "transcribed" if task == "transcribe" else "translated"
    text = f"{verb} {len(audio)} bytes sha256 {digest}"
    duration = wav_duration(audio)
    if duration is None:
        duration = len(audio) / 32000
    if fmt == "text":
        return text.encode(), b"text/plain; charset=utf-8"
    usage = {"type": "duration", "seconds": math.ceil(duration)}
    if fmt == "json":
        answer: dict[str, Any] = {"text": text}
        if task == "transcribe":
            answer["usage"] = usage
        return orjson.dumps(answer), b"application/json"
    language = form.text("language") or "english"
    segment = {
        "id": 0,
        "seek": 0,
        "start": 0.0,
        "end": duration,
        "text": text,
        "tokens": list(bytes.fromhex(digest)),
        "temperature": 0.0,
        "avg_logprob": -0.1,
        "compression_ratio": 1.0,
        "no_speech_prob": 0.0,
    }
    verbose = {
        "task": task,
        "language": language,
        "duration": duration,
        "text": text,
        "segments": [segment],
        "usage": usage,
    }
    return orjson.dumps(verbose), b"application/json"


# --- images ------------------------------------------------------------------------------


def _size(value: Any) -> tuple[int, int]:
    if value is None or value == "auto":
        return 256, 256
    if isinstance(value, str):
        w, sep, h = value.partition("x")
        if sep and w.isdigit() and h.isdigit():
            width, height = int(w), int(h)
            if 1 <= width <= _MAX_IMAGE_SIDE and 1 <= height <= _MAX_IMAGE_SIDE:
                return width, height
    raise BadRequest(
        f"'size' must be 'auto' or WIDTHxHEIGHT, each 1 to {_MAX_IMAGE_SIDE}", param="size"
    )


def _count(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.isdigit():  # a form field
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_IMAGES:
        raise BadRequest(f"'n' must be an integer from 1 to {_MAX_IMAGES}", param="n")
    return value


def _images(material: bytes, fields: dict[str, Any], created: int) -> bytes:
    width, height = _size(fields.get("size"))
    n = _count(fields.get("n"))
    fmt = fields.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise BadRequest("'response_format' must be b64_json or url", param="response_format")
    if fields.get("output_format") not in (None, "png"):
        raise BadRequest("only output_format 'png' is supported", param="output_format")
    data = []
    for i in range(n):
        colours = hashlib.sha256(material + b"\0%d" % i).digest()
        encoded = base64.b64encode(png(width, height, colours[:3], colours[3:6])).decode()
        if fmt == "url":
            data.append({"url": "data:image/png;base64," + encoded})
        else:
            data.append({"b64_json": encoded})
    return orjson.dumps(
        {"created": created, "data": data, "output_format": "png", "size": f"{width}x{height}"}
    )


def _prompt(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("'prompt' is required and must be a non-empty string", param="prompt")
    return value


def generations(body: dict[str, Any], created: int) -> bytes:
    """A `/v1/images/generations` answer."""
    prompt = _prompt(body.get("prompt"))
    return _images(prompt.encode("utf-8", "surrogatepass"), body, created)


def edits(form: Form, created: int) -> bytes:
    """A `/v1/images/edits` answer: the image's digest and the prompt pick the colours."""
    image = form.file("image", "image[]").data
    prompt = _prompt(form.text("prompt"))
    fields: dict[str, Any] = {
        k: form.text(k) for k in ("size", "n", "response_format", "output_format")
    }
    dims = png_size(image)
    if fields["size"] is None and dims and max(dims) <= _MAX_IMAGE_SIDE and min(dims) >= 1:
        fields["size"] = f"{dims[0]}x{dims[1]}"  # the edit keeps the image's size
    material = hashlib.sha256(image).digest() + prompt.encode("utf-8", "surrogatepass")
    return _images(material, fields, created)
