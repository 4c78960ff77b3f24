"""Rolling updates on a real cluster: two frontends, a worker, sims as processes, steady traffic.

The sim answers with its configuration's fingerprint (`system_fingerprint`), so the traffic
sees which revision served each request; the audit log says when the first replica of the
new revision was loaded.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from cluster import FAST_FRONTEND_ENV, Cluster, wait_for
from traffic import Traffic, events, start_workers

pytestmark = pytest.mark.slow

TICK = float(FAST_FRONTEND_ENV["CORRAL_RECONCILE_INTERVAL"])
ROUTED = 0.5  # seconds for a loaded replica's event to reach the other frontend's view


def spec(fingerprint: str, replicas: int, **options: Any) -> dict[str, Any]:
    return {
        "backend": "sim",
        "options": {"tokens": 2, "load_time": 1, "fingerprint": fingerprint, **options},
        "scheduling": {"min_replicas": replicas},
    }


def model(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = cluster.api("GET", "/api/models/chat")
    return found


def rolled(cluster: Cluster, replicas: int) -> bool:
    m = model(cluster)
    states = [(r["state"], r["revision"]) for r in m["replicas"]]
    return states == [("loaded", m["revision"])] * replicas


class Watch:
    """Polls the replicas in the background: the fewest loaded ones seen during a rollout."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.fewest: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                n = sum(1 for r in self.cluster.replicas("chat") if r["state"] == "loaded")
            except Exception:  # noqa: S112 - a poll that failed says nothing
                continue
            self.fewest = n if self.fewest is None else min(self.fewest, n)


def load_seconds(cluster: Cluster) -> float:
    """The longest load so far, as the audit log reports it ("... in 1.23s (revision ...)")."""
    loads = events(cluster, "replica.loaded")
    return max(float(e["message"].split(" in ")[1].split("s")[0]) for e in loads)


def first_loaded_at(cluster: Cluster, revision: str) -> float:
    return min(e["at"] for e in events(cluster, "replica.loaded") if revision in e["message"])


def test_changed_options_roll_out_under_load_with_no_failed_request(cluster: Cluster) -> None:
    cluster.write_model("chat", **spec("v1", 3))
    front = [cluster.start_frontend(wait=False) for _ in range(2)]
    for f in front:
        cluster.wait_healthy(f)
    start_workers(cluster, "w1")
    # declared with a minimum: loaded before any request, so no request pays a load
    wait_for(lambda: rolled(cluster, 3), timeout=60, what="3 replicas preloaded")
    assert cluster.api("GET", "/api/loads")["jobs"] == []
    before = {r["address"] for r in model(cluster)["replicas"]}
    one_load = load_seconds(cluster)

    with (
        Watch(cluster) as watch,
        Traffic(cluster.url(front[0]), "chat") as t0,
        Traffic(cluster.url(front[1]), "chat") as t1,
    ):
        t0.wait_for_successes(5)
        t1.wait_for_successes(5)
        changed = time.monotonic()
        m = cluster.api("PUT", "/api/models/chat", json=spec("v2", 3))
        revision = m["revision"]
        bound = 3 * one_load + 6 * TICK + 10  # three loads, a few ticks, a loaded machine
        wait_for(lambda: rolled(cluster, 3), timeout=bound, what="every replica at v2")
        took = time.monotonic() - changed
        assert model(cluster)["revision"] == revision
        t0.wait_for_successes(len(t0.outcomes) + 5)
    print(f"\nrolled 3 replicas in {took:.1f}s (one load {one_load:.2f}s, tick {TICK:g}s)")

    outcomes = t0.outcomes + t1.outcomes
    assert t0.failures() == [] and t1.failures() == [], "no request failed"
    assert watch.fewest is not None and watch.fewest >= 3, "never below min_replicas serving"
    after = {r["address"] for r in model(cluster)["replicas"]}
    assert not before & after, "new processes at new addresses"
    ready = first_loaded_at(cluster, revision)
    late = [o for o in outcomes if o.wall >= ready + ROUTED and o.fingerprint != "v2"]
    assert late == [], "no request answered by an old replica once a new one was ready"
    assert {o.fingerprint for o in outcomes} == {"v1", "v2"}
    rollouts = [e["message"] for e in reversed(events(cluster, "model.rollout"))]
    assert [e.split(" (")[0] for e in rollouts] == ["chat rolling", "chat finished"]


def test_a_broken_revision_halts_and_a_fixed_one_finishes(cluster: Cluster) -> None:
    cluster.write_model("chat", **spec("v1", 2))
    cluster.start_frontend()
    start_workers(cluster, "w1")
    wait_for(lambda: rolled(cluster, 2), timeout=60, what="2 replicas preloaded")
    with Traffic(cluster.url(), "chat") as traffic:
        traffic.wait_for_successes(3)
        broken = cluster.api("PUT", "/api/models/chat", json=spec("v2", 2, no_such_flag=1))
        wait_for(lambda: model(cluster)["rollout"]["phase"] == "halted", timeout=60, what="halted")
        rollout = model(cluster)["rollout"]
        assert "unrecognized arguments: --no-such-flag" in rollout["last_error"]
        assert (rollout["old"], rollout["revision"]) == (2, broken["revision"])
        listed = subprocess.run(
            [
                *(sys.executable, "-m", "corral", "models"),
                *("--url", cluster.url(), "--api-key", cluster.admin_key),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "halted" in listed and "unrecognized arguments" in listed
        (halted,) = [e for e in events(cluster, "model.rollout") if "halted" in e["message"]]
        assert "unrecognized arguments" in halted["message"]
        served = len(traffic.outcomes)
        traffic.wait_for_successes(served + 3)
        assert {o.fingerprint for o in traffic.outcomes} == {"v1"}, "the old replicas serve"

        cluster.api("PUT", "/api/models/chat", json=spec("v3", 2))
        wait_for(lambda: rolled(cluster, 2), timeout=60, what="the fixed spec rolled out")
        assert model(cluster)["rollout"]["phase"] == "idle"
        traffic.wait_for_successes(len(traffic.outcomes) + 3)
    assert traffic.failures() == []
    assert traffic.outcomes[-1].fingerprint == "v3"
