"""What a backend can serve (capabilities) and which capability each OpenAI request path needs.

Pure and dependency-free, so the frontend's request path can import it without the catalog
loader: `capability_for_path("/v1/responses/resp_1")` → "responses", None for a path that is
no inference endpoint (`/v1/models`, `/health`, ...).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, get_args

Capability = Literal[
    "chat",  # POST /v1/chat/completions
    "completions",  # POST /v1/completions
    "embeddings",  # POST /v1/embeddings
    "responses",  # POST /v1/responses, GET/DELETE /v1/responses/{id}, .../cancel, .../input_items
    "rerank",  # POST /v1/rerank, /rerank, /v2/rerank
    "score",  # POST /v1/score, /score
    "transcription",  # POST /v1/audio/transcriptions, /v1/audio/translations
    "speech",  # POST /v1/audio/speech
    "images",  # POST /v1/images/generations, /v1/images/edits, /v1/images/variations
    "moderations",  # POST /v1/moderations
    "tokenize",  # POST /tokenize, /detokenize
]

#: Every capability, in declaration order.
CAPABILITIES: Final[tuple[Capability, ...]] = get_args(Capability)

#: Older names a catalog may still use, and what they stand for.
ALIASES: Final[dict[str, tuple[Capability, ...]]] = {"audio": ("transcription", "speech")}

#: Request path → the capability a backend needs to answer it (exact paths).
PATHS: Final[dict[str, Capability]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/rerank": "rerank",
    "/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/v1/score": "score",
    "/score": "score",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "transcription",
    "/v1/audio/speech": "speech",
    "/v1/images/generations": "images",
    "/v1/images/edits": "images",
    "/v1/images/variations": "images",
    "/v1/moderations": "moderations",
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
}

#: Path prefixes whose every sub-path needs a capability (a stored response by id).
PREFIXES: Final[tuple[tuple[str, Capability], ...]] = (("/v1/responses/", "responses"),)


def capability_for_path(path: str) -> Capability | None:
    """The capability a request to `path` needs; None when the path is no inference endpoint.

    `path` is the request target's path; a query string and one trailing slash are ignored.
    """
    path = path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    found = PATHS.get(path)
    if found is not None:
        return found
    for prefix, capability in PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return capability
    return None


def expand_aliases(names: Iterable[object]) -> list[object]:
    """`names` with each alias replaced by what it stands for: its first capability in its
    place, the others appended, so every other item keeps its position (an error about an
    unknown name at index i still points at it). When every name is known, duplicates are
    dropped (first one kept)."""
    items = list(names)
    head = [ALIASES[n][0] if isinstance(n, str) and n in ALIASES else n for n in items]
    tail = [c for n in items if isinstance(n, str) and n in ALIASES for c in ALIASES[n][1:]]
    out = head + tail
    if all(isinstance(n, str) and n in CAPABILITIES for n in out):
        out = list(dict.fromkeys(out))
    return out
