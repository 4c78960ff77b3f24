"""A small multipart/form-data parser for the simulator's upload endpoints (pure).

The server has already collected the body under its size limit, so this parses that one
buffer: each part's data is one slice of it, byte for byte as the client sent it.
"""

from __future__ import annotations

from typing import NamedTuple

from corral.errors import BadRequest

MAX_PARTS = 64
_MAX_HEADERS = 8 * 1024


class Part(NamedTuple):
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _params(value: str) -> tuple[str, dict[str, str]]:
    """A header value's main token (lower-cased) and its `;`-separated parameters."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(chars)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return main.strip().lower(), params


def boundary(content_type: bytes) -> bytes:
    """The boundary of a multipart/form-data content type (400 when it is something else)."""
    kind, params = _params(content_type.decode("latin-1"))
    if kind != "multipart/form-data":
        raise BadRequest("the body must be multipart/form-data")
    value = params.get("boundary", "")
    if not 1 <= len(value) <= 70:
        raise BadRequest("multipart/form-data needs a boundary of 1 to 70 characters")
    return value.encode("latin-1")


def parse(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart/form-data body, in order (400 on a malformed body)."""
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise BadRequest("malformed multipart body: no boundary")
    pos += len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise BadRequest("malformed multipart body: bad boundary line")
        start = line_end + 2
        if body.startswith(b"\r\n", start):  # a part without headers
            head_end, data_start = start, start + 2
        else:
            head_end = body.find(b"\r\n\r\n", start, start + _MAX_HEADERS)
            if head_end < 0:
                raise BadRequest("malformed multipart body: part headers do not end")
            data_start = head_end + 4
        end = _next_delimiter(body, b"\r\n" + delimiter, data_start)
        if len(parts) == MAX_PARTS:
            raise BadRequest(f"multipart body has more than {MAX_PARTS} parts")
        parts.append(_part(body[start:head_end], body[data_start:end]))
        pos = end + 2 + len(delimiter)


def _next_delimiter(body: bytes, marker: bytes, start: int) -> int:
    """Where the CRLF of the next real delimiter line is: one followed by `--` (the last)
    or by optional blanks and CRLF, so data that merely starts like one is kept."""
    pos = start
    while True:
        end = body.find(marker, pos)
        if end < 0:
            raise BadRequest("malformed multipart body: a part does not end")
        after = end + len(marker)
        if body.startswith(b"--", after):
            return end
        line_end = body.find(b"\r\n", after)
        if line_end >= 0 and not body[after:line_end].strip(b" \t"):
            return end
        pos = after


def _part(head: bytes, data: bytes) -> Part:
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    for line in head.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "content-disposition":
            kind, params = _params(value)
            if kind != "form-data":
                raise BadRequest("every multipart part must be form-data")
            name = params.get("name")
            filename = params.get("filename")
        elif key == "content-type":
            content_type = value.strip()
    if name is None:
        raise BadRequest("a multipart part has no name")
    return Part(name, filename, content_type, data)


class Form(NamedTuple):
    """A parsed form: the last part of each name wins, files and text fields alike."""

    parts: dict[str, Part]

    @classmethod
    def parse(cls, body: bytes, content_type: bytes) -> Form:
        return cls({p.name: p for p in parse(body, boundary(content_type))})

    def text(self, name: str, default: str | None = None) -> str | None:
        part = self.parts.get(name)
        if part is None:
            return default
        try:
            return part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"form field '{name}' is not UTF-8 text", param=name) from None

    def file(self, *names: str) -> Part:
        """The first of `names` present (400 naming the first when none is)."""
        for name in names:
            part = self.parts.get(name)
            if part is not None:
                return part
        raise BadRequest(f"form field '{names[0]}' (a file) is required", param=names[0])
