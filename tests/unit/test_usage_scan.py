"""Finding the backend's token usage in whole answers and stream tails, and per-key limits."""

from __future__ import annotations

import orjson
import pytest

from corral.domain.usage import (
    TAIL_BYTES,
    Limits,
    StreamTail,
    Usage,
    day_of,
    limit_decision,
    minute_of,
    usage_of,
)

CHAT = orjson.dumps(
    {
        "id": "c1",
        "choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 999}'}}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 3},
        },
    }
)


def event(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def test_whole_answers_give_their_usage_and_text_that_mentions_usage_is_ignored() -> None:
    assert usage_of(CHAT) == Usage(12, 5)
    embeddings = b'{"data": [], "usage" : { "prompt_tokens" : 7, "total_tokens": 7 } }'
    assert usage_of(embeddings) == Usage(7, 0)
    responses = orjson.dumps({"output": [], "usage": {"input_tokens": 4, "output_tokens": 9}})
    assert usage_of(responses) == Usage(4, 9)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b'{"id": "x"}',
        b'{"usage": null}',
        b'{"usage": "many"}',
        b'{"usage": {"prompt_tokens": "7"}}',
        b'{"usage": {"prompt_tokens": 7',  # cut off
        b"\x00\xff binary usage",
    ],
)
def test_no_usage_is_none(data: bytes) -> None:
    assert usage_of(data) is None


def test_a_stream_gives_the_last_usage_that_is_not_null() -> None:
    chunks = [event({"choices": [{"delta": {"content": "hi"}}], "usage": None}) for _ in range(3)]
    chunks.append(event({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 3}}))
    chunks.append(b"data: [DONE]\n\n")
    assert usage_of(b"".join(chunks)) == Usage(8, 3)
    assert usage_of(b"".join(chunks[:3])) is None  # only nulls so far


def test_the_stream_tail_keeps_the_end_without_copying_and_finds_a_split_usage() -> None:
    tail = StreamTail()
    filler = event({"choices": [{"delta": {"content": "x" * 1000}}]})
    for _ in range(100):
        tail.feed(filler)
    final = event({"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 40}})
    for i in range(0, len(final), 7):  # the usage event split in small pieces
        tail.feed(final[i : i + 7])
    tail.feed(b"data: [DONE]\n\n")
    assert tail.usage() == Usage(21, 40)
    kept = sum(len(c) for c in tail._chunks)
    assert TAIL_BYTES <= kept < TAIL_BYTES + len(filler)  # bounded, not the whole stream


def test_limits_refuse_at_the_limit_and_say_how_long_to_wait() -> None:
    now = 1_700_000_070.0  # 30 s into a minute
    limits = Limits(requests_per_minute=3, tokens_per_day=1000)
    assert limit_decision(limits, 2, 999, now) is None
    why, wait = limit_decision(limits, 3, 0, now) or ("", 0.0)
    assert "3 requests per minute" in why and wait == pytest.approx(30.0)
    why, wait = limit_decision(limits, 0, 1000, now) or ("", 0.0)
    assert "1000 tokens per day" in why and wait == pytest.approx(86400 - now % 86400)
    assert limit_decision(Limits(), 10**9, 10**12, now) is None
    assert minute_of(now) == now - 30 and day_of(now) % 86400 == 0
