"""The frontend's request metrics: histograms as Prometheus reads them, and bounded labels."""

from __future__ import annotations

import pytest

from corral.frontend import metrics
from corral.frontend.metrics import OTHER, FrontendMetrics, Histogram


def test_a_histogram_counts_each_value_in_its_bucket_cumulatively() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.sum == 3.65


def test_requests_are_kept_per_model_endpoint_and_status_class() -> None:
    m = FrontendMetrics()
    m.observe_request("a", "/v1/chat/completions", 200, 0.2, 0.05)
    m.observe_request("a", "/v1/chat/completions", 201, 0.3, None)
    m.observe_request("a", "/v1/chat/completions", 503, 0.01, None)
    m.observe_request("a", "/v1/chat/completions", 0, 0.01, None)  # odd statuses stay bounded
    ok = m.requests[("a", "/v1/chat/completions", "2xx")]
    assert ok.duration.count == 2 and ok.first_byte.count == 1
    assert m.requests[("a", "/v1/chat/completions", "5xx")].duration.count == 1
    assert set(m.requests) == {
        ("a", "/v1/chat/completions", "2xx"),
        ("a", "/v1/chat/completions", "5xx"),
        ("a", "/v1/chat/completions", "1xx"),
    }


def test_series_stay_bounded_when_models_come_and_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = FrontendMetrics()
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    for i in range(10):
        m.observe_request(f"model-{i}", "/v1/embeddings", 200, 0.1, None)
        m.observe_queue_wait(f"model-{i}", 0.1)
    assert len(m.requests) == 4  # three, then "other"
    assert m.requests[(OTHER, "/v1/embeddings", "2xx")].duration.count == 7
    assert len(m.queue_wait) == 4 and m.queue_wait[OTHER].count == 7
