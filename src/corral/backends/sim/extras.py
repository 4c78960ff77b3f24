"""The simulator's scoring and text-utility endpoints: rerank, score, moderations, tokenize and
detokenize (pure, deterministic: the same body always gives the same answer).

Relevance is word overlap: |A ∩ B| / sqrt(|A| |B|) over the lower-cased words of two texts.
Tokens follow the engine model's rule, 4 bytes = 1 token: a token id is its 4 bytes read
little-endian (the last token padded with NULs), so detokenize inverts tokenize exactly.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

from corral.backends.sim.engine import chat_prompt, count_words, render_chat
from corral.backends.sim.scheduler import BYTES_PER_TOKEN
from corral.errors import BadRequest

_WORD = re.compile(r"\w+")


def words(text: str) -> frozenset[str]:
    return frozenset(w.lower() for w in _WORD.findall(text))


def overlap(a: str, b: str) -> float:
    """The relevance of two texts in [0, 1]: shared words over the geometric mean of counts."""
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / math.sqrt(len(wa) * len(wb))


# --- rerank and score --------------------------------------------------------------------


def _document_text(doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        text: str = doc["text"]
        return text
    raise BadRequest("every document must be a string or an object with 'text'", param="documents")


def rerank(body: dict[str, Any], model: str, rid: str) -> bytes:
    """A `/v1/rerank` answer (Jina/Cohere shape, as vLLM answers it), best first."""
    query = body.get("query")
    if not isinstance(query, str):
        raise BadRequest("'query' is required and must be a string", param="query")
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise BadRequest("'documents' is required and must be a list", param="documents")
    texts = [_document_text(d) for d in docs]
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0):
        raise BadRequest("'top_n' must be an integer >= 0", param="top_n")
    with_docs = body.get("return_documents", True)
    if not isinstance(with_docs, bool):
        raise BadRequest("'return_documents' must be a boolean", param="return_documents")
    scored = sorted(
        ((overlap(query, t), i) for i, t in enumerate(texts)), key=lambda s: (-s[0], s[1])
    )
    if top_n:
        scored = scored[:top_n]
    results: list[dict[str, Any]] = []
    for score, index in scored:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if with_docs:
            result["document"] = {"text": texts[index]}
        results.append(result)
    used = count_words(query) * max(1, len(texts)) + sum(count_words(t) for t in texts)
    return orjson.dumps(
        {
            "id": rid,
            "model": model,
            "usage": {"prompt_tokens": used, "total_tokens": used},
            "results": results,
        }
    )


def _texts(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(f"'{name}' is required: a string or a non-empty list of strings", param=name)


def score(body: dict[str, Any], model: str, rid: str, created: int) -> bytes:
    """A `/v1/score` answer (vLLM's shape): one text against many, or pairwise."""
    first, second = _texts(body, "text_1"), _texts(body, "text_2")
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise BadRequest(
            f"'text_1' has {len(first)} texts and 'text_2' {len(second)}: "
            "give one text_1 or as many as text_2",
            param="text_1",
        )
    data = [
        {"index": i, "object": "score", "score": overlap(a, b)}
        for i, (a, b) in enumerate(zip(first, second, strict=True))
    ]
    used = sum(count_words(a) + count_words(b) for a, b in zip(first, second, strict=True))
    return orjson.dumps(
        {
            "id": rid,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0},
        }
    )


# --- moderations -------------------------------------------------------------------------

# Category -> words that flag it; every other category scores a small deterministic value.
_TRIGGERS: dict[str, frozenset[str]] = {
    "harassment": frozenset({"idiot", "loser"}),
    "harassment/threatening": frozenset({"threaten"}),
    "hate": frozenset({"hate"}),
    "hate/threatening": frozenset(),
    "illicit": frozenset({"steal", "smuggle"}),
    "illicit/violent": frozenset({"bomb"}),
    "self-harm": frozenset({"suicide"}),
    "self-harm/intent": frozenset(),
    "self-harm/instructions": frozenset(),
    "sexual": frozenset({"nsfw"}),
    "sexual/minors": frozenset(),
    "violence": frozenset({"kill", "attack"}),
    "violence/graphic": frozenset({"gore"}),
}
_IMAGE_TOO = frozenset(
    {
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "violence",
        "violence/graphic",
    }
)


def _moderation_inputs(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """(text, has an image) per result; a list of parts is one multi-modal input."""
    value = body.get("input")
    if isinstance(value, str):
        return [(value, False)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v, False) for v in value]
        if all(isinstance(v, dict) for v in value):
            text = " ".join(v["text"] for v in value if isinstance(v.get("text"), str))
            return [(text, any(v.get("type") == "image_url" for v in value))]
    raise BadRequest(
        "'input' is required: a string, a list of strings or a list of content parts",
        param="input",
    )


def _moderation(text: str, image: bool) -> dict[str, Any]:
    found = words(text)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    scores: dict[str, float] = {}
    for i, (category, triggers) in enumerate(_TRIGGERS.items()):
        scores[category] = 0.9 if found & triggers else digest[i] / 25600  # < 0.01
    flags = {c: s > 0.5 for c, s in scores.items()}
    applied = {c: (["text", "image"] if image and c in _IMAGE_TOO else ["text"]) for c in _TRIGGERS}
    return {
        "flagged": any(flags.values()),
        "categories": flags,
        "category_scores": scores,
        "category_applied_input_types": applied,
    }


def moderations(body: dict[str, Any], model: str, rid: str) -> bytes:
    """A `/v1/moderations` answer; a category is flagged when a trigger word appears."""
    results = [_moderation(text, image) for text, image in _moderation_inputs(body)]
    return orjson.dumps({"id": rid, "model": model, "results": results})


# --- tokenize ----------------------------------------------------------------------------


def encode_tokens(data: bytes) -> list[int]:
    """Token ids of bytes under the 4-bytes rule (an empty text has none)."""
    size = BYTES_PER_TOKEN
    return [
        int.from_bytes(data[i : i + size].ljust(size, b"\0"), "little")
        for i in range(0, len(data), size)
    ]


def decode_tokens(ids: list[int]) -> bytes:
    """The bytes of token ids (the inverse of encode_tokens; trailing NULs are padding)."""
    return b"".join(t.to_bytes(BYTES_PER_TOKEN, "little") for t in ids).rstrip(b"\0")


def tokenize(body: dict[str, Any], max_model_len: int) -> bytes:
    """A vLLM `/tokenize` answer for a completion prompt or chat messages."""
    if "messages" in body:
        chat_prompt(body)  # validates the messages
        data = render_chat(body)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' (a string) or 'messages' is required", param="prompt")
        data = prompt.encode("utf-8", "surrogatepass")
    ids = encode_tokens(data)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    if body.get("return_token_strs") is True:
        step = BYTES_PER_TOKEN
        answer["token_strs"] = [
            data[i : i + step].decode("utf-8", "replace") for i in range(0, len(data), step)
        ]
    return orjson.dumps(answer)


def detokenize(body: dict[str, Any]) -> bytes:
    """A vLLM `/detokenize` answer: the text of token ids."""
    ids = body.get("tokens")
    limit = 1 << (8 * BYTES_PER_TOKEN)
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit for t in ids
    ):
        raise BadRequest(f"'tokens' must be a list of token ids in [0, {limit})", param="tokens")
    return orjson.dumps({"prompt": decode_tokens(ids).decode("utf-8", "replace")})
