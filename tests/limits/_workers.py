"""Process bodies of the multi-process tests (importable by "spawn" children)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.errors import DeadlineExceededError
from llm_executor.limits import make_lane_limiter


def _limiter(url: str, namespace: str, lease_ttl_s: float = 30.0, **limits: Any) -> Any:
    pcfg = ProviderConfig(**limits)
    ecfg = ExecutorConfig(providers={"openai": pcfg}, rate_backend=url, namespace=namespace)
    return make_lane_limiter("openai", pcfg, ecfg, lease_ttl_s=lease_ttl_s)


def qps_worker(url: str, namespace: str, qps: float, threads: int, ready: Any, go: Any, start: Any,
               duration_s: float, out: Any) -> None:
    """``threads`` threads take tokens until the run ends; puts the wall-clock start times."""
    # 60 ms window margin, as in the executor-level shared test: 32 threads in 4 processes on two
    # busy cores can stamp a start >20 ms after its token (CI saw 21 in one window once).
    limiter = _limiter(url, namespace, qps=qps, window_margin_ms=60)
    stopping = threading.Event()
    stamps: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        go.wait()
        end_wall = start.value + duration_s
        while True:
            deadline = time.monotonic() + (end_wall - time.time())
            try:
                limiter.acquire(stopping, deadline_monotonic=deadline)
            except DeadlineExceededError:
                return
            now = time.time()  # the "start" an observer (the provider) would see
            with lock:
                stamps.append(now)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    ready.put(os.getpid())
    for w in workers:
        w.join()
    limiter.close()
    out.put(stamps)


def slot_worker(url: str, namespace: str, cap: int, threads: int, ready: Any, go: Any, duration_s: float,
                in_flight: Any, peak: Any, calls: Any) -> None:
    """Threads hold a global slot for 5 ms each, counting concurrent holders across processes."""
    limiter = _limiter(url, namespace, global_max_parallel=cap)
    stopping = threading.Event()

    def run() -> None:
        go.wait()
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            release = limiter.acquire_slot(stopping, deadline_monotonic=end + 1)
            try:
                with in_flight.get_lock():
                    in_flight.value += 1
                    peak.value = max(peak.value, in_flight.value)
                    calls.value += 1
                time.sleep(0.005)  # the "provider call"
                with in_flight.get_lock():
                    in_flight.value -= 1
            finally:
                release()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    ready.put(os.getpid())
    for w in workers:
        w.join()
    limiter.close()


def slot_hog(url: str, namespace: str, cap: int, lease_ttl_s: float, ready: Any) -> None:
    """Take every slot and hang until killed (the renewer keeps the leases alive)."""
    limiter = _limiter(url, namespace, lease_ttl_s=lease_ttl_s, global_max_parallel=cap)
    held = [limiter.acquire_slot(threading.Event()) for _ in range(cap)]
    ready.put(len(held))
    time.sleep(120)
