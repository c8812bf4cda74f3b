#!/usr/bin/env python3
"""MAX_PARALLEL=auto against an Ollama-like emulator (issue 12, the concurrency figure).

    PYTHONPATH=. python scripts/bench_concurrency.py                # full run for docs/benchmarks.md
    PYTHONPATH=. python scripts/bench_concurrency.py --quick        # smoke run (< 30 s)
    PYTHONPATH=. python scripts/bench_concurrency.py --plot docs/benchmarks-concurrency.png
    python scripts/bench_concurrency.py --replot bench-results/bench_concurrency.json \
        --plot docs/benchmarks-concurrency.png   # only the plot, from a saved run (any Python with matplotlib)

The emulator's "ollama" serves ``capacity`` (6) calls at full speed; past that each call
progresses at capacity/n (latency grows linearly with concurrency, throughput stays flat). The
client always has more requests queued than it may start (a saturating backlog), so throughput
is set by the in-flight cap alone.

1. Sweep: a fixed MAX_PARALLEL in SWEEP (1..32), each for ``--seconds``; throughput = calls
   finished inside the window / its length. MAX_PARALLEL=1 gives the unloaded latency (p50).
2. Auto: MAX_PARALLEL=auto (ceiling 32) for ``--auto-seconds`` from a cold start: its throughput
   over the whole window (convergence included) and the p50 of its calls' latencies.

Figures (issue 12): auto throughput >= 90% of the best fixed one, over the whole window from a
cold start and over its second half (after convergence); auto p50 <= 1.3x unloaded. Each figure
is the median of ``--runs`` runs (3; 1 with --quick). Full run only: after the emulator's
capacity drops 6 -> 3 mid-run, the seconds until the limit is at most 4 (one run, target 5 s),
and two Executors (as two processes would be: the limit is not shared) on one server.
Informational: the best fixed MAX_PARALLEL whose p50 stays within 1.3x, the mean learned limit.
Exit status: 0 all targets met, 1 a target missed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_executor import LLMResponse

ROOT = Path(__file__).resolve().parent.parent
CAPACITY = 6
SWEEP = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
QUICK_SWEEP = (1, 4, 6, 8, 16)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def run_once(max_parallel: int | str, seconds: float, latency_s: float, *,
             drop_at_s: float | None = None, executors: int = 1) -> dict[str, Any]:
    """One run against a fresh emulator: throughput, latencies, and the limit over time.

    Args:
        max_parallel: a fixed cap or "auto".
        seconds: the measured window, from the first submit.
        latency_s: the emulator's unloaded service time.
        drop_at_s: when set, the emulator's capacity drops to CAPACITY // 2 at that second.
        executors: independent Executors (as separate processes would be) sharing the server;
            the timeline's limit and in-flight are their sums.

    Returns:
        {"throughput", "p50_s", "finished", "timeline": [(t, limit, in_flight)], "done_at": [t...]}.
    """
    from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
    from llm_executor.testing import Emulator, ProviderSim

    n = int(CAPACITY / latency_s * seconds * 1.5) + 64  # more than can finish: always a backlog
    with Emulator({"ollama": ProviderSim(latency_s=latency_s, capacity=CAPACITY)}) as emu:
        cfg = ExecutorConfig(providers={"ollama": ProviderConfig(
            base_url=emu.url("ollama"), model="llama3.2", max_parallel=max_parallel,  # type: ignore[arg-type]
            max_retries=0, timeout=30.0)}, queue_size=0)
        done_at: list[float] = []
        latencies: list[float] = []
        lock = threading.Lock()
        fleet = [Executor(cfg) for _ in range(executors)]
        try:
            t0 = time.monotonic()

            def finished(fut: Future[LLMResponse]) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    return
                with lock:
                    done_at.append(time.monotonic() - t0)
                    latencies.append(fut.result().latency_ms / 1000.0)

            for i in range(n):
                ex = fleet[i % executors]
                ex.submit(LLMRequest(provider="ollama", model="llama3.2", prompt=f"p{i}")).add_done_callback(finished)
            timeline: list[tuple[float, int, int]] = []
            dropped = False
            while (now := time.monotonic() - t0) < seconds:
                if drop_at_s is not None and not dropped and now >= drop_at_s:
                    emu.set_limits("ollama", capacity=CAPACITY // 2)
                    dropped = True
                stats = [e.stats()["ollama"] for e in fleet]
                timeline.append((round(now, 3), sum(st.max_parallel for st in stats),
                                 sum(st.in_flight for st in stats)))
                time.sleep(0.1)
        finally:
            for ex in fleet:
                ex.shutdown(wait=True, cancel_futures=True)
    inside = [t for t in done_at if t <= seconds]
    lat = sorted(latencies)
    late = sorted(x for t, x in zip(done_at, latencies, strict=True) if seconds / 2 <= t <= seconds)
    return {"max_parallel": max_parallel, "throughput": len(inside) / seconds, "finished": len(inside),
            "p50_s": lat[len(lat) // 2] if lat else float("nan"),
            "p50_late_s": late[len(late) // 2] if late else float("nan"),
            "timeline": timeline, "done_at": sorted(done_at)}


def second_half_rate(run: dict[str, Any], seconds: float) -> float:
    """Calls finished per second in the second half of the window (after convergence)."""
    return sum(1 for t in run["done_at"] if seconds / 2 <= t <= seconds) / (seconds / 2)


def second_half_limit(run: dict[str, Any]) -> float:
    half = run["timeline"][len(run["timeline"]) // 2:]
    return statistics.fmean(limit for _, limit, _ in half) if half else float("nan")


def drop_recovery_s(run: dict[str, Any], drop_at_s: float, at_most: int) -> float | None:
    """Seconds from the capacity drop until the learned limit is at most ``at_most``."""
    for t, limit, _ in run["timeline"]:
        if t >= drop_at_s and limit <= at_most:
            return t - drop_at_s
    return None


def plot(auto: dict[str, Any], drop: dict[str, Any] | None, best_rps: float, path: Path) -> None:
    """The learned limit and throughput (per 0.5 s) over time, for the auto run(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("capacity 6", auto, None)] + ([("capacity 6 -> 3", drop, drop["drop_at_s"])] if drop else [])
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.8 * len(runs)), squeeze=False)
    for ax, (label, run, drop_at) in zip(axes[:, 0], runs, strict=True):
        ts = [t for t, _, _ in run["timeline"]]
        ax.step(ts, [limit for _, limit, _ in run["timeline"]], where="post", color="tab:blue",
                label="learned MAX_PARALLEL")
        ax.axhline(CAPACITY, color="tab:green", ls=":", lw=1, label=f"capacity {CAPACITY}")
        ax.set_ylabel("calls in flight")
        ax2 = ax.twinx()
        end = run.get("seconds") or math.ceil(ts[-1])
        bins = [i * 0.5 for i in range(int(end / 0.5) + 1)]
        rate = [sum(1 for d in run["done_at"] if b <= d < b + 0.5) / 0.5 for b in bins]
        ax2.plot([b + 0.25 for b in bins], rate, color="tab:orange", lw=1.2, label="finished per s")
        ax2.axhline(best_rps, color="tab:red", ls="--", lw=1, label=f"best fixed {best_rps:.1f}/s")
        ax2.set_ylabel("calls per s")
        if drop_at is not None:
            ax.axvline(drop_at, color="k", lw=0.8)
            ax.axhline(CAPACITY // 2, color="tab:green", ls="--", lw=0.8)
        ax.set_title(f"MAX_PARALLEL=auto, Ollama-like emulator, {label}, service time "
                     f"{run.get('latency_s', 0.2):g}s", fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="lower right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("seconds since first submit")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 30 s): fewer points, one run")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median); 3, or 1 with --quick")
    parser.add_argument("--latency", type=float, default=0.2, help="the emulator's unloaded latency, s")
    parser.add_argument("--seconds", type=float, default=None, help="each fixed run's window (6; 2.5 quick)")
    parser.add_argument("--auto-seconds", type=float, default=None, help="the auto run's window (20; 8 quick)")
    parser.add_argument("--json", default="bench-results/bench_concurrency.json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH", help="save the limit/throughput plot here (needs matplotlib)")
    parser.add_argument("--replot", metavar="JSON", help="no run: plot a saved --json file into --plot")
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        saved = json.loads(Path(args.replot).read_text())
        best = max(median([r["throughput"] for r in rs]) for rs in saved["sweep"].values())
        plot(dict(saved["auto"][0], latency_s=saved["latency_s"]), saved["drop"], best, Path(args.plot))
        print(f"plot written to {args.plot}")
        return 0
    logging.getLogger("llm_executor").setLevel(logging.WARNING)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (2.5 if args.quick else 6.0)
    auto_s = args.auto_seconds or (8.0 if args.quick else 20.0)
    sweep = QUICK_SWEEP if args.quick else SWEEP
    t_start = time.perf_counter()

    fixed: dict[int, list[dict[str, Any]]] = {}
    for p in sweep:
        fixed[p] = [run_once(p, seconds, args.latency) for _ in range(runs)]
        print(f"  fixed {p:>2}: {median([r['throughput'] for r in fixed[p]]):6.1f} calls/s, "
              f"p50 {median([r['p50_s'] for r in fixed[p]]) * 1000:6.0f} ms", flush=True)
    best_p = max(sweep, key=lambda p: median([r["throughput"] for r in fixed[p]]))
    best_rps = median([r["throughput"] for r in fixed[best_p]])
    unloaded_s = median([r["p50_s"] for r in fixed[1]])
    autos = [run_once("auto", auto_s, args.latency) for _ in range(runs)]
    auto_rps = median([r["throughput"] for r in autos])
    auto_p50 = median([r["p50_s"] for r in autos])
    auto_limit = median([second_half_limit(r) for r in autos])
    auto_steady = median([second_half_rate(r, auto_s) for r in autos])
    auto_p50_late = median([r["p50_late_s"] for r in autos])
    latency_ok = [p for p in sweep if median([r["p50_s"] for r in fixed[p]]) <= 1.3 * unloaded_s]
    best_ok = max(latency_ok, key=lambda p: median([r["throughput"] for r in fixed[p]]))
    best_ok_rps = median([r["throughput"] for r in fixed[best_ok]])
    print(f"  auto    : {auto_rps:6.1f} calls/s, p50 {auto_p50 * 1000:6.0f} ms, "
          f"learned limit {auto_limit:.1f} (mean, second half)", flush=True)
    drop: dict[str, Any] | None = None
    recovery: float | None = None
    pair: list[dict[str, Any]] = []
    if not args.quick:
        pair = [run_once("auto", auto_s, args.latency, executors=2) for _ in range(runs)]
        drop_at = auto_s / 2
        drop = run_once("auto", auto_s, args.latency, drop_at_s=drop_at)
        drop.update(drop_at_s=drop_at, seconds=auto_s, latency_s=args.latency)
        recovery = drop_recovery_s(drop, drop_at, CAPACITY // 2 + 1)

    figures = [
        {"figure": "auto throughput / best fixed", "measured": auto_rps / best_rps, "target": 0.90, "op": ">=",
         "note": f"auto {auto_rps:.1f}/s over {auto_s:g}s from a cold start; best fixed MAX_PARALLEL={best_p}: "
                 f"{best_rps:.1f}/s"},
        {"figure": "  after convergence (second half) / best fixed", "measured": auto_steady / best_rps,
         "target": 0.90, "op": ">=", "note": f"auto {auto_steady:.1f}/s in [{auto_s / 2:g}, {auto_s:g}] s"},
        {"figure": "  best fixed with p50 <= 1.3x unloaded", "measured": best_ok_rps / best_rps, "target": None,
         "op": "", "note": f"MAX_PARALLEL={best_ok}: {best_ok_rps:.1f}/s (auto / it: {auto_rps / best_ok_rps:.2f} "
                           f"whole run, {auto_steady / best_ok_rps:.2f} after convergence)"},
        {"figure": "auto p50 latency / unloaded p50", "measured": auto_p50 / unloaded_s, "target": 1.3, "op": "<=",
         "note": f"auto p50 {auto_p50 * 1000:.0f} ms; MAX_PARALLEL=1 p50 {unloaded_s * 1000:.0f} ms"},
        {"figure": "  after convergence (second half)", "measured": auto_p50_late / unloaded_s, "target": 1.3,
         "op": "<=", "note": f"auto p50 {auto_p50_late * 1000:.0f} ms in [{auto_s / 2:g}, {auto_s:g}] s"},
        {"figure": "learned limit, mean of the second half", "measured": auto_limit, "target": None, "op": "",
         "note": f"capacity {CAPACITY}"},
    ]
    if pair:
        pair_rps = median([r["throughput"] for r in pair])
        pair_p50 = median([r["p50_s"] for r in pair])
        pair_limit = median([second_half_limit(r) for r in pair])
        figures.append({"figure": "2 executors, one server: throughput / best fixed", "measured": pair_rps / best_rps,
                        "target": None, "op": "", "note": f"sum {pair_rps:.1f}/s, not shared (per process)"})
        figures.append({"figure": "2 executors, one server: p50 / unloaded", "measured": pair_p50 / unloaded_s,
                        "target": None, "op": "", "note": f"sum of learned limits {pair_limit:.1f} (second half)"})
    if drop is not None:
        figures.append({"figure": f"capacity {CAPACITY} -> {CAPACITY // 2}: s until limit <= {CAPACITY // 2 + 1}",
                        "measured": recovery, "target": 5.0, "op": "<=",
                        "note": f"one run; mean limit in its second half {second_half_limit(drop):.1f}"})
    print()
    print(f"{'figure':<48} {'measured':>9} {'target':>8}  status")
    print("-" * 80)
    missed = False
    for f in figures:
        m, t = f["measured"], f["target"]
        ok: bool | None = None
        if t is not None:
            ok = m is not None and (m >= t if f["op"] == ">=" else m <= t)
        f["ok"] = ok
        missed |= ok is False
        shown = "-" if m is None else f"{m:.3g}"
        target = "-" if t is None else f"{f['op']} {t:g}"
        print(f"{f['figure']:<48} {shown:>9} {target:>8}  {({True: 'OK', False: 'MISSED', None: '-'})[ok]}"
              f"  ({f['note']})")
    elapsed = time.perf_counter() - t_start
    print(f"\n{'quick' if args.quick else 'full'} run, {runs} run(s) per figure, latency {args.latency:g}s, "
          f"{elapsed:.0f}s")
    out = {"quick": args.quick, "runs": runs, "latency_s": args.latency, "capacity": CAPACITY, "elapsed_s": elapsed,
           "argv": sys.argv[1:] if argv is None else list(argv), "figures": figures,
           "sweep": {p: [{k: r[k] for k in ("throughput", "p50_s", "finished")} for r in rs]
                     for p, rs in fixed.items()},
           "auto": autos, "drop": drop, "pair": pair}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"results written to {path}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("no plot: matplotlib is not installed", file=sys.stderr)
        else:
            first = dict(autos[0], seconds=auto_s, latency_s=args.latency)
            plot(first, drop, best_rps, Path(args.plot))
            print(f"plot written to {args.plot}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
