"""Streaming rewrite of the `model` field of a multipart/form-data body, for openai-proxy uploads.

An upload (`/v1/audio/transcriptions`, `/v1/images/edits`) names its model in a form field; the
proxy must check that name and may have to replace it by the upstream's, without holding the
file in memory. `ModelFieldRewriter` passes the body through chunk by chunk, holding back only
a delimiter's length, one part's headers, or the (small) model field itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum

#: Limits past which the body is not what this rewriter expects.
MAX_HEADERS = 16 * 1024  # one part's header block
MAX_MODEL = 1024  # the model field's value

_BOUNDARY = re.compile(rb'boundary=(?:"([^"]+)"|([^";,\s]+))', re.IGNORECASE)
_MODEL_FIELD = re.compile(
    rb'^content-disposition:[^\r\n]*;\s*name="?model"?\s*(;|\r|$)', re.I | re.M
)


class MultipartError(ValueError):
    """The body's model field cannot be read (too long, or the body ends inside it)."""


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data; boundary=...` content type, else None."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    found = _BOUNDARY.search(content_type.encode("latin-1", errors="replace"))
    return (found.group(1) or found.group(2)) if found else None


class _State(Enum):
    BODY = 1  # inside the preamble or a part's content: looking for the next delimiter
    HEADERS = 2  # after a delimiter: reading the next part's headers (or the final "--")
    MODEL = 3  # inside the model field's value
    DONE = 4  # after the closing delimiter, or given up: everything passes unchanged


class ModelFieldRewriter:
    """Feed a multipart body's chunks through `feed` (then `close`); the model field's value
    comes out as `rename(value)`. `rename` may raise to refuse the model; `model` is the value
    found (None until then)."""

    def __init__(self, boundary: bytes, rename: Callable[[str], str]) -> None:
        self.rename = rename
        self.model: str | None = None
        self._delimiter = b"\r\n--" + boundary
        self._state = _State.BODY
        self._buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it: add one
        self._skip = 2  # ... and never send it

    def feed(self, chunk: bytes) -> bytes:
        """The bytes that can go on now."""
        self._buf += chunk
        out = bytearray()
        while True:
            step = self._step()
            if step is None:
                break
            out += step
        return self._emit(out)

    def close(self) -> bytes:
        """The rest, at the end of the body."""
        if self._state is _State.MODEL:
            raise MultipartError("the body ends inside the 'model' field")
        rest = bytes(self._buf)
        self._buf.clear()
        return self._emit(bytearray(rest))

    def _emit(self, out: bytearray) -> bytes:
        if self._skip:
            dropped = min(self._skip, len(out))
            del out[:dropped]
            self._skip -= dropped
        return bytes(out)

    def _step(self) -> bytes | None:
        """Advance over what the buffer holds; the bytes to send, or None to wait for more."""
        buf, delimiter = self._buf, self._delimiter
        if self._state is _State.DONE:
            if not buf:
                return None
            out = bytes(buf)
            buf.clear()
            return out
        if self._state is _State.BODY:
            at = buf.find(delimiter)
            if at < 0:
                keep = len(delimiter) - 1  # a delimiter may straddle two chunks
                if len(buf) <= keep:
                    return None
                out = bytes(buf[:-keep])
                del buf[:-keep]
                return out
            end = at + len(delimiter)
            out = bytes(buf[:end])
            del buf[:end]
            self._state = _State.HEADERS
            return out
        if self._state is _State.HEADERS:
            if len(buf) < 2:
                return None
            if buf.startswith(b"--"):  # the closing delimiter
                self._state = _State.DONE
                return b""
            at = buf.find(b"\r\n\r\n")
            if at < 0:
                if len(buf) > MAX_HEADERS:
                    self._state = _State.DONE  # not a form this rewriter understands
                return b"" if self._state is _State.DONE else None
            end = at + 4
            headers = bytes(buf[:end])
            del buf[:end]
            self._state = _State.MODEL if _MODEL_FIELD.search(headers) else _State.BODY
            return headers
        # MODEL
        at = buf.find(delimiter)
        if at < 0:
            if len(buf) > MAX_MODEL + len(delimiter):
                raise MultipartError(f"the 'model' field is longer than {MAX_MODEL} bytes")
            return None
        value = bytes(buf[:at]).decode("utf-8", errors="replace")
        self.model = value
        renamed = self.rename(value).encode()
        del buf[:at]
        self._state = _State.BODY
        return renamed
