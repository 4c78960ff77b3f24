"""Autoscaling decisions: one table row per rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from corral.domain.autoscale import (
    Observed,
    Sample,
    ScaleAction,
    ScaleDecision,
    ScalePolicy,
    Signal,
    decide,
)
from corral.errors import ConfigError

NOW = 10_000.0
UP, DOWN, HOLD = ScaleAction.UP, ScaleAction.DOWN, ScaleAction.HOLD

#: in-flight per replica, target 4, 1..8 replicas, up after 30 s, down after 300 s
INFLIGHT = ScalePolicy(Signal.INFLIGHT, target=4.0, min_replicas=1, max_replicas=8)
#: queue wait, target 1 s, 0..unbounded, unload after 600 s idle
WAIT = ScalePolicy(Signal.QUEUE_WAIT, target=1.0, idle_timeout=600.0)
TTFT = ScalePolicy(Signal.TTFT_P90, target=0.5, min_replicas=1)


def steady(value: float, seconds: float, every: float = 10.0) -> tuple[Sample, ...]:
    """Samples of `value` every `every` seconds over the last `seconds` (and one before)."""
    n = int(seconds // every) + 1
    return tuple(Sample(NOW - i * every, value) for i in reversed(range(n + 1)))


def poke(samples: tuple[Sample, ...], at: float, value: float) -> tuple[Sample, ...]:
    """`samples` with the one at `at` set to `value` (added when there is none), oldest first."""
    kept = [s for s in samples if s.at != at]
    return tuple(sorted([*kept, Sample(at, value)], key=lambda s: s.at))


def obs(n: int | list[int], samples: tuple[Sample, ...] = (), **kw: float) -> Observed:
    replicas = list(range(n)) if isinstance(n, int) else n
    fields: dict[str, float] = {"last_request": NOW, **kw}
    return Observed(
        replicas,
        samples=samples,
        starting=int(fields.pop("starting", 0)),
        busy=int(fields.pop("busy", 0)),
        **fields,
    )


# (id, policy, observed, expected action, desired, stop)
CASES: list[tuple[str, ScalePolicy, Observed, ScaleAction, int, tuple[int, ...]]] = [
    # 1. bounds
    ("above-max", INFLIGHT, obs(10), DOWN, 8, (9, 8)),
    ("below-min", INFLIGHT, obs(0), UP, 1, ()),
    # 2. from zero
    ("scale-from-zero", WAIT, obs(0, busy=3), UP, 1, ()),
    ("zero-without-demand", WAIT, obs(0), HOLD, 0, ()),
    ("from-zero-to-min", replace(WAIT, min_replicas=2), obs(0, busy=1), UP, 2, ()),
    # 3. idle -> zero
    ("idle-to-zero", WAIT, obs([0, 1], last_request=NOW - 600), DOWN, 0, (1, 0)),
    ("idle-not-long-enough", WAIT, obs([0, 1], steady(0, 600), last_request=NOW - 599),
     DOWN, 1, (1,)),
    ("idle-but-busy", WAIT, obs(1, steady(0.2, 60), busy=1, last_request=NOW - 900), HOLD, 1, ()),
    ("idle-timeout-needs-min-0", replace(INFLIGHT, idle_timeout=60.0),
     obs(1, steady(0, 600), last_request=0.0), HOLD, 1, ()),
    # 4. not now
    ("starting-holds", INFLIGHT, obs(2, steady(9, 60), starting=1), HOLD, 2, ()),
    ("no-samples", INFLIGHT, obs(2), HOLD, 2, ()),
    ("stale-samples", INFLIGHT, obs(2, (Sample(NOW - 111, 9), Sample(NOW - 61, 9))), HOLD, 2, ()),
    # 5. up
    ("up-proportional", INFLIGHT, obs(2, steady(8, 30)), UP, 4, ()),
    ("up-at-least-one", INFLIGHT, obs(4, steady(4.1, 30)), UP, 5, ()),
    ("up-capped-by-max", INFLIGHT, obs(6, steady(12, 30)), UP, 8, ()),
    ("up-max-step", replace(INFLIGHT, max_step=2), obs(2, steady(40, 30)), UP, 4, ()),
    ("up-at-max", INFLIGHT, obs(8, steady(12, 30)), HOLD, 8, ()),
    ("up-queue-wait", WAIT, obs(2, steady(3.0, 30)), UP, 6, ()),
    ("up-ttft", TTFT, obs(1, steady(0.8, 30)), UP, 2, ()),
    ("up-history-too-short", INFLIGHT, obs(2, steady(8, 30)[2:]), HOLD, 2, ()),
    ("up-one-sample-at-target", INFLIGHT,
     obs(2, poke(steady(8, 30), NOW - 10, 4.0)), HOLD, 2, ()),
    ("up-mean-of-the-samples-inside-the-window", INFLIGHT,
     obs(2, poke(steady(8, 30), NOW - 30, 5.0)), UP, 4, ()),
    ("up-value-before-window-ignored", INFLIGHT,
     obs(2, poke(steady(8, 30), NOW - 100, 0.0)), UP, 4, ()),
    ("up-waits-a-window-after-a-change", INFLIGHT, obs(2, steady(8, 30), last_change=NOW - 20),
     HOLD, 2, ()),
    # 6. down: always the highest index
    ("down-proportional", INFLIGHT, obs(4, steady(1.5, 300)), DOWN, 2, (3, 2)),
    ("down-would-overload", INFLIGHT, obs(3, steady(3.5, 300)), HOLD, 3, ()),
    ("down-peak-counts", INFLIGHT,
     obs(4, poke(steady(0.5, 300), NOW - 250, 2.9)),
     DOWN, 3, (3,)),
    ("down-never-below-min", INFLIGHT, obs(3, steady(0, 300)), DOWN, 1, (2, 1)),
    ("down-at-min", INFLIGHT, obs(1, steady(0, 300)), HOLD, 1, ()),
    ("down-never-to-zero-by-the-signal", replace(INFLIGHT, min_replicas=0),
     obs(2, steady(0, 300)), DOWN, 1, (1,)),
    ("zero-is-the-idle-timeouts", WAIT, obs(1, steady(0, 300), last_request=NOW - 100),
     HOLD, 1, ()),
    ("down-not-long-enough", INFLIGHT, obs(4, steady(1.0, 200)), HOLD, 4, ()),
    ("down-queue-wait-one-at-a-time", WAIT, obs(3, steady(0, 300)), DOWN, 2, (2,)),
    ("down-ttft-one-at-a-time", TTFT, obs(3, steady(0.1, 300)), DOWN, 2, (2,)),
    ("down-highest-index-with-holes", WAIT, obs([0, 2, 5], steady(0, 300)), DOWN, 2, (5,)),
    ("down-unsorted-indexes", WAIT, obs([4, 1, 3], steady(0, 300)), DOWN, 2, (4,)),
    ("down-waits-after-a-change", INFLIGHT, obs(4, steady(1, 300), last_change=NOW - 100),
     HOLD, 4, ()),
    # 7. otherwise
    ("within-target", INFLIGHT, obs(3, steady(4.0, 300)), HOLD, 3, ()),
    ("mixed-window", INFLIGHT,
     obs(3, poke(steady(1.0, 300), NOW, 6.0)), HOLD, 3, ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "observed", "action", "desired", "stop"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(
    policy: ScalePolicy,
    observed: Observed,
    action: ScaleAction,
    desired: int,
    stop: tuple[int, ...],
) -> None:
    got = decide(policy, observed, NOW)
    assert (got.action, got.desired, got.stop) == (action, desired, stop), got.reason
    assert got.reason


def test_staggered_idle_times_still_stop_the_highest_index() -> None:
    # the old rule stopped the highest index among replicas idle past the delay: with 2 busy
    # more recently than 1, it stopped 1 and left {0, 2}. The decision ignores idle times.
    first = decide(WAIT, obs([0, 1, 2], steady(0, 300)), NOW)
    assert first.stop == (2,)
    second = decide(WAIT, obs([0, 1], steady(0, 600), last_change=NOW - 300), NOW)
    assert second.stop == (1,)


def test_reasons_name_the_signal_and_numbers() -> None:
    got = decide(INFLIGHT, obs(2, steady(8, 30)), NOW)
    assert "inflight_per_replica" in got.reason and "8" in got.reason and "4" in got.reason
    assert got == ScaleDecision(UP, 4, got.reason)


INVALID = [
    ("target-zero", {"target": 0.0}),
    ("negative-min", {"min_replicas": -1}),
    ("min-above-max", {"min_replicas": 3, "max_replicas": 2}),
    ("negative-step", {"max_step": -1}),
]


@pytest.mark.parametrize("fields", [c[1] for c in INVALID], ids=[c[0] for c in INVALID])
def test_policy_is_validated(fields: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        replace(INFLIGHT, **fields)  # type: ignore[arg-type]
