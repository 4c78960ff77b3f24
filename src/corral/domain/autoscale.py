"""Autoscaling decisions: how many replicas a model should have now, and which ones to stop.

Pure: the reconciler calls `decide(policy, observed, now)` once per model per tick and applies
the `ScaleDecision` (data with a reason). The caller caps a scale-up by memory (placement) and
passes `observed.replicas` = the indexes of the model's active replicas (starting or loaded),
`observed.starting` = how many of them are not loaded yet, the signal's recent `samples`
(time, value; oldest first), the demand now (`busy`: in flight + queued), the time of the last
request and of the last change of the replica count.

Signals (`Signal`), one per model, with a target: queue wait (seconds), in-flight requests per
replica, time to first byte p90 (seconds). The signal is a step function of its samples: its
value at time t is the latest sample at or before t. "Above target for a window" means above
on the whole of `[now - window, now]`, so it needs a sample at or before the window's start
(enough history) and every later one; a window must also start after the last change of the
replica count (what was measured before it measured another capacity).

Rules, first match wins:

1. more replicas than `max_replicas` (0 = no cap): down to it; fewer than `min_replicas`: up;
2. no replica: up to max(1, min) when requests wait (scale from zero), else hold;
3. `min_replicas` 0 with `idle_timeout`: nothing in flight or queued and no request for
   `idle_timeout` seconds: down to zero (unload the model);
4. replicas still starting, or the newest sample older than `max_sample_age`: hold (their
   capacity is not in the signal yet / the signal is not trustworthy);
5. above target for `up_window`: up to `ceil(current * mean / target)` (mean of the samples
   taken inside the window; the value in force at its start only when there are none: after a
   step in load that one still averages in the time before the step), at least one more, at
   most `max_step` more (0 = no step cap), never above max;
6. below target for `scale_down_delay`: down, never below min and never below one replica
   (zero is rule 3's: only an idle timeout unloads a model). For in-flight per replica
   (proportional to the replica count) to `ceil(current * peak / target)` (the window's peak),
   so the replicas left stay under target, and hold if that removes none; for queue wait and
   TTFT (which say nothing about how much capacity is spare) one replica per window;
7. otherwise hold.

A scale-down always stops the HIGHEST replica indexes (`stop`, highest first), whichever
replicas are idle: a busy one is drained by the actuator (UNLOADING: no new requests, in-flight
ones finish). Picking among idle replicas instead left holes (with staggered idle times index 1
went before 2, leaving {0, 2}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from corral.errors import ConfigError


class Signal(StrEnum):
    """The load signal a model scales on."""

    QUEUE_WAIT = "queue_wait"  # seconds requests wait in the admission queue
    INFLIGHT = "inflight_per_replica"  # requests in flight per active replica
    TTFT_P90 = "ttft_p90"  # 90th percentile of the time to first byte, seconds


class ScaleAction(StrEnum):
    """What a decision asks the reconciler to do."""

    HOLD = "hold"  # keep the replica count
    UP = "up"  # start replicas until `desired`
    DOWN = "down"  # stop the replicas in `stop`


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """How one model scales (the model file's `autoscale:` section plus its scheduling)."""

    signal: Signal
    target: float
    min_replicas: int = 0
    max_replicas: int = 0  # 0 = no cap
    up_window: float = 30.0  # seconds above target before scaling up
    scale_down_delay: float = 300.0  # seconds below target before scaling down
    idle_timeout: float | None = None  # with min_replicas 0: unload after this long unused
    max_step: int = 0  # most replicas added by one decision (0 = no cap)
    max_sample_age: float = 60.0  # a newer sample than this is needed to act on the signal

    def __post_init__(self) -> None:
        if not self.target > 0:
            raise ConfigError(f"must be > 0, got {self.target}", field="autoscale.target")
        if self.min_replicas < 0 or self.max_replicas < 0 or self.max_step < 0:
            raise ConfigError("replica counts must be >= 0", field="autoscale")
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}",
                field="autoscale.min_replicas",
            )


@dataclass(frozen=True, slots=True)
class ScalingTarget:
    """A model's `scaling:` setting (beside its min/max replicas and scale-down delay)."""

    metric: Signal
    target: float
    window: float = 30.0  # seconds above target before scaling up
    idle_timeout: float | None = None  # with min_replicas 0: unload after this long unused
    max_step: int = 0  # most replicas one decision adds (0 = as many as the gap asks)

    def policy(
        self, *, min_replicas: int, max_replicas: int, scale_down_delay: float
    ) -> ScalePolicy:
        """The policy `decide` applies, with the model's replica bounds."""
        return ScalePolicy(
            signal=self.metric,
            target=self.target,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            up_window=self.window,
            scale_down_delay=scale_down_delay,
            idle_timeout=self.idle_timeout,
            max_step=self.max_step,
            max_sample_age=max(60.0, 2 * self.window),
        )


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation of the signal."""

    at: float
    value: float


@dataclass(frozen=True, slots=True)
class Observed:
    """What the reconciler knows about one model this tick."""

    replicas: Sequence[int]  # indexes of the active (starting or loaded) replicas
    starting: int = 0  # how many of them are not loaded yet
    samples: Sequence[Sample] = ()  # oldest first
    busy: int = 0  # requests in flight + queued now
    last_request: float = 0.0
    last_change: float = 0.0  # when the replica count last changed


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """The decision for one model: the count to reach and, going down, whom to stop."""

    action: ScaleAction
    desired: int
    reason: str
    stop: tuple[int, ...] = ()  # replica indexes to stop, highest first


def decide(policy: ScalePolicy, observed: Observed, now: float) -> ScaleDecision:
    """The scaling decision for one model at `now` (rules in the module doc)."""
    current = len(observed.replicas)
    lo = policy.min_replicas
    hi = policy.max_replicas or math.inf
    if current > hi:
        return _down(observed, policy.max_replicas, f"above max_replicas {policy.max_replicas}")
    if current < lo:
        return _up(lo, f"below min_replicas {lo}")
    if current == 0:
        if observed.busy:
            return _up(max(1, lo), f"scale from zero: {observed.busy} requests waiting")
        return _hold(0, "no replica and no demand")
    if lo == 0 and policy.idle_timeout is not None and not observed.busy:
        idle = now - observed.last_request
        if idle >= policy.idle_timeout:
            why = f"idle for {idle:.0f}s (idle_timeout {policy.idle_timeout:g}s)"
            return _down(observed, 0, why)
    if observed.starting:
        return _hold(current, f"{observed.starting} replicas still starting")
    samples = observed.samples
    if not samples or samples[-1].at < now - policy.max_sample_age:
        return _hold(current, f"no {policy.signal} sample in the last {policy.max_sample_age:g}s")
    target = policy.target
    above = _holds(samples, observed.last_change, now, policy.up_window, lambda v: v > target)
    if above is not None:
        if current >= hi:
            return _hold(current, f"{policy.signal} above target but at max_replicas")
        inside = above[1:] or above  # after a step, the value in force at the start lags
        mean = sum(inside) / len(inside)
        desired = max(current + 1, math.ceil(current * mean / target))
        if policy.max_step:
            desired = min(desired, current + policy.max_step)
        desired = int(min(desired, hi))
        why = f"{policy.signal} {mean:.3g} above target {target:g} for {policy.up_window:g}s"
        return _up(desired, why)
    below = _holds(
        samples, observed.last_change, now, policy.scale_down_delay, lambda v: v < target
    )
    floor = max(lo, 1)
    if below is not None and current > floor:
        peak = max(below)
        if policy.signal == Signal.INFLIGHT:
            desired = max(floor, math.ceil(current * peak / target))
            if desired >= current:
                return _hold(current, f"one replica fewer would put {policy.signal} above target")
        else:
            desired = current - 1
        why = f"{policy.signal} {peak:.3g} below target {target:g} for {policy.scale_down_delay:g}s"
        return _down(observed, desired, why)
    return _hold(current, f"{policy.signal} within target")


def _holds(
    samples: Sequence[Sample],
    last_change: float,
    now: float,
    window: float,
    ok: Callable[[float], bool],
) -> list[float] | None:
    """The signal's values over [now - window, now] when `ok` holds for all of them, else None."""
    start = now - window
    if last_change > start:
        return None
    values: list[float] = []
    for s in samples:
        if s.at <= start:
            values = [s.value]  # the value in force when the window starts
        elif s.at <= now:
            if not values:
                return None  # no sample at or before the start: history too short
            values.append(s.value)
    if not values or not all(ok(v) for v in values):
        return None
    return values


def _up(desired: int, reason: str) -> ScaleDecision:
    return ScaleDecision(ScaleAction.UP, desired, reason)


def _hold(current: int, reason: str) -> ScaleDecision:
    return ScaleDecision(ScaleAction.HOLD, current, reason)


def _down(observed: Observed, desired: int, reason: str) -> ScaleDecision:
    highest_first = sorted(observed.replicas, reverse=True)
    stop = tuple(highest_first[: len(highest_first) - desired])
    return ScaleDecision(ScaleAction.DOWN, desired, reason, stop)
