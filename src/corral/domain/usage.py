"""Token usage in backend answers, found without decoding them whole, and per-key limits.

`usage_of(data)` finds the last non-null `"usage": {...}` object in bytes (a whole JSON answer,
or the tail of an event stream) and parses only that object; `StreamTail` keeps the last few
KB of a relayed stream by reference (no copy) for it. `limit_decision` says whether a key over
its requests per minute or tokens per day must wait, and how long.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import orjson

#: Bytes of a stream's end kept for its usage: the final usage event and `[DONE]` fit easily.
TAIL_BYTES = 16 * 1024
_MARK = b'"usage"'
_SPACE = b" \t\r\n"


class Usage(NamedTuple):
    """Tokens one answer used (Chat/Completions names; the Responses API's input/output)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


def usage_of(data: bytes) -> Usage | None:
    """The last usage object in `data` that is not null, None when there is none."""
    end = len(data)
    while True:
        at = data.rfind(_MARK, 0, end)
        if at < 0:
            return None
        end = at
        if at > 0 and data[at - 1] == 0x5C:  # \"usage\": inside a JSON string
            continue
        start = _object_start(data, at + len(_MARK))
        if start < 0:
            continue  # "usage": null, or the word in some other place
        stop = _object_end(data, start)
        if stop < 0:
            continue  # cut off: an earlier one may be whole
        found = _parse(data[start:stop])
        if found is not None:
            return found


def _object_start(data: bytes, i: int) -> int:
    """The index of the `{` after `"usage"` ending at `i` (past `:` and spaces), else -1."""
    if data.startswith(b":{", i):  # compact JSON, the usual case
        return i + 1
    window = data[i : i + 32]
    head = window.lstrip(_SPACE)
    if not head.startswith(b":"):
        return -1
    rest = head[1:].lstrip(_SPACE)
    if not rest.startswith(b"{"):
        return -1
    return i + len(window) - len(rest)  # `rest` is the window's end


def _object_end(data: bytes, start: int) -> int:
    """The index after the `}` closing the object at `start` (usage holds no strings with
    braces: only numbers and nested detail objects); -1 when it is cut off."""
    close = data.find(b"}", start, start + 4096)
    if close >= 0 and data.find(b"{", start + 1, close) < 0:  # flat: the usual case
        return close + 1
    while close >= 0:
        if data.count(b"{", start, close) == data.count(b"}", start, close + 1):
            return close + 1
        close = data.find(b"}", close + 1, start + 4096)
    return -1


def _parse(raw: bytes) -> Usage | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    prompt = obj.get("prompt_tokens")
    if prompt is None:
        prompt = obj.get("input_tokens", 0)
    completion = obj.get("completion_tokens")
    if completion is None:
        completion = obj.get("output_tokens", 0)
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(prompt, completion)


class StreamTail:
    """The last `TAIL_BYTES` (or more: whole chunks) of a stream, kept as the chunks relayed."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        chunks = self._chunks
        chunks.append(chunk)
        self._size += len(chunk)
        while len(chunks) > 1 and self._size - len(chunks[0]) >= TAIL_BYTES:
            self._size -= len(chunks.popleft())

    def usage(self) -> Usage | None:
        return usage_of(b"".join(self._chunks))


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's limits; None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_day: int | None = None

    @property
    def any(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_day is not None


def limit_decision(
    limits: Limits, requests_this_minute: int, tokens_today: int, now: float
) -> tuple[str, float] | None:
    """Why a key must wait and for how many seconds (None: it may go): `requests_this_minute`
    and `tokens_today` are the counts so far in the current minute and UTC day."""
    rpm = limits.requests_per_minute
    if rpm is not None and requests_this_minute >= rpm:
        return (f"{rpm} requests per minute", 60.0 - now % 60.0)
    tpd = limits.tokens_per_day
    if tpd is not None and tokens_today >= tpd:
        return (f"{tpd} tokens per day", 86400.0 - now % 86400.0)
    return None


def minute_of(now: float) -> float:
    """The start of the minute `now` is in (usage is counted per minute)."""
    return now - now % 60.0


def day_of(now: float) -> float:
    """The start of the UTC day `now` is in."""
    return now - now % 86400.0
