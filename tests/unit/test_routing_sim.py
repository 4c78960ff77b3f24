"""The default routing weights against least-loaded and round robin in the routing simulation.

The simulation (bench/routesim.py) is deterministic and pure Python: replicas with slots and an
LRU prefix cache, Poisson arrivals, the real hashing, prefix index and `route`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load_routesim() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "routesim.py"
    spec = importlib.util.spec_from_file_location("routesim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["routesim"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


sim = _load_routesim()


def run(kind: str, rate: float) -> dict[str, Any]:
    cfg = sim.SimConfig(requests=2000, rate=rate)
    requests = sim.workload(kind, cfg)
    return {p.name: sim.simulate(p, requests, cfg, kind) for p in sim.policies(cfg.replicas)}


DEFAULT, LEAST, RR = "corral (defaults)", "least-loaded", "round-robin"


@pytest.mark.parametrize("rate", [30.0, 45.0, 55.0])
def test_defaults_beat_least_loaded_on_shared_prefixes(rate: float) -> None:
    got = run("shared-prefix", rate)
    ours, least = got[DEFAULT], got[LEAST]
    assert ours.hit_rate > least.hit_rate + 0.1
    assert ours.mean < least.mean * 0.95
    assert ours.p99 <= least.p99 * 1.05


@pytest.mark.parametrize("kind", ["uniform", "mixed"])
@pytest.mark.parametrize("rate", [30.0, 55.0])
def test_defaults_never_lose_more_than_5_percent(kind: str, rate: float) -> None:
    got = run(kind, rate)
    ours, least = got[DEFAULT], got[LEAST]
    assert ours.mean <= least.mean * 1.05
    assert ours.p99 <= least.p99 * 1.05


def test_simulation_is_deterministic() -> None:
    a, b = run("mixed", 45.0), run("mixed", 45.0)
    assert [r.latencies for r in a.values()] == [r.latencies for r in b.values()]
