"""MAX_PARALLEL=auto, the algorithm alone (limits.concurrency.GradientLimit) on synthetic latency curves.

The driver below is a closed loop on a fake clock: every "round" starts ``value`` calls at once
(a saturating backlog), they all take ``latency(value)`` and finish together. No threads, no sleep.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llm_executor.limits.concurrency import DROP_FACTOR, INITIAL_LIMIT, GradientLimit

L = 0.2  # unloaded latency, seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def capacity(c: int) -> Callable[[int], float]:
    """A server of capacity ``c``: flat up to it, then latency grows as n / c (processor sharing)."""
    return lambda n: L * max(1.0, n / c)


def drive(limit: GradientLimit, clock: Clock, latency: Callable[[int], float], rounds: int,
          demand: int | None = None) -> list[int]:
    """Run ``rounds`` rounds; returns the limit's value at the start of each."""
    seen = []
    for _ in range(rounds):
        n = limit.value if demand is None else min(limit.value, demand)
        seen.append(limit.value)
        lat = latency(n)
        clock.now += lat
        for _ in range(n):
            limit.on_sample(lat, True, n)
    return seen


def test_flat_latency_grows_to_the_ceiling_and_never_past_it() -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    assert limit.value == INITIAL_LIMIT
    seen = drive(limit, clock, lambda n: L, 60)
    assert max(seen) == 32 and limit.value == 32
    # Slow start: from 1 to 32 in 8 rounds (the first three one call at a time), not 31
    # additive steps of up to 32 calls each.
    assert seen.index(32) <= 8


def test_the_cold_start_reaches_8_in_six_call_times() -> None:
    """Three one-at-a-time calls measure the unloaded latency; then one round per doubling."""
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    assert drive(limit, clock, lambda n: L, 7) == [1, 1, 1, 2, 4, 8, 16]
    assert limit.baseline_s == pytest.approx(L)


def test_latency_rising_past_a_capacity_settles_at_it() -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    seen = drive(limit, clock, capacity(6), 300)
    tail = seen[-100:]
    assert min(tail) >= 6 and max(tail) <= 7, sorted(set(tail))
    # Latency stays within 1.2x unloaded, throughput at capacity (n >= 6) all along the tail.
    assert max(capacity(6)(n) for n in tail) / L <= 1.2


@pytest.mark.parametrize("cap", [1, 2, 3, 12])
def test_small_and_large_capacities_settle_near_them(cap: int) -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    tail = drive(limit, clock, capacity(cap), 400)[-100:]
    assert cap <= sum(tail) / len(tail) <= cap * 1.1 + 1, sorted(set(tail))
    assert max(tail) <= cap + 1 + (cap > 4)


def test_a_capacity_drop_mid_run_brings_the_limit_down_within_a_few_windows() -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    drive(limit, clock, capacity(8), 200)
    assert limit.value >= 8
    seen = drive(limit, clock, capacity(4), 10)
    assert seen[-1] <= 5  # halved at most per window, so a few windows


def test_a_drop_backs_off_at_once_and_counts_once_per_window() -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock, initial=20)
    clock.now += 1.0
    assert limit.on_sample(0.5, False, 20) == int(20 * DROP_FACTOR)
    assert limit.slow_start is False
    # Another failure of a call that started before that decrease: the same overload, ignored.
    assert limit.on_sample(0.5, False, 20) is None
    assert limit.value == int(20 * DROP_FACTOR)
    clock.now += 1.0  # a call started after the decrease fails: decrease again
    assert limit.on_sample(0.5, False, 14) == int(20 * DROP_FACTOR * DROP_FACTOR)


def test_drops_never_take_the_limit_below_one() -> None:
    clock = Clock()
    limit = GradientLimit(8, clock=clock)
    for _ in range(50):
        clock.now += 1.0
        limit.on_sample(0.1, False, 1)
    assert limit.value == 1 and limit.limit >= 1.0


def test_no_growth_while_the_caller_keeps_few_calls_in_flight() -> None:
    """App-limited: two calls at a time say nothing about whether 20 would be fine."""
    clock = Clock()
    limit = GradientLimit(32, clock=clock, initial=8)
    drive(limit, clock, lambda n: L, 50, demand=2)
    assert limit.value == 8


def test_a_slower_model_raises_the_baseline_instead_of_pinning_the_limit_at_one() -> None:
    clock = Clock()
    limit = GradientLimit(16, clock=clock)
    drive(limit, clock, lambda n: L, 40)
    assert limit.value == 16
    # The unloaded latency triples for good (a bigger model): the limit falls, and once a window
    # runs one call at a time it re-learns the baseline and grows back.
    seen = drive(limit, clock, lambda n: 3 * L, 200)
    assert min(seen) < 16 and limit.value == 16
    assert limit.baseline_s == pytest.approx(3 * L)


def test_samples_of_calls_started_before_the_last_change_are_not_counted() -> None:
    clock = Clock()
    limit = GradientLimit(32, clock=clock, initial=4)
    clock.now += 1.0
    for _ in range(4):
        assert limit.on_sample(2.0, True, 4) is None  # started 1 s before the limit existed
    assert limit._window == []


@pytest.mark.parametrize("kw", [{"ceiling": 0}, {"tolerance": 0.9}, {"drop_factor": 1.0}, {"drop_factor": 0.0}])
def test_bad_parameters_are_refused(kw: dict[str, float]) -> None:
    args = {"ceiling": 8, **kw}
    with pytest.raises(ValueError, match="GradientLimit"):
        GradientLimit(**args)  # type: ignore[arg-type]


def test_the_start_is_clamped_to_the_ceiling() -> None:
    assert GradientLimit(1).value == 1
    assert GradientLimit(4, initial=50).value == 4


def test_only_a_change_of_the_integer_value_is_reported() -> None:
    """The lane logs one INFO line per reported change: the float moves every window, the cap less often."""
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    drive(limit, clock, lambda n: L, 3)  # the unloaded reference: 3 one-at-a-time calls
    drive(limit, clock, lambda n: L, 2)
    limit.slow_start = False
    limit.limit = 10.9
    clock.now += 1.0
    reported = [limit.on_sample(1.12 * limit.baseline_s, True, 10) for _ in range(11)]  # type: ignore[operator]
    assert 10.0 <= limit.limit < 10.9 and limit.value == 10
    assert reported == [None] * 11
