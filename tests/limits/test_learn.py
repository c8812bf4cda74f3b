"""QPS/RPM/TPM=auto: the learner's arithmetic with a fake clock, the store record on every backend,
and the lane's limits through the public Executor against the emulator's hidden limits (issue 12)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.limits import make_lane_limiter
from llm_executor.limits._backend import MemoryBackend
from llm_executor.limits.learn import (
    BETA,
    BETA_AGAIN,
    DECREASE_HOLD_S,
    HEADER_MARGIN,
    INTERVAL_S,
    REFRESH_S,
    SAFE_QPS,
    SAFE_TPM,
    SLOW_START_BETA,
    RateLearner,
)
from llm_executor.testing import Emulator, ProviderSim, max_in_window
from llm_executor.types import RateLimitInfo

from .conftest import redis_client_or_skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


class StoreOf:
    """A MemoryBackend seen as the learner's store (``LaneLimiter.learned``'s signature)."""

    reserve_horizon_s: float | None = None

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.calls = 0

    def learned(self, expected_version: int, data: str = "", min_age_ms: int = 0) -> Any:
        self.calls += 1
        return self.backend.learned(expected_version, data, min_age_ms)


def make(clock: Clock, backend: MemoryBackend | None = None, *, shared: bool = False,
         **limits: Any) -> tuple[RateLearner, list[tuple[str, float, str]], list[ProviderConfig]]:
    backend = backend or MemoryBackend(now_ms=clock.ms)
    seen: list[tuple[str, float, str]] = []
    applied: list[ProviderConfig] = []
    learner = RateLearner("fake", ProviderConfig(**(limits or {"qps": "auto"})), StoreOf(backend), shared=shared,
                          clock=clock)
    learner.bind(applied.append, lambda limit, value, source, reason: seen.append((limit, value, source)))
    learner.start()
    return learner, seen, applied


def busy_interval(learner: RateLearner, clock: Clock, starts: int = 5) -> None:
    """One interval in which every start waited for its token (the pace holds the lane back)."""
    for _ in range(starts):
        learner.on_start(0.05)
    clock.now += INTERVAL_S
    learner.on_start(0.05)


# -- the arithmetic ------------------------------------------------------------------------------------


def test_starts_safe_and_reports_it_as_configured() -> None:
    _, seen, applied = make(Clock(), qps="auto", tpm="auto")
    assert applied[-1].qps == SAFE_QPS and applied[-1].tpm == SAFE_TPM
    assert ("qps", SAFE_QPS, "configured") in seen and ("tpm", float(SAFE_TPM), "configured") in seen


def test_headers_are_adopted_at_the_first_reply_less_the_margin() -> None:
    learner, seen, applied = make(Clock(), qps="auto", rpm="auto", tpm="auto")
    learner.on_reply(RateLimitInfo(limit_requests=2220, remaining_requests=2219, limit_tokens=40_000), learner.version)
    cfg = applied[-1]
    rpm = int(2220 * (1 - HEADER_MARGIN))
    assert cfg.rpm == rpm and cfg.qps == pytest.approx(rpm / 60)
    assert cfg.tpm == int(40_000 * (1 - HEADER_MARGIN))
    assert ("qps", pytest.approx(rpm / 60), "headers") in seen and ("tpm", float(cfg.tpm), "headers") in seen
    # The same headers again change nothing (no store write, no log line).
    before = len(seen)
    learner.on_reply(RateLimitInfo(limit_requests=2220, limit_tokens=40_000), learner.version)
    assert len(seen) == before


def test_a_429_under_header_pacing_is_a_hidden_window_decreased_by_beta_not_halved() -> None:
    clock = Clock()
    learner, _, applied = make(clock)
    learner.on_reply(RateLimitInfo(limit_requests=1200), learner.version)
    paced = applied[-1].qps
    learner.on_rate_limited(RateLimitInfo(limit_requests=1200), learner.version)
    assert applied[-1].qps == pytest.approx(paced * BETA)
    for _ in range(8):  # climbs back, but never past the headers' pace
        clock.now += DECREASE_HOLD_S
        busy_interval(learner, clock)
    assert applied[-1].qps <= paced


def test_a_lower_reported_limit_is_adopted_at_once() -> None:
    learner, _, applied = make(Clock())
    learner.on_reply(RateLimitInfo(limit_requests=2220), learner.version)
    learner.on_reply(RateLimitInfo(limit_requests=1110), learner.version)
    assert applied[-1].qps == pytest.approx(int(1110 * (1 - HEADER_MARGIN)) / 60)


def test_slow_start_doubles_only_while_the_pace_holds_the_lane_back() -> None:
    clock = Clock()
    learner, seen, applied = make(clock)
    busy_interval(learner, clock)
    assert applied[-1].qps == 2 * SAFE_QPS and seen[-1][2] == "probe"
    # An interval whose starts did not wait for a token: the demand, not the pace, is the limit.
    for _ in range(5):
        learner.on_start(0.0)
    clock.now += INTERVAL_S
    learner.on_start(0.0)
    assert applied[-1].qps == 2 * SAFE_QPS


def test_a_429_burst_decreases_once_per_episode_then_aimd_closes_in() -> None:
    clock = Clock()
    learner, _, applied = make(clock)
    for _ in range(4):
        busy_interval(learner, clock)
    assert applied[-1].qps == 16
    token = learner.version
    learner.on_rate_limited(None, token)
    learner.on_rate_limited(None, token)  # same episode: started before the decrease
    assert applied[-1].qps == 16 * SLOW_START_BETA
    # A 429 for a request started after the decrease, inside the hold: the provider's window
    # still held the old pace's starts.
    clock.now += DECREASE_HOLD_S / 2
    learner.on_rate_limited(None, learner.version)
    assert applied[-1].qps == 16 * SLOW_START_BETA
    clock.now += DECREASE_HOLD_S
    busy_interval(learner, clock)
    assert 8 < applied[-1].qps <= 0.95 * 16
    clock.now += DECREASE_HOLD_S
    learner.on_rate_limited(None, learner.version)  # a new episode: x BETA, ceiling lowered
    overran = applied[-2].qps
    assert applied[-1].qps == pytest.approx(overran * BETA)
    assert learner.state.ceiling_s == pytest.approx(overran)


def test_decreases_in_a_row_follow_a_dropped_limit_faster() -> None:
    clock = Clock()
    learner, _, applied = make(clock)
    for _ in range(4):
        busy_interval(learner, clock)
    learner.on_rate_limited(None, learner.version)  # ends slow start: 16 -> 8
    clock.now += DECREASE_HOLD_S
    busy_interval(learner, clock)
    before = applied[-1].qps
    clock.now += DECREASE_HOLD_S
    learner.on_rate_limited(None, learner.version)  # after an increase: x BETA
    assert applied[-1].qps == pytest.approx(before * BETA)
    clock.now += DECREASE_HOLD_S
    learner.on_rate_limited(None, learner.version)  # again, no increase between: x BETA_AGAIN
    assert applied[-1].qps == pytest.approx(before * BETA * BETA_AGAIN)


def test_a_record_that_expired_in_the_store_is_written_again() -> None:
    clock = Clock()
    learner, _, applied = make(clock)
    learner.on_reply(RateLimitInfo(limit_requests=600), learner.version)
    clock.now += 2 * 3600  # an hour unwritten: the store forgets the record (LEARNED_TTL_MS)
    learner.on_reply(RateLimitInfo(limit_requests=300), learner.version)
    assert applied[-1].qps == pytest.approx(int(300 * (1 - HEADER_MARGIN)) / 60)
    token = learner.version
    learner.on_rate_limited(None, token)  # and it keeps learning on the fresh record
    assert applied[-1].qps == pytest.approx(int(300 * (1 - HEADER_MARGIN)) / 60 * BETA)


def test_a_stale_429_is_ignored() -> None:
    clock = Clock()
    learner, _, applied = make(clock)
    old = learner.version
    busy_interval(learner, clock)
    learner.on_rate_limited(None, old)  # started under the version before the increase
    assert applied[-1].qps == 2 * SAFE_QPS


def test_a_provider_that_reports_no_token_limit_gets_no_local_tpm() -> None:
    learner, seen, applied = make(Clock(), qps="auto", tpm="auto")
    learner.on_reply(None, learner.version)
    assert applied[-1].tpm is None and seen[-1][:2] == ("tpm", float("inf"))


def test_only_rpm_auto_probes_a_requests_per_minute_limit() -> None:
    clock = Clock()
    learner, _, applied = make(clock, rpm="auto")
    assert applied[-1].rpm == 60 and applied[-1].qps is None
    busy_interval(learner, clock)
    assert applied[-1].rpm == 120


# -- sharing: one record, many learners ----------------------------------------------------------------


def test_learners_sharing_a_store_raise_once_per_interval_and_decrease_once_per_episode() -> None:
    clock = Clock()
    store = MemoryBackend(now_ms=clock.ms)
    a, _, applied_a = make(clock, store, shared=True)
    b, seen_b, applied_b = make(clock, store, shared=True)

    def both_busy() -> None:  # one interval in which both were held back by the pace
        for learner in (a, b):
            for _ in range(5):
                learner.on_start(0.05)
        clock.now += INTERVAL_S
        a.on_start(0.05)
        b.on_start(0.05)  # too late: the record changed less than an interval ago; b adopts it

    both_busy()
    assert applied_a[-1].qps == 2 and applied_b[-1].qps == 2
    assert seen_b[-1][2] == "store"
    for _ in range(3):
        both_busy()
    shared_qps = applied_a[-1].qps
    assert shared_qps == 16  # doubled once per interval, not once per learner
    assert applied_b[-1].qps == shared_qps
    # The same 429 burst seen by both: one decrease.
    token_a, token_b = a.version, b.version
    a.on_rate_limited(None, token_a)
    b.on_rate_limited(None, token_b)
    assert applied_a[-1].qps == applied_b[-1].qps == shared_qps * SLOW_START_BETA


def test_a_new_learner_starts_from_what_the_store_holds() -> None:
    clock = Clock()
    store = MemoryBackend(now_ms=clock.ms)
    a, _, _ = make(clock, store, shared=True)
    a.on_reply(RateLimitInfo(limit_requests=600), a.version)
    _, seen, applied = make(clock, store, shared=True)
    assert applied[-1].qps == pytest.approx(int(600 * (1 - HEADER_MARGIN)) / 60)
    assert seen[0][2] == "store"


def test_a_shared_learner_rereads_the_store_every_refresh() -> None:
    clock = Clock()
    store = MemoryBackend(now_ms=clock.ms)
    a, _, _ = make(clock, store, shared=True)
    b, _, applied_b = make(clock, store, shared=True)
    a.on_reply(RateLimitInfo(limit_requests=1200), a.version)
    b.on_start(0.0)
    assert applied_b[-1].qps == SAFE_QPS  # read less than REFRESH_S ago
    clock.now += REFRESH_S
    b.on_start(0.0)
    assert applied_b[-1].qps == pytest.approx(int(1200 * (1 - HEADER_MARGIN)) / 60)


def test_the_store_record_is_compare_and_set_on_every_backend(backend_url: str, namespace: str) -> None:
    cfg = ExecutorConfig(providers={"fake": ProviderConfig()}, rate_backend=backend_url, namespace=namespace)
    limiter = make_lane_limiter("fake", ProviderConfig(), cfg)
    try:
        empty = limiter.learned(-1)
        assert empty is not None and empty.version == 0 and not empty.applied
        first = limiter.learned(0, "one", 0)
        assert first is not None and first.applied and first.version == 1
        lost = limiter.learned(0, "two", 0)  # stale version: refused, the current record comes back
        assert lost is not None and not lost.applied and (lost.version, lost.data) == (1, "one")
        young = limiter.learned(1, "three", 60_000)  # changed less than a minute ago
        assert young is not None and not young.applied
        second = limiter.learned(1, "four", 0)
        assert second is not None and second.applied and second.version == 2
        assert limiter.learned(-1).data == "four"  # type: ignore[union-attr]
    finally:
        limiter.close()


# -- through the Executor, against the emulator ---------------------------------------------------------


def _feed(ex: Executor, request: LLMRequest, seconds: float) -> None:
    stop = time.monotonic() + seconds

    def run() -> None:
        while time.monotonic() < stop:
            ex.submit(request)

    feeder = threading.Thread(target=run, daemon=True)
    feeder.start()
    feeder.join(seconds + 30)


def _executor(emu: Emulator, provider: str, model: str, backend: str = "memory", namespace: str = "t",
              **limits: Any) -> Executor:
    pcfg = ProviderConfig(max_parallel=8, base_url=emu.url(provider), api_key="k", model=model, max_retries=8,
                          **limits)
    return Executor(ExecutorConfig(providers={provider: pcfg}, queue_size=32, backpressure="block",
                                   rate_backend=backend, namespace=namespace))


def test_headers_are_adopted_within_the_first_replies() -> None:
    with Emulator({"openai": ProviderSim(rpm=1200, tpm=100_000, latency_s=0.02)}) as emu:
        ex = _executor(emu, "openai", "gpt-4o-mini", qps="auto", tpm="auto")
        try:
            request = LLMRequest("openai", "gpt-4o-mini", "hi", max_output_tokens=4)
            assert ex.run(request, timeout=10).rate_limit.limit_requests == 1200  # type: ignore[union-attr]
            learned = ex.stats()["openai"].learned
            assert learned["qps"].source == "headers" and learned["qps"].value == pytest.approx(1176 / 60)
            assert learned["tpm"].source == "headers" and learned["tpm"].value == 98_000
            start = time.monotonic()
            _feed(ex, request, 2.0)
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        starts = [r.monotonic for r in emu.requests("openai") if r.monotonic >= start]
    # The learned pace at once: about 19.6/s, never more than the minute's share of one second.
    assert max_in_window(starts) <= 20 and len(starts) >= 0.8 * 19.6 * 2
    assert [r.status for r in emu.requests("openai")].count(429) == 0


@pytest.mark.slow
def test_a_halved_reported_limit_is_followed_within_5s() -> None:
    with Emulator({"openai": ProviderSim(rpm=1200, latency_s=0.02)}) as emu:
        ex = _executor(emu, "openai", "gpt-4o-mini", qps="auto")
        try:
            request = LLMRequest("openai", "gpt-4o-mini", "hi", max_output_tokens=4)
            _feed(ex, request, 2.0)
            emu.set_limits("openai", rpm=600)  # the provider halves the limit mid-run
            dropped_at = time.monotonic()
            _feed(ex, request, 6.0)
            assert ex.stats()["openai"].learned["qps"].value == pytest.approx(588 / 60)
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        late = [r.monotonic for r in emu.requests("openai") if r.monotonic >= dropped_at + 5.0]
    assert late and max_in_window(late) <= 10, "not back under the halved limit (10/s) within 5 s"
    assert [r.status for r in emu.requests("openai")].count(429) == 0


@pytest.mark.slow
def test_probing_without_headers_finds_a_hidden_rate_and_follows_it_down() -> None:
    with Emulator({"gemini": ProviderSim(rps=12, latency_s=0.02)}) as emu:
        ex = _executor(emu, "gemini", "gemini-2.5-flash", qps="auto")
        try:
            request = LLMRequest("gemini", "gemini-2.5-flash", "hi", max_output_tokens=4)
            assert ex.run(request, timeout=10).rate_limit is None  # Gemini reports no limits
            _feed(ex, request, 14.0)
            learned = ex.stats()["gemini"].learned["qps"]
            assert learned.source == "probe" and 8 <= learned.value <= 16
            t_end = time.monotonic()
            ok = [r.monotonic for r in emu.requests("gemini") if r.status == 200 and r.monotonic >= t_end - 4.0]
            assert len(ok) >= 0.7 * 12 * 4, f"{len(ok)} successes in the last 4 s at a hidden 12 rps"
            emu.set_limits("gemini", rps=6)  # halved mid-run
            dropped_at = time.monotonic()
            _feed(ex, request, 7.0)
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        late = [r.monotonic for r in emu.requests("gemini") if r.monotonic >= dropped_at + 5.0]
    assert late and max_in_window(late) <= 6 + 1, "not back under the halved limit within 5 s"


@pytest.mark.redis
def test_two_executors_on_one_redis_pace_against_one_learned_value(namespace: str) -> None:
    client = redis_client_or_skip()
    try:
        with Emulator({"openai": ProviderSim(rpm=1200, latency_s=0.02)}) as emu:
            a = _executor(emu, "openai", "gpt-4o-mini", "redis://127.0.0.1:6379/0", namespace, qps="auto")
            b = _executor(emu, "openai", "gpt-4o-mini", "redis://127.0.0.1:6379/0", namespace, qps="auto")
            try:
                request = LLMRequest("openai", "gpt-4o-mini", "hi", max_output_tokens=4)
                a.run(request, timeout=10)  # a learns from the headers and writes the record
                assert b.stats()["openai"].learned["qps"].value == SAFE_QPS
                time.sleep(REFRESH_S + 0.1)
                b.run(request, timeout=10)  # b re-reads the record on its next start
                learned = b.stats()["openai"].learned["qps"]
                assert learned.value == pytest.approx(1176 / 60) and learned.source == "store"
                start = time.monotonic()
                threads = [threading.Thread(target=_feed, args=(ex, request, 3.0)) for ex in (a, b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
            finally:
                a.shutdown(wait=True, cancel_futures=True)
                b.shutdown(wait=True, cancel_futures=True)
            starts = [r.monotonic for r in emu.requests("openai") if start + 0.5 <= r.monotonic <= start + 3.0]
        # Two processes' worth of demand, one shared pace of 19.6/s: never two paces' worth.
        assert max_in_window(starts) <= 20
        assert len(starts) >= 0.8 * 19 * 2.5
    finally:
        from .conftest import delete_namespace

        delete_namespace(client, namespace)


_FORKED: Executor | None = None


def _forked_child(conn: Any) -> None:
    try:
        assert _FORKED is not None
        from llm_executor.types import LLMResponse as Response

        response = _FORKED.run(LLMRequest("fake", "m", "from the child"), timeout=10)
        lane = _FORKED._engine.lanes["fake"]
        conn.send((isinstance(response, Response), lane.pcfg.qps, lane.limiter.reserve_horizon_s))
    except BaseException as exc:  # reported to the parent
        conn.send(("error", repr(exc), None))
    finally:
        conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_keeps_what_the_parent_learned() -> None:
    import multiprocessing

    from llm_executor.testing import ScriptedProvider

    global _FORKED
    provider = ScriptedProvider(replies=["ok"] * 4)
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig(qps="auto")}), providers={"fake": provider}) as ex:
        lane = ex._engine.lanes["fake"]
        assert lane.learner is not None
        lane.learner.on_reply(RateLimitInfo(limit_requests=600), lane.learner.version)
        _FORKED = ex
        ctx = multiprocessing.get_context("fork")
        parent_conn, child_conn = ctx.Pipe()
        process = ctx.Process(target=_forked_child, args=(child_conn,))
        process.start()
        assert parent_conn.poll(20), "the forked child's request never finished"
        result = parent_conn.recv()
        process.join(10)
    _FORKED = None
    assert result == (True, pytest.approx(588 / 60), 0.25), result


def test_a_learned_pace_keeps_its_fraction_and_a_configured_qps_does_not() -> None:
    """QPS=auto: the lane's limiter gets 36.25/s as 37 per 1.021 s (+ margin); the same number
    configured stays floor = 36 per 1 s (DESIGN: never more than the QPS in a second)."""
    import dataclasses

    from llm_executor import Executor, ExecutorConfig, ProviderConfig
    from llm_executor.limits._backend import Rate
    from tests.fakes import FakeProvider

    config = ExecutorConfig(providers={"learning": ProviderConfig(qps="auto"),
                                       "fixed": ProviderConfig(qps=2175 / 60)})
    with Executor(config, {"learning": FakeProvider("learning"), "fixed": FakeProvider("fixed")}) as ex:
        auto, fixed = ex._lanes["learning"], ex._lanes["fixed"]
        auto.apply_learned(dataclasses.replace(auto.pcfg, qps=2175 / 60))
        assert auto.limiter._rates[-1] == Rate(37, 1021 + 20)
        assert fixed.limiter._rates[-1] == Rate(36, 1000 + 20)
