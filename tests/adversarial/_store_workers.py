"""Process bodies of the store-fault tests (importable by "spawn" children)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.errors import DeadlineExceededError, ExecutorShutdownError, ProviderUnavailableError
from llm_executor.limits import LaneLimiter, make_lane_limiter


def lane(url: str, namespace: str, **limits: Any) -> LaneLimiter:
    # A start is stamped after its token; on two busy cores that can be >20 ms late (the default
    # window margin), so the observer would see one window too many. 60 ms covers it.
    limits.setdefault("window_margin_ms", 60)
    pcfg = ProviderConfig(**limits)
    ecfg = ExecutorConfig(providers={"openai": pcfg}, rate_backend=url, namespace=namespace,
                          backend_failure="local")
    return make_lane_limiter("openai", pcfg, ecfg, lease_ttl_s=5.0)


def run_calls(limiter: LaneLimiter, threads: int, call_s: float, until_monotonic: float,
              spans: list[tuple[float, float]], rejoined: list[float]) -> None:
    """``threads`` threads take a global slot then a rate token (as the executor does), "call" for
    ``call_s``, release; until ``until_monotonic``. Appends (start, end) monotonic spans, and the
    time the limiter went back to the shared store after a loss."""
    lock = threading.Lock()
    stopping = threading.Event()
    was_degraded = [False]

    def worker() -> None:
        while time.monotonic() < until_monotonic:
            try:
                release = limiter.acquire_slot(stopping, deadline_monotonic=until_monotonic)
                try:
                    limiter.acquire(stopping, deadline_monotonic=until_monotonic)
                    start = time.monotonic()
                    time.sleep(call_s)
                    end = time.monotonic()
                finally:
                    if release is not None:
                        release()
            except (DeadlineExceededError, ExecutorShutdownError):
                return
            except ProviderUnavailableError:  # pragma: no cover - the policy is local
                raise
            with lock:
                spans.append((start, end))
                degraded = limiter.is_degraded
                if was_degraded[0] and not degraded:
                    rejoined.append(time.monotonic())
                was_degraded[0] = degraded

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def process_body(url: str, namespace: str, qps: float, cap: int, threads: int, call_s: float, ready: Any,
                 go: Any, until: Any, out: Any) -> None:
    limiter = lane(url, namespace, qps=qps, global_max_parallel=cap)
    ready.put(os.getpid())
    go.wait()
    spans: list[tuple[float, float]] = []
    rejoined: list[float] = []
    run_calls(limiter, threads, call_s, until.value, spans, rejoined)
    limiter.close()
    out.put((os.getpid(), spans, rejoined))
