"""The cold path: one load per model across the cluster, placement, eviction, and the wait budget.

It decides and waits; the actuator starts the replica, evicts and reports the progress.

Requests for a model without a loaded replica call `ensure_replica`. On each frontend, one
task per model does the work; across frontends, the `load_jobs` claim in PostgreSQL elects a
single loader while the others wait for its replica event. While a replica of the model is
already starting (the reconciler's preload, rollout or scale-up), requests wait for it.
Waiters give up after the wait budget with 503 and the load's progress (`model_loading`, only
while a load really runs; `no_capacity` naming why while no node has room); the load itself goes
on (a client that leaves does not cancel it). While no node is healthy (none joined yet, or all
pending or re-joining), the load waits for one within the budget. A failed load reaches every
waiter, on every frontend, with the same error (the job row keeps its wire code): the node's
own error as `model_load_failed`, `no_capacity`, or `no_eligible_node` (no node matches the
selector or runs the backend: 503 without Retry-After, since retrying cannot help).

Backoff: a model whose loads fail in a row is not loaded again for 5, 10, 20 ... seconds
(`backoff`, capped); meanwhile every request gets the last error at once, with Retry-After the
time left. A success (the job row is deleted) or a change of the model's spec or of the nodes
(`forget_failed`) resets it. Capacity and transport failures keep their verdict 5 s and do not
count; a node with no responder on its command subject has not re-joined yet (a restart): the
load places again within the budget instead of failing every waiter.
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
from corral.errors import (
    CapacityError,
    CorralError,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
    NoEligibleNode,
    TransportError,
    Unavailable,
)
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
        backoff: tuple[float, float] = (5.0, 300.0),
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
        self.backoff = backoff  # (first, most) seconds between failed loads of a model
        self.clock = clock
        self._waiting: dict[str, str] = {}  # model -> why its load waits (no node, no room)
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, tuple[float, str]] = {}  # model -> (wall time, error)
        self.starts = 0  # loads this frontend performed itself (tests, metrics)

    # --- waiting side -------------------------------------------------------------------
    async def ensure_replica(self, spec: ModelSpec, budget: float | None = None) -> None:
        """Return once `spec` has a candidate replica; raise a 503-type error after `budget`
        seconds (the request's deadline; default: the wait budget)."""
        budget = self.wait_budget if budget is None else budget
        deadline = self.clock() + budget
        while not self.view.candidates(spec.name):
            task = self._loads.get(spec.name)
            if task is None:
                task = asyncio.create_task(self._load(spec), name=f"load:{spec.name}")
                self._loads[spec.name] = task
                task.add_done_callback(functools.partial(self._finished, spec.name))
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise self._timeout(spec, budget)
            done, _ = await asyncio.wait({task}, timeout=remaining)
            if not done:
                raise self._timeout(spec, budget)
            exc = task.exception()
            if exc is not None:
                raise exc

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        if self._loads.get(name) is task:
            del self._loads[name]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("load of %s failed: %s", name, exc)

    def _timeout(self, spec: ModelSpec, budget: float) -> Unavailable:
        """The wait budget passed: `model_loading` with the progress while a load runs,
        else `no_capacity` naming why nothing is loading."""
        progress = self.view.progress.get(spec.name)
        loading = self._starting(spec.name) or (
            progress is not None and progress.state in ("staging", "installing", "loading")
        )
        if not loading:
            why = self._waiting.get(spec.name) or (
                f"no node has room for it yet ({progress.state})" if progress else "not placed yet"
            )
            return NoCapacity(
                f"model '{spec.name}' is not loading after {budget:g}s: {why}",
                retry_after=5,
            )
        load = (
            {
                "state": progress.state,
                "phase": progress.phase,
                "percent": progress.percent,
                "node_id": progress.node_id,
            }
            if progress
            else {"state": "starting"}
        )
        return LoadTimeout(
            f"model '{spec.name}' is still loading after {budget:g}s; retry later",
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
                left = max(1.0, job.expires_at - time.time())
                raise load_error(job.error_code, job.error, left)  # in backoff: the last error
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
            await self._start(spec)
        except CorralError as exc:
            await self._failed(spec, exc)
            raise
        except Exception as exc:
            error = LoadFailed(f"loading {spec.name} failed: {exc!r}")
            await self._failed(spec, error)
            raise error from exc
        else:
            await self.registry.jobs.finish(spec.name, self.frontend_id)
        finally:
            renew.cancel()

    async def _start(self, spec: ModelSpec) -> None:
        """Place and start one replica. A node without a responder on its command subject has
        not re-joined yet (after a restart): place again, within the wait budget."""
        deadline = self.clock() + self.wait_budget
        while True:
            node_id, estimate = await self.choose_node(spec)
            try:
                await self.actuator.apply(
                    StartReplica(spec.name, node_id, None, spec.backend, estimate, "cold start")
                )
                return
            except LoadFailed as exc:
                if not exc.extra.get("no_responders") or self.clock() >= deadline:
                    raise
                log.info("node %s is not back yet; placing %s again", node_id, spec.name)
                await asyncio.sleep(CAPACITY_POLL)

    async def _failed(self, spec: ModelSpec, exc: CorralError) -> None:
        """Record the failed load for every frontend: a real failure backs off longer each time
        in a row; a capacity verdict holds 5 s. The error says when to retry."""
        counts = not isinstance(exc, CapacityError | TransportError)
        counts = counts and not exc.extra.get("no_responders")
        keep = await self.registry.jobs.fail(
            spec.name,
            self.frontend_id,
            exc.message,
            code=exc.code,
            backoff=self.backoff if counts else None,
        )
        if not isinstance(exc, NoEligibleNode):
            exc.retry_after = keep
        await self.actuator.apply(ReportLoad(spec.name, "failed", error=exc.message))

    async def _renew(self, model: str) -> None:
        while True:
            await asyncio.sleep(self.job_ttl / 3)
            try:
                await self.registry.jobs.update(model, self.frontend_id, ttl=self.job_ttl)
            except Exception:
                log.exception("renewing the load claim of %s failed", model)

    async def choose_node(self, spec: ModelSpec, *, wait_for_nodes: bool = True) -> tuple[str, int]:
        """Choose a node, evicting idle replicas when that makes room; wait while all are busy,
        and while none is healthy unless `wait_for_nodes` is False (then NoCapacity at once)."""
        size = await self.artifacts.size(spec.artifact) if self.artifacts else None
        estimate = estimate_memory(spec, size)
        pool = memory_pool(spec, self.gpu_backends)
        deadline = self.clock() + self.wait_budget
        try:
            while True:
                placed = await self._place(spec, estimate, pool, wait_for_nodes)
                if placed is not None:
                    return placed, estimate
                if self.clock() >= deadline:
                    raise NoCapacity(self._waiting[spec.name], retry_after=5)
                await asyncio.sleep(CAPACITY_POLL)
        finally:
            self._waiting.pop(spec.name, None)

    async def _place(
        self, spec: ModelSpec, estimate: int, pool: MemoryPool, wait_for_nodes: bool = True
    ) -> str | None:
        """A node for the replica (evicting idle ones if that makes room), or None after
        noting in `_waiting` why the load must wait; raises when waiting cannot help."""
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
                return decision.node_id
            if decision.healthy == 0:  # none joined yet, or all pending or re-joining
                if not wait_for_nodes:
                    raise NoCapacity(decision.reason, retry_after=5)
                self._waiting[spec.name] = decision.reason
                return None
            if decision.eligible == 0:
                raise NoEligibleNode(decision.reason)
            if not decision.eviction_may_help:
                raise NoCapacity(decision.reason, retry_after=10)
            candidates = _only(nodes, decision.eviction_candidates)
            plan = plan_eviction(
                estimate,
                candidates,
                replicas,
                self.inflight.view(),
                {m.name: m.scheduling.min_replicas for m in self.view.models.values()},
                spec.name,
                pool=pool,
                model_pools=pools,
            )
            if plan is None:
                self._waiting[spec.name] = f"{decision.reason}; {self._blocked(candidates)}"
                return None
            await self._evict(spec, plan.node_id, plan.victims)

    def _blocked(self, nodes: list[Node]) -> str:
        """Why no replica on `nodes` may be evicted: busy ones, and ones their model's
        minimum holds."""
        wanted = {n.id for n in nodes}
        mins = {m.name: m.scheduling.min_replicas for m in self.view.models.values()}
        loaded = [r for r in self.view.replicas.values() if r.state == ReplicaState.LOADED]
        per_model: dict[str, int] = {}
        for r in loaded:
            per_model[r.model] = per_model.get(r.model, 0) + 1
        busy = held = 0
        for r in loaded:
            if r.node_id not in wanted:
                continue
            if self.inflight.total(r.key) > 0:
                busy += 1
            elif per_model[r.model] <= mins.get(r.model, 0):
                held += 1
        named = [
            f"{busy} busy" if busy else "",
            f"{held} held at their model's minimum" if held else "",
        ]
        return "no replica can be evicted to make room: " + (
            ", ".join(n for n in named if n) or "none is idle"
        )

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


def load_error(code: str | None, message: str, retry_after: float) -> CorralError:
    """A failed load's error as its loader raised it (from the job row's wire code)."""
    if code == NoEligibleNode("").code:
        return NoEligibleNode(message)
    if code == NoCapacity("").code:
        return NoCapacity(message, retry_after=retry_after)
    return LoadFailed(message, retry_after=retry_after)


def _only(nodes: list[Node], ids: tuple[str, ...]) -> list[Node]:
    wanted = set(ids)
    return [n for n in nodes if n.id in wanted]
