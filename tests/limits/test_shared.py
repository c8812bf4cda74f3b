"""Limits shared by several processes (SQLite file on one host, Redis anywhere).

Children are started with the "spawn" context: they run threads, and fork() with threads is
unsafe (and deprecated in 3.12).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from llm_executor import limits
from llm_executor.errors import DeadlineExceededError
from llm_executor.testing import max_in_window

from . import _workers
from .conftest import MakeLimiter

CTX = multiprocessing.get_context("spawn")


def _start(processes: list[multiprocessing.process.BaseProcess], ready: object,
           timeout_s: float = 30) -> None:
    for p in processes:
        p.start()
    for _ in processes:
        ready.get(timeout=timeout_s)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_qps_shared_by_4_processes_x_8_threads_never_exceeds_limit(shared_url: str, namespace: str) -> None:
    qps, duration_s = 20, 3.0
    ready, out, go = CTX.Queue(), CTX.Queue(), CTX.Event()
    start = CTX.Value("d", 0.0)
    procs = [CTX.Process(target=_workers.qps_worker,
                         args=(shared_url, namespace, qps, 8, ready, go, start, duration_s, out))
             for _ in range(4)]
    _start(procs, ready)
    start.value = time.time()
    go.set()
    stamps: list[float] = []
    for _ in procs:
        stamps.extend(out.get(timeout=duration_s + 30))
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    in_run = [t for t in stamps if t < start.value + duration_s]
    assert max_in_window(stamps) <= qps
    assert len(in_run) >= 0.9 * qps * duration_s, f"only {len(in_run)} starts in {duration_s}s at QPS={qps}"


@pytest.mark.slow
def test_global_in_flight_cap_holds_across_processes(shared_url: str, namespace: str) -> None:
    cap = 3
    ready, go = CTX.Queue(), CTX.Event()
    in_flight, peak, calls = CTX.Value("i", 0), CTX.Value("i", 0), CTX.Value("i", 0)
    procs = [CTX.Process(target=_workers.slot_worker,
                         args=(shared_url, namespace, cap, 4, ready, go, 1.5, in_flight, peak, calls))
             for _ in range(3)]
    _start(procs, ready)
    go.set()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert peak.value == cap, f"peak {peak.value} holders for a cap of {cap}"
    assert in_flight.value == 0
    assert calls.value > 50


@pytest.mark.slow
def test_slots_of_a_sigkilled_process_come_back_within_the_ttl(shared_url: str, namespace: str,
                                                               make_limiter: MakeLimiter) -> None:
    cap, ttl_s = 3, 1.0
    ready = CTX.Queue()
    hog = CTX.Process(target=_workers.slot_hog, args=(shared_url, namespace, cap, ttl_s, ready))
    hog.start()
    try:
        assert ready.get(timeout=30) == cap
        limiter = make_limiter(shared_url, global_max_parallel=cap, lease_ttl_s=ttl_s)
        stopping = threading.Event()
        time.sleep(1.5 * ttl_s)  # past one TTL: only the hog's renewals keep its leases
        assert limiter.slots_held() == cap
        with pytest.raises(DeadlineExceededError):
            limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 0.1)
    finally:
        assert hog.pid is not None
        os.kill(hog.pid, signal.SIGKILL)
        hog.join(timeout=10)
    killed = time.monotonic()
    releases = [limiter.acquire_slot(stopping, deadline_monotonic=killed + 3 * ttl_s) for _ in range(cap)]
    reclaimed_s = time.monotonic() - killed
    # A waiter looks again at most every SLOT_POLL_MAX_S while the cap stays full.
    bound_s = ttl_s + limits.SLOT_POLL_MAX_S + 0.1
    assert reclaimed_s <= bound_s, f"slots came back after {reclaimed_s:.2f}s, TTL {ttl_s}s"
    for release in releases:
        assert release is not None
        release()
