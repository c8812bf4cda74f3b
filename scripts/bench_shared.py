"""Cost and accuracy of the shared rate backends.

1. Per-acquire cost of sqlite and redis against memory: one thread, a limit never hit,
   microseconds per ``LaneLimiter.acquire`` (median of 3 runs).
2. Multi-process accuracy: P processes x T threads share one QPS budget for D seconds;
   prints the most starts seen in any sliding 1 s window (must be <= QPS) and the utilisation.

Usage:
    python scripts/bench_shared.py [--redis redis://127.0.0.1:6379/15] [--n 3000]
                                   [--qps 20] [--processes 4] [--threads 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.errors import ConfigError, DeadlineExceededError
from llm_executor.limits import LaneLimiter, make_lane_limiter
from llm_executor.testing import max_in_window


def _limiter(url: str, namespace: str, qps: float, burst: int | None = None) -> LaneLimiter:
    pcfg = ProviderConfig(qps=qps, burst=burst)
    return make_lane_limiter("bench", pcfg, ExecutorConfig(providers={"bench": pcfg}, rate_backend=url,
                                                           namespace=namespace))


def _cleanup(url: str, namespace: str) -> None:
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match="{" + namespace + ":*"):  # lane keys: {namespace:provider}:...
            client.delete(key)


def acquire_cost_us(url: str, n: int) -> float:
    """Median over 3 runs of the microseconds one acquire takes when the limit is never hit."""
    runs = []
    for _ in range(3):
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        # Never reached: a window 10x the run, and no pacing (burst = QPS) to hold a tight loop.
        limiter = _limiter(url, namespace, qps=10 * n, burst=10 * n)
        stopping = threading.Event()
        for _ in range(50):
            limiter.acquire(stopping)  # warm up connections and scripts
        started = time.perf_counter()
        for _ in range(n):
            limiter.acquire(stopping)
        runs.append((time.perf_counter() - started) / n * 1e6)
        limiter.close()
        _cleanup(url, namespace)
    return statistics.median(runs)


def _worker(url: str, namespace: str, qps: float, threads: int, ready: object, go: object, start: object,
            seconds: float, out: object) -> None:
    limiter = _limiter(url, namespace, qps)
    stopping = threading.Event()
    stamps: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        go.wait()  # type: ignore[attr-defined]
        end_wall = start.value + seconds  # type: ignore[attr-defined]
        while True:
            try:
                limiter.acquire(stopping, deadline_monotonic=time.monotonic() + (end_wall - time.time()))
            except DeadlineExceededError:
                return
            now = time.time()
            with lock:
                stamps.append(now)

    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    ready.put(1)  # type: ignore[attr-defined]
    for t in pool:
        t.join()
    limiter.close()
    out.put(stamps)  # type: ignore[attr-defined]


def accuracy(url: str, qps: float, processes: int, threads: int, seconds: float) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")  # children run threads: never fork them
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ready, out, go, start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_worker, args=(url, namespace, qps, threads, ready, go, start, seconds, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    start.value = time.time()
    go.set()
    stamps: list[float] = []
    for _ in procs:
        stamps.extend(out.get(timeout=seconds + 60))
    for p in procs:
        p.join()
    _cleanup(url, namespace)
    in_run = [t for t in stamps if t < start.value + seconds]
    return max_in_window(stamps), len(in_run) / (qps * seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--n", type=int, default=3000, help="acquires per cost run")
    parser.add_argument("--qps", type=float, default=20)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"memory": "memory", "sqlite": f"sqlite:///{tmp}/bench.db", "redis": args.redis}
        costs: dict[str, float] = {}
        header = ("backend", "us/acquire", "+us vs memory", "max 1s window", "utilisation")
        print(f"{header[0]:8} {header[1]:>11} {header[2]:>14} {header[3]:>14} {header[4]:>12}")
        for name, url in backends.items():
            try:
                costs[name] = acquire_cost_us(url, args.n)
            except ConfigError as exc:
                print(f"{name:8} skipped: {exc}")
                continue
            extra = costs[name] - costs["memory"]
            if name == "memory":
                window, util = "n/a", "n/a (per process)"
            else:
                peak, used = accuracy(url, args.qps, args.processes, args.threads, args.seconds)
                ok = "ok" if peak <= args.qps else "OVER"
                window, util = f"{peak}/{args.qps:g} {ok}", f"{used:.0%}"
            print(f"{name:8} {costs[name]:11.1f} {extra:14.1f} {window:>14} {util:>12}")
        print(f"accuracy: {args.processes} processes x {args.threads} threads sharing QPS={args.qps:g} "
              f"for {args.seconds:g}s; cost: median of 3 runs of {args.n} acquires, limit never hit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
