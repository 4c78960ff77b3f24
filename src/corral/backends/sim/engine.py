"""SimEngine: pure deterministic generation from OpenAI request bodies (text, chunks, embeddings).

Nothing here does I/O or keeps state between calls: the same request body always gives the
same tokens. Request ids and timestamps are passed in by the caller, so tests can pin them.
Responses are returned as ready-to-send JSON bytes; streaming chunks are whole SSE events
(`data: {...}\\n\\n`), built from pre-encoded templates so a token costs one concatenation.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import orjson

from corral.backends.sim.config import SimConfig
from corral.errors import BadRequest

# 256 words, so one byte of a digest picks one token.
_WORDS = """
    able acid aged also area army away baby back ball band bank base bath bear beat
    been beer bell belt best bird blow blue boat body bold bond bone book boom born
    boss both bowl bulk burn bush busy call calm came camp card care case cash cast
    cell chat chip city club coal coat code cold come cook cool cope copy core cost
    crew crop dark data date dawn days dead deal dear debt deep deny desk dial diet
    disk done door dose down draw drew drop drum dual duke dust duty each earn ease
    east easy edge else even ever epic exit face fact fail fair fall farm fast fate
    fear feed feel fell felt file fill film find fine fire firm fish five flat flow
    food foot ford form fort four free from fuel full fund gain game gate gave gear
    gene gift girl give glad goal goes gold golf gone good gray grew grey grow gulf
    hair half hall hand hang hard harm harp have head hear heat held hint help here
    hero high hill hire hold hole holy home hope host hour huge hung hunt husk idea
    inch into iron item jack jane jean john join jump jury just keen keep kent kept
    kick kite kind king knee knew know lack lady laid lake land lane last late lead
    left less life lift like line link list live load loan lock logo long look lord
    lose loss lost love luck made mail main make male many mark mass matt meal mean
"""
VOCABULARY: tuple[str, ...] = tuple(_WORDS.split())
if len(VOCABULARY) != 256:  # pragma: no cover - guards an edit of the list above
    raise AssertionError(f"vocabulary must hold 256 words, has {len(VOCABULARY)}")

# Every token but the first carries a leading space; both spellings pre-encoded as JSON strings.
_FIRST_TEXT: tuple[str, ...] = VOCABULARY
_NEXT_TEXT: tuple[str, ...] = tuple(" " + w for w in VOCABULARY)
_FIRST_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in _FIRST_TEXT)
_NEXT_JSON: tuple[bytes, ...] = tuple(orjson.dumps(w) for w in _NEXT_TEXT)

DONE_EVENT = b"data: [DONE]\n\n"
_NULL_USAGE = b',"usage":null'
_BIG_ENDIAN = sys.byteorder == "big"


class Prompt(NamedTuple):
    """What generation needs from a request: the seed text and its token count."""

    text: str
    tokens: int


class Generation(NamedTuple):
    """The output for one prompt: vocabulary indices of its tokens, and why it ended."""

    indices: bytes
    prompt_tokens: int
    finish_reason: str  # "length" when max_tokens cut it short, else "stop"
    cached_tokens: int | None = None  # prompt tokens the engine model found cached

    @property
    def completion_tokens(self) -> int:
        return len(self.indices)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + len(self.indices)

    def tokens(self) -> list[str]:
        """The output tokens as strings (every one but the first starts with a space)."""
        out = [_NEXT_TEXT[i] for i in self.indices]
        if out:
            out[0] = _FIRST_TEXT[self.indices[0]]
        return out

    @property
    def text(self) -> str:
        """The tokens joined: the words separated by single spaces."""
        return " ".join(map(VOCABULARY.__getitem__, self.indices))

    def usage(self) -> dict[str, Any]:
        n = len(self.indices)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


@dataclass(frozen=True, slots=True)
class StreamEvents:
    """A streamed answer as SSE events: `head` goes out at once, one event per token follows
    (`tokens`), then `tail` (finish chunk, optional usage chunk, `[DONE]`)."""

    head: list[bytes]
    tokens: list[bytes]
    tail: list[bytes]


# --- request fields ----------------------------------------------------------------------


def count_words(text: str) -> int:
    """The simulator's token count of a text: whitespace-separated words, at least 1."""
    return max(1, len(text.split()))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    raise BadRequest("message content must be a string, a list of parts or null", param="messages")


def render_chat(body: dict[str, Any]) -> bytes:
    """A chat request's messages as the engine model sees them: `role: content` lines, so a
    conversation that grows keeps its earlier rendering as a prefix (call after chat_prompt)."""
    lines = [f"{m.get('role')}: {_content_text(m.get('content'))}\n" for m in body["messages"]]
    return "".join(lines).encode("utf-8", "surrogatepass")


def chat_prompt(body: dict[str, Any]) -> Prompt:
    """The prompt of a chat request: the messages' contents joined by newlines."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty list", param="messages")
    texts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("every message must be an object", param="messages")
        texts.append(_content_text(message.get("content")))
    text = "\n".join(texts)
    return Prompt(text, count_words(text))


def _is_int_list(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def completion_prompt(body: dict[str, Any]) -> Prompt:
    """The prompt of a completions request: a string, strings, token ids or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return Prompt(prompt, count_words(prompt))
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            text = "\n".join(prompt)
            return Prompt(text, count_words(text))
        if _is_int_list(prompt):
            return Prompt(" ".join(map(str, prompt)), len(prompt))
        if all(isinstance(p, list) and p and _is_int_list(p) for p in prompt):
            flat = [t for p in prompt for t in p]
            return Prompt(" ".join(map(str, flat)), len(flat))
    raise BadRequest(
        "'prompt' is required: a string, a list of strings, a list of token ids "
        "or a list of lists of token ids",
        param="prompt",
    )


def embedding_inputs(body: dict[str, Any]) -> list[Prompt]:
    """The inputs of an embeddings request, one Prompt per vector to return."""
    value = body.get("input")
    if isinstance(value, str):
        return [Prompt(value, count_words(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [Prompt(v, count_words(v)) for v in value]
        if _is_int_list(value):
            return [Prompt(" ".join(map(str, value)), len(value))]
        if all(isinstance(v, list) and v and _is_int_list(v) for v in value):
            return [Prompt(" ".join(map(str, v)), len(v)) for v in value]
    raise BadRequest(
        "'input' is required: a string, a list of strings, a list of token ids "
        "or a list of lists of token ids",
        param="input",
    )


def _optional_positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer", param=name)
    return value if value > 0 else None


def max_tokens(body: dict[str, Any]) -> int | None:
    """The request's cap on output tokens (`max_completion_tokens` wins), None when uncapped."""
    cap = _optional_positive_int(body, "max_completion_tokens")
    return cap if cap is not None else _optional_positive_int(body, "max_tokens")


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed answer ends with a usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- the engine --------------------------------------------------------------------------


class SimEngine:
    """Deterministic text and vector generation for one served model."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config

    @cached_property
    def _model_json(self) -> bytes:
        """`,"model":...,"system_fingerprint":...` as chunks carry them, encoded once."""
        return b"".join(
            (
                b',"model":',
                orjson.dumps(self._config.model),
                b',"system_fingerprint":',
                orjson.dumps(self.fingerprint),
            )
        )

    @cached_property
    def fingerprint(self) -> str:
        """The `system_fingerprint` of every chat and completion answer."""
        return self._config.system_fingerprint

    @cached_property
    def _seed_key(self) -> bytes:
        return str(self._config.seed).encode()

    def _digest(self, text: str, size: int) -> bytes:
        # shake_256 gives any length; the key (the --seed) comes first so it cannot collide.
        material = self._seed_key + b"\x00" + text.encode("utf-8", "surrogatepass")
        return hashlib.shake_256(material).digest(size)

    def generate(self, prompt: Prompt, cap: int | None) -> Generation:
        """The output for a prompt: `tokens` words, or `cap` when that is smaller."""
        n = self._config.tokens
        finish = "stop"
        if cap is not None and cap < n:
            n = cap
            finish = "length"
        indices = self._digest(prompt.text, n) if n else b""
        return Generation(indices, prompt.tokens, finish)

    # --- non-streaming bodies --------------------------------------------------------------

    def chat_completion(self, rid: str, created: int, gen: Generation) -> bytes:
        return orjson.dumps(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": self._config.model,
                "system_fingerprint": self.fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": gen.text},
                        "logprobs": None,
                        "finish_reason": gen.finish_reason,
                    }
                ],
                "usage": gen.usage(),
            }
        )

    def text_completion(self, rid: str, created: int, gen: Generation) -> bytes:
        return orjson.dumps(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self._config.model,
                "system_fingerprint": self.fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "text": gen.text,
                        "logprobs": None,
                        "finish_reason": gen.finish_reason,
                    }
                ],
                "usage": gen.usage(),
            }
        )

    # --- streaming events ------------------------------------------------------------------

    def _chunk_prefix(self, rid: str, created: int, obj: bytes) -> bytes:
        return b"".join(
            (
                b'data: {"id":',
                orjson.dumps(rid),
                b',"object":"',
                obj,
                b'","created":',
                str(created).encode(),
                self._model_json,
                b',"choices":[',
            )
        )

    def _token_events(self, prefix: bytes, suffix: bytes, gen: Generation) -> list[bytes]:
        indices = gen.indices
        events = [b"".join((prefix, _NEXT_JSON[i], suffix)) for i in indices]
        if events:
            events[0] = b"".join((prefix, _FIRST_JSON[indices[0]], suffix))
        return events

    def _usage_event(self, rid: str, created: int, obj: str, gen: Generation) -> bytes:
        chunk = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": self._config.model,
            "system_fingerprint": self.fingerprint,
            "choices": [],
            "usage": gen.usage(),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def chat_events(
        self, rid: str, created: int, gen: Generation, *, with_usage: bool
    ) -> StreamEvents:
        """SSE events of a streamed chat answer (`chat.completion.chunk` objects)."""
        prefix = self._chunk_prefix(rid, created, b"chat.completion.chunk")
        end = (_NULL_USAGE if with_usage else b"") + b"}\n\n"
        role = (
            prefix
            + b'{"index":0,"delta":{"role":"assistant","content":""},'
            + (b'"logprobs":null,"finish_reason":null}]' + end)
        )
        tokens = self._token_events(
            prefix + b'{"index":0,"delta":{"content":',
            b'},"logprobs":null,"finish_reason":null}]' + end,
            gen,
        )
        finish = b"".join(
            (
                prefix,
                b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"',
                gen.finish_reason.encode(),
                b'"}]',
                end,
            )
        )
        tail = [finish]
        if with_usage:
            tail.append(self._usage_event(rid, created, "chat.completion.chunk", gen))
        tail.append(DONE_EVENT)
        return StreamEvents([role], tokens, tail)

    def completion_events(
        self, rid: str, created: int, gen: Generation, *, with_usage: bool
    ) -> StreamEvents:
        """SSE events of a streamed completion (`text_completion` objects with `text`)."""
        prefix = self._chunk_prefix(rid, created, b"text_completion")
        end = (_NULL_USAGE if with_usage else b"") + b"}\n\n"
        tokens = self._token_events(
            prefix + b'{"index":0,"text":',
            b',"logprobs":null,"finish_reason":null}]' + end,
            gen,
        )
        finish = b"".join(
            (
                prefix,
                b'{"index":0,"text":"","logprobs":null,"finish_reason":"',
                gen.finish_reason.encode(),
                b'"}]',
                end,
            )
        )
        tail = [finish]
        if with_usage:
            tail.append(self._usage_event(rid, created, "text_completion", gen))
        tail.append(DONE_EVENT)
        return StreamEvents([], tokens, tail)

    # --- embeddings ------------------------------------------------------------------------

    def embedding_dim(self, body: dict[str, Any]) -> int:
        """The vector length: the server's, or the request's `dimensions` when smaller."""
        requested = _optional_positive_int(body, "dimensions")
        dim = self._config.embedding_dim
        return requested if requested is not None and requested < dim else dim

    def embed(self, prompt: Prompt, dim: int) -> list[float]:
        """A deterministic unit-norm vector for one input."""
        raw = array("h", self._digest(prompt.text, 2 * dim))
        if _BIG_ENDIAN:  # pragma: no cover - keeps vectors equal across platforms
            raw.byteswap()
        norm = math.hypot(*raw)
        if norm == 0.0:  # pragma: no cover - a digest of zeros; astronomically unlikely
            return [1.0] + [0.0] * (dim - 1)
        inv = 1.0 / norm
        return [v * inv for v in raw]

    def embeddings(self, body: dict[str, Any]) -> bytes:
        """The full `/v1/embeddings` response body for a request body."""
        inputs = embedding_inputs(body)
        dim = self.embedding_dim(body)
        fmt = body.get("encoding_format", "float")
        if fmt is None:
            fmt = "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(
                "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        data: list[dict[str, Any]] = []
        for index, prompt in enumerate(inputs):
            vector = self.embed(prompt, dim)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": vector if fmt == "float" else encode_base64(vector),
                }
            )
        used = sum(p.tokens for p in inputs)
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": self._config.model,
                "usage": {"prompt_tokens": used, "total_tokens": used},
            }
        )


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32, base64."""
    packed = array("f", vector)
    if _BIG_ENDIAN:  # pragma: no cover
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_base64(text: str) -> list[float]:
    """The inverse of `encode_base64` (for tests and clients)."""
    packed = array("f", base64.b64decode(text))
    if _BIG_ENDIAN:  # pragma: no cover
        packed.byteswap()
    return packed.tolist()
