"""backends/vllm_cpu.py hides CUDA-built torch extensions beside a CPU torch, in children too.

Fake `torch`, `torchvision`, ... packages (directories with a native library that names, or does
not name, libtorch_cuda.so) on a PYTHONPATH stand in for a real vllm-cpu virtualenv; the
launcher's functions run in a fresh interpreter with runpy, as the test model writer uses them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.tiny_hf_llama import LAUNCHER

CUDA_SO = b"\x7fELF....libtorch_cuda.so\x00libc10.so\x00"
CPU_SO = b"\x7fELF....libtorch_cpu.so\x00libc10.so\x00"


def package(root: Path, name: str, libraries: dict[str, bytes]) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "__init__.py").write_text(f"IMPORTED = {name!r}\n")
    for relative, data in libraries.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


PROBE = """
import importlib.util, json, os, runpy, subprocess, sys
launcher = runpy.run_path(sys.argv[1])
found = launcher["cuda_built_extensions"]()
launcher["hide"](found)

def visible(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return importlib.util.find_spec(name) is not None

child = subprocess.run(
    [sys.executable, "-c",
     "import importlib.util, json; print(json.dumps("
     "[n for n in ('torch', 'torchvision', 'torchaudio', 'torchcodec')"
     " if importlib.util.find_spec(n) is not None]))"],
    capture_output=True, text=True, check=True,
)
print(json.dumps({
    "found": found,
    "visible": [n for n in ("torch", "torchvision", "torchaudio", "torchcodec") if visible(n)],
    "child_visible": json.loads(child.stdout),
    "env": os.environ.get("CORRAL_HIDE_MODULES"),
}))
"""


def probe(site: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("CORRAL_HIDE_MODULES", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(LAUNCHER)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_cuda_builds_beside_a_cpu_torch_are_hidden_here_and_in_children(tmp_path: Path) -> None:
    package(tmp_path, "torch", {"lib/libtorch_cpu.so": b"cpu", "lib/libc10.so": b"c10"})
    package(tmp_path, "torchvision", {"_C.so": CUDA_SO, "image.so": CPU_SO})
    package(tmp_path, "torchaudio", {"lib/libtorchaudio.abi3.so": CUDA_SO})
    package(tmp_path, "torchcodec", {"libtorchcodec_core9.so": CPU_SO})  # a CPU build: kept
    result = probe(tmp_path)
    assert result["found"] == ["torchvision", "torchaudio"]
    assert result["visible"] == ["torch", "torchcodec"]
    assert result["child_visible"] == ["torch", "torchcodec"]  # through sitecustomize
    assert result["env"] == "torchvision,torchaudio"


@pytest.mark.parametrize("torch_kind", ["cuda", "absent"])
def test_nothing_is_hidden_beside_a_cuda_torch_or_without_torch(
    tmp_path: Path, torch_kind: str
) -> None:
    if torch_kind == "cuda":
        package(tmp_path, "torch", {"lib/libtorch_cuda.so": b"cuda", "lib/libc10.so": b"c10"})
    package(tmp_path, "torchvision", {"_C.so": CUDA_SO})
    result = probe(tmp_path)
    assert result["found"] == []
    assert "torchvision" in result["visible"] and "torchvision" in result["child_visible"]
