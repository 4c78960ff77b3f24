"""Probes what this machine offers: CPUs, RAM, free disk on the data directory and NVIDIA GPUs."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

from corral.domain.entities import Gpu, Resources

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_SMI_TIMEOUT = 5.0  # seconds nvidia-smi may take
_SMI_QUERY = [
    "--query-gpu=index,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]


def probe_resources(data_dir: Path) -> Resources:
    """What this machine offers now. Blocking (runs nvidia-smi): call it in a thread."""
    vm = psutil.virtual_memory()
    return Resources(
        cpu_count=_cpu_count(),
        ram_total=int(vm.total),
        ram_free=int(vm.available),
        disk_free=_disk_free(data_dir),
        gpus=probe_gpus(),
    )


def probe_gpus() -> tuple[Gpu, ...]:
    """NVIDIA GPUs via NVML when `pynvml` imports and works, else via nvidia-smi, else none."""
    gpus = _gpus_from_nvml()
    if gpus is not None:
        return gpus
    return _gpus_from_nvidia_smi()


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total,memory.free
    --format=csv,noheader,nounits` output (memory in MiB); malformed lines are skipped."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            log.warning("ignoring malformed nvidia-smi line: %r", line)
            continue
        # A name could hold a comma: the index is first, the two memory columns are last.
        index, total, free = fields[0], fields[-2], fields[-1]
        name = ", ".join(fields[1:-2])
        try:
            gpu = Gpu(
                index=int(index),
                name=name,
                memory_total=int(float(total) * _MIB),
                memory_free=int(float(free) * _MIB),
            )
        except (ValueError, OverflowError):  # "[N/A]", "nan", "inf"
            log.warning("ignoring malformed nvidia-smi line: %r", line)
            continue
        if gpu.index < 0 or gpu.memory_total < 0 or gpu.memory_free < 0 or not name:
            log.warning("ignoring malformed nvidia-smi line: %r", line)
            continue
        gpus.append(gpu)
    return tuple(gpus)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def _disk_free(data_dir: Path) -> int:
    path = data_dir.absolute()
    while not path.exists() and path != path.parent:  # the data dir may not exist yet
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _gpus_from_nvml() -> tuple[Gpu, ...] | None:
    """GPUs via NVML; None when pynvml is missing or NVML does not initialise."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception as e:
        log.debug("NVML unavailable: %s", e)
        return None
    try:
        gpus: list[Gpu] = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                name = nvml.nvmlDeviceGetName(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                if isinstance(name, bytes):  # older pynvml returns bytes
                    name = name.decode(errors="replace")
                gpus.append(
                    Gpu(
                        index=i,
                        name=str(name),
                        memory_total=int(mem.total),
                        memory_free=int(mem.free),
                    )
                )
            except Exception as e:
                log.warning("cannot read GPU %d through NVML: %s", i, e)
        return tuple(gpus)
    except Exception as e:
        log.warning("NVML failed: %s", e)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as e:
            log.debug("nvmlShutdown failed: %s", e)


def _gpus_from_nvidia_smi() -> tuple[Gpu, ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, *_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=_SMI_TIMEOUT,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed: %s", e)
        return ()
    return parse_nvidia_smi(out.stdout)
