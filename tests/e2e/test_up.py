"""`corral up`: one command brings up a working endpoint; SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from cluster import wait_for
from corral.embedded import free_port

pytestmark = pytest.mark.slow


def start_up(data_dir: Path, port: int, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "corral",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def wait_up(proc: subprocess.Popen[bytes], log: Path, port: int, runs: int) -> None:
    """Wait for the banner (printed once the local worker has joined) of the `runs`-th start."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"corral up exited:\n{log.read_text()[-3000:]}")
        if log.read_text().count("Corral is up") < runs:
            return False
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200

    wait_for(ready, timeout=120, what="corral up ready")


def chat(port: int) -> str:
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0
    ) as client:
        answer = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello!"}]
        )
    return answer.choices[0].message.content or ""


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    port = free_port()
    started = time.monotonic()
    proc = start_up(data_dir, port, log)
    try:
        wait_up(proc, log, port, runs=1)
        api = f"http://127.0.0.1:{port}/api"
        key_file = data_dir / "admin.key"
        assert str(key_file) in log.read_text()  # its path is shown, the key never
        admin = {"authorization": f"Bearer {key_file.read_text().strip()}"}
        assert httpx.get(f"{api}/models/demo", timeout=5).status_code == 401
        demo = httpx.get(f"{api}/models/demo", timeout=5, headers=admin).json()
        assert [r["state"] for r in demo["replicas"]] == ["loaded"], "preloaded before the banner"
        assert chat(port)
        loads = httpx.get(f"{api}/loads", timeout=5, headers=admin).json()
        assert loads["jobs"] == [], "no cold load"
        first_answer = time.monotonic() - started
        print(f"corral up: first answer after {first_answer:.1f}s")
        processes = tree(proc.pid)
        names = " ".join(p.name() for p in processes)
        assert "postgres" in names and "nats-server" in names
        assert len(processes) >= 4  # corral, postgres (+ its workers), nats, the sim backend

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        wait_for(
            lambda: not [p for p in processes if p.is_running() and p.status() != "zombie"],
            timeout=30,
            what="every child process gone",
        )
        assert "corral stopped" in log.read_text()

        # the data outlives the process: the same node comes back, and it still answers
        nodes_before = (data_dir / "worker" / "node.json").read_text()
        proc = start_up(data_dir, port, log)
        wait_up(proc, log, port, runs=2)
        assert chat(port)
        nodes = httpx.get(f"http://127.0.0.1:{port}/api/nodes", headers=admin).json()["nodes"]
        assert len(nodes) == 1 and nodes[0]["id"] in nodes_before
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            for p in tree(proc.pid):
                p.kill()


def test_up_with_two_frontend_processes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    port = free_port()
    proc = start_up(data_dir, port, log, "--processes", "2")
    try:
        wait_up(proc, log, port, runs=1)
        assert chat(port)

        def ids() -> set[str]:
            found = set()
            for _ in range(12):
                with httpx.Client(timeout=5) as c:
                    found.add(c.get(f"http://127.0.0.1:{port}/healthz").json()["frontend_id"])
            return found

        wait_for(lambda: len(ids()) == 2, timeout=60, what="two frontend processes")
        processes = tree(proc.pid)
        assert sum("corral.frontends" in " ".join(p.cmdline()) for p in processes) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        wait_for(
            lambda: not [p for p in processes if p.is_running() and p.status() != "zombie"],
            timeout=30,
            what="every child process gone",
        )
    finally:
        if proc.poll() is None:
            for p in tree(proc.pid):
                p.kill()


def test_a_chat_sent_the_instant_the_port_opens_succeeds(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    port = free_port()
    proc = start_up(tmp_path / "data", port, log)

    def accepting() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"corral up exited:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(accepting, timeout=120, what="the port accepting connections")
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hello!"}]}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text  # it waited for the local worker, within its deadline
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                for p in tree(proc.pid):
                    p.kill()
