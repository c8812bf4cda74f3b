#!/usr/bin/env python3
"""Learned limits (issue 12, rate half): QPS/RPM/TPM=auto against the emulator's hidden limits.

    PYTHONPATH=. python scripts/bench_learn.py                 # full run for docs/benchmarks.md (~8 min)
    PYTHONPATH=. python scripts/bench_learn.py --quick         # smoke run (< 40 s; 5 s / 12 s runs, no shared-headers)
    PYTHONPATH=. python scripts/bench_learn.py --only headers,probe --runs 1
    PYTHONPATH=.:/path/to/matplotlib python scripts/bench_learn.py --plot docs/benchmarks-learn.png

Scenarios (``--only`` names); every client starts knowing nothing (``qps="auto"``):
  headers        OpenAI-like: hidden RPM 2220 (= 37 rps) and TPM 40k, x-ratelimit-* headers on every reply.
  probe          Gemini-like: hidden 23 rps, no headers, 429s carry QuotaFailure/RetryInfo.
  shared-headers 4 processes, one Redis, the headers provider: the figures for the sum.
  shared-probe   4 processes, one Redis, the probe provider: the figures for the sum.

Figures (targets from the issue): the success rate reached (``t95``/``t85``: the first time the
trailing 2 s success rate is >= 95 % / 85 % of the hidden rate), the success rate from then on
(headers: from 5 s, probe: from 30 s or from the first time the trailing 2 s success rate
reached 85 %, whichever is earlier), the most arrivals at the provider in any 1 s window after the first
2 s (headers: <= the hidden 37), and the share of 429s (headers: all requests; probe: after
convergence = after the 30 s mark). Each figure is the median of ``--runs`` runs (3), except the
1 s window, which is the worst run. ``--json`` writes everything, per-second series included.
The demand always exceeds the limit (a feeder keeps the queue full), MAX_PARALLEL is 16 per
process and each call takes 50 ms at the emulator. Exit status: 0 all targets met, 1 one missed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.testing import Emulator, ProviderSim, max_in_window

ROOT = Path(__file__).resolve().parent.parent
ALL = ("headers", "probe", "shared-headers", "shared-probe")
REDIS_URL = os.environ.get("LLM_EXECUTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HIDDEN_RPM, HIDDEN_TPM, HIDDEN_RPS = 2220, 40_000, 23
LATENCY_S = 0.05
MAX_PARALLEL = 16
CTX = multiprocessing.get_context("spawn")


def scenario(name: str) -> dict[str, Any]:
    """Provider, emulator limits, client config and targets of a scenario."""
    if name.endswith("headers"):
        return {"provider": "openai", "model": "gpt-4o-mini", "hidden_rps": HIDDEN_RPM / 60.0,
                "sim": ProviderSim(rpm=HIDDEN_RPM, tpm=HIDDEN_TPM, latency_s=LATENCY_S),
                "limits": {"qps": "auto", "rpm": "auto", "tpm": "auto"}, "share": 0.95, "within_s": 5.0,
                "settled_s": 5.0, "max_429": 0.005, "window_after_s": 2.0}
    return {"provider": "gemini", "model": "gemini-2.5-flash", "hidden_rps": float(HIDDEN_RPS),
            "sim": ProviderSim(rps=HIDDEN_RPS, latency_s=LATENCY_S),
            "limits": {"qps": "auto"}, "share": 0.85, "within_s": 30.0, "settled_s": 30.0, "max_429": 0.02,
            "window_after_s": None}


def client_config(name: str, base_url: str, backend: str, namespace: str) -> ExecutorConfig:
    sc = scenario(name)
    pcfg = ProviderConfig(max_parallel=MAX_PARALLEL, base_url=base_url, api_key="bench-key", model=sc["model"],
                          max_retries=8, max_retry_wait_s=120.0, **sc["limits"])
    return ExecutorConfig(providers={sc["provider"]: pcfg}, queue_size=4 * MAX_PARALLEL, backpressure="block",
                          rate_backend=backend, namespace=namespace)


def drive(name: str, base_url: str, backend: str, namespace: str, start_at: float, duration_s: float) -> dict[str, Any]:
    """One client process: keep the lane's queue full from ``start_at`` (wall) for ``duration_s``."""
    sc = scenario(name)
    provider = sc["provider"]
    with Executor(client_config(name, base_url, backend, namespace)) as ex:
        time.sleep(max(0.0, start_at - time.time()))
        stop = time.monotonic() + duration_s
        request = LLMRequest(provider, sc["model"], "a short prompt", max_output_tokens=8)

        def feed() -> None:
            while time.monotonic() < stop:
                try:
                    ex.submit(request)
                except Exception:  # a full queue under "block" only waits; anything else ends the feed
                    return

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        feeder.join()
        learned = {k: {"value": v.value, "source": v.source, "changes": v.changes}
                   for k, v in ex.stats()[provider].learned.items()}
        ex.shutdown(wait=True, cancel_futures=True)
    return {"learned": learned}


def _child(name: str, base_url: str, backend: str, namespace: str, start_at: float, duration_s: float,
           out: Any) -> None:
    import faulthandler

    # A child that hangs says where (all threads' stacks on stderr) and ends, rather than stall the run.
    faulthandler.dump_traceback_later(start_at - time.time() + duration_s + 30, exit=True)
    out.put(drive(name, base_url, backend, namespace, start_at, duration_s))
    faulthandler.cancel_dump_traceback_later()


def run_once(name: str, duration_s: float) -> dict[str, Any]:
    """One run: the emulator here, 1 or 4 client processes; the figures from what the emulator saw."""
    sc = scenario(name)
    provider = sc["provider"]
    shared = name.startswith("shared")
    namespace = f"bench-learn-{uuid.uuid4().hex[:8]}"
    with Emulator({provider: sc["sim"]}) as emu:
        base_url = emu.url(provider)
        if shared:
            out = CTX.Queue()
            start_at = time.time() + 4.0  # spawn + import + Executor in every child first
            procs = [CTX.Process(target=_child, args=(name, base_url, REDIS_URL, namespace, start_at, duration_s, out))
                     for _ in range(4)]
            for p in procs:
                p.start()
            clients = [out.get(timeout=duration_s + 60) for _ in procs]
            for p in procs:
                p.join(timeout=30)
        else:
            clients = [drive(name, base_url, "memory", namespace, time.time(), duration_s)]
        recs = [r for r in emu.requests(provider) if r.status is not None]
    if shared:
        _clean_redis(namespace)
    return figures(name, recs, duration_s) | {"learned": [c["learned"] for c in clients]}


def _clean_redis(namespace: str) -> None:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match="{" + namespace + ":*"):
            client.delete(key)
    except Exception:  # cleanup only
        pass


def figures(name: str, recs: list[Any], duration_s: float) -> dict[str, Any]:
    sc = scenario(name)
    hidden = sc["hidden_rps"]
    t0 = min(r.monotonic for r in recs)
    arrivals = sorted(r.monotonic - t0 for r in recs)
    ok = sorted(r.monotonic - t0 for r in recs if r.status == 200)
    limited = sorted(r.monotonic - t0 for r in recs if r.status == 429)

    def rate(times: list[float], a: float, b: float) -> float:
        return sum(1 for t in times if a <= t < b) / (b - a) if b > a else 0.0

    reach = None
    t = 2.0
    while t <= duration_s:
        if rate(ok, t - 2.0, t) >= sc["share"] * hidden:
            reach = round(t, 1)
            break
        t += 0.1
    settled = sc["settled_s"] if reach is None else min(sc["settled_s"], reach)
    # Up to the last second the feeder ran in full (its clock started a moment before the first arrival).
    end = min(duration_s, math.floor(arrivals[-1])) if arrivals else duration_s
    after = rate(ok, settled, end)
    if name.endswith("headers"):
        share_429 = len(limited) / max(1, len(recs))
    else:
        later = [x for x in arrivals if x >= sc["settled_s"]]
        share_429 = sum(1 for x in limited if x >= sc["settled_s"]) / max(1, len(later))
    window_after = sc["window_after_s"]
    max_window = max_in_window([x for x in arrivals if window_after is None or x >= window_after]) if arrivals else 0
    seconds = int(duration_s) + 1
    return {"hidden_rps": hidden, "t_reach_s": reach, "rate_after": after, "rate_after_from_s": settled,
            "share_429": share_429, "requests": len(recs), "429s": len(limited), "max_1s_window": max_window,
            "ok_per_s": [sum(1 for x in ok if s <= x < s + 1) for s in range(seconds)],
            "r429_per_s": [sum(1 for x in limited if s <= x < s + 1) for s in range(seconds)]}


class Results:
    def __init__(self) -> None:
        self.figures: list[dict[str, Any]] = []
        self.raw: dict[str, Any] = {}

    def add(self, name: str, value: float | None, target: float, unit: str, *, higher_is_better: bool,
            note: str = "") -> None:
        if value is None:
            ok, ratio = False, None
        else:
            ok = value >= target if higher_is_better else value <= target
            ratio = value / target if target else None
        self.figures.append({"name": name, "value": value, "target": target, "unit": unit, "ratio": ratio,
                             "ok": ok, "higher_is_better": higher_is_better, "note": note})


def bench(name: str, res: Results, quick: bool, runs: int) -> None:
    sc = scenario(name)
    durations = {True: (5.0, 12.0), False: (15.0, 60.0)}[quick]  # (headers, probe)
    duration_s = durations[0] if name.endswith("headers") else durations[1]
    data = []
    for i in range(runs):
        d = run_once(name, duration_s)
        data.append(d)
        print(f"  run {i + 1}: reach {d['t_reach_s']}s, rate after {d['rate_after']:.1f}/s "
              f"({d['rate_after'] / d['hidden_rps']:.1%}), 429s {d['429s']}/{d['requests']}, "
              f"max 1 s window {d['max_1s_window']}", flush=True)
    res.raw[name] = {"duration_s": duration_s, "runs": data}
    hidden = sc["hidden_rps"]
    pct = round(sc["share"] * 100)
    reach = [d["t_reach_s"] for d in data]
    reach_med = None if any(r is None for r in reach) else statistics.median(reach)
    res.add(f"{name}: time to {pct}% of hidden {hidden:g} rps", reach_med, sc["within_s"], "s",
            higher_is_better=False, note="trailing 2 s success rate")
    res.add(f"{name}: success rate after {data[0]['rate_after_from_s']:g}s / hidden",
            statistics.median(d["rate_after"] / hidden for d in data), sc["share"], "x", higher_is_better=True)
    label = "all requests" if name.endswith("headers") else f"after {sc['settled_s']:g}s"
    res.add(f"{name}: 429 share ({label})", statistics.median(d["share_429"] for d in data), sc["max_429"], "x",
            higher_is_better=False)
    if sc["window_after_s"] is not None:
        res.add(f"{name}: max arrivals in 1 s after {sc['window_after_s']:g}s", float(max(d["max_1s_window"]
                for d in data)), hidden, "req", higher_is_better=False, note="worst of runs")


def print_table(res: Results) -> None:
    print(f"\n{'figure':64} {'value':>9} {'target':>8} {'ratio':>6}  result")
    for f in res.figures:
        value = "-" if f["value"] is None else f"{f['value']:.3g}"
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}"
        print(f"{f['name']:64} {value:>9} {f['target']:>8.3g} {ratio:>6}  {'OK' if f['ok'] else 'MISSED'}")


def plot(res: Results, path: Path) -> None:
    """Successes and 429s per second over time, first run of each scenario, against the hidden rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.raw)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        run = res.raw[name]["runs"][0]
        xs = list(range(len(run["ok_per_s"])))
        ax.plot(xs, run["ok_per_s"], color="tab:blue", lw=1.2, drawstyle="steps-post", label="200 per s")
        ax.bar(xs, run["r429_per_s"], color="tab:red", alpha=0.6, width=0.9, align="edge", label="429 per s")
        ax.axhline(run["hidden_rps"], color="black", ls="--", lw=1, label=f"hidden {run['hidden_rps']:g}/s")
        ax.set_ylim(0, run["hidden_rps"] * 1.4)
        ax.set_title(f"{name}: reach {run['t_reach_s']}s, rate after {run['rate_after']:.1f}/s, "
                     f"429s {run['429s']}/{run['requests']}", fontsize=9)
        ax.set_ylabel("per second")
        ax.legend(loc="lower right", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("seconds since the first request")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scenario {bad[0]!r}; expected some of {','.join(ALL)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, one each (< 40 s)")
    parser.add_argument("--only", type=parse_only, default=None, metavar="NAME,...",
                        help=f"run only these ({','.join(ALL)}; --quick: all but shared-headers)")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3, --quick 1)")
    parser.add_argument("--json", default="bench-results/bench_learn.json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH", help="save the rate-over-time plot (needs matplotlib) here")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        parser.error("--runs must be >= 1")
    res = Results()
    t_start = time.perf_counter()
    only = args.only or ([n for n in ALL if n != "shared-headers"] if args.quick else list(ALL))
    for name in only:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        bench(name, res, args.quick, runs)
        print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    print_table(res)
    elapsed = time.perf_counter() - t_start
    print(f"\n{'quick' if args.quick else 'full'} run, {runs} runs per figure, {elapsed:.0f}s")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"quick": args.quick, "runs": runs, "elapsed_s": elapsed, "figures": res.figures,
                                "raw": res.raw}, indent=1))
    print(f"results written to {path}")
    if args.plot:
        try:
            plot(res, Path(args.plot))
            print(f"plot written to {args.plot}")
        except ImportError:
            print("no plot: matplotlib is not installed", file=sys.stderr)
    return 1 if any(f["ok"] is False for f in res.figures) else 0


if __name__ == "__main__":
    sys.exit(main())
