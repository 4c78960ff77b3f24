"""Pure frontend and configuration logic: in-flight counts, the cluster view, request parsing,
auth, error payloads, model files, the backend catalog, sizes and settings. No I/O but tmp files.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import corral.backends.catalog as catalog_module
from corral.backends.catalog import RESERVED_OPTIONS, BackendEntry, Catalog, option_flags
from corral.bus.messages import LoadReport
from corral.config import FrontendSettings, WorkerSettings, parse_labels, to_async_url
from corral.domain.entities import (
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
    Resources,
    Scheduling,
)
from corral.domain.sizes import MemoryBudget, format_size, parse_size
from corral.errors import (
    BadRequest,
    ConfigError,
    CorralError,
    LoadTimeout,
    NodeUnreachable,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from corral.frontend.asgi import error_headers, error_payload
from corral.frontend.auth import Authorizer, bearer, digest, matches_any
from corral.frontend.inflight import InflightTracker
from corral.frontend.proxy import parse_request
from corral.frontend.view import ClusterView
from corral.modelfile import load_models_dir, parse_model, parse_model_file


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# =====================================================================================
# frontend/inflight.py
# =====================================================================================

A = ("m", 0)
B = ("m", 1)
C = ("other", 0)


def _tracker(clock: FakeClock | None = None) -> InflightTracker:
    return InflightTracker("fe-me", stale_after=2.0, clock=clock or FakeClock())


def test_inflight_acquire_counts_and_release_returns_to_zero() -> None:
    t = _tracker()
    s1 = t.acquire(A)
    s2 = t.acquire(A)
    s3 = t.acquire(B)
    assert (t.total(A), t.total(B), t.local_total()) == (2, 1, 3)
    s1.release()
    assert t.total(A) == 1
    s2.release()
    s3.release()
    assert t.local == {}
    assert (t.total(A), t.total(B), t.local_total()) == (0, 0, 0)


def test_inflight_double_release_never_goes_negative() -> None:
    t = _tracker()
    first = t.acquire(A)
    second = t.acquire(A)
    first.release()
    first.release()
    first.release()
    assert t.total(A) == 1, "a repeated release must not free another request's slot"
    assert first.released and not second.released
    second.release()
    second.release()
    assert t.total(A) == 0
    assert A not in t.local


def test_inflight_version_bumps_on_local_changes_only() -> None:
    t = _tracker()
    v0 = t.version
    slot = t.acquire(A)
    v1 = t.version
    assert v1 > v0
    slot.release()
    v2 = t.version
    assert v2 > v1
    slot.release()  # no-op: nothing changed, nothing to report
    assert t.version == v2
    t.merge(LoadReport(frontend_id="fe-other", inflight=[("m", 0, 3)]))
    assert t.version == v2, "remote reports are not this frontend's state"


def test_inflight_merge_adds_remote_counts_and_ignores_own_echo() -> None:
    t = _tracker()
    t.acquire(A)
    t.merge(LoadReport(frontend_id="fe-me", inflight=[("m", 0, 50)]))
    assert t.total(A) == 1, "our own broadcast echoed back must not double count"
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 2), ("m", 1, 4)]))
    t.merge(LoadReport(frontend_id="fe-3", inflight=[("m", 0, 3), ("other", 0, 0)]))
    assert (t.total(A), t.total(B), t.total(C)) == (1 + 2 + 3, 4, 0)
    assert t.local_total() == 1, "remote counts are not local"


def test_inflight_newer_report_replaces_older_one_of_same_frontend() -> None:
    t = _tracker()
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 5)]))
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 1, 1)]))
    assert (t.total(A), t.total(B)) == (0, 1)


def test_inflight_expire_forgets_stale_reports_only() -> None:
    clock = FakeClock(100.0)
    t = _tracker(clock)
    t.merge(LoadReport(frontend_id="fe-old", inflight=[("m", 0, 4)]))
    clock.now = 101.0
    t.merge(LoadReport(frontend_id="fe-new", inflight=[("m", 0, 1)]))
    clock.now = 101.9  # fe-old is 1.9 s old: still fresh
    t.expire()
    assert t.total(A) == 5
    clock.now = 102.5  # fe-old 2.5 s old (stale), fe-new 1.5 s old
    t.expire()
    assert t.total(A) == 1
    clock.now = 110.0
    t.expire()
    assert t.total(A) == 0


def test_inflight_view_is_a_mapping_of_local_plus_remote() -> None:
    t = _tracker()
    t.acquire(A)
    t.acquire(A)
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 1), ("m", 1, 3)]))
    view = t.view()
    assert view[A] == 3
    assert view.get(B, 0) == 3
    assert view.get(C, 0) == 0
    assert view[C] == 0
    assert set(view) == {A, B}
    assert len(view) == 2
    assert dict(view) == {A: 3, B: 3}
    t.acquire(C)  # a live view: later changes show through
    assert view[C] == 1 and len(view) == 3


def test_inflight_report_carries_local_counts_and_clock() -> None:
    clock = FakeClock(42.0)
    t = _tracker(clock)
    t.acquire(A)
    t.acquire(B)
    t.acquire(B)
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 9)]))
    report = t.report()
    assert report.frontend_id == "fe-me"
    assert report.at == 42.0
    assert sorted(report.inflight) == [("m", 0, 1), ("m", 1, 2)]
    # what one frontend reports, another one merges
    other = InflightTracker("fe-2", clock=clock)
    other.merge(LoadReport.model_validate_json(report.model_dump_json()))
    assert (other.total(A), other.total(B)) == (1, 2)


# =====================================================================================
# frontend/view.py
# =====================================================================================


def _node(
    node_id: str = "n1",
    *,
    status: NodeStatus = NodeStatus.HEALTHY,
    labels: dict[str, str] | None = None,
    ram_free: int = 0,
) -> Node:
    return Node(
        id=node_id,
        name=node_id,
        status=status,
        labels=labels or {},
        resources=Resources(ram_free=ram_free),
    )


def _model(name: str = "m", selector: dict[str, str] | None = None) -> ModelSpec:
    return ModelSpec(name=name, backend="sim", scheduling=Scheduling(node_selector=selector or {}))


def _replica(
    index: int,
    node: str = "n1",
    *,
    model: str = "m",
    state: ReplicaState = ReplicaState.LOADED,
    last_used: float = 0.0,
) -> Replica:
    return Replica(model, index, node, state, address=f"{node}:{9000 + index}", last_used=last_used)


def _keys(replicas: list[Replica]) -> list[tuple[str, int]]:
    return sorted(r.key for r in replicas)


@pytest.fixture
def view() -> ClusterView:
    v = ClusterView()
    v.put_node(_node("n1", labels={"zone": "a"}))
    v.put_node(_node("n2", labels={"zone": "b"}))
    v.put_model(_model("m"))
    v.put_model(_model("other"))
    v.put_replica(_replica(0, "n1"))
    v.put_replica(_replica(1, "n2"))
    v.put_replica(_replica(0, "n1", model="other"))
    return v


def test_view_candidates_filter_state_and_unknown_model(view: ClusterView) -> None:
    view.put_replica(_replica(2, "n1", state=ReplicaState.LOADING))
    view.put_replica(_replica(3, "n-unknown"))
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]
    assert view.candidates("nope") == []
    assert view.loaded_count("m") == 3
    assert len(view.replicas_of("m")) == 4


def test_view_candidates_are_cached_until_a_change(view: ClusterView) -> None:
    first = view.candidates("m")
    assert view.candidates("m") is first, "no change: the cached list is returned"
    other = view.candidates("other")
    view.put_replica(_replica(2, "n2"))
    after = view.candidates("m")
    assert after is not first
    assert _keys(after) == [("m", 0), ("m", 1), ("m", 2)]
    assert view.candidates("other") is other, "a replica of m does not invalidate other"


MUTATIONS: list[tuple[str, Any, list[tuple[str, int]]]] = [
    ("drop-replica", lambda v: v.drop_replica("m", 0), [("m", 1)]),
    (
        "replica-unloading",
        lambda v: v.put_replica(_replica(0, "n1", state=ReplicaState.UNLOADING)),
        [("m", 1)],
    ),
    ("drop-node", lambda v: v.drop_node("n2"), [("m", 0)]),
    (
        "node-unhealthy",
        lambda v: v.put_node(_node("n1", status=NodeStatus.UNHEALTHY, labels={"zone": "a"})),
        [("m", 1)],
    ),
    (
        "node-draining-still-serves",
        lambda v: v.put_node(_node("n1", status=NodeStatus.DRAINING, labels={"zone": "a"})),
        [("m", 0), ("m", 1)],
    ),
    ("selector-change", lambda v: v.put_model(_model("m", {"zone": "b"})), [("m", 1)]),
    ("drop-model", lambda v: v.drop_model("m"), []),
]


@pytest.mark.parametrize(
    ("change", "expected"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_view_change_invalidates_cached_candidates(
    view: ClusterView, change: Any, expected: list[tuple[str, int]]
) -> None:
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]  # fill the cache
    change(view)
    assert _keys(view.candidates("m")) == expected


def test_view_node_relabel_out_of_selector_removes_candidate(view: ClusterView) -> None:
    view.put_model(_model("m", {"zone": "a"}))
    assert _keys(view.candidates("m")) == [("m", 0)]
    view.put_node(_node("n1", labels={"zone": "x"}))
    assert view.candidates("m") == []
    view.put_node(_node("n2", labels={"zone": "a"}))
    assert _keys(view.candidates("m")) == [("m", 1)]


def test_view_drop_node_removes_its_replicas(view: ClusterView) -> None:
    view.drop_node("n1")
    assert ("m", 0) not in view.replicas
    assert ("other", 0) not in view.replicas
    assert ("m", 0) not in view.last_used
    assert _keys(view.replicas_of("m")) == [("m", 1)]


CHANGES_FOR_M: list[tuple[str, Any, bool]] = [
    ("put-replica-m", lambda v: v.put_replica(_replica(5, "n1")), True),
    ("drop-replica-m", lambda v: v.drop_replica("m", 0), True),
    ("put-model-m", lambda v: v.put_model(_model("m", {"zone": "a"})), True),
    ("drop-model-m", lambda v: v.drop_model("m"), True),
    ("put-node", lambda v: v.put_node(_node("n3")), True),
    ("drop-node", lambda v: v.drop_node("n2"), True),
    ("replace-all", lambda v: v.replace_all([], [], []), True),
    ("put-replica-other", lambda v: v.put_replica(_replica(5, "n1", model="other")), False),
    ("put-model-other", lambda v: v.put_model(_model("other", {"zone": "b"})), False),
]


@pytest.mark.parametrize(
    ("change", "fires"), [c[1:] for c in CHANGES_FOR_M], ids=[c[0] for c in CHANGES_FOR_M]
)
async def test_view_changed_event(view: ClusterView, change: Any, fires: bool) -> None:
    event = view.changed("m")
    assert not event.is_set()
    assert view.changed("m") is event, "waiters of one model share the pending event"
    change(view)
    assert event.is_set() is fires
    if fires:
        fresh = view.changed("m")
        assert fresh is not event and not fresh.is_set()


async def test_view_changed_wakes_a_waiter(view: ClusterView) -> None:
    waiter = asyncio.create_task(view.changed("m").wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    view.put_replica(_replica(7, "n2"))
    await asyncio.wait_for(waiter, timeout=1)


def test_view_replace_all_keeps_newer_local_last_used(view: ClusterView) -> None:
    view.last_used[("m", 0)] = 500.0  # a request just used it; not flushed yet
    view.last_used[("m", 1)] = 100.0
    view.replace_all(
        [_node("n1"), _node("n2")],
        [_model("m")],
        [_replica(0, "n1", last_used=200.0), _replica(1, "n2", last_used=300.0)],
    )
    assert view.last_used[("m", 0)] == 500.0, "the local time is newer than the database's"
    assert view.last_used[("m", 1)] == 300.0, "the database's time is newer than the local one"
    assert ("other", 0) not in view.replicas and "other" not in view.models
    assert view.synced_at > 0
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]


def test_view_replace_all_drops_vanished_replicas_from_candidates(view: ClusterView) -> None:
    assert len(view.candidates("m")) == 2
    view.replace_all([_node("n1"), _node("n2")], [_model("m")], [_replica(1, "n2")])
    assert _keys(view.candidates("m")) == [("m", 1)]
    assert _keys(view.replicas_of("m")) == [("m", 1)]


def test_view_put_replica_keeps_local_last_used(view: ClusterView) -> None:
    view.last_used[("m", 0)] = 900.0
    view.put_replica(_replica(0, "n1", last_used=10.0))  # e.g. a state event with an old time
    assert view.last_used[("m", 0)] == 900.0


def test_view_free_memory() -> None:
    v = ClusterView()
    v.put_node(_node("n1", ram_free=5))
    v.put_node(_node("n2", ram_free=7))
    assert v.free_memory() == {"n1": 5, "n2": 7}


async def test_view_heartbeat_keeps_candidates_and_updates_free_memory(view: ClusterView) -> None:
    cached = view.candidates("m")
    assert view.free_memory()["n1"] == 0
    event = view.changed("m")
    view.put_node(_node("n1", labels={"zone": "a"}, ram_free=42))  # same status and labels
    assert view.candidates("m") is cached, "a heartbeat does not rebuild candidate lists"
    assert view.free_memory()["n1"] == 42
    assert view.nodes["n1"].resources.ram_free == 42
    assert not event.is_set()
    view.put_node(_node("n1", labels={"zone": "b"}, ram_free=42))  # a relabel does
    assert view.candidates("m") is not cached and event.is_set()


# =====================================================================================
# frontend/proxy.py parse_request
# =====================================================================================

CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
EMBEDDINGS = b"/v1/embeddings"

VALID_REQUESTS = [
    ("chat", CHAT, b'{"model":"m","messages":[]}', "m", False),
    ("chat-stream", CHAT, b'{"model":"m","messages":[],"stream":true}', "m", True),
    ("chat-stream-false", CHAT, b'{"model":"m","messages":[],"stream":false}', "m", False),
    ("completions", COMPLETIONS, b'{"model":"org/m:7b","prompt":"hi"}', "org/m:7b", False),
    ("embeddings", EMBEDDINGS, b'{"model":"e","input":["a","b"]}', "e", False),
    ("unknown-path-no-required-field", b"/v1/other", b'{"model":"m"}', "m", False),
    ("extra-fields-ok", CHAT, b'{"model":"m","messages":[],"temperature":0.1}', "m", False),
]


@pytest.mark.parametrize(
    ("path", "body", "model", "stream"),
    [v[1:] for v in VALID_REQUESTS],
    ids=[v[0] for v in VALID_REQUESTS],
)
def test_parse_request_valid(path: bytes, body: bytes, model: str, stream: bool) -> None:
    parsed = parse_request(path, body)
    assert (parsed.model, parsed.stream, parsed.path) == (model, stream, path)
    assert parsed.body is body, "the request bytes are forwarded unchanged"


INVALID_REQUESTS = [
    ("invalid-json", CHAT, b'{"model": "m",', None, "not valid JSON"),
    ("empty-body", CHAT, b"", None, "not valid JSON"),
    ("array", CHAT, b'[{"model":"m"}]', None, "JSON object"),
    ("string", CHAT, b'"m"', None, "JSON object"),
    ("number", CHAT, b"3", None, "JSON object"),
    ("missing-model", CHAT, b'{"messages":[]}', "model", "'model'"),
    ("model-not-string", CHAT, b'{"model":3,"messages":[]}', "model", "'model'"),
    ("model-empty", CHAT, b'{"model":"","messages":[]}', "model", "'model'"),
    ("chat-without-messages", CHAT, b'{"model":"m","prompt":"x"}', "messages", "'messages'"),
    ("completions-without-prompt", COMPLETIONS, b'{"model":"m"}', "prompt", "'prompt'"),
    ("embeddings-without-input", EMBEDDINGS, b'{"model":"m"}', "input", "'input'"),
    ("stream-string", CHAT, b'{"model":"m","messages":[],"stream":"yes"}', "stream", "boolean"),
    ("stream-int", CHAT, b'{"model":"m","messages":[],"stream":1}', "stream", "boolean"),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "text"),
    [v[1:] for v in INVALID_REQUESTS],
    ids=[v[0] for v in INVALID_REQUESTS],
)
def test_parse_request_invalid(path: bytes, body: bytes, param: str | None, text: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(path, body)
    assert info.value.status == 400
    assert info.value.extra.get("param") == param
    assert text in info.value.message


def test_parse_request_stream_null_means_not_streaming() -> None:
    parsed = parse_request(CHAT, b'{"model":"m","messages":[],"stream":null}')
    assert parsed.stream is False


# =====================================================================================
# frontend/auth.py
# =====================================================================================


def _scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


BEARERS: list[tuple[str, list[tuple[bytes, bytes]], str | None]] = [
    ("no-header", [], None),
    ("bearer", [(b"authorization", b"Bearer sk-1")], "sk-1"),
    ("scheme-case-insensitive", [(b"authorization", b"bEaReR sk-1")], "sk-1"),
    ("whitespace-trimmed", [(b"authorization", b"Bearer   sk-1  ")], "sk-1"),
    ("empty-token", [(b"authorization", b"Bearer ")], None),
    ("only-scheme", [(b"authorization", b"Bearer")], None),
    ("basic-scheme", [(b"authorization", b"Basic dXNlcjpwYXNz")], None),
    ("other-headers-ignored", [(b"x-api-key", b"sk-1"), (b"accept", b"*/*")], None),
    ("after-other-headers", [(b"accept", b"*/*"), (b"authorization", b"Bearer k")], "k"),
]


@pytest.mark.parametrize(
    ("headers", "expected"), [b[1:] for b in BEARERS], ids=[b[0] for b in BEARERS]
)
def test_bearer(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert bearer(_scope(*headers)) == expected


def test_matches_any() -> None:
    digests = [digest("a"), digest("b")]
    assert matches_any("a", digests)
    assert matches_any("b", digests)
    assert not matches_any("c", digests)
    assert not matches_any("a", [])
    assert not matches_any(digest("a"), digests), "a digest is not a key"


def test_authorizer_open_without_keys() -> None:
    auth = Authorizer()
    assert not auth.enabled
    auth.check(_scope())  # no header, no error
    auth.check(_scope((b"authorization", b"Bearer anything")))


@pytest.mark.parametrize(
    ("headers", "ok", "text"),
    [
        ([(b"authorization", b"Bearer good")], True, ""),
        ([(b"authorization", b"Bearer bad")], False, "invalid API key"),
        ([], False, "missing API key"),
        ([(b"authorization", b"Basic good")], False, "missing API key"),
    ],
    ids=["right-key", "wrong-key", "no-key", "wrong-scheme"],
)
def test_authorizer_enabled(headers: list[tuple[bytes, bytes]], ok: bool, text: str) -> None:
    auth = Authorizer([digest("good"), digest("other")])
    assert auth.enabled
    if ok:
        auth.check(_scope(*headers))
        return
    with pytest.raises(Unauthorized) as info:
        auth.check(_scope(*headers))
    assert info.value.status == 401
    assert text in info.value.message


def test_authorizer_update_turns_auth_on_and_off() -> None:
    auth = Authorizer()
    auth.update([digest("k")])
    assert auth.enabled
    with pytest.raises(Unauthorized):
        auth.check(_scope())
    auth.check(_scope((b"authorization", b"Bearer k")))
    auth.update([])
    assert not auth.enabled
    auth.check(_scope())


# =====================================================================================
# frontend/asgi.py error_payload / error_headers
# =====================================================================================

RETRY_AFTER: list[tuple[str, float | None, bytes | None]] = [
    ("none", None, None),
    ("whole", 3, b"3"),
    ("rounds-up", 1.2, b"2"),
    ("rounds-up-tiny", 2.0001, b"3"),
    ("at-least-one", 0.1, b"1"),
    ("zero-becomes-one", 0, b"1"),
]


@pytest.mark.parametrize(
    ("retry_after", "header"), [r[1:] for r in RETRY_AFTER], ids=[r[0] for r in RETRY_AFTER]
)
def test_error_headers_retry_after(retry_after: float | None, header: bytes | None) -> None:
    headers = dict(error_headers(Unavailable("busy", retry_after=retry_after)))
    assert headers[b"content-type"] == b"application/json"
    assert headers.get(b"retry-after") == header


def test_error_payload_openai_shape() -> None:
    payload = error_payload(BadRequest("'model' is required", param="model"))
    assert payload == {
        "error": {
            "message": "'model' is required",
            "type": "invalid_request_error",
            "param": "model",
            "code": "invalid_request",
        }
    }
    assert error_payload(RateLimited("slow down"))["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limited",
    }


def test_error_payload_includes_extra_fields() -> None:
    load = {"state": "loading", "percent": 40.0, "node_id": "n1"}
    payload = error_payload(LoadTimeout("still loading", retry_after=5, load=load, model="m"))
    error = payload["error"]
    assert error["load"] == load
    assert error["model"] == "m"
    assert error["code"] == "model_loading"
    assert error["type"] == "server_error"


@pytest.mark.parametrize("flag", ["no_responders", "timed_out"])
def test_error_payload_hides_internal_flags(flag: str) -> None:
    error = error_payload(NodeUnreachable("node n1 did not answer", **{flag: True}))["error"]
    assert flag not in error
    assert error["message"] == "node n1 did not answer"


def test_error_payload_extra_cannot_override_standard_fields() -> None:
    error = error_payload(CorralError("boom", code="spoofed", type="spoofed"))["error"]
    assert (error["message"], error["type"], error["code"]) == ("boom", "server_error", None)


# =====================================================================================
# modelfile.py
# =====================================================================================


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_model_file_single_model(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "m.yaml",
        """
name: org/llama-3:8b
backend: sim
artifact: hf://org/llama
memory: 8GiB
options: {n_ctx: 4096, fast: true}
scheduling:
  min_replicas: 1
  max_replicas: 3
  spread_all: false
  node_selector: {zone: eu}
  scale_down_delay: 60
""",
    )
    (spec,) = parse_model_file(path)
    assert spec == ModelSpec(
        name="org/llama-3:8b",
        backend="sim",
        artifact="hf://org/llama",
        options={"n_ctx": 4096, "fast": True},
        memory=8 * 1024**3,
        scheduling=Scheduling(
            min_replicas=1, max_replicas=3, node_selector={"zone": "eu"}, scale_down_delay=60.0
        ),
    )


@pytest.mark.parametrize(
    "text",
    [
        "- {name: a, backend: sim}\n- {name: b, backend: sim, memory: 1GB}\n",
        "models:\n  - {name: a, backend: sim}\n  - {name: b, backend: sim, memory: 1GB}\n",
    ],
    ids=["list", "models-key"],
)
def test_model_file_several_models(tmp_path: Path, text: str) -> None:
    specs = parse_model_file(_write(tmp_path, "m.yaml", text))
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[1].memory == 1_000_000_000
    assert specs[0].scheduling == Scheduling()


def test_model_file_empty_is_no_models(tmp_path: Path) -> None:
    assert parse_model_file(_write(tmp_path, "m.yaml", "# nothing yet\n")) == []


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: a\nbackend: sim\n  bad: indent\n", 3),
        ("name: a\n\tbackend: sim\n", 2),
    ],
    ids=["bad-indent", "tab"],
)
def test_model_file_broken_yaml_names_path_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path, "broken.yaml", text)
    with pytest.raises(ConfigError) as info:
        parse_model_file(path)
    assert info.value.path == str(path)
    assert info.value.field == f"line {line}"
    assert str(path) in info.value.message and f"line {line}" in info.value.message
    assert "invalid YAML" in info.value.message


def test_model_file_unreadable_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_file(tmp_path / "missing.yaml")
    assert info.value.path == str(tmp_path / "missing.yaml")


BAD_FIELDS: list[tuple[str, dict[str, Any], str | None]] = [
    ("min-replicas-negative", {"scheduling": {"min_replicas": -1}}, "scheduling.min_replicas"),
    ("max-replicas-text", {"scheduling": {"max_replicas": "many"}}, "scheduling.max_replicas"),
    ("scheduling-unknown-key", {"scheduling": {"replicas": 2}}, "scheduling.replicas"),
    ("selector-not-mapping", {"scheduling": {"node_selector": ["a"]}}, "scheduling.node_selector"),
    ("unknown-field", {"bogus": 1}, "bogus"),
    ("bad-memory", {"memory": "12XB"}, "memory"),
    ("memory-list", {"memory": [1]}, "memory"),
    ("bad-backend", {"backend": "Sim!"}, "backend"),
    ("bad-name", {"name": "-leading-dash"}, "name"),
    ("missing-backend", {"backend": None}, "backend"),
]


@pytest.mark.parametrize(
    ("override", "field"), [b[1:] for b in BAD_FIELDS], ids=[b[0] for b in BAD_FIELDS]
)
def test_model_bad_field_names_path_and_field(override: dict[str, Any], field: str | None) -> None:
    data: dict[str, Any] = {"name": "m", "backend": "sim", **override}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_model(data, path="models/m.yaml")
    assert info.value.path == "models/m.yaml"
    assert info.value.field == field
    assert info.value.message.startswith(f"models/m.yaml: {field}: ")


def test_model_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model(["name", "m"], path="x.yaml")
    assert info.value.path == "x.yaml"


def test_model_file_list_error_names_the_item(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "m.yaml",
        "- {name: a, backend: sim}\n- {name: b, backend: sim, scheduling: {min_replicas: -2}}\n",
    )
    with pytest.raises(ConfigError) as info:
        parse_model_file(path)
    assert info.value.path == f"{path}[1]"
    assert info.value.field == "scheduling.min_replicas"


def test_model_infinite_memory_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model({"name": "m", "backend": "sim", "memory": math.inf}, path="m.yaml")
    assert info.value.field == "memory"


def test_models_dir_loads_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "name: alpha\nbackend: sim\n")
    _write(tmp_path, "b.yml", "- {name: beta, backend: sim}\n- {name: alpha, backend: other}\n")
    broken = _write(tmp_path, "c.yaml", "name: gamma\nbackend: sim\n  oops: 1\n")
    bad_field = _write(
        tmp_path, "d.yaml", "name: delta\nbackend: sim\nscheduling: {min_replicas: x}\n"
    )
    _write(tmp_path, "e.yaml", "name: epsilon\nbackend: sim\n")
    _write(tmp_path, "notes.txt", "name: ignored\nbackend: sim\n")
    specs, errors = load_models_dir(tmp_path)
    by_name = {s.name: s for s in specs}
    assert sorted(by_name) == ["alpha", "beta", "epsilon"]
    assert by_name["alpha"].backend == "sim", "the first declaration wins"
    assert len(errors) == 3
    dup = [e for e in errors if e.field == "alpha"]
    assert len(dup) == 1 and dup[0].path == str(tmp_path / "b.yml")
    assert "declared twice" in dup[0].message
    assert any(e.path == str(broken) and e.field == "line 3" for e in errors)
    assert any(e.path == str(bad_field) and e.field == "scheduling.min_replicas" for e in errors)


def test_models_dir_missing() -> None:
    specs, errors = load_models_dir(Path("/nonexistent/corral-models"))
    assert specs == []
    assert len(errors) == 1 and "does not exist" in errors[0].message


# =====================================================================================
# backends/catalog.py
# =====================================================================================


def test_builtin_catalog_parses() -> None:
    catalog = Catalog.builtin()
    assert "sim" in catalog.names()
    sim = catalog.get("sim")
    assert sim is not None
    assert not sim.needs_install
    assert not sim.gpu
    assert sim.default_memory == 64_000_000
    assert "chat" in sim.capabilities
    assert "{python}" in sim.command
    for name in catalog.names():
        entry = catalog.get(name)
        assert entry is not None and entry.name == name and entry.command
    assert catalog.names() == sorted(catalog.names())


def test_catalog_gpu_and_runnable() -> None:
    catalog = Catalog(
        {
            "cpu": BackendEntry(name="cpu", command=("x",)),
            "gpu": BackendEntry(name="gpu", command=("x",), gpu=True),
        }
    )
    assert catalog.gpu_backends() == frozenset({"gpu"})
    assert catalog.runnable(has_gpu=False) == ["cpu"]
    assert catalog.runnable(has_gpu=True) == ["cpu", "gpu"]
    assert catalog.check_model(ModelSpec(name="m", backend="cpu")) is None
    reason = catalog.check_model(ModelSpec(name="m", backend="nope"))
    assert reason is not None and "nope" in reason and "cpu" in reason


OPTION_FLAGS: list[tuple[str, dict[str, Any], dict[str, bool], list[str]]] = [
    ("value", {"foo_bar": 1}, {}, ["--foo-bar", "1"]),
    ("string", {"chat_format": "chatml"}, {}, ["--chat-format", "chatml"]),
    ("float", {"gpu_memory_utilization": 0.45}, {}, ["--gpu-memory-utilization", "0.45"]),
    ("true-is-switch", {"fast": True}, {}, ["--fast"]),
    ("false-omitted", {"off": False}, {}, []),
    ("none-omitted", {"x": None}, {}, []),
    ("zero-kept", {"n": 0}, {}, ["--n", "0"]),
    ("list-repeats", {"lora": ["a", "b"]}, {}, ["--lora", "a", "--lora", "b"]),
    ("tuple-repeats", {"lora": ("a",)}, {}, ["--lora", "a"]),
    ("order-kept", {"b": 1, "a": 2}, {}, ["--b", "1", "--a", "2"]),
    ("underscores", {"n_gpu_layers": -1}, {"underscores": True}, ["--n_gpu_layers", "-1"]),
    ("bool-values-true", {"fast": True}, {"bool_values": True}, ["--fast", "true"]),
    ("bool-values-false", {"off": False}, {"bool_values": True}, ["--off", "false"]),
    ("bool-values-none-omitted", {"x": None}, {"bool_values": True}, []),
]


@pytest.mark.parametrize(
    ("options", "kw", "expected"),
    [o[1:] for o in OPTION_FLAGS],
    ids=[o[0] for o in OPTION_FLAGS],
)
def test_option_flags(options: dict[str, Any], kw: dict[str, bool], expected: list[str]) -> None:
    assert option_flags(options, **kw) == expected


@pytest.mark.parametrize("key", sorted(RESERVED_OPTIONS))
def test_option_flags_skip_reserved(key: str) -> None:
    assert option_flags({key: "x", "keep": 1}) == ["--keep", "1"]
    assert option_flags({key: True}, bool_values=True) == []


def test_argv_fills_placeholders_and_appends_flags() -> None:
    entry = BackendEntry(
        name="t",
        command=(
            "{python}",
            "{corral_backends}/server.py",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--path={model_path}",
        ),
    )
    argv = entry.argv(
        python="/py",
        host="0.0.0.0",
        port=8123,
        model="org/m",
        model_path="/data/m",
        options={"n_ctx": 4096, "gpu": True, "warm": True},
    )
    backends_dir = str(Path(catalog_module.__file__).resolve().parent)
    assert argv == [
        "/py",
        f"{backends_dir}/server.py",
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
        "--model",
        "org/m",
        "--path=/data/m",
        "--n-ctx",
        "4096",
        "--warm",
    ]


def test_argv_without_model_path_and_without_flags() -> None:
    entry = BackendEntry(name="t", command=("{python}", "--p={model_path}"), options="none")
    argv = entry.argv(
        python="py", host="h", port="{port}", model="m", model_path=None, options={"a": 1}
    )
    assert argv == ["py", "--p="]


def test_argv_option_styles_from_entry() -> None:
    entry = BackendEntry(name="t", command=("x",), option_names="underscores", option_bools="value")
    argv = entry.argv(
        python="p", host="h", port=1, model="m", model_path=None, options={"a_b": False}
    )
    assert argv == ["x", "--a_b", "false"]


def test_catalog_user_dir_overrides_and_adds(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "10-override.yaml",
        "backends:\n  - name: sim\n    version: custom\n    command: [my-sim, '{port}']\n",
    )
    _write(tmp_path, "20-new.yml", "- name: mine\n  command: [mine]\n  gpu: true\n")
    _write(tmp_path, "notes.txt", "not: yaml: at: all")
    builtin = Catalog.builtin()
    merged = builtin.with_dir(tmp_path)
    sim = merged.get("sim")
    assert sim is not None and sim.version == "custom" and sim.command == ("my-sim", "{port}")
    mine = merged.get("mine")
    assert mine is not None and mine.gpu
    assert set(builtin.names()) | {"mine"} == set(merged.names())
    assert builtin.get("sim") != sim, "the builtin catalog itself is unchanged"
    assert builtin.with_dir(None) is builtin


def test_catalog_user_dir_later_file_wins(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "- {name: x, version: '1', command: [a]}\n")
    _write(tmp_path, "b.yaml", "- {name: x, version: '2', command: [b]}\n")
    entry = Catalog().with_dir(tmp_path).get("x")
    assert entry is not None and entry.version == "2"


BAD_ENTRIES: list[tuple[str, str, str]] = [
    ("bad-options", "- {name: x, command: [a], options: weird}\n", "backends[0].options"),
    ("missing-command", "- {name: x}\n", "backends[0].command"),
    ("bad-name", "- {name: X!, command: [a]}\n", "backends[0].name"),
    ("unknown-field", "- {name: x, command: [a], bogus: 1}\n", "backends[0].bogus"),
    (
        "bad-capability",
        "backends:\n  - {name: x, command: [a]}\n"
        "  - {name: y, command: [a], capabilities: [fly]}\n",
        "backends[1].capabilities.0",
    ),
]


@pytest.mark.parametrize(
    ("text", "field"), [b[1:] for b in BAD_ENTRIES], ids=[b[0] for b in BAD_ENTRIES]
)
def test_catalog_invalid_entry_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        Catalog.builtin().with_dir(tmp_path)
    assert info.value.path == str(path)
    assert info.value.field == field
    assert str(path) in info.value.message and field in info.value.message


def test_catalog_broken_yaml_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.yaml", "backends: [\n")
    with pytest.raises(ConfigError) as info:
        Catalog().with_dir(tmp_path)
    assert info.value.path == str(path)
    assert "invalid YAML" in info.value.message


@pytest.mark.parametrize(
    "text", ["backends:\n", "backends: 5\n", "42\n"], ids=["null", "int", "scalar"]
)
def test_catalog_non_list_backends_is_config_error_or_empty(tmp_path: Path, text: str) -> None:
    _write(tmp_path, "odd.yaml", text)
    try:
        catalog = Catalog().with_dir(tmp_path)
    except ConfigError as exc:
        assert exc.path == str(tmp_path / "odd.yaml")
    else:
        assert catalog.names() == []


def test_catalog_unknown_placeholder_is_config_error(tmp_path: Path) -> None:
    _write(tmp_path, "typo.yaml", "- {name: x, command: ['{python}', '--model', '{modle}']}\n")
    with pytest.raises(ConfigError):
        Catalog().with_dir(tmp_path)


# =====================================================================================
# domain/sizes.py
# =====================================================================================

SIZES: list[tuple[str | int | float, int]] = [
    (0, 0),
    (1234, 1234),
    (12.7, 12),
    ("0", 0),
    ("512", 512),
    ("512B", 512),
    ("1k", 1000),
    ("1KB", 1000),
    ("12GB", 12_000_000_000),
    ("12 gb", 12_000_000_000),
    ("1.5g", 1_500_000_000),
    ("2T", 2_000_000_000_000),
    ("1KiB", 1024),
    ("512MiB", 512 * 1024**2),
    (" 8 GiB ", 8 * 1024**3),
    ("1gi", 1024**3),
    ("1TiB", 1024**4),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[repr(v) for v, _ in SIZES])
def test_parse_size(value: str | int | float, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "GB", "abc", "12XB", "-1GB", "1e9", "1,5GB", "12 G B", -1, -0.5, True, False],
    ids=repr,
)
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1_500_000_000, "1.5 GB"),
        (5 * 10**15, "5000.0 TB"),
    ],
    ids=["zero", "bytes", "kb", "gb", "tb-cap"],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


BUDGETS: list[tuple[str | int, MemoryBudget, int]] = [
    ("80%", MemoryBudget(fraction=0.8), 80),
    (" 50 % ", MemoryBudget(fraction=0.5), 50),
    ("100%", MemoryBudget(fraction=1.0), 100),
    ("12GB", MemoryBudget(size=12_000_000_000), 100),
    ("50", MemoryBudget(size=50), 50),
    (30, MemoryBudget(size=30), 30),
]


@pytest.mark.parametrize(("text", "budget", "of_100"), BUDGETS, ids=[repr(b[0]) for b in BUDGETS])
def test_memory_budget_parse(text: str | int, budget: MemoryBudget, of_100: int) -> None:
    parsed = MemoryBudget.parse(text)
    assert parsed == budget
    assert parsed.bytes_of(100) == of_100


def test_memory_budget_size_without_known_total() -> None:
    assert MemoryBudget(size=7).bytes_of(0) == 7
    assert MemoryBudget(fraction=0.5).bytes_of(0) == 0


@pytest.mark.parametrize("text", ["0%", "101%", "-5%", "abc%", "%", "lots"], ids=repr)
def test_memory_budget_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        MemoryBudget.parse(text)


@pytest.mark.parametrize(
    ("budget", "text"),
    [(MemoryBudget(fraction=0.8), "80%"), (MemoryBudget(size=12_000_000_000), "12.0 GB")],
    ids=["fraction", "size"],
)
def test_memory_budget_str_roundtrips(budget: MemoryBudget, text: str) -> None:
    assert str(budget) == text
    if budget.fraction is not None:
        assert MemoryBudget.parse(str(budget)) == budget


# =====================================================================================
# config.py
# =====================================================================================

LABELS: list[tuple[str, str, dict[str, str]]] = [
    ("empty", "", {}),
    ("one", "zone=eu", {"zone": "eu"}),
    ("several", "zone=eu,gpu=a100", {"zone": "eu", "gpu": "a100"}),
    ("spaces", " zone = eu , gpu= a100 ", {"zone": "eu", "gpu": "a100"}),
    ("empty-value", "flag=", {"flag": ""}),
    ("equals-in-value", "expr=a=b", {"expr": "a=b"}),
    ("trailing-comma", "a=1,,b=2,", {"a": "1", "b": "2"}),
    ("last-wins", "a=1,a=2", {"a": "2"}),
]


@pytest.mark.parametrize(("text", "expected"), [x[1:] for x in LABELS], ids=[x[0] for x in LABELS])
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize(
    ("text", "bad"),
    [("zone", "zone"), ("=eu", "=eu"), ("a=1,gpu", "gpu"), (" = x", "= x")],
    ids=["no-equals", "no-key", "second-bad", "blank-key"],
)
def test_parse_labels_errors_name_the_pair(text: str, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_labels(text)
    assert repr(bad) in str(info.value)


ASYNC_URLS = [
    ("postgresql://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
    ("postgres://u:p@h/db?sslmode=require", "postgresql+asyncpg://u:p@h/db?sslmode=require"),
    ("postgresql+asyncpg://h/db", "postgresql+asyncpg://h/db"),
]


@pytest.mark.parametrize(("url", "expected"), ASYNC_URLS, ids=["postgresql", "postgres", "already"])
def test_to_async_url(url: str, expected: str) -> None:
    assert to_async_url(url) == expected


def test_to_async_url_rejects_other_schemes_without_leaking_credentials() -> None:
    with pytest.raises(ValueError) as info:
        to_async_url("mysql://admin:hunter2@db.example:3306/x")
    assert "hunter2" not in str(info.value)
    assert "db.example" in str(info.value)


def test_frontend_settings_async_url_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_DATABASE_URL", "postgres://u@h/db")
    monkeypatch.setenv("CORRAL_API_KEYS", " k1, k2 ,,")
    settings = FrontendSettings()
    assert settings.async_database_url == "postgresql+asyncpg://u@h/db"
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings), "secrets are not printed"


def test_frontend_settings_ids_are_unique() -> None:
    assert FrontendSettings().frontend_id != FrontendSettings().frontend_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zone=eu,gpu=a100", {"zone": "eu", "gpu": "a100"}), ({"a": "b"}, {"a": "b"})],
    ids=["string", "dict"],
)
def test_worker_settings_labels(value: Any, expected: dict[str, str]) -> None:
    assert WorkerSettings(labels=value).labels == expected


def test_worker_settings_labels_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_WORKER_LABELS", "zone=eu,tier=gold")
    assert WorkerSettings().labels == {"zone": "eu", "tier": "gold"}


def test_worker_settings_bad_labels() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(labels="zone")
    assert "key=value" in str(info.value)


@pytest.mark.parametrize("budget", ["80%", "100%", "12GB", "512MiB"])
def test_worker_settings_memory_budget_ok(budget: str) -> None:
    assert WorkerSettings(memory_budget=budget).memory_budget == budget


@pytest.mark.parametrize("budget", ["0%", "150%", "lots", "12XB"])
def test_worker_settings_memory_budget_rejected(budget: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(memory_budget=budget)
    assert "memory_budget" in str(info.value)
