"""HTTP/1.1 bytes the server writes: status lines, response heads, chunk framing, error bodies."""

from __future__ import annotations

from http import HTTPStatus

import orjson

from corral.errors import CorralError
from corral.frontend.asgi import error_headers, error_payload

Headers = list[tuple[bytes, bytes]]

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CLOSE = b"connection: close\r\n"
KEEP_ALIVE = b"connection: keep-alive\r\n"  # only HTTP/1.0 clients need to be told
CHUNKED = b"transfer-encoding: chunked\r\n"

_STATUS_LINES = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode("latin-1")) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d \r\n" % status
    return line


def chunk(data: bytes) -> bytes:
    """`data` as one HTTP chunk (empty data would end the body: the caller skips it)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(exc: CorralError) -> tuple[int, Headers, bytes]:
    """Status, headers and body of the OpenAI-style error for `exc`."""
    return exc.status, error_headers(exc), orjson.dumps(error_payload(exc))
