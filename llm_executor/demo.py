"""``llm-executor demo``: the example pipeline end to end on the built-in provider emulator.

Starts an ``Emulator`` that enforces the same concurrency and rate limits as the executor's
configuration (so any overshoot would show as a refused request, and in the emulator's own
record), builds an ``Executor`` with the three built-in adapters pointed at it with different
limits, runs ``run_pipeline`` over a corpus, and reports per provider what the executor and the
emulator each observed. No API key, no network beyond 127.0.0.1.
Imports: the public API, ``pipeline`` and ``testing`` only; printing is the CLI's job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import Executor, ExecutorConfig, ProviderConfig
from .pipeline import PipelineResult, load_corpus, run_pipeline

__all__ = ["DEMO_PROVIDERS", "DemoReport", "ProviderRow", "run_demo"]

DEMO_KEY = "demo-key-not-secret"
# The demo's first requests open new connections (and, on a busy laptop or CI machine, wait for a
# core) and reach the emulator tens of ms after their tokens; the emulator counts the window on
# arrival. A 100 ms window margin (the knob a far-away provider needs too) keeps "every limit held"
# true at both ends from the first second; it costs ~10 % of the QPS in the demo.
DEMO_WINDOW_MARGIN_MS = 100


@dataclass(frozen=True)
class _DemoLane:
    model: str
    max_parallel: int
    qps: float | None
    latency_s: float


# Different limits per provider, so the table shows each lane holding its own.
DEMO_PROVIDERS: dict[str, _DemoLane] = {
    # openai: slow replies, so MAX_PARALLEL binds; gemini: fast replies, so QPS binds;
    # ollama: a local server with no QPS, only its concurrency.
    "openai": _DemoLane("gpt-4o-mini", max_parallel=4, qps=10.0, latency_s=0.5),
    "gemini": _DemoLane("gemini-2.5-flash", max_parallel=3, qps=4.0, latency_s=0.15),
    "ollama": _DemoLane("llama3.2", max_parallel=2, qps=None, latency_s=0.3),
}
# Faults the demo injects with --fault-rate: retryable ones, plus malformed JSON (a repair).
DEMO_FAULTS = {"rate_limit": 1.0, "server_error": 1.0, "unavailable": 1.0, "malformed": 1.0}


@dataclass(frozen=True)
class ProviderRow:
    """One provider's line of the demo table: what the executor did and what the emulator saw."""

    provider: str
    model: str
    requests: int
    completed: int
    failed: int
    retries: int
    latency_ms_mean: float | None
    queue_ms_mean: float | None
    max_in_flight: int
    emulator_max_concurrency: int
    max_parallel: int
    max_starts_1s: int
    emulator_max_per_1s: int
    qps: float | None
    refused_by_emulator: int

    @property
    def limits_held(self) -> bool:
        """In flight never above MAX_PARALLEL and starts in any 1 s never above QPS, on both sides."""
        ok = max(self.max_in_flight, self.emulator_max_concurrency) <= self.max_parallel
        if self.qps is not None:
            cap = max(1, math.floor(self.qps))  # a configured QPS: never more in any 1 s window
            ok = ok and max(self.max_starts_1s, self.emulator_max_per_1s) <= cap
        return ok


@dataclass
class DemoReport:
    """Everything the demo measured; ``ok`` is the exit status's verdict."""

    rows: list[ProviderRow]
    pipeline: PipelineResult
    elapsed_s: float
    fault_rate: float
    unresolved: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def limits_held(self) -> bool:
        return all(r.limits_held for r in self.rows)

    @property
    def ok(self) -> bool:
        """Every limit held and every task resolved (a failed task is resolved: it has an error)."""
        return self.limits_held and self.pipeline.complete and self.unresolved == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "limits_held": self.limits_held,
            "every_task_resolved": self.pipeline.complete and self.unresolved == 0,
            "elapsed_s": round(self.elapsed_s, 3),
            "fault_rate": self.fault_rate,
            "providers": [{**r.__dict__, "limits_held": r.limits_held} for r in self.rows],
            "pipeline": self.pipeline.as_dict(),
        }

    def format_table(self) -> str:
        """The per-provider table (limits observed vs configured)."""
        header = ("provider", "requests", "ok", "failed", "retries", "mean ms", "queue ms",
                  "in flight (emu) / max", "1s window (emu) / QPS", "limits")
        body = []
        for r in self.rows:
            body.append((
                r.provider, str(r.requests), str(r.completed), str(r.failed), str(r.retries),
                "-" if r.latency_ms_mean is None else f"{r.latency_ms_mean:.0f}",
                "-" if r.queue_ms_mean is None else f"{r.queue_ms_mean:.0f}",
                f"{r.max_in_flight} ({r.emulator_max_concurrency}) / {r.max_parallel}",
                f"{r.max_starts_1s} ({r.emulator_max_per_1s}) / {'-' if r.qps is None else f'{r.qps:g}'}",
                "held" if r.limits_held else "EXCEEDED",
            ))
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                                strict=True)))
                 for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def run_demo(
    *,
    providers: Sequence[str] | None = None,
    docs: str | Path | None = None,
    fault_rate: float = 0.05,
    seed: int = 0,
    max_docs: int | None = None,
    progress: bool = True,
) -> DemoReport:
    """Run the example pipeline on the emulator and report what every lane did.

    Args:
        providers: built-in providers to use (default: openai, gemini, ollama).
        docs: a directory of *.txt files (default: the bundled corpus).
        fault_rate: share of requests the emulator answers with a fault (429, 5xx, malformed JSON).
        seed: the emulator's fault RNG seed.
        max_docs: use only the first N documents (a short run).
        progress: tqdm bars per phase.

    Raises:
        ValueError: an unknown provider name or a fault rate outside [0, 1].
    """
    from .testing import Emulator, ProviderSim

    names = list(providers) if providers else list(DEMO_PROVIDERS)
    unknown = [n for n in names if n not in DEMO_PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown {unknown}; expected some of {', '.join(DEMO_PROVIDERS)}")
    if not 0.0 <= fault_rate <= 1.0:
        raise ValueError(f"--fault-rate={fault_rate}: expected a number in [0, 1]")
    documents = load_corpus(docs)
    if max_docs is not None:
        documents = dict(list(documents.items())[:max_docs])

    sims = {
        n: ProviderSim(max_concurrency=DEMO_PROVIDERS[n].max_parallel, rps=DEMO_PROVIDERS[n].qps,
                       latency_s=DEMO_PROVIDERS[n].latency_s, fault_rate=fault_rate, faults=DEMO_FAULTS,
                       retry_after_s=0.5, require_key=DEMO_KEY)
        for n in names
    }
    t0 = time.monotonic()
    with Emulator(sims, seed=seed) as emu:
        config = ExecutorConfig(
            providers={
                n: ProviderConfig(max_parallel=DEMO_PROVIDERS[n].max_parallel, qps=DEMO_PROVIDERS[n].qps,
                                  model=DEMO_PROVIDERS[n].model, base_url=emu.url(n), api_key=DEMO_KEY,
                                  timeout=10.0, max_retries=4, backoff_max_s=1.0, repair_attempts=1,
                                  window_margin_ms=DEMO_WINDOW_MARGIN_MS)
                for n in names
            },
            queue_size=50,
        )
        with Executor(config) as ex:
            result = run_pipeline(ex, documents, providers=names, progress=progress)
        stats = ex.stats()
        rows = []
        for n in names:
            s, e = stats[n], emu.stats(n)
            # "rate_limited"/"busy": the emulator refused a request over its limits (an injected
            # 429 fault is "rate_limit"); with the executor keeping its limits this stays 0.
            refused = e.faults.get("rate_limited", 0) + e.faults.get("busy", 0)
            rows.append(ProviderRow(
                provider=n, model=DEMO_PROVIDERS[n].model, requests=s.attempts, completed=s.completed,
                failed=s.failed, retries=s.retries, latency_ms_mean=s.latency_ms_mean,
                queue_ms_mean=s.queue_ms_mean, max_in_flight=s.max_in_flight,
                emulator_max_concurrency=e.max_concurrency, max_parallel=s.max_parallel,
                max_starts_1s=s.max_starts_1s, emulator_max_per_1s=e.max_requests_per_1s, qps=s.qps,
                refused_by_emulator=refused,
            ))
        unresolved = sum(s.queued + s.in_flight for s in stats.values())
    report = DemoReport(rows, result, time.monotonic() - t0, fault_rate, unresolved)
    if fault_rate:
        report.notes.append(f"the emulator injected faults into ~{fault_rate:.0%} of requests "
                            "(429 with Retry-After, 500, 503, malformed JSON); retries and repairs absorb them")
    return report
