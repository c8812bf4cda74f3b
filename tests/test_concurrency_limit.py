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


def test_slow_start_opens_a_slot_per_flat_sample_without_waiting_for_the_window() -> None:
    """TCP's per-ACK growth: the round at 4 gives 5, 6, 7, 8 as its calls end, not 8 at its end.

    Calls started before the window opened (here: all but the first round's) still grow the
    limit when flat; they are only kept out of the window that decides the end of slow start.
    """
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    drive(limit, clock, lambda n: L, 4)  # the reference (3 calls), then a round at 2
    assert limit.value == 4
    clock.now += L
    assert [limit.on_sample(L, True, 4) for _ in range(4)] == [5, 6, 7, 8]
    clock.now += 0.05
    assert limit.on_sample(1.5 * L, True, 8) is None  # latency risen: no slot added


def test_the_window_that_ends_slow_start_scales_the_load_it_measured() -> None:
    """Flat samples raised the limit to 12 while the window saw at most 8 in flight at 1.5x:
    the decrease applies to the 8 measured (8 * 1.1 / 1.5), not to the 12 granted meanwhile."""
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    drive(limit, clock, lambda n: L, 6)  # reference, then rounds at 2 and 4, and 8 flat
    assert limit.value == 16 and limit.slow_start
    limit.limit = 12.0
    clock.now += 2 * L
    for _ in range(16):
        limit.on_sample(1.5 * L, True, 8)
    assert not limit.slow_start
    assert limit.value == int(8 * 1.1 / 1.5)


def test_a_small_window_does_not_lower_the_unloaded_reference() -> None:
    """Two fast calls (e.g. on fresh connections) are no reference; three or more are."""
    clock = Clock()
    limit = GradientLimit(32, clock=clock)
    drive(limit, clock, lambda n: L, 3)
    assert limit.baseline_s == pytest.approx(L) and limit.value == 2
    clock.now += 0.8 * L
    limit.on_sample(0.8 * L, True, 2)
    limit.on_sample(0.8 * L, True, 2)  # the round at 2 closes: median 0.8 L, two samples
    assert limit.baseline_s == pytest.approx(L)
    clock.now += 0.7 * L
    for _ in range(4):
        limit.on_sample(0.7 * L, True, 4)  # a round of 4 at 0.7 L: a reference
    assert limit.baseline_s == pytest.approx(0.7 * L)
