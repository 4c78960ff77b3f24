"""The streaming rewrite of a multipart body's `model` field (openai-proxy uploads), pure."""

from __future__ import annotations

import pytest

from corral.backends.multipart_model import (
    MAX_MODEL,
    ModelFieldRewriter,
    MultipartError,
    boundary_of,
)

BOUNDARY = b"----corral7MA4YWxkTrZu0gW"


def form(*parts: tuple[bytes, bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """A multipart/form-data body of (headers, content) parts."""
    body = preamble
    for headers, content in parts:
        body += b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n" + epilogue


FILE = (
    b'Content-Disposition: form-data; name="file"; filename="model"\r\nContent-Type: audio/wav',
    bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n",
)


def model_part(name: bytes) -> tuple[bytes, bytes]:
    return (b'Content-Disposition: form-data; name="model"', name)


def field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return (b'content-disposition: form-data; name="' + name + b'"', value)


def rename(value: str) -> str:
    if value not in ("whisper", "whisper-1"):
        raise LookupError(value)
    return "whisper-1"


def run(body: bytes, chunk: int) -> tuple[bytes, ModelFieldRewriter]:
    rewriter = ModelFieldRewriter(BOUNDARY, rename)
    out = b"".join(rewriter.feed(body[i : i + chunk]) for i in range(0, len(body), chunk))
    return out + rewriter.close(), rewriter


CASES: list[tuple[str, bytes, bytes, str | None]] = [
    (
        "model-after-file",
        form(FILE, model_part(b"whisper"), field(b"language", b"en")),
        form(FILE, model_part(b"whisper-1"), field(b"language", b"en")),
        "whisper",
    ),
    (
        "model-first",
        form(model_part(b"whisper"), FILE),
        form(model_part(b"whisper-1"), FILE),
        "whisper",
    ),
    (
        "already-upstream-name",
        form(model_part(b"whisper-1")),
        form(model_part(b"whisper-1")),
        "whisper-1",
    ),
    (
        "no-model-field",
        form(FILE, field(b"model_extra", b"x")),
        form(FILE, field(b"model_extra", b"x")),
        None,
    ),
    (
        "unquoted-name",
        form((b"Content-Disposition: form-data; name=model", b"whisper")),
        form((b"Content-Disposition: form-data; name=model", b"whisper-1")),
        "whisper",
    ),
    (
        "preamble-and-epilogue",
        form(model_part(b"whisper"), preamble=b"ignored\r\n", epilogue=b"trailing"),
        form(model_part(b"whisper-1"), preamble=b"ignored\r\n", epilogue=b"trailing"),
        "whisper",
    ),
    (
        "not-multipart-at-all",
        b"just bytes, no boundary anywhere",
        b"just bytes, no boundary anywhere",
        None,
    ),
    ("empty", b"", b"", None),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize(
    ("body", "expected", "model"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rewrites_the_model_field_whatever_the_chunking(
    body: bytes, expected: bytes, model: str | None, chunk: int
) -> None:
    out, rewriter = run(body, chunk)
    assert out == expected
    assert rewriter.model == model


def test_holds_back_little_while_streaming() -> None:
    """A large file part flows on as it comes, not at the end."""
    rewriter = ModelFieldRewriter(BOUNDARY, rename)
    head = b"--" + BOUNDARY + b"\r\n" + FILE[0] + b"\r\n\r\n"
    assert rewriter.feed(head) == head
    sent = sum(len(rewriter.feed(b"\x00" * 4096)) for _ in range(100))
    assert sent >= 100 * 4096 - len(BOUNDARY) - 4  # all but a delimiter's length


def test_refused_model_raises_from_rename() -> None:
    with pytest.raises(LookupError):
        run(form(FILE, model_part(b"gpt-4")), 16)


def test_overlong_model_field_is_an_error() -> None:
    with pytest.raises(MultipartError):
        run(form(model_part(b"x" * (MAX_MODEL + 100))), 64)


def test_body_ending_inside_the_model_field_is_an_error() -> None:
    body = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhis'
    with pytest.raises(MultipartError):
        run(body, 5)


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ("multipart/form-data; boundary=abc123", b"abc123"),
        ('multipart/form-data; boundary="a b"', b"a b"),
        ('Multipart/Form-Data; charset=utf-8; boundary="xyz"', b"xyz"),
        ("multipart/form-data", None),
        ("application/json", None),
        ("multipart/mixed; boundary=abc", None),
        ("", None),
    ],
)
def test_boundary_of(content_type: str, boundary: bytes | None) -> None:
    assert boundary_of(content_type) == boundary
