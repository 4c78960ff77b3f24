"""The frontend service: builds the parts, keeps the view fresh, and runs the background loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from corral.backends.catalog import Catalog
from corral.bus.client import Bus, decode
from corral.bus.messages import (
    KeysChanged,
    LoadProgress,
    LoadReport,
    ModelEvent,
    NodeEvent,
    ReplicaEvent,
)
from corral.config import FrontendSettings
from corral.domain.actions import RecordUse
from corral.domain.prefix import PrefixIndex
from corral.frontend.actuator import Actuator
from corral.frontend.admission import AdmissionGate
from corral.frontend.artifacts_api import ArtifactStore
from corral.frontend.auth import Authorizer, digest
from corral.frontend.coldpath import ColdLoader
from corral.frontend.drain import Drainer
from corral.frontend.headers import HeaderFilter
from corral.frontend.health import ReplicaHealth
from corral.frontend.inflight import InflightTracker
from corral.frontend.installs import InstallController
from corral.frontend.metering import Metering
from corral.frontend.metrics import FrontendMetrics, metrics_registry
from corral.frontend.models_dir import ModelsDir
from corral.frontend.nats_trust import NatsTrust
from corral.frontend.node_client import NodeClient
from corral.frontend.parts import Parts
from corral.frontend.prefix_share import PrefixShare
from corral.frontend.probe import ProbeCache
from corral.frontend.proxy import OpenAIProxy
from corral.frontend.reconciler import Reconciler
from corral.frontend.responses_map import ResponseHomes, SharedHomes
from corral.frontend.router import Router
from corral.frontend.signals import LoadSignals
from corral.frontend.upstream import UpstreamPool
from corral.frontend.usage import UsageMeter
from corral.frontend.view import ClusterView
from corral.keyfile import read_or_create_admin_key
from corral.store.registry import Registry

log = logging.getLogger(__name__)


class Frontend:
    """One frontend process: registry, bus, view, router, cold path and control loops."""

    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        self.id = settings.frontend_id
        self.registry = Registry.from_url(settings.database_url)
        self.bus = Bus(settings.nats_url, prefix=settings.nats_prefix, name=f"corral-{self.id}")
        self.nats = NatsTrust(
            self.bus,
            self.registry,
            auth_dir=settings.nats_auth_dir,
            ca_file=settings.nats_ca_file,
        )
        self.catalog = Catalog.builtin()
        self.view = ClusterView()
        self.inflight = InflightTracker(
            self.id, stale_after=max(2.0, settings.load_report_interval * 10)
        )
        self.pool = UpstreamPool()
        self.metrics = FrontendMetrics()
        self.usage = UsageMeter(self.registry.usage)
        self.probes = ProbeCache(self.pool, ttl=settings.health_ttl)
        self.authorizer = Authorizer(
            static=[digest(k.get_secret_value()) for k in settings.api_keys],
            metrics=[digest(settings.metrics_key.get_secret_value())]
            if settings.metrics_key is not None
            else [],
        )
        self.artifacts = ArtifactStore(settings.model_store) if settings.model_store else None
        self.nodes = NodeClient(
            self.bus, start_timeout=settings.start_timeout, artifacts=self.artifacts
        )
        self.actuator = Actuator(
            registry=self.registry,
            bus=self.bus,
            view=self.view,
            nodes=self.nodes,
            frontend_id=self.id,
            on_load=self.metrics.observe_load,
        )
        self.installs = InstallController(
            registry=self.registry, bus=self.bus, catalog=self.catalog
        )
        self.models_dir = (
            ModelsDir(
                settings.models_dir,
                registry=self.registry,
                actuator=self.actuator,
                catalog=self.catalog,
            )
            if settings.models_dir is not None
            else None
        )
        parts = Parts(self.registry, self.view, self.inflight, self.actuator)
        self.cold = ColdLoader(
            parts,
            frontend_id=self.id,
            artifacts=self.artifacts,
            wait_budget=settings.wait_budget,
            job_ttl=settings.load_job_ttl,
            strategy=settings.placement,
            gpu_backends=self.catalog.gpu_backends(),
            backoff=(settings.load_backoff, settings.load_backoff_max),
        )
        self.drainer = Drainer(parts, cold=self.cold, timeout=settings.drain_timeout)
        self.signals = LoadSignals(self.view, self.inflight)
        self.reconciler = Reconciler(
            parts,
            health=ReplicaHealth(
                probes=self.probes, inflight=self.inflight, actuator=self.actuator
            ),
            signals=self.signals,
            settings=settings,
            gpu_backends=self.catalog.gpu_backends(),
            artifacts=self.artifacts,
        )
        self.response_homes = SharedHomes(
            ResponseHomes(settings.response_map_size, settings.response_ttl), self.bus, self.id
        )
        self.admission = AdmissionGate(
            self.view,
            self.inflight,
            limit_of=self.catalog.max_concurrency_of,
            ensure_replica=self.cold.ensure_replica,
            max_entries=settings.queue_max_entries,
            max_bytes=settings.queue_max_bytes,
            default_deadline=settings.wait_budget,
            max_deadline=settings.max_deadline,
            key_priorities=settings.key_priorities,
            on_wait=self.metrics.observe_queue_wait,
        )
        self.router = Router(
            self.inflight.view(),
            index=PrefixIndex(max_entries=settings.prefix_index_size, ttl=settings.prefix_ttl),
        )
        self.prefixes = PrefixShare(self.bus, self.router.index, self.id)
        self.proxy = OpenAIProxy(
            view=self.view,
            inflight=self.inflight,
            pool=self.pool,
            probes=self.probes,
            ensure_replica=self.cold.ensure_replica,
            drop_replica=self.actuator.apply,
            authorizer=self.authorizer,
            max_body_bytes=settings.max_body_bytes,
            request_timeout=settings.request_timeout,
            max_inflight=settings.max_inflight,
            forward_headers=HeaderFilter(settings.forward_headers),
            capabilities=self.catalog.capabilities_of,
            homes=self.response_homes,
            spool_memory_bytes=settings.spool_memory_bytes,
            admission=self.admission,
            router=self.router,
            metering=Metering(self.metrics, self.inflight, self.usage),
        )
        self.metrics_registry = metrics_registry(self)
        self.started = False
        self.extra_loops: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reported_version = -1
        self._quiet_reports = 0

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.open()
        self.run_loops()

    async def open(self) -> None:
        """Migrate, connect, declare the models directory, fill the view and follow the events:
        all of `start` but the background loops (in-process tests drive those by hand)."""
        await self.registry.migrate()
        key_file = self.settings.admin_key_path
        if key_file is not None:
            self.authorizer.set_admin([digest(read_or_create_admin_key(key_file))])
            log.info("admin key: %s", key_file)
        await self.nats.connect()
        self.actuator.node_writes.revoke = self.nats.revoke
        if self.models_dir is not None:
            await self.models_dir.sync()
        await self.refresh()
        s = self.bus.subjects
        await self.bus.subscribe(s.replica_events, self._on_replica_event)
        await self.bus.subscribe(s.node_events, self._on_node_event)
        await self.bus.subscribe(s.model_events, self._on_model_event)
        await self.bus.subscribe(s.key_events, self._on_key_event)
        await self.bus.subscribe(s.all_load_events, self._on_load_event)
        await self.bus.subscribe(s.load_reports, self._on_load_report)
        await self.bus.subscribe_progress(s.all_load_progress, self._on_load_progress)
        await self.bus.subscribe_progress(s.all_install_progress, self.installs.on_progress)
        await self.response_homes.open()
        await self.prefixes.open()

    def run_loops(self) -> None:
        """Start the background loops: in-flight reports, last-used flushes, resyncs, the
        reconciler and any extra loop."""
        loops: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
            ("report-load", self._report_load, self.settings.load_report_interval),
            ("share-prefixes", self.prefixes.publish, self.settings.prefix_share_interval),
            ("flush-last-used", self._flush_last_used, self.settings.last_used_flush_interval),
            ("resync", self.refresh, self.settings.resync_interval),
            ("flush-usage", self.usage.flush, self.settings.usage_flush_interval),
        ]
        for name, step, interval in loops:
            self._tasks.append(asyncio.create_task(self._every(name, step, interval), name=name))
        self._tasks.append(asyncio.create_task(self.reconciler.run(), name="reconciler"))
        if self.models_dir is not None:
            self._tasks.append(asyncio.create_task(self.models_dir.watch(), name="models-dir"))
        for loop in self.extra_loops:
            self._tasks.append(asyncio.create_task(loop()))
        self.started = True
        log.info("frontend %s ready", self.id)

    async def stop(self) -> None:
        self.started = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.drainer.close()
        await self.admission.close()
        await self.cold.close()
        await self.reconciler.close()
        await self.installs.close()
        try:
            await self._flush_last_used()
        except Exception:
            log.exception("final last-used flush failed")
        try:
            await self.usage.flush()
        except Exception:
            log.exception("final usage flush failed")
        await self.actuator.close()
        await self.nats.close()
        await self.bus.close()
        await self.pool.close()
        await self.registry.close()

    async def _every(self, name: str, step: Callable[[], Awaitable[None]], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loop %s failed", name)

    # --- state ----------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Resync the view and API keys from PostgreSQL (repairs missed events)."""
        await self.view.resync(self.registry)
        self.authorizer.update(await self.registry.audit.api_key_grants())
        await self.usage.load_keys()
        self.inflight.expire()

    async def keys_changed(self) -> None:
        """This frontend stored or deleted an API key: take the keys now, and tell the other
        frontends to, so every frontend's open/closed mode changes within moments (their
        resync would take up to `resync_interval`)."""
        self.authorizer.update(await self.registry.audit.api_key_grants())
        await self.bus.publish(self.bus.subjects.key_events, KeysChanged(origin=self.id))

    # --- event handlers -------------------------------------------------------------------
    async def _on_key_event(self, payload: bytes) -> None:
        event = decode(payload, KeysChanged)
        if event is not None and event.origin != self.id:  # a hint: PostgreSQL has the keys
            self.authorizer.update(await self.registry.audit.api_key_grants())

    async def _on_replica_event(self, payload: bytes) -> None:
        """A replica changed: a hint, never authority. The view takes the replica's row from
        PostgreSQL (read now, once per event, never per request): an address only the event
        names, or that PostgreSQL gives another replica, routes nothing."""
        event = decode(payload, ReplicaEvent)
        if event is None:
            return
        if event.kind in ("removed", "failed"):
            self.reconciler.poke()  # capacity freed
        if event.origin == self.id:
            return
        row = await self.registry.replicas.get(event.model, event.index)
        if row is None:
            gone = self.view.drop_replica(event.model, event.index)
            if gone is not None and gone.address:
                self.probes.forget(gone.node_id, gone.address)
            return
        if event.address is not None and event.address != row.address:
            log.warning(
                "replica event for %s#%d names %s, PostgreSQL %s: the row is believed",
                event.model,
                event.index,
                event.address,
                row.address,
            )
        old = self.view.replicas.get(row.key)
        if old is not None and old.address and old.address != row.address:
            self.probes.forget(old.node_id, old.address)
        self.view.put_replica(row)

    async def _on_node_event(self, payload: bytes) -> None:
        event = decode(payload, NodeEvent)
        if event is None:
            return
        if event.kind in ("joined", "labels", "status"):
            self.reconciler.poke()  # capacity may have appeared
        if event.origin == self.id:
            return
        node = await self.registry.nodes.get(event.node_id)
        if node is None:
            self.view.drop_node(event.node_id)
        else:
            self.view.put_node(node)
            if event.kind == "removed" or node.status.value == "offline":
                for replica in list(self.view.replicas.values()):
                    if replica.node_id == node.id:
                        self.view.drop_replica(replica.model, replica.index)

    async def _on_model_event(self, payload: bytes) -> None:
        event = decode(payload, ModelEvent)
        if event is None or event.origin == self.id:
            return
        spec = await self.registry.models.get(event.name)
        if spec is None:
            self.view.drop_model(event.name)
        else:
            self.view.put_model(spec)

    async def _on_load_progress(self, node_id: str, payload: bytes) -> None:
        """A worker's progress on a load: the node is the one the subject names."""
        event = decode(payload, LoadProgress)
        if event is not None:
            await self._take_load_event(event.model_copy(update={"node_id": node_id}))

    async def _on_load_event(self, payload: bytes) -> None:
        event = decode(payload, LoadProgress)
        if event is not None and event.origin != self.id:
            await self._take_load_event(event)

    async def _take_load_event(self, event: LoadProgress) -> None:
        self.view.progress[event.model] = event
        if event.state == "failed" and event.error:
            self.cold.load_failed_elsewhere(event.model, event.error)

    async def _on_load_report(self, payload: bytes) -> None:
        report = decode(payload, LoadReport)
        if report is not None:
            self.inflight.merge(report)

    # --- loops ----------------------------------------------------------------------------
    async def _report_load(self) -> None:
        self.signals.sample()
        version = self.inflight.version
        if version == self._reported_version and not self.inflight.local:
            self._quiet_reports += 1
            if self._quiet_reports % 5:
                return  # nothing in flight and nothing changed: report less often
        self._reported_version = version
        await self.bus.publish(self.bus.subjects.load_reports, self.inflight.report())

    async def _flush_last_used(self) -> None:
        used, self.proxy.used = self.proxy.used, {}
        if used:
            await self.actuator.apply(RecordUse(used))
