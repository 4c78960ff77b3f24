"""The cold path: one load per model across the cluster, placement, eviction, and the wait budget.

It decides and waits; the actuator starts the replica, evicts and reports the progress.

Requests for a model without a loaded replica call `ensure_replica`. On each frontend, one
task per model does the work; across frontends, the `load_jobs` claim in PostgreSQL elects a
single loader while the others wait for its replica event. While a replica of the model is
already starting (the reconciler's preload, rollout or scale-up), requests wait for it.
Waiters give up after the wait budget with 503 and the load's progress; the load itself goes
on (a client that leaves does not cancel it). A failed load reaches every waiter with the
node's own error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable

from corral.domain.actions import ReportLoad, StartReplica, StopReplica
from corral.domain.entities import ModelSpec, Node, Replica, ReplicaState
from corral.domain.eviction import plan_eviction
from corral.domain.memory import MemoryPool, estimate_memory, memory_pool
from corral.domain.placement import Strategy, place
from corral.errors import CorralError, LoadFailed, LoadTimeout, NoCapacity
from corral.frontend.artifacts_api import ArtifactStore
from corral.frontend.parts import Parts

log = logging.getLogger(__name__)

CAPACITY_POLL = 0.5  # seconds between placement attempts while every replica is busy
#: Replica states on the way to LOADED.
STARTING = frozenset({ReplicaState.SCHEDULED, ReplicaState.STAGING, ReplicaState.LOADING})


class ColdLoader:
    """Makes sure a model has a loaded replica, loading it at most once at a time cluster-wide."""

    def __init__(
        self,
        parts: Parts,
        *,
        frontend_id: str,
        artifacts: ArtifactStore | None,
        wait_budget: float,
        job_ttl: float,
        strategy: Strategy = "binpack",
        gpu_backends: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = parts.registry
        self.view = parts.view
        self.inflight = parts.inflight
        self.actuator = parts.actuator
        self.frontend_id = frontend_id
        self.artifacts = artifacts
        self.wait_budget = wait_budget
        self.job_ttl = job_ttl
        self.strategy: Strategy = strategy
        self.gpu_backends = gpu_backends
        self.clock = clock
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, tuple[float, str]] = {}  # model -> (wall time, error)
        self.starts = 0  # loads this frontend performed itself (tests, metrics)

    # --- waiting side -------------------------------------------------------------------
    async def ensure_replica(self, spec: ModelSpec) -> None:
        """Return once `spec` has a candidate replica; raise a 503-type error otherwise."""
        deadline = self.clock() + self.wait_budget
        while not self.view.candidates(spec.name):
            task = self._loads.get(spec.name)
            if task is None:
                task = asyncio.create_task(self._load(spec), name=f"load:{spec.name}")
                self._loads[spec.name] = task
                task.add_done_callback(functools.partial(self._finished, spec.name))
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise self._timeout(spec)
            done, _ = await asyncio.wait({task}, timeout=remaining)
            if not done:
                raise self._timeout(spec)
            exc = task.exception()
            if exc is not None:
                raise exc

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("load of %s failed: %s", name, exc)

    def _timeout(self, spec: ModelSpec) -> LoadTimeout:
        progress = self.view.progress.get(spec.name)
        load = (
            {
                "state": progress.state,
                "phase": progress.phase,
                "percent": progress.percent,
                "node_id": progress.node_id,
            }
            if progress
            else {"state": "pending"}
        )
        return LoadTimeout(
            f"model '{spec.name}' is still loading after {self.wait_budget:g}s; retry later",
            retry_after=5,
            load=load,
        )

    def load_failed_elsewhere(self, model: str, error: str) -> None:
        """Another frontend reports that its load of `model` failed (from a load event)."""
        self._failures[model] = (time.time(), error)
        self.view.changed(model).set()

    # --- loading side -------------------------------------------------------------------
    async def _load(self, spec: ModelSpec) -> None:
        began = time.time()
        while not self.view.candidates(spec.name):
            if self._starting(spec.name):
                # a replica of it is on its way (the reconciler preloads, rolls or scales it,
                # or another load): wait for it rather than start one more
                await self._changed(spec.name)
                continue
            if await self.registry.jobs.claim(spec.name, self.frontend_id, ttl=self.job_ttl):
                await self._load_claimed(spec)
                return
            job = await self.registry.jobs.get(spec.name)
            if job is not None and job.state == "failed" and job.error:
                raise LoadFailed(job.error, retry_after=5)
            failure = self._failures.get(spec.name)
            if failure is not None and failure[0] >= began:
                raise LoadFailed(failure[1], retry_after=5)
            # another frontend loads it: wait for its replica event, re-checking the claim
            await self._changed(spec.name)

    def _starting(self, model: str) -> bool:
        return any(r.state in STARTING for r in self.view.replicas_of(model))

    async def _changed(self, model: str) -> None:
        """Return on the next change of the model's replicas, or after a second."""
        changed = self.view.changed(model)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout=1.0)

    async def _load_claimed(self, spec: ModelSpec) -> None:
        renew = asyncio.create_task(self._renew(spec.name))
        try:
            self.starts += 1
            await self.actuator.apply(ReportLoad(spec.name, "placing"))
            node_id, estimate = await self.choose_node(spec)
            await self.actuator.apply(
                StartReplica(spec.name, node_id, None, spec.backend, estimate, "cold start")
            )
        except CorralError as exc:
            await self.registry.jobs.fail(spec.name, self.frontend_id, exc.message)
            await self.actuator.apply(ReportLoad(spec.name, "failed", error=exc.message))
            raise
        except Exception as exc:
            await self.registry.jobs.fail(spec.name, self.frontend_id, repr(exc))
            await self.actuator.apply(ReportLoad(spec.name, "failed", error=repr(exc)))
            raise LoadFailed(f"loading {spec.name} failed: {exc!r}") from exc
        else:
            await self.registry.jobs.finish(spec.name, self.frontend_id)
        finally:
            renew.cancel()

    async def _renew(self, model: str) -> None:
        while True:
            await asyncio.sleep(self.job_ttl / 3)
            try:
                await self.registry.jobs.update(model, self.frontend_id, ttl=self.job_ttl)
            except Exception:
                log.exception("renewing the load claim of %s failed", model)

    async def choose_node(self, spec: ModelSpec) -> tuple[str, int]:
        """Choose a node, evicting idle replicas when that makes room; wait while all are busy."""
        size = await self.artifacts.size(spec.artifact) if self.artifacts else None
        estimate = estimate_memory(spec, size)
        pool = memory_pool(spec, self.gpu_backends)
        deadline = self.clock() + self.wait_budget
        while True:
            nodes = await self.registry.nodes.all()
            replicas = self._fresh_use(await self.registry.replicas.all())
            pools = self._pools()
            decision = place(
                spec,
                estimate,
                nodes,
                replicas,
                strategy=self.strategy,
                pool=pool,
                model_pools=pools,
            )
            if decision.node_id is not None:
                return decision.node_id, estimate
            if not decision.eviction_may_help:
                raise NoCapacity(decision.reason, retry_after=10)
            plan = plan_eviction(
                estimate,
                _only(nodes, decision.eviction_candidates),
                replicas,
                self.inflight.view(),
                {m.name: m.scheduling.min_replicas for m in self.view.models.values()},
                spec.name,
                pool=pool,
                model_pools=pools,
            )
            if plan is not None:
                await self._evict(spec, plan.node_id, plan.victims)
                continue
            if self.clock() >= deadline:
                raise NoCapacity(
                    f"{decision.reason}; every replica that could make room is busy",
                    retry_after=5,
                )
            await asyncio.sleep(CAPACITY_POLL)

    async def _evict(self, spec: ModelSpec, node_id: str, victims: tuple[Replica, ...]) -> None:
        await self.actuator.apply(ReportLoad(spec.name, "evicting", node_id=node_id))
        names = ", ".join(f"{v.model}#{v.index}" for v in victims)
        log.info("evicting %s on %s to make room for %s", names, node_id, spec.name)
        for victim in victims:
            await self.actuator.apply(
                StopReplica.of(victim, f"evicted to make room for {spec.name}")
            )

    def _fresh_use(self, replicas: list[Replica]) -> list[Replica]:
        """Rows with this frontend's own last-used times, which the DB gets only in batches."""
        used = self.view.last_used
        return [
            dataclasses.replace(r, last_used=used[r.key])
            if used.get(r.key, 0.0) > r.last_used
            else r
            for r in replicas
        ]

    def _pools(self) -> dict[str, MemoryPool]:
        return {m.name: memory_pool(m, self.gpu_backends) for m in self.view.models.values()}

    async def close(self) -> None:
        for task in list(self._loads.values()):
            task.cancel()
        if self._loads:
            await asyncio.gather(*self._loads.values(), return_exceptions=True)


def _only(nodes: list[Node], ids: tuple[str, ...]) -> list[Node]:
    wanted = set(ids)
    return [n for n in nodes if n.id in wanted]
