"""What the proxy tells about each request once it ends: metrics, the autoscaler's time to
first byte, and usage per API key (with its limits, checked once the model is known)."""

from __future__ import annotations

import time

from corral.frontend.inflight import InflightTracker
from corral.frontend.metrics import OTHER, FrontendMetrics
from corral.frontend.tally import Tally
from corral.frontend.usage import UsageMeter

#: The status a request counts as when the client left before any answer (nginx's).
CLIENT_GONE = 499


class Metering:
    """Hands a request's `Tally` to the metrics, the in-flight tracker and the usage meter."""

    def __init__(
        self,
        metrics: FrontendMetrics,
        inflight: InflightTracker | None = None,
        usage: UsageMeter | None = None,
    ) -> None:
        self.metrics = metrics
        self.inflight = inflight
        self.usage = usage

    def admit(self, tally: Tally) -> None:
        """Count the request for its key and model; RateLimited when the key is over a limit."""
        if self.usage is not None and tally.model is not None:
            self.usage.admit(tally.grant, tally.model)
            tally.admitted = True

    def done(self, tally: Tally) -> None:
        """The request ended (answered, failed, or its client left)."""
        elapsed = time.perf_counter() - tally.started
        status = tally.status or CLIENT_GONE
        first = None
        if tally.first_byte is not None and status < 400:
            first = tally.first_byte - tally.started
        model = tally.model
        self.metrics.observe_request(
            model or OTHER, tally.endpoint or OTHER, status, elapsed, first
        )
        if first is not None and model is not None and self.inflight is not None:
            self.inflight.observe_ttft(model, first)
        if tally.admitted and self.usage is not None and model is not None:
            self.usage.done(tally.grant, model, status, tally.usage)
