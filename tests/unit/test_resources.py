"""Tests of resource probing: nvidia-smi parsing, the nvidia-smi and NVML paths, CPU/RAM/disk."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import types
from pathlib import Path

import pytest

from corral.domain.entities import Gpu
from corral.worker import resources
from corral.worker.resources import parse_nvidia_smi, probe_gpus, probe_resources

MIB = 1024 * 1024


def test_parse_two_gpus() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 81559, 81002\n1, NVIDIA A10G, 23028, 22000\n"
    assert parse_nvidia_smi(out) == (
        Gpu(
            index=0, name="NVIDIA H100 80GB HBM3", memory_total=81559 * MIB, memory_free=81002 * MIB
        ),
        Gpu(index=1, name="NVIDIA A10G", memory_total=23028 * MIB, memory_free=22000 * MIB),
    )


def test_parse_skips_malformed_lines_and_keeps_the_good_ones() -> None:
    out = "\n".join(
        [
            "0, Tesla T4, 15360, 15000",
            "garbage",
            "1, Tesla T4, [N/A], 100",
            "x, Tesla T4, 15360, 15000",
            "2, Tesla T4, 15360",
            "3, , 15360, 100",
            "4, Tesla T4, -1, 100",
            "5, Tesla T4, inf, 100",
            "",
            "   ",
            "6, Weird, Name, 2048, 1024",
            "No devices were found",
        ]
    )
    gpus = parse_nvidia_smi(out)
    assert [g.index for g in gpus] == [0, 6]
    assert gpus[1].name == "Weird, Name"
    assert gpus[1].memory_total == 2048 * MIB


def test_parse_empty_output() -> None:
    assert parse_nvidia_smi("") == ()


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: NVML path skipped


def test_nvidia_smi_is_used_without_pynvml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        "import sys\n"
        "assert '--format=csv,noheader,nounits' in sys.argv\n"
        "print('0, Fake GPU, 1024, 512')",
    )
    assert probe_gpus() == (
        Gpu(index=0, name="Fake GPU", memory_total=MIB * 1024, memory_free=MIB * 512),
    )


def test_failing_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(
        tmp_path, monkeypatch, "import sys\nprint('0, Fake GPU, 1024, 512')\nsys.exit(9)"
    )
    assert probe_gpus() == ()


def test_hanging_nvidia_smi_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_SMI_TIMEOUT", 0.5)
    fake_nvidia_smi(tmp_path, monkeypatch, "import time\ntime.sleep(30)")
    assert probe_gpus() == ()


def test_no_nvidia_smi_and_no_pynvml_means_no_gpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert probe_gpus() == ()


class FakeMemory:
    total = 16 * 1024 * MIB
    free = 10 * 1024 * MIB


def fake_nvml(*, init_fails: bool = False, bad_device: int | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    def handle(i: int) -> int:
        if i == bad_device:
            raise RuntimeError("GPU is lost")
        return i

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: b"Old Bytes GPU" if h == 0 else "New Str GPU"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: FakeMemory()  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    return mod


def test_nvml_is_preferred_and_shut_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "print('0, From SMI, 1, 1')")
    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus = probe_gpus()
    assert [g.name for g in gpus] == ["Old Bytes GPU", "New Str GPU"]
    assert gpus[0].memory_total == FakeMemory.total and gpus[0].memory_free == FakeMemory.free
    assert nvml.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_nvml_device_error_skips_that_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(bad_device=0))
    assert [g.index for g in probe_gpus()] == [1]


def test_nvml_init_failure_falls_back_to_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "print('3, From SMI, 2048, 1024')")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_fails=True))
    assert [(g.index, g.name) for g in probe_gpus()] == [(3, "From SMI")]


def test_probe_resources_reports_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "probe_gpus", lambda: ())
    res = probe_resources(tmp_path / "not" / "created" / "yet")
    assert res.cpu_count >= 1
    assert 0 < res.ram_free <= res.ram_total
    assert res.disk_free > 0
    assert abs(res.disk_free - shutil.disk_usage(tmp_path).free) < 1024**3
    assert res.gpus == ()


@pytest.mark.gpu
def test_probe_finds_a_real_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi on this machine")
    res = probe_resources(tmp_path)
    assert res.gpus, "nvidia-smi is installed but no GPU was found"
    assert all(g.memory_total > 0 and 0 <= g.memory_free <= g.memory_total for g in res.gpus)
