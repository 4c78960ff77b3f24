"""Unit tests of the simulator's pure generation: prompts, tokens, chunks, embeddings, config."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import (
    DONE_EVENT,
    VOCABULARY,
    Prompt,
    SimEngine,
    chat_prompt,
    completion_prompt,
    decode_base64,
    embedding_inputs,
    encode_base64,
    include_usage,
    max_tokens,
)
from corral.errors import BadRequest, ConfigError


def _engine(**kw: Any) -> SimEngine:
    return SimEngine(SimConfig(**kw))


def _chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _events(raw: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in raw:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        out.append(orjson.loads(event[6:-2]))
    return out


# --- generation --------------------------------------------------------------------------


def test_same_prompt_gives_same_text_and_different_prompt_differs() -> None:
    engine = _engine(tokens=16)
    a1 = engine.generate(chat_prompt(_chat("hello world")), None)
    a2 = _engine(tokens=16).generate(chat_prompt(_chat("hello world")), None)
    b = engine.generate(chat_prompt(_chat("goodbye world")), None)
    assert a1.text == a2.text
    assert a1.text != b.text
    assert all(word in VOCABULARY for word in a1.text.split())


def test_seed_changes_the_output() -> None:
    prompt = Prompt("same prompt", 2)
    assert (
        _engine(seed=1).generate(prompt, None).text != _engine(seed=2).generate(prompt, None).text
    )


def test_token_count_cap_and_finish_reason() -> None:
    engine = _engine(tokens=10)
    prompt = Prompt("some words here", 3)
    full = engine.generate(prompt, None)
    assert full.completion_tokens == 10 and len(full.tokens()) == 10
    assert full.finish_reason == "stop"
    assert full.usage() == {"prompt_tokens": 3, "completion_tokens": 10, "total_tokens": 13}
    capped = engine.generate(prompt, 4)
    assert capped.completion_tokens == 4 and capped.finish_reason == "length"
    assert full.text.startswith(capped.text)
    # A cap at or above --tokens is not a cut.
    assert engine.generate(prompt, 10).finish_reason == "stop"
    assert engine.generate(prompt, 50).completion_tokens == 10


def test_tokens_concatenate_to_text_with_single_spaces() -> None:
    gen = _engine(tokens=8).generate(Prompt("x", 1), None)
    tokens = gen.tokens()
    assert not tokens[0].startswith(" ")
    assert all(t.startswith(" ") for t in tokens[1:])
    assert "".join(tokens) == gen.text
    assert len(gen.text.split(" ")) == 8


def test_zero_tokens() -> None:
    gen = _engine(tokens=0).generate(Prompt("x", 1), None)
    assert gen.text == "" and gen.completion_tokens == 0 and gen.finish_reason == "stop"


# --- request fields ----------------------------------------------------------------------


def test_chat_prompt_joins_contents_and_counts_words() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
            {"role": "assistant", "content": None},
        ]
    }
    prompt = chat_prompt(body)
    assert prompt.text == "be brief\nhi there\n"
    assert prompt.tokens == 4


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": ["hi"]},
        {"messages": [{"content": 3}]},
    ],
)
def test_chat_prompt_rejects_bad_messages(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as info:
        chat_prompt(body)
    assert info.value.extra["param"] == "messages"


def test_completion_prompt_forms() -> None:
    assert completion_prompt({"prompt": "one two three"}) == Prompt("one two three", 3)
    assert completion_prompt({"prompt": ["a b", "c"]}) == Prompt("a b\nc", 3)
    assert completion_prompt({"prompt": [1, 2, 3]}) == Prompt("1 2 3", 3)
    assert completion_prompt({"prompt": [[1, 2], [3]]}) == Prompt("1 2 3", 3)
    assert completion_prompt({"prompt": ""}).tokens == 1  # at least one token
    bad_prompts: list[dict[str, Any]] = [
        {},
        {"prompt": None},
        {"prompt": []},
        {"prompt": [1, "a"]},
        {"prompt": 5},
    ]
    for bad in bad_prompts:
        with pytest.raises(BadRequest):
            completion_prompt(bad)


def test_embedding_input_forms() -> None:
    assert embedding_inputs({"input": "a b"}) == [Prompt("a b", 2)]
    assert embedding_inputs({"input": ["a", "b c"]}) == [Prompt("a", 1), Prompt("b c", 2)]
    assert embedding_inputs({"input": [5, 6]}) == [Prompt("5 6", 2)]
    assert embedding_inputs({"input": [[5], [6, 7]]}) == [Prompt("5", 1), Prompt("6 7", 2)]
    bad_inputs: list[dict[str, Any]] = [
        {},
        {"input": []},
        {"input": [True]},
        {"input": {"a": 1}},
        {"input": [[]]},
    ]
    for bad in bad_inputs:
        with pytest.raises(BadRequest):
            embedding_inputs(bad)


def test_max_tokens_fields() -> None:
    assert max_tokens({}) is None
    assert max_tokens({"max_tokens": 5}) == 5
    assert max_tokens({"max_completion_tokens": 3, "max_tokens": 5}) == 3
    assert max_tokens({"max_tokens": 0}) is None
    assert max_tokens({"max_tokens": -1}) is None
    assert max_tokens({"max_tokens": None}) is None
    for bad in ("5", 1.5, True):
        with pytest.raises(BadRequest):
            max_tokens({"max_tokens": bad})


def test_include_usage() -> None:
    assert include_usage({"stream_options": {"include_usage": True}})
    assert not include_usage({"stream_options": {"include_usage": False}})
    assert not include_usage({"stream_options": None})
    assert not include_usage({})


# --- response bodies ---------------------------------------------------------------------


def test_chat_completion_shape() -> None:
    engine = _engine(model="m1", tokens=5)
    gen = engine.generate(Prompt("p", 1), 3)
    body = orjson.loads(engine.chat_completion("chatcmpl-1", 123, gen))
    assert body["id"] == "chatcmpl-1" and body["object"] == "chat.completion"
    assert body["created"] == 123 and body["model"] == "m1"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": gen.text}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


def test_text_completion_shape() -> None:
    engine = _engine(model="m1", tokens=5)
    gen = engine.generate(Prompt("p", 1), None)
    body = orjson.loads(engine.text_completion("cmpl-1", 9, gen))
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == gen.text
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5


def test_chat_events_without_usage() -> None:
    engine = _engine(model='we"ird', tokens=4)
    gen = engine.generate(Prompt("p", 1), None)
    events = engine.chat_events("chatcmpl-x", 7, gen, with_usage=False)
    assert events.tail[-1] == DONE_EVENT
    chunks = _events(events.head + events.tokens + events.tail[:-1])
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == "chatcmpl-x" and c["model"] == 'we"ird' for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(contents) == 4 and "".join(contents) == gen.text
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_chat_events_with_usage() -> None:
    engine = _engine(tokens=4)
    gen = engine.generate(Prompt("p q", 2), 2)
    events = engine.chat_events("chatcmpl-x", 7, gen, with_usage=True)
    chunks = _events(events.head + events.tokens + events.tail[:-1])
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_completion_events() -> None:
    engine = _engine(tokens=3)
    gen = engine.generate(Prompt("p", 1), None)
    events = engine.completion_events("cmpl-x", 7, gen, with_usage=True)
    assert events.head == [] and events.tail[-1] == DONE_EVENT
    chunks = _events(events.tokens + events.tail[:-1])
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:3]) == gen.text
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["choices"][0]["text"] == ""
    assert chunks[4]["usage"]["completion_tokens"] == 3


# --- embeddings --------------------------------------------------------------------------


def test_embeddings_are_deterministic_unit_vectors() -> None:
    engine = _engine(embedding_dim=32)
    a = engine.embed(Prompt("alpha", 1), 32)
    assert len(a) == 32
    assert math.isclose(math.fsum(v * v for v in a), 1.0, rel_tol=1e-9)
    assert a == _engine(embedding_dim=32).embed(Prompt("alpha", 1), 32)
    assert a != engine.embed(Prompt("beta", 1), 32)


def test_embeddings_body_dimensions_and_base64() -> None:
    engine = _engine(model="e", embedding_dim=16)
    floats = orjson.loads(engine.embeddings({"input": ["a", "b c"]}))
    assert floats["object"] == "list" and floats["model"] == "e"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 16 for d in floats["data"])
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}

    small = orjson.loads(engine.embeddings({"input": "a", "dimensions": 8}))
    assert len(small["data"][0]["embedding"]) == 8
    large = orjson.loads(engine.embeddings({"input": "a", "dimensions": 64}))
    assert len(large["data"][0]["embedding"]) == 16

    b64 = orjson.loads(engine.embeddings({"input": ["a", "b c"], "encoding_format": "base64"}))
    for packed, plain in zip(b64["data"], floats["data"], strict=True):
        decoded = decode_base64(packed["embedding"])
        assert decoded == pytest.approx(plain["embedding"], rel=1e-6, abs=1e-7)

    with pytest.raises(BadRequest):
        engine.embeddings({"input": "a", "encoding_format": "int8"})


def test_base64_is_little_endian_float32() -> None:
    assert encode_base64([1.0]) == "AACAPw=="  # 0x3f800000 little-endian
    assert decode_base64(encode_base64([0.5, -2.0])) == [0.5, -2.0]


# --- config ------------------------------------------------------------------------------


def test_config_validation() -> None:
    assert SimConfig().validate() == SimConfig()
    for bad in (
        {"model": ""},
        {"port": 70000},
        {"ttft": -1.0},
        {"tpot": -0.1},
        {"load_time": -1.0},
        {"tokens": -1},
        {"embedding_dim": 0},
    ):
        with pytest.raises(ConfigError):
            SimConfig(**bad).validate()
