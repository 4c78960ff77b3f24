"""A newcomer's first run of `corral up`: plain words about root, a banner that says where models
go, a models directory that is watched, conventions clients expect, and a taken port that is
one line and exit code 1."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cluster import wait_for
from corral.embedded import free_port
from e2e.test_up import start_up, tree, wait_up

pytestmark = pytest.mark.slow


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _corral(*args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_TOKEN"] = "t"
    env.update(extra)
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_a_taken_port_is_one_line_and_exit_1(taken_port: int, tmp_path: Path) -> None:
    for args in (
        ("up", "--port", str(taken_port), "--data-dir", str(tmp_path / "data")),
        ("serve", "--port", str(taken_port)),
    ):
        done = _corral(*args)
        assert done.returncode == 1, done
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert lines == [
            f"error: port {taken_port} on 127.0.0.1 is already in use: stop what listens "
            "there, or choose another --port"
        ], lines
    assert not (tmp_path / "data" / "postgres").exists(), "nothing started before the check"


def _chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_first_run_says_what_it_does_and_watches_the_models_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_up(data_dir, port, log)
    try:
        wait_up(proc, log, port, runs=1)
        output = log.read_text()
        models_dir = data_dir / "models"
        assert f"Models: {models_dir}\n" in output
        assert "add one by writing a YAML file there" in output
        if os.geteuid() == 0:
            assert output.count("unprivileged system user 'corral-postgres'") == 1, output

        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        key_file = data_dir / "admin.key"  # made on first start, only its path is printed
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert str(key_file) in output and key not in output
        admin = {"authorization": f"Bearer {key}"}
        docs = httpx.get(f"{url}/docs", timeout=5, headers=admin).text
        assert "https://" not in docs and "http://" not in docs
        assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', docs)
        assert len(assets) == 3, docs  # script, stylesheet, icon: served by this frontend
        for asset in assets:
            assert httpx.get(url + asset, timeout=10).status_code == 200, asset

        written = time.monotonic()
        (models_dir / "second.yaml").write_text(
            yaml.safe_dump({"name": "second", "backend": "sim", "options": {"tokens": 4}})
        )
        wait_for(lambda: _chat(url, "second").status_code == 200, timeout=5, what="served")
        print(f"a new model file was served after {time.monotonic() - written:.2f}s")

        (models_dir / "broken.yaml").write_text("name: broken\nbackend: sim\nmemory: lots\n")

        def reported() -> list[dict[str, str]]:
            errors: list[dict[str, str]] = httpx.get(f"{url}/api/models", headers=admin).json()[
                "errors"
            ]
            return errors

        (error,) = wait_for(reported, timeout=5, what="the broken file reported")
        assert (error["file"], error["field"]) == (str(models_dir / "broken.yaml"), "memory")
        listing = _corral("models", "--url", url, CORRAL_DATA_DIR=str(data_dir))
        assert listing.returncode == 0, listing
        assert "second" in listing.stdout and "1 model file error(s):" in listing.stdout
        assert f"{models_dir / 'broken.yaml'}: memory:" in listing.stdout

        (models_dir / "second.yaml").unlink()
        wait_for(lambda: _chat(url, "second").status_code == 404, timeout=5, what="removed")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            for p in tree(proc.pid):
                p.kill()
