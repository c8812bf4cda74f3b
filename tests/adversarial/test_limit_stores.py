"""Stores that freeze, lock up or come back (issue 11 items 3, 4 and 6), against servers the tests start.

* A frozen Redis (SIGSTOP) holds each caller for at most its socket timeout, all at once rather
  than one after another (no lock held across a call), and ``last_known_wait_s`` answers at once.
* A foreign process holding the SQLite database's write lock fails every call within the busy
  timeout (the configured policy then applies), and ``close()`` returns.
* ``LLM_EXECUTOR_BACKEND_FAILURE=local`` never exceeds the shared limits on the way back: what
  was taken locally is recorded into the store before the lane uses it again.
Never the shared Redis: each test starts (and kills) its own redis-server.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_executor.errors import ProviderUnavailableError
from llm_executor.limits import LaneLimiter
from llm_executor.limits._redis import SOCKET_TIMEOUT_S
from llm_executor.limits._sqlite import BUSY_TIMEOUT_S
from llm_executor.testing import max_in_window
from tests.limits.conftest import MakeLimiter, limiter_factory
from tests.limits.servers import RedisServer

from . import _store_workers

CTX = multiprocessing.get_context("spawn")
SLACK_S = 1.0  # scheduling on a busy 2-core machine


@pytest.fixture
def make_limiter() -> Iterator[MakeLimiter]:
    with limiter_factory(f"adv-{uuid.uuid4().hex[:8]}") as make:
        yield make


def _max_overlap(spans: list[tuple[float, float]], since: float = float("-inf")) -> int:
    """Most spans in flight at once, counting only instants at or after ``since``."""
    events = sorted([(max(s, since), 1) for s, e in spans if e > since] + [(e, -1) for s, e in spans if e > since])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def _concurrently(fn: Any, n: int) -> list[tuple[float, BaseException | None]]:
    """Run ``fn`` in ``n`` threads released together; each one's (seconds taken, error)."""
    barrier = threading.Barrier(n)
    results: list[tuple[float, BaseException | None]] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait(5)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            error = exc
        with lock:
            results.append((time.monotonic() - started, error))

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n, "a caller never returned"
    return results


@pytest.mark.slow
def test_a_frozen_redis_holds_each_caller_for_one_socket_timeout_at_most_and_all_at_once(
        tmp_path: Path, make_limiter: MakeLimiter) -> None:
    with RedisServer(tmp_path) as server:
        limiter = make_limiter(server.url, qps=100, burst=100, tpm=10_000, global_max_parallel=8)
        for _ in range(4):  # warm: pooled connections exist, scripts are loaded
            assert limiter.try_acquire() == 0.0
        before = limiter.last_known_wait_s()
        server.freeze()
        try:
            stuck = threading.Thread(target=lambda: _concurrently(limiter.try_acquire, 1))
            stuck.start()
            # Routing reads the last known wait while a call is stuck in the frozen store: no I/O.
            started = time.monotonic()
            assert limiter.last_known_wait_s() == before
            assert time.monotonic() - started < 0.05
            stuck.join(30)
            stopping = threading.Event()
            calls = [limiter.try_acquire, lambda: limiter.reserve_tokens(10, stopping),
                     lambda: limiter.acquire_slot(stopping), limiter.expected_wait_s]
            for call in calls:
                results = _concurrently(call, 4)
                # Four callers at once each wait one socket timeout: in parallel, not 2, 4, 6, 8 s.
                assert max(took for took, _ in results) < SOCKET_TIMEOUT_S + SLACK_S, results
                for _, error in results:
                    assert error is None or isinstance(error, ProviderUnavailableError), error
            assert limiter.last_known_wait_s() == 3600.0  # fail_closed: "auto" steers away
        finally:
            server.thaw()
        assert limiter.try_acquire() == 0.0  # the store answers again: so does the lane


@pytest.mark.slow
def test_a_frozen_redis_under_the_local_policy_costs_one_timeout_then_runs_locally(
        tmp_path: Path, make_limiter: MakeLimiter) -> None:
    with RedisServer(tmp_path) as server:
        limiter = make_limiter(server.url, backend_failure="local", qps=100, burst=100)
        assert limiter.try_acquire() == 0.0
        server.freeze()
        try:
            results = _concurrently(limiter.try_acquire, 4)
            assert max(took for took, _ in results) < SOCKET_TIMEOUT_S + SLACK_S
            assert all(error is None for _, error in results) and limiter.is_degraded
            started = time.monotonic()
            for _ in range(20):
                limiter.try_acquire()  # local: no call waits on the frozen store (one probe at most)
            assert time.monotonic() - started < SOCKET_TIMEOUT_S + SLACK_S
        finally:
            server.thaw()


_HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def foreign_lock_holder(tmp_path: Path) -> Any:
    """Start another process holding the database's write lock; yields a function that ends it."""
    procs: list[subprocess.Popen[str]] = []

    def hold(db: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(db)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail_closed", "local"])
def test_a_foreign_sqlite_lock_holder_fails_calls_within_the_busy_timeout(
        tmp_path: Path, make_limiter: MakeLimiter, foreign_lock_holder: Any, policy: str) -> None:
    db = tmp_path / "limits.db"
    limiter = make_limiter(f"sqlite:///{db}", backend_failure=policy, qps=100, burst=100, tpm=10_000,
                           global_max_parallel=4)
    stopping = threading.Event()
    assert limiter.try_acquire() == 0.0
    holder = foreign_lock_holder(db)
    results = _concurrently(lambda: limiter.acquire(stopping), 4)
    assert max(took for took, _ in results) < 2 * BUSY_TIMEOUT_S + SLACK_S, results
    if policy == "fail_closed":
        assert all(isinstance(error, ProviderUnavailableError) for _, error in results), results
        assert "locked" in str(results[0][1])
    else:
        assert all(error is None for _, error in results) and limiter.is_degraded
    started = time.monotonic()
    limiter.close()  # never hangs on the lock
    assert time.monotonic() - started < BUSY_TIMEOUT_S + SLACK_S
    holder.kill()
    holder.wait(10)
    again = make_limiter(f"sqlite:///{db}", qps=100, burst=100)
    assert again.try_acquire() == 0.0


def _starts(spans: list[tuple[float, float]]) -> list[float]:
    return [s for s, _ in spans]


@pytest.mark.slow
def test_local_fallback_never_exceeds_the_shared_limits_when_a_killed_redis_comes_back(
        tmp_path: Path, make_limiter: MakeLimiter) -> None:
    qps, cap = 20, 6
    with RedisServer(tmp_path) as server:
        limiter: LaneLimiter = make_limiter(server.url, backend_failure="local", qps=qps, global_max_parallel=cap)
        spans: list[tuple[float, float]] = []
        rejoined: list[float] = []
        begin = time.monotonic()
        runner = threading.Thread(target=_store_workers.run_calls,
                                  args=(limiter, 12, 0.05, begin + 6.0, spans, rejoined))
        runner.start()
        time.sleep(1.5)  # the scenario's timeline: shared, lost (empty on return), shared again
        server.kill()
        time.sleep(2.0)
        server.start()
        runner.join(30)
    assert not limiter.is_degraded and rejoined, "the lane never went back to the shared store"
    # One process: its local budget and the shared one are the same, and each hand-over carries
    # what was taken, so no window and no instant ever sees more than the shared limits.
    assert max_in_window(_starts(spans)) <= qps
    assert _max_overlap(spans) <= cap
    assert len(spans) >= 0.8 * qps * 6.0, f"only {len(spans)} calls in 6 s at QPS {qps}"


@pytest.mark.slow
def test_local_fallback_of_four_processes_returns_to_the_shared_limits_after_a_freeze(tmp_path: Path) -> None:
    qps, cap, processes = 20, 6, 4
    namespace = f"adv-{uuid.uuid4().hex[:8]}"
    with RedisServer(tmp_path) as server:
        ready, out, go = CTX.Queue(), CTX.Queue(), CTX.Event()
        until = CTX.Value("d", 0.0)
        procs = [CTX.Process(target=_store_workers.process_body,
                             args=(server.url, namespace, qps, cap, 6, 0.05, ready, go, until, out))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=60)
        begin = time.monotonic()
        until.value = begin + 7.0
        go.set()
        time.sleep(1.5)
        server.freeze()
        time.sleep(2.5)
        server.thaw()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    spans = [span for _, process_spans, _ in results for span in process_spans]
    back = [max(r) for _, _, r in results if r]
    assert len(back) == processes, f"only {len(back)} of {processes} processes went back to the shared store"
    # While the store was lost each process kept its own limits: never more than N x the limit ...
    assert _max_overlap(spans) <= processes * cap
    assert max_in_window(_starts(spans)) <= processes * qps
    # ... and once every process is back, what they took locally is in the store, so the store
    # admits nothing past the shared limits. Starts a process reserved locally before it went
    # back (a few pacing steps ahead) still run, counted; one window later only shared ones do.
    settled = max(back) + 1.1
    after = [s for s in spans if s[0] >= settled]
    assert after, "no call ran after the processes went back"
    assert max_in_window(_starts(after)) <= qps
    assert _max_overlap(spans, since=settled) <= cap
