#!/usr/bin/env python3
"""Core executor benchmarks (issue 3): overhead, rate accuracy, makespan. Prints figures and ratios.

    python scripts/bench_core.py            # all three, median of 3 runs each (~70 s)
    python scripts/bench_core.py --quick    # smaller N and shorter rate run (~15 s)
    python scripts/bench_core.py --json out.json

(a) overhead: N no-op requests through Executor vs a bare ThreadPoolExecutor running the same
    no-op provider with the same number of workers; (time_exec - time_tpe) / N in µs.
(b) rate accuracy: an instant provider at QPS for D seconds: achieved/QPS over [first start,
    first start + D) and the maximum number of starts in any sliding 1 s window.
(c) makespan: N requests at latency L, MAX_PARALLEL P, QPS Q against the lower bound
    max(N/Q, ceil(N/P)·L).
Targets: overhead ≤ 15 µs/request; max window ≤ QPS; achieved ≥ 0.97·QPS; makespan ≤ 1.05 × bound.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import wait
from typing import Any

# One definition of the no-op provider and of the overhead measurement for both benches
# (scripts/ is on sys.path when a script in it runs).
from bench import NoopProvider, overhead_once

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.testing import max_in_window as max_window


class RecordingProvider(NoopProvider):
    def __init__(self, latency_s: float = 0.0) -> None:
        super().__init__(latency_s, record=True)


def bench_overhead(n: int, runs: int, workers: int) -> dict[str, Any]:
    overhead_once(2000, workers)  # warm-up
    pairs = [overhead_once(n, workers) for _ in range(runs)]
    exec_us = statistics.median(p[0] for p in pairs) / n * 1e6
    tpe_us = statistics.median(p[1] for p in pairs) / n * 1e6
    over = statistics.median((p[0] - p[1]) / n * 1e6 for p in pairs)
    return {"n": n, "workers": workers, "executor_us_per_request": round(exec_us, 2),
            "threadpool_us_per_request": round(tpe_us, 2), "overhead_us_per_request": round(over, 2),
            "target_us": 15.0, "ok": over <= 15.0}


def rate_once(qps: float, duration_s: float) -> tuple[float, int]:
    provider = RecordingProvider()
    n = int(qps * duration_s * 1.5) + 10
    cfg = ExecutorConfig(providers={"noop": ProviderConfig(max_parallel=8, qps=qps)}, queue_size=0)
    ex = Executor(cfg, providers={"noop": provider})
    request = LLMRequest("noop", "m", "p")
    for _ in range(n):
        ex.submit(request)
    time.sleep(duration_s + 0.3)
    ex.shutdown(wait=True, cancel_futures=True)
    starts = sorted(provider.starts)
    t0 = starts[0]
    in_window = [t for t in starts if t < t0 + duration_s]
    return len(in_window) / duration_s / qps, max_window(starts)


def bench_rate(qps: float, duration_s: float, runs: int) -> dict[str, Any]:
    results = [rate_once(qps, duration_s) for _ in range(runs)]
    achieved = statistics.median(r[0] for r in results)
    worst = max(r[1] for r in results)
    return {"qps": qps, "duration_s": duration_s, "achieved_over_qps": round(achieved, 4),
            "max_starts_in_1s": worst, "ok": worst <= qps and achieved >= 0.97}


def makespan_once(n: int, latency_s: float, parallel: int, qps: float | None) -> float:
    provider = NoopProvider(latency_s)
    cfg = ExecutorConfig(providers={"noop": ProviderConfig(max_parallel=parallel, qps=qps)}, queue_size=0)
    with Executor(cfg, providers={"noop": provider}) as ex:
        request = LLMRequest("noop", "m", "p")
        t0 = time.perf_counter()
        futures = [ex.submit(request) for _ in range(n)]
        wait(futures)
        return time.perf_counter() - t0


def bench_makespan(cases: list[tuple[int, float, int, float | None]], runs: int) -> list[dict[str, Any]]:
    out = []
    for n, latency_s, parallel, qps in cases:
        bound = max(n / qps if qps else 0.0, math.ceil(n / parallel) * latency_s)
        measured = statistics.median(makespan_once(n, latency_s, parallel, qps) for _ in range(runs))
        out.append({"n": n, "latency_s": latency_s, "max_parallel": parallel, "qps": qps,
                    "bound_s": round(bound, 3), "makespan_s": round(measured, 3),
                    "ratio": round(measured / bound, 4), "ok": measured <= 1.05 * bound})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller figures for a smoke run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    runs = args.runs
    n = 5000 if args.quick else 20000
    duration = 3.0 if args.quick else 10.0
    cases: list[tuple[int, float, int, float | None]] = (
        [(100, 0.02, 8, 50.0), (200, 0.01, 4, None)] if args.quick
        else [(200, 0.05, 8, 40.0), (400, 0.02, 4, None), (120, 0.2, 4, 20.0), (1000, 0.1, 64, None)]
    )
    results: dict[str, Any] = {"python": sys.version.split()[0]}
    results["overhead"] = bench_overhead(n, runs, 4)
    o = results["overhead"]
    print(f"(a) overhead   N={o['n']} workers={o['workers']}: executor {o['executor_us_per_request']} µs/req, "
          f"ThreadPoolExecutor {o['threadpool_us_per_request']} µs/req -> overhead "
          f"{o['overhead_us_per_request']} µs/req (target ≤ 15) {'OK' if o['ok'] else 'MISSED'}")
    results["rate"] = bench_rate(20.0, duration, runs)
    r = results["rate"]
    print(f"(b) rate       QPS={r['qps']} for {r['duration_s']}s: achieved/QPS {r['achieved_over_qps']} "
          f"(target ≥ 0.97), max starts in any 1 s window {r['max_starts_in_1s']} (target ≤ {r['qps']:.0f}) "
          f"{'OK' if r['ok'] else 'MISSED'}")
    results["makespan"] = bench_makespan(cases, runs)
    for m in results["makespan"]:
        print(f"(c) makespan   N={m['n']} L={m['latency_s']}s P={m['max_parallel']} Q={m['qps']}: "
              f"{m['makespan_s']}s vs bound {m['bound_s']}s -> ratio {m['ratio']} (target ≤ 1.05) "
              f"{'OK' if m['ok'] else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    ok = results["overhead"]["ok"] and results["rate"]["ok"] and all(m["ok"] for m in results["makespan"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
