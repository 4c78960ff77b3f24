"""Request ids: a client's `x-request-id` when it is short and made of safe characters, else
one generated here (this process's random prefix and a counter: unique, and cheap)."""

from __future__ import annotations

import itertools
import re
import secrets
from enum import IntEnum

from corral.frontend.http.wire import Headers

HEADER = b"x-request-id"
MAX_LENGTH = 128
SAFE = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,%d}" % MAX_LENGTH)


class Origin(IntEnum):
    """Where a request's id came from."""

    CLIENT = 0  # the client's own x-request-id
    GENERATED = 1  # the client sent none
    REPLACED = 2  # the client's was too long or had unsafe characters


_CLIENT, _GENERATED, _REPLACED = Origin.CLIENT, Origin.GENERATED, Origin.REPLACED


class RequestIds:
    """Picks the id of each request."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = (prefix or secrets.token_hex(4)).encode()
        self._counter = itertools.count(1)

    def pick(self, sent: bytes | None) -> tuple[bytes, Origin]:
        """The client's id (`sent`: its x-request-id header, None without one) if valid, else
        a new one; and where it came from."""
        if sent is not None and SAFE.fullmatch(sent):
            return sent, _CLIENT
        made = b"%s-%x" % (self.prefix, next(self._counter))
        return made, _GENERATED if sent is None else _REPLACED

    def __call__(self, headers: Headers) -> tuple[bytes, Origin]:
        """`pick` for a request's headers (the first x-request-id counts)."""
        for name, value in headers:
            if name == HEADER:
                return self.pick(value)
        return self.pick(None)
