"""Parsing an inference request just enough to route it (model, stream, required field)."""

from __future__ import annotations

import pytest

from corral.errors import (
    BadRequest,
)
from corral.frontend.request import parse_request

CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
EMBEDDINGS = b"/v1/embeddings"

VALID_REQUESTS = [
    ("chat", CHAT, b'{"model":"m","messages":[]}', "m", False),
    ("chat-stream", CHAT, b'{"model":"m","messages":[],"stream":true}', "m", True),
    ("chat-stream-false", CHAT, b'{"model":"m","messages":[],"stream":false}', "m", False),
    ("completions", COMPLETIONS, b'{"model":"org/m:7b","prompt":"hi"}', "org/m:7b", False),
    ("embeddings", EMBEDDINGS, b'{"model":"e","input":["a","b"]}', "e", False),
    ("unknown-path-no-required-field", b"/v1/other", b'{"model":"m"}', "m", False),
    ("extra-fields-ok", CHAT, b'{"model":"m","messages":[],"temperature":0.1}', "m", False),
]


@pytest.mark.parametrize(
    ("path", "body", "model", "stream"),
    [v[1:] for v in VALID_REQUESTS],
    ids=[v[0] for v in VALID_REQUESTS],
)
def test_parse_request_valid(path: bytes, body: bytes, model: str, stream: bool) -> None:
    parsed = parse_request(path, body)
    assert (parsed.model, parsed.stream, parsed.path) == (model, stream, path)
    assert parsed.body is body, "the request bytes are forwarded unchanged"


INVALID_REQUESTS = [
    ("invalid-json", CHAT, b'{"model": "m",', None, "not valid JSON"),
    ("empty-body", CHAT, b"", None, "not valid JSON"),
    ("array", CHAT, b'[{"model":"m"}]', None, "JSON object"),
    ("string", CHAT, b'"m"', None, "JSON object"),
    ("number", CHAT, b"3", None, "JSON object"),
    ("missing-model", CHAT, b'{"messages":[]}', "model", "'model'"),
    ("model-not-string", CHAT, b'{"model":3,"messages":[]}', "model", "'model'"),
    ("model-empty", CHAT, b'{"model":"","messages":[]}', "model", "'model'"),
    ("chat-without-messages", CHAT, b'{"model":"m","prompt":"x"}', "messages", "'messages'"),
    ("completions-without-prompt", COMPLETIONS, b'{"model":"m"}', "prompt", "'prompt'"),
    ("embeddings-without-input", EMBEDDINGS, b'{"model":"m"}', "input", "'input'"),
    ("stream-string", CHAT, b'{"model":"m","messages":[],"stream":"yes"}', "stream", "boolean"),
    ("stream-int", CHAT, b'{"model":"m","messages":[],"stream":1}', "stream", "boolean"),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "text"),
    [v[1:] for v in INVALID_REQUESTS],
    ids=[v[0] for v in INVALID_REQUESTS],
)
def test_parse_request_invalid(path: bytes, body: bytes, param: str | None, text: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(path, body)
    assert info.value.status == 400
    assert info.value.extra.get("param") == param
    assert text in info.value.message


def test_parse_request_stream_null_means_not_streaming() -> None:
    parsed = parse_request(CHAT, b'{"model":"m","messages":[],"stream":null}')
    assert parsed.stream is False
