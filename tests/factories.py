"""Builders for tests: nodes, replicas and models with sensible defaults, files, a fake clock.

Every unit and in-process test builds its entities here; a test module that wants other
defaults wraps these in a line, it never copies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.domain.autoscale import ScalingTarget
from corral.domain.entities import (
    Gpu,
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
    Resources,
    Rollout,
    Scheduling,
)
from corral.domain.sizes import MemoryBudget

GB = 1000**3
MB = 1000**2


def node(
    node_id: str = "n1",
    *,
    status: NodeStatus = NodeStatus.HEALTHY,
    labels: Mapping[str, str] | None = None,
    budget: int | MemoryBudget | None = None,
    ram_total: int = 100 * GB,
    ram_free: int = 0,
    disk: int = 0,
    vram: int | Sequence[int] = (),
    backends: Iterable[str] = (),
    artifacts: Iterable[str] = (),
    cap: int = 0,
    last_heartbeat: float = 0.0,
    address: str = "127.0.0.1",
) -> Node:
    """A node. `budget`: bytes, a MemoryBudget, or None for the default 80%; `vram`: one GPU's
    memory (0: no GPU) or one entry per GPU."""
    sizes = ([vram] if vram else []) if isinstance(vram, int) else list(vram)
    gpus = tuple(Gpu(i, "g", v, v) for i, v in enumerate(sizes))
    if budget is None:
        memory_budget = MemoryBudget(fraction=0.8)
    elif isinstance(budget, MemoryBudget):
        memory_budget = budget
    else:
        memory_budget = MemoryBudget(size=budget)
    return Node(
        id=node_id,
        name=node_id,
        status=status,
        address=address,
        labels=dict(labels or {}),
        resources=Resources(ram_total=ram_total, ram_free=ram_free, disk_free=disk, gpus=gpus),
        memory_budget=memory_budget,
        max_replicas_per_model=cap,
        backends=frozenset(backends),
        artifacts=frozenset(artifacts),
        last_heartbeat=last_heartbeat,
    )


def replica(
    model: str = "m",
    index: int = 0,
    node_id: str = "n1",
    state: ReplicaState = ReplicaState.LOADED,
    *,
    address: str | None = "auto",
    memory: int = 0,
    last_used: float = 0.0,
    updated: float = 0.0,
    revision: str = "",
    replaces: int | None = None,
) -> Replica:
    """A replica; its address defaults to `<node>:<9000 + index>`."""
    return Replica(
        model,
        index,
        node_id,
        state,
        address=f"{node_id}:{9000 + index}" if address == "auto" else address,
        memory=memory,
        last_used=last_used,
        updated=updated,
        revision=revision,
        replaces=replaces,
    )


def model(
    name: str = "m",
    *,
    backend: str = "sim",
    artifact: str | None = None,
    memory: int | None = None,
    options: Mapping[str, Any] | None = None,
    min_replicas: int = 0,
    max_replicas: int = 0,
    spread_all: bool = False,
    selector: Mapping[str, str] | None = None,
    scale_down_delay: float = 300.0,
    scaling: ScalingTarget | None = None,
    rollout: Rollout = Rollout(),  # noqa: B008 - frozen
) -> ModelSpec:
    """A declared model."""
    return ModelSpec(
        name=name,
        backend=backend,
        artifact=artifact,
        options=dict(options or {}),
        memory=memory,
        scheduling=Scheduling(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            spread_all=spread_all,
            node_selector=dict(selector or {}),
            scale_down_delay=scale_down_delay,
            scaling=scaling,
        ),
        rollout=rollout,
    )


def write_file(directory: Path, name: str, text: str) -> Path:
    """Write `text` to `directory/name` and return the path."""
    path = directory / name
    path.write_text(text)
    return path


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
