"""Shared limits at fleet scale: one Redis vs a Redis Cluster, measured at the provider.

1. Fleet run (medians of 3 in full mode): P processes x T threads (one Executor each, MAX_PARALLEL=T)
   share QPS and GLOBAL_MAX_PARALLEL through the store for D seconds, calling the built-in
   emulator over HTTP. Reported: the most arrivals the emulator saw in any 1 s window (must be
   <= QPS), the most requests it saw in flight (must be <= the global cap), utilisation (200s
   in the steady part of the run / (QPS x its length), goal >= 97%), and store round trips per
   answered request (every call the executor's limiters made, counted by the backends).
2. Cost of one start (single thread, limits never hit, median of 3): microseconds and round trips
   for ``LaneLimiter.admit`` (slot + rate token in one script, then the release) and for the
   separate ``acquire_slot`` + ``acquire`` calls, and the Redis CPU per call (usec_per_call).
3. On paper: the requests/s one Redis (one core) and one 3-master cluster could carry, from the
   server-side CPU per request; one lane lives in one hash slot, so a single lane's ceiling is
   one master's, and a cluster multiplies it only across lanes (providers x API keys).

The script starts its own redis-server and cluster (temp dir, free ports) so it may reset their
statistics; it never touches the shared Redis. Machine noise matters: run full mode on a quiet
machine.

Usage:
    python scripts/bench_fleet.py --quick            # 4 processes x 4 threads, 6 s, one run each (~1 min)
    python scripts/bench_fleet.py                    # 16 x 4, QPS 50, cap 32, 30 s, medians of 3
    python scripts/bench_fleet.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.limits import LaneLimiter, make_lane_limiter
from llm_executor.testing import Emulator, ProviderSim
from tests.limits.servers import RedisClusterNodes, RedisServer

# Published request limits of the largest accounts, for scale (provider docs, late 2025; they change).
PROVIDER_LIMITS = (
    ("OpenAI tier 5, mini models (30,000 RPM)", 30_000 / 60),
    ("OpenAI tier 5, flagship models (10,000-15,000 RPM)", 15_000 / 60),
    ("Gemini API top paid tier (~10,000 RPM)", 10_000 / 60),
)


def _child(url: str, namespace: str, base_url: str, qps: float, cap: int, threads: int, margin_ms: int,
           ready: Any, go: Any, until: Any, out: Any) -> None:
    pcfg = ProviderConfig(qps=qps, max_parallel=threads, global_max_parallel=cap, api_key="bench", base_url=base_url,
                          max_retries=0, window_margin_ms=margin_ms)
    # Count the store calls of every limiter this process builds, whatever the executor calls.
    made: list[LaneLimiter] = []
    original_init = LaneLimiter.__init__

    def counting_init(self: LaneLimiter, *a: Any, **k: Any) -> None:
        original_init(self, *a, **k)
        made.append(self)

    LaneLimiter.__init__ = counting_init  # type: ignore[method-assign]
    executor = Executor(ExecutorConfig(providers={"openai": pcfg}, rate_backend=url, namespace=namespace, queue_size=0))
    # Warm: one connection per thread. A process's first requests (new connections) reach the
    # provider tens of ms after their tokens, more than the window margin covers.
    warm = [LLMRequest(provider="openai", model="gpt-4o-mini", prompt=f"warm {i}") for i in range(threads)]
    list(executor.map(warm))
    trips = sum(limiter.store_round_trips for limiter in made)
    ready.put(os.getpid())
    go.wait()
    per_process = int(qps * (until.value - time.monotonic()) * 2 / max(1, threads)) + 50
    futures = [executor.submit(LLMRequest(provider="openai", model="gpt-4o-mini", prompt=f"p{i}"))
               for i in range(per_process)]
    threading.Event().wait(max(0.0, until.value - time.monotonic()))
    executor.shutdown(wait=True, cancel_futures=True)
    ok = sum(1 for f in futures if not f.cancelled() and f.exception() is None)
    out.put((ok, sum(limiter.store_round_trips for limiter in made) - trips))


def _max_per_window(times: list[float], span_s: float = 1.0) -> int:
    """The most of ``times`` (sorted) in any window of ``span_s`` seconds."""
    best, first = 0, 0
    for i, t in enumerate(times):
        while times[first] <= t - span_s:
            first += 1
        best = max(best, i - first + 1)
    return best


def _reset(clients: list[Any]) -> None:
    for client in clients:
        client.config_resetstat()


def fleet_run(url: str, clients: list[Any], processes: int, threads: int, qps: int, cap: int, seconds: float,
              latency_s: float, margin_ms: int = 20) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    namespace = f"fleet-{uuid.uuid4().hex[:8]}"
    with Emulator(providers={"openai": ProviderSim(latency_s=latency_s)}) as emu:
        ready, out, go, until = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
        procs = [ctx.Process(target=_child, args=(url, namespace, emu.url("openai"), qps, cap, threads, margin_ms,
                                                  ready, go, until, out)) for _ in range(processes)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=300)
        time.sleep(1.1)  # the warm-up requests leave every window of the run
        emu.reset()
        _reset(clients)
        start = time.monotonic()
        until.value = start + seconds
        go.set()
        reports = [out.get(timeout=seconds + 300) for _ in procs]
        answered, trips = sum(r[0] for r in reports), sum(r[1] for r in reports)
        for p in procs:
            p.join(60)
        stats = emu.stats("openai")
        posts = sorted(r.monotonic for r in emu.requests("openai") if r.method == "POST")
        arrivals = [r.monotonic for r in emu.requests("openai") if r.method == "POST" and r.status == 200]
    steady = [t for t in arrivals if start + 1.0 <= t < start + seconds]
    return {
        "max_per_1s": stats.max_requests_per_1s,
        # Windows that begin 1 s after the go: every process has started its lane by then. In the
        # first second 16 processes wake at once on the machine's cores and the first requests
        # reach the provider ~100 ms after their starts (scheduling), more than the margin.
        "max_per_1s_after_1s": _max_per_window([t for t in posts if t >= start + 1.0]),
        "max_in_flight": stats.max_concurrency,
        "utilisation": len(steady) / (qps * (seconds - 1.0)),
        "round_trips_per_request": trips / max(1, answered),
        "answered": answered,
        "non_200": sum(n for status, n in stats.statuses.items() if status != 200),
    }


def start_cost(url: str, clients: list[Any], n: int) -> dict[str, float]:
    """One thread, limits never hit: us and round trips per start, admit() vs separate calls."""
    out: dict[str, list[float]] = {"admit_us": [], "separate_us": [], "admit_rt": [], "separate_rt": [],
                                   "server_us_per_script": []}
    for _ in range(3):
        namespace = f"cost-{uuid.uuid4().hex[:8]}"
        pcfg = ProviderConfig(qps=10 * n, burst=10 * n, global_max_parallel=10 * n)
        limiter = make_lane_limiter("bench", pcfg, ExecutorConfig(providers={"bench": pcfg}, rate_backend=url,
                                                                  namespace=namespace))
        stopping = threading.Event()
        for _ in range(50):
            limiter.admit(None, stopping).release()  # warm: connections, scripts
        _reset(clients)
        trips, started = limiter.store_round_trips, time.perf_counter()
        for _ in range(n):
            limiter.admit(None, stopping).release()
        out["admit_us"].append((time.perf_counter() - started) / n * 1e6)
        out["admit_rt"].append((limiter.store_round_trips - trips) / n)
        scripts = [v for c in clients for k, v in c.info("commandstats").items() if k == "cmdstat_evalsha"]
        out["server_us_per_script"].append(sum(v["usec"] for v in scripts) / max(1, sum(v["calls"] for v in scripts)))
        trips, started = limiter.store_round_trips, time.perf_counter()
        for _ in range(n):
            release = limiter.acquire_slot(stopping)
            limiter.acquire(stopping)
            assert release is not None
            release()
        out["separate_us"].append((time.perf_counter() - started) / n * 1e6)
        out["separate_rt"].append((limiter.store_round_trips - trips) / n)
        limiter.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 processes, 6 s, one run per store")
    parser.add_argument("--processes", type=int)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--qps", type=int, default=50)
    parser.add_argument("--cap", type=int, default=32, help="GLOBAL_MAX_PARALLEL")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--latency", type=float, help="emulator latency per request, s (0.5; --quick 0.2)")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--n", type=int, default=2000, help="starts per cost run")
    parser.add_argument("--margin-ms", type=int, default=20,
                        help="WINDOW_MARGIN_MS of the fleet's lanes (default 20, the library's default)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    processes = args.processes or (4 if args.quick else 16)
    seconds = args.seconds or (6.0 if args.quick else 30.0)
    runs = args.runs or (1 if args.quick else 3)
    # Enough threads x latency to want more than QPS, so the limits bind: 64 / 0.5 s, 16 / 0.2 s.
    latency_s = args.latency or (0.2 if args.quick else 0.5)
    n = min(args.n, 500) if args.quick else args.n
    import redis

    results: dict[str, Any] = {"config": {"processes": processes, "threads": args.threads, "qps": args.qps,
                                          "cap": args.cap, "seconds": seconds, "runs": runs,
                                          "latency_s": latency_s, "margin_ms": args.margin_ms}}
    with tempfile.TemporaryDirectory() as tmp:
        single = RedisServer(Path(tmp) / "single").start()
        cluster = RedisClusterNodes(Path(tmp) / "cluster").start()
        try:
            stores = {
                "redis": (single.url, [redis.Redis(port=single.port)]),
                "cluster": (cluster.url, [redis.Redis(port=node.port) for node in cluster.nodes]),
            }
            for name, (url, clients) in stores.items():
                fleets = [fleet_run(url, clients, processes, args.threads, args.qps, args.cap, seconds, latency_s,
                                    args.margin_ms)
                          for _ in range(runs)]
                fleet = {k: statistics.median(f[k] for f in fleets) for k in fleets[0]}
                fleet["worst_max_per_1s"] = max(f["max_per_1s"] for f in fleets)
                fleet["worst_max_in_flight"] = max(f["max_in_flight"] for f in fleets)
                fleet["worst_max_per_1s_after_1s"] = max(f["max_per_1s_after_1s"] for f in fleets)
                cost = start_cost(url, clients, n)
                # One core runs one master: requests/s it carries = 1e6 / (server us per request),
                # counting the release as dear as the script (it is far cheaper: conservative).
                per_request_us = cost["server_us_per_script"] * cost["admit_rt"]
                cost["paper_rps_one_master"] = 1e6 / per_request_us if per_request_us else float("inf")
                results[name] = {"fleet": fleet, "cost": cost}
        finally:
            cluster.stop()
            single.stop()
    _print(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = all(results[s]["fleet"]["worst_max_per_1s"] <= args.qps and
             results[s]["fleet"]["worst_max_in_flight"] <= args.cap for s in ("redis", "cluster"))
    return 0 if ok else 1


def _print(results: dict[str, Any]) -> None:
    c = results["config"]
    print(f"fleet: {c['processes']} processes x {c['threads']} threads, QPS {c['qps']}, GLOBAL_MAX_PARALLEL "
          f"{c['cap']}, {c['seconds']:g} s, emulator latency {c['latency_s']:g} s, median of {c['runs']}, "
          f"window margin {c.get('margin_ms', 20)} ms")
    print("(max/1s and in flight: the worst run; max/1s later: windows starting 1 s after the go)")
    print(f"{'store':8} {'max/1s':>7} {'max/1s later':>13} {'in flight':>9} {'util':>6} {'RT/req':>7} {'non-200':>8}")
    for store in ("redis", "cluster"):
        f = results[store]["fleet"]
        print(f"{store:8} {f['worst_max_per_1s']:>7.0f} {f['worst_max_per_1s_after_1s']:>13.0f} "
              f"{f['worst_max_in_flight']:>9.0f} {f['utilisation']:>6.1%} "
              f"{f['round_trips_per_request']:>7.2f} {f['non_200']:>8.0f}")
    print("cost of one start (one thread, limits never hit, median of 3):")
    print(f"{'store':8} {'admit us':>9} {'RT':>5} {'separate us':>12} {'RT':>5} {'server us/script':>15} "
          f"{'req/s per master (paper)':>25}")
    for store in ("redis", "cluster"):
        k = results[store]["cost"]
        print(f"{store:8} {k['admit_us']:>9.0f} {k['admit_rt']:>5.1f} {k['separate_us']:>12.0f} "
              f"{k['separate_rt']:>5.1f} {k['server_us_per_script']:>15.1f} {k['paper_rps_one_master']:>25,.0f}")
    paper = results["redis"]["cost"]["paper_rps_one_master"]
    print(f"on paper: one Redis ~{paper:,.0f} requests/s for any number of lanes; a 3-master cluster "
          f"~{3 * results['cluster']['cost']['paper_rps_one_master']:,.0f} across lanes, one lane <= one master")
    for name, rps in PROVIDER_LIMITS:
        print(f"  for scale: {name}: {rps:,.0f} requests/s")


if __name__ == "__main__":
    raise SystemExit(main())
