"""One property suite over every backend: the same operations at the same instants give the same answers.

Hypothesis draws a lane's limits and a sequence of operations (advance the clock, admit a start
with or without a slot, TPM tokens and a reservation horizon, cancel a reserved start, settle
tokens, release a slot). Each backend runs them on an injected clock: the memory backend and the
SQLite file call ``_backend.py``'s pure functions, Redis and Redis Cluster run the Lua port with
the clock passed in (``RedisBackend(now_ms=...)``), so any drift between the Python arithmetic and
the Lua is a failing example. Two independent oracles check the memory backend's answers: a
brute-force count of every window, and pyrate-limiter's InMemoryBucket (the implementation we
replaced) on the admit-now-or-never operations.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from llm_executor.config import ProviderConfig
from llm_executor.limits._backend import Ask, MemoryBackend, Rate, Verdict, build_rates, rate_wait_ms
from llm_executor.limits._sqlite import SQLiteBackend

from .conftest import CLUSTER_URL, REDIS_URL, delete_namespace, redis_client_or_skip

# Leases outlive every sequence: a memory slot has no lease (the process is its holder), shared
# ones expire; expiry is proved with real processes in test_shared.py.
LEASE_MS = 10**9


@dataclass
class Clock:
    now: int = 1_000_000_000

    def __call__(self) -> int:
        return self.now


@dataclass
class World:
    """Every backend on one clock, each on a lane of its own."""

    clock: Clock
    backends: dict[str, Any]
    made: list[Any] = field(default_factory=list)


@pytest.fixture(scope="module")
def redis_urls() -> list[tuple[str, str, Any]]:
    namespace = f"prop-{uuid.uuid4().hex[:8]}"
    out = []
    for kind, url in (("redis", REDIS_URL), ("cluster", CLUSTER_URL)):
        out.append((kind, url, redis_client_or_skip(url)))
    yield [(kind, url, namespace) for kind, url, _ in out]  # type: ignore[misc]
    for _, _, client in out:
        delete_namespace(client, namespace)


@pytest.fixture
def worlds(tmp_path: Path, redis_urls: list[tuple[str, str, str]]) -> Iterator[Any]:
    from llm_executor.limits._redis import RedisBackend

    counter = itertools.count()
    made: list[Any] = []

    def world() -> World:
        clock = Clock()
        lane = f"{redis_urls[0][2]}:lane{next(counter)}-{uuid.uuid4().hex[:6]}"
        backends: dict[str, Any] = {
            "memory": MemoryBackend(now_ms=clock),
            "sqlite": SQLiteBackend(f"sqlite:///{tmp_path / 'props.db'}", lane, now_ms=clock),
        }
        for kind, url, _ in redis_urls:
            backends[kind] = RedisBackend(url, lane, now_ms=clock)
        made.extend(backends.values())
        return World(clock, backends)

    yield world
    for backend in made:
        backend.close()


rates_st = st.lists(st.tuples(st.integers(1, 6), st.integers(5, 400)), min_size=0, max_size=3).map(
    lambda pairs: tuple(sorted({Rate(limit, interval) for limit, interval in pairs}, key=lambda r: r.interval_ms)))

op_st = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 300)),
    st.tuples(st.just("admit"), st.booleans(), st.booleans(), st.integers(0, 40), st.sampled_from([0, 0, 50, 500])),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("readmit"), st.integers(0, 50), st.sampled_from([0, 50, 500])),
    st.tuples(st.just("settle"), st.integers(-60, 60)),
    st.tuples(st.just("release"), st.integers(0, 50)),
)


def _run(world: World, rates: tuple[Rate, ...], tpm: int, cap: int, ops: list[tuple[Any, ...]]) -> list[Any]:
    """Apply ``ops`` to every backend; return the memory backend's trace (and assert the others match)."""
    traces: dict[str, list[Any]] = {name: [] for name in world.backends}
    members: list[str] = []
    holders: list[str] = []
    seq = itertools.count()
    for op in ops:
        kind = op[0]
        if kind == "advance":
            world.clock.now += op[1]
            continue
        if kind == "admit":
            _, with_slot, with_tokens, tokens, max_wait = op
            n = next(seq)
            ask = Ask(rates=rates, member=f"m{n}", max_wait_ms=max_wait, tokens=tokens,
                      tpm_limit=tpm if with_tokens else None, holder=f"h{n}" if with_slot else "",
                      cap=cap if with_slot else None, ttl_ms=LEASE_MS)
            for name, backend in world.backends.items():
                verdict: Verdict = backend.admit(ask)
                traces[name].append(("admit", world.clock.now, verdict, ask))
            verdict = traces["memory"][-1][2]
            if verdict.taken:
                members.append(ask.member)
                if with_slot:
                    holders.append(ask.holder)
            continue
        if kind == "readmit" and members:
            # A caller woken late moves its reserved start: the same member asks again.
            member = members.pop(op[1] % len(members))
            ask = Ask(rates=rates, member=member, max_wait_ms=op[2])
            for name, backend in world.backends.items():
                traces[name].append(("admit", world.clock.now, backend.admit(ask), ask))
            if traces["memory"][-1][2].taken:
                members.append(member)
        elif kind == "cancel" and members:
            member = members.pop(op[1] % len(members))
            for backend in world.backends.values():
                backend.cancel(member)
        elif kind == "settle":
            for backend in world.backends.values():
                backend.adjust_tokens(op[1])
        elif kind == "release" and holders:
            holder = holders.pop(op[1] % len(holders))
            for backend in world.backends.values():
                backend.release_slot(holder)
        for name, backend in world.backends.items():
            traces[name].append(("state", world.clock.now, backend.tpm_used(), backend.slots_held(),
                                 backend.rate_wait_s(rates)))
    for name, trace in traces.items():
        assert trace == traces["memory"], f"{name} disagrees with the memory backend"
    return traces["memory"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rates=rates_st, tpm=st.integers(20, 120), cap=st.integers(1, 3), ops=st.lists(op_st, max_size=30))
# The edges random steps rarely hit: a start exactly one interval after the last, reservations
# ahead followed by one more under TPM.
@example(rates=(Rate(1, 100),), tpm=50, cap=1,
         ops=[("admit", False, False, 0, 0), ("advance", 100), ("admit", False, False, 0, 0),
              ("advance", 1), ("admit", False, False, 0, 0)])
@example(rates=(Rate(2, 100), Rate(3, 300)), tpm=50, cap=1,
         ops=[("admit", True, True, 30, 500)] * 5 + [("advance", 150), ("admit", False, True, 20, 0)])
def test_every_backend_gives_the_memory_backends_answers(worlds: Any, rates: tuple[Rate, ...], tpm: int, cap: int,
                                                         ops: list[tuple[Any, ...]]) -> None:
    _run(worlds(), rates, tpm, cap, ops)


def _windows_hold(starts: list[int], rates: tuple[Rate, ...]) -> None:
    """Brute force: every window [t - interval, t] holds at most ``limit`` starts."""
    ordered = sorted(starts)
    for rate in rates:
        for t in ordered:
            inside = [s for s in ordered if t - rate.interval_ms <= s <= t]
            assert len(inside) <= rate.limit, f"{len(inside)} starts within {rate.interval_ms} ms under {rate}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rates=rates_st.filter(bool), ops=st.lists(op_st, max_size=40))
def test_admitted_starts_never_crowd_a_window(worlds: Any, rates: tuple[Rate, ...], ops: list[tuple[Any, ...]]) -> None:
    trace = _run(worlds(), rates, 10**6, 10**6, [op for op in ops if op[0] in ("advance", "admit", "readmit")])
    starts: dict[str, int] = {}  # member -> its start; asking again moves it, a refusal removes it
    for _, now, verdict, ask in (e for e in trace if e[0] == "admit"):
        if verdict.taken:
            starts[ask.member] = now + verdict.wait_ms
        else:
            starts.pop(ask.member, None)
    _windows_hold(list(starts.values()), rates)
    # A start refused now-or-never had a full window, and its wait names the first free instant.
    for _, _, verdict, ask in (e for e in trace if e[0] == "admit"):
        if not verdict.taken:
            assert verdict.blocked_by == "rate" and verdict.wait_ms > ask.max_wait_ms


@settings(max_examples=60, deadline=None)
@given(rates=rates_st.filter(bool), steps=st.lists(st.integers(0, 120), max_size=40))
def test_admit_now_or_never_agrees_with_pyrate_limiter(rates: tuple[Rate, ...], steps: list[int]) -> None:
    from pyrate_limiter import InMemoryBucket, RateItem
    from pyrate_limiter import Rate as PyrateRate

    try:
        bucket = InMemoryBucket([PyrateRate(r.limit, r.interval_ms) for r in rates])
    except ValueError:  # pyrate refuses rate lists whose density grows (its issue #239); we need not
        assume(False)
        return
    clock = Clock()
    ours = MemoryBackend(now_ms=clock)
    for i, step in enumerate(steps):
        clock.now += step
        verdict = ours.admit(Ask(rates=rates, member=f"m{i}"))
        assert verdict.taken == bool(bucket.put(RateItem("lane", clock.now))), f"step {i} at {clock.now}"


def test_the_wait_names_the_first_instant_a_start_fits() -> None:
    rates = (Rate(2, 100),)
    log = [1000, 1050]  # two starts: the window holds 2

    def nth(n: int) -> int | None:
        return sorted(log, reverse=True)[n] if n < len(log) else None

    assert rate_wait_ms(1060, rates, nth) == 1101 - 1060  # the older start leaves the window at 1101
    log.append(1200)  # reserved ahead by another caller: later starts queue behind it
    assert rate_wait_ms(1060, rates, nth) == 1200 - 1060
    log.append(1200)  # two at 1200: the next one waits for the first of them to leave
    assert rate_wait_ms(1060, rates, nth) == 1301 - 1060


@given(qps=st.floats(min_value=0.01, max_value=500.0, allow_nan=False), margin=st.integers(0, 50))
def test_a_learned_qps_keeps_its_fraction_and_never_exceeds_itself_or_its_ceiling(qps: float, margin: int) -> None:
    """A learned pace's window is ``ceil(qps)`` starts per ``ceil(qps)/qps`` s + margin: its
    long-run pace is at most ``qps``, within the margin and 1 ms of rounding of it, and no 1 s
    window holds more than ``ceil(qps)`` starts (the window is at least 1 s long)."""
    cfg = ProviderConfig(qps=qps, window_margin_ms=margin, burst=None)
    window = build_rates(cfg, learned_qps=True)[-1]
    n = math.ceil(qps)
    assert window.limit == max(1, n)
    assert window.interval_ms >= 1000 + margin
    assert window.limit * 1000 / window.interval_ms <= qps
    assert window.limit * 1000 / (window.interval_ms - margin - 1) >= qps


@given(qps=st.floats(min_value=0.01, max_value=500.0, allow_nan=False), margin=st.integers(0, 50))
def test_a_configured_qps_never_allows_more_than_itself_in_any_second(qps: float, margin: int) -> None:
    """DESIGN: never more than its QPS in any 1 s window. The window (the longest rate; the
    pacing rate before it runs at 1.1x QPS within it) is at least 1 s + margin long and holds at
    most ``qps`` starts (one, spaced 1/qps apart, below 1)."""
    window = build_rates(ProviderConfig(qps=qps, window_margin_ms=margin, burst=None))[-1]
    assert window.interval_ms >= 1000 + margin
    assert window.limit <= max(1, qps)
    assert window.limit * 1000 / window.interval_ms <= qps


def test_whole_and_sub_one_qps_keep_their_windows_and_a_learned_fraction_is_kept() -> None:
    margin = 20
    for learned in (False, True):
        assert build_rates(ProviderConfig(qps=5), learned_qps=learned)[-1] == Rate(5, 1000 + margin)
        assert build_rates(ProviderConfig(qps=0.5), learned_qps=learned) == (Rate(1, 2000 + margin),)
    # A learned header pace of 2175/min: 37 per 1.021 s (35.5/s), not floor = 36 per 1 s (35.3/s).
    assert build_rates(ProviderConfig(qps=2175 / 60), learned_qps=True)[-1] == Rate(37, 1021 + margin)
    assert build_rates(ProviderConfig(qps=2.5, burst=3), learned_qps=True) == (Rate(3, 1200 + margin),)
    # The same values configured: floor(QPS) per 1 s.
    assert build_rates(ProviderConfig(qps=2175 / 60))[-1] == Rate(36, 1000 + margin)
    assert build_rates(ProviderConfig(qps=2.5, burst=3)) == (Rate(2, 1000 + margin),)
