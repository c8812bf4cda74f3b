"""Per-lane counters, latency statistics and the limit auditor; optional Prometheus export.

``LaneMetrics`` is written by the executor (never a provider call inside) and read as an
immutable ``ProviderStats`` snapshot. What every attempt writes takes no shared lock: each worker
thread counts into its own ``_Tally`` (summed by ``snapshot``), in-flight calls are a list's length
and attempt starts a deque (``append``/``pop`` are atomic). A lock shared by the workers and
taken per attempt convoys under the GIL (see ``lifecycle.lane``); rare events (failures,
cancels, fallbacks, learned limits, TPM reservations) still take the lane's metrics lock.
The auditor keeps what the limits promise checkable from outside: the maximum requests in
flight ever observed and the maximum number of attempt starts in any sliding 1 s window.
Imports: stdlib only (prometheus-client lazily, in ``PrometheusExporter``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ExecutorStats", "LaneMetrics", "LearnedLimit", "PrometheusExporter", "ProviderStats"]

_RECENT = 2048  # latencies kept for p50/p95: bounded memory, recent behaviour

log = logging.getLogger("llm_executor")


@dataclass(frozen=True)
class LearnedLimit:
    """One limit a lane set itself (``auto``), as ``stats()`` shows it.

    Attributes:
        value: the limit in force (requests/s for ``qps``, per minute for ``rpm``/``tpm``,
            calls for ``max_parallel``).
        source: where it came from: "configured" (the safe start), "headers" (the provider's
            rate-limit headers), "probe" (additive increase / multiplicative decrease on 429s),
            "gradient" (latency-gradient concurrency), "store" (another process, through the
            shared backend).
        changed_at: wall-clock time (epoch s) of the last change, None while never changed.
        changes: how many times it changed.
    """

    value: float
    source: str
    changed_at: float | None = None
    changes: int = 0


@dataclass(frozen=True)
class ProviderStats:
    """A snapshot of one provider lane.

    Attributes:
        provider: lane name.
        queued: requests accepted but not started.
        in_flight: provider calls running now.
        submitted: requests accepted from callers (fallbacks into this lane are ``fallbacks_in``).
        fallbacks_in: requests another lane handed to this one after its retryable failures.
        completed: requests that ended with a response.
        failed: requests that ended with an exception; ``failed_by_error`` splits it by class.
        cancelled: requests cancelled before they started.
        attempts: provider calls made (retries and repairs included).
        retries: attempts beyond the first of each request.
        fallbacks: requests handed on to another provider after retryable failures.
        latency_ms_mean / _p50 / _p95: provider time of successful attempts (p50/p95 over the
            last 2048).
        queue_ms_mean: mean time from submit to the first attempt.
        prompt_tokens / completion_tokens / tokens: reported usage of every attempt.
        max_in_flight: the most provider calls ever running at once.
        max_starts_1s: the most attempt starts in any sliding 1 s window.
        max_parallel / qps: the limits in force, for comparison (the learned value when ``auto``).
        paused_until: wall-clock time (epoch s) until which a 429 paused the lane, or None.
        tpm_reserved: TPM tokens reserved by attempts waiting or running now (0 when idle).
        learned: each limit configured ``auto`` ("qps", "rpm", "tpm", "max_parallel") as the lane
            learned it (empty when none is ``auto``).

    Each request is counted once, by the lane that settled it: ``completed + failed + cancelled``
    summed over lanes equals what callers saw, fallbacks included.
    """

    provider: str
    queued: int = 0
    in_flight: int = 0
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    failed_by_error: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    attempts: int = 0
    retries: int = 0
    fallbacks: int = 0
    latency_ms_mean: float | None = None
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    queue_ms_mean: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: int = 0
    max_in_flight: int = 0
    max_starts_1s: int = 0
    max_parallel: int = 0
    qps: float | None = None
    paused_until: float | None = None
    fallbacks_in: int = 0
    tpm_reserved: int = 0
    learned: dict[str, LearnedLimit] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        """Requests that reached an end: completed + failed + cancelled."""
        return self.completed + self.failed + self.cancelled

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __str__(self) -> str:
        return _text_table([self])

    def _repr_html_(self) -> str:
        return _html_table([self])

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self) if cycle else _text_table([self]))


class ExecutorStats(Mapping[str, ProviderStats]):
    """Snapshots of every lane, by provider name (a read-only mapping)."""

    def __init__(self, providers: Mapping[str, ProviderStats]) -> None:
        self._providers = dict(providers)

    def __getitem__(self, name: str) -> ProviderStats:
        return self._providers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)

    def __len__(self) -> int:
        return len(self._providers)

    def __repr__(self) -> str:
        return f"ExecutorStats({self._providers!r})"

    def __str__(self) -> str:
        """One line per provider: what ``print(ex.stats())`` shows."""
        return _text_table(list(self._providers.values()))

    def _repr_html_(self) -> str:
        """An HTML table, one row per provider: how Jupyter shows ``ex.stats()``."""
        return _html_table(list(self._providers.values()))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display: the table of ``__str__``."""
        printer.text(repr(self) if cycle else str(self))

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (for JSON): ``{provider: {field: value}}``."""
        return {name: s.as_dict() for name, s in self._providers.items()}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _errors(s: ProviderStats) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(s.failed_by_error.items()))


# The columns of the stats tables: (header, tooltip, cell of one snapshot). Each limit sits beside
# what was observed, so a glance tells whether it held.
_COLUMNS: tuple[tuple[str, str, Callable[[ProviderStats], str]], ...] = (
    ("provider", "lane name", lambda s: s.provider),
    ("queued", "accepted, not started", lambda s: str(s.queued)),
    ("in flight", "provider calls running now", lambda s: str(s.in_flight)),
    ("submitted", "accepted from callers", lambda s: str(s.submitted)),
    ("completed", "ended with a response", lambda s: str(s.completed)),
    ("failed", "ended with an exception", lambda s: str(s.failed)),
    ("cancelled", "cancelled before they started", lambda s: str(s.cancelled)),
    ("attempts", "provider calls made, retries included", lambda s: str(s.attempts)),
    ("retries", "attempts beyond each request's first", lambda s: str(s.retries)),
    ("p50 ms", "median provider time of successful attempts", lambda s: _ms(s.latency_ms_p50)),
    ("p95 ms", "95th percentile provider time", lambda s: _ms(s.latency_ms_p95)),
    ("queue ms", "mean wait from submit to the first attempt", lambda s: _ms(s.queue_ms_mean)),
    ("tokens", "reported tokens of every attempt", lambda s: str(s.tokens)),
    ("max in flight / limit", "most calls ever running at once / MAX_PARALLEL",
     lambda s: f"{s.max_in_flight} / {s.max_parallel}"),
    ("max starts 1s / qps", "most attempt starts in any 1 s window / QPS",
     lambda s: f"{s.max_starts_1s} / {'-' if s.qps is None else f'{s.qps:g}'}"),
    ("errors", "failed requests by error class", _errors),
)


def _text_table(rows: list[ProviderStats]) -> str:
    if not rows:
        return "ExecutorStats: no providers"
    table = [[header for header, _, _ in _COLUMNS], *([cell(s) for _, _, cell in _COLUMNS] for s in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                      strict=True))).rstrip() for row in table)


def _html_table(rows: list[ProviderStats]) -> str:
    from html import escape

    head = "".join(f'<th title="{escape(tip)}">{escape(header)}</th>' for header, tip, _ in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell(s))}</td>" for _, _, cell in _COLUMNS) + "</tr>"
                   for s in rows)
    paused = [f"{escape(s.provider)} paused by a 429 until "
              f"{time.strftime('%H:%M:%S', time.localtime(s.paused_until))}" for s in rows if s.paused_until]
    note = f"<p>{'; '.join(paused)}</p>" if paused else ""
    return (f'<table class="llm-executor-stats"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{note}")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class _Tally:
    """One thread's share of a lane's per-attempt counters, written by that thread alone."""

    __slots__ = ("attempts", "completed", "completion_tokens", "latency_n", "latency_sum_ms", "prompt_tokens",
                 "queue_n", "queue_sum_ms", "retries", "thread", "tokens")

    def __init__(self, thread: threading.Thread | None) -> None:
        self.thread = thread
        self.attempts = self.retries = self.completed = self.latency_n = self.queue_n = 0
        self.prompt_tokens = self.completion_tokens = self.tokens = 0
        self.latency_sum_ms = self.queue_sum_ms = 0.0

    def add(self, other: _Tally) -> None:
        for name in _TALLY_COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


_TALLY_COUNTS = tuple(name for name in _Tally.__slots__ if name != "thread")
# False on a free-threaded build: the lock-free updates here and the lane's lock-free take
# (``lifecycle.lane``) then take their locks, as single C calls are no longer atomic.
GIL_ENABLED = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


class LaneMetrics:
    """Mutable counters of one lane; every method is cheap and thread-safe.

    Per-attempt counters live in one ``_Tally`` per worker thread (no lock on the request path);
    a tally whose thread ended is folded into the retired counts when the next thread's tally is made,
    so there are never more tallies than live threads that made attempts. ``max_in_flight`` and
    ``max_starts_1s`` are observed without a lock: a start racing another may be missed by one
    (a peak reported low), never counted twice (a peak is never reported above what happened).
    """

    def __init__(self, name: str, max_parallel: int, qps: float | None,
                 clock_s: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.max_parallel = max_parallel
        self.qps = qps
        self._clock_s = clock_s
        self._lock = threading.Lock()
        self.failed: Counter[str] = Counter()
        self.cancelled = 0
        self.fallbacks = 0
        self.recent_ms: deque[float] = deque(maxlen=_RECENT)
        self.max_in_flight = 0
        self.max_starts_1s = 0
        self.tpm_reserved = 0
        self.learned: dict[str, LearnedLimit] = {}
        self.listeners: list[Callable[[str, str, float | None], None]] = []
        self._reset_threading()

    def _reset_threading(self) -> None:
        self._local = threading.local()
        # (the counts of threads that ended, one tally per live thread that counted), replaced
        # whole under _lock: a fork sees the old books or the new ones, never a fold half done.
        self._books: tuple[_Tally, tuple[_Tally, ...]] = (_Tally(None), ())
        self._flight: list[None] = []  # one entry per provider call running
        self._starts: deque[float] = deque()  # attempt starts of the last second
        self._trim_lock = threading.Lock()  # taken without blocking: one trimmer at a time

    @property
    def in_flight(self) -> int:
        """Provider calls running now."""
        return len(self._flight)

    def _new_tally(self) -> _Tally:
        """Make and register the calling thread's tally (its first count on this lane; every
        later one reads ``_local.tally`` directly, the request path's only lookup)."""
        tally = _Tally(threading.current_thread())
        with self._lock:
            old_retired, tallies = self._books
            retired = _Tally(None)
            retired.add(old_retired)
            live = []
            for other in tallies:
                if other.thread is not None and other.thread.is_alive():
                    live.append(other)
                else:
                    retired.add(other)
            live.append(tally)
            self._books = (retired, tuple(live))
        self._local.tally = tally
        return tally

    def _totals(self) -> _Tally:
        """Every thread's counts added up (caller holds ``_lock``)."""
        retired, tallies = self._books
        total = _Tally(None)
        total.add(retired)
        for tally in tallies:
            total.add(tally)
        return total

    def after_fork(self) -> None:
        """In a forked child: fresh locks, and no calls in flight (they were the parent's)."""
        self._lock = threading.Lock()
        total = self._totals()  # every thread's counts, kept as the child's history
        self._reset_threading()
        self._books = (total, ())
        self.tpm_reserved = 0

    def _notify(self, outcome: str, latency_ms: float | None) -> None:
        # A listener that raises must not strand the Future being settled (issue 10, item 9).
        for listener in list(self.listeners):
            try:
                listener(self.name, outcome, latency_ms)
            except Exception:
                log.exception("metrics listener %r failed on %s", listener, self.name)

    def on_learned(self, limit: str, value: float, source: str, reason: str = "") -> None:
        """Record a learned limit; one INFO log line when its value or source changes.

        Args:
            limit: "qps", "rpm", "tpm" or "max_parallel".
            value: the new value.
            source: see ``LearnedLimit.source``.
            reason: a few words for the log line ("429, x0.7", "x-ratelimit-limit-requests 2220").
        """
        with self._lock:
            old = self.learned.get(limit)
            if old is not None and old.value == value and old.source == source:
                return
            first = old is None
            changes = 0 if old is None else old.changes + 1
            self.learned[limit] = LearnedLimit(value, source, None if first else time.time(), changes)
            if limit == "qps":
                self.qps = value
            elif limit == "max_parallel":
                self.max_parallel = int(value)
        log.info("llm_executor: %s %s %s %g (%s%s)", self.name, limit, "starts at" if first else "->", value,
                 source, f": {reason}" if reason else "",
                 extra={"provider": self.name, "limit": limit, "value": value, "source": source,
                        "previous": None if old is None else old.value})

    def on_tpm_reserved(self, tokens: int) -> None:
        """TPM tokens reserved (> 0) or given back / settled (< 0) by an attempt."""
        with self._lock:
            self.tpm_reserved += tokens

    def on_attempt_start(self, is_retry: bool, queue_ms: float | None = None) -> None:
        """An attempt starts; ``queue_ms`` is given on a request's first attempt."""
        try:
            tally = self._local.tally
        except AttributeError:
            tally = self._new_tally()
        if queue_ms is not None:
            tally.queue_sum_ms += queue_ms
            tally.queue_n += 1
        tally.attempts += 1
        if is_retry:
            tally.retries += 1
        flight = self._flight
        flight.append(None)
        in_flight = len(flight)  # exact at this instant, this call included
        if in_flight > self.max_in_flight:
            if GIL_ENABLED:  # no switch between the test and the store under the GIL in practice
                self.max_in_flight = in_flight
            else:
                with self._lock:
                    self.max_in_flight = max(self.max_in_flight, in_flight)
        now = self._clock_s()
        starts = self._starts
        starts.append(now)
        trim = self._trim_lock
        if trim.acquire(False):  # never waits: the thread holding it counts this start too
            try:
                horizon = now - 1.0
                while starts[0] <= horizon:
                    starts.popleft()
                if len(starts) > self.max_starts_1s:
                    self.max_starts_1s = len(starts)
            finally:
                trim.release()

    def on_attempt_end(self, prompt_tokens: int | None, completion_tokens: int | None,
                       total_tokens: int | None) -> None:
        try:
            self._flight.pop()
        except IndexError:  # the call began in the parent of this forked child (after_fork)
            pass
        if not (prompt_tokens or completion_tokens or total_tokens):
            return
        try:
            tally = self._local.tally
        except AttributeError:
            tally = self._new_tally()
        if prompt_tokens:
            tally.prompt_tokens += prompt_tokens
        if completion_tokens:
            tally.completion_tokens += completion_tokens
        if total_tokens:
            tally.tokens += total_tokens
        else:
            tally.tokens += (prompt_tokens or 0) + (completion_tokens or 0)

    def on_success(self, latency_ms: float) -> None:
        try:
            tally = self._local.tally
        except AttributeError:
            tally = self._new_tally()
        tally.completed += 1
        tally.latency_sum_ms += latency_ms
        tally.latency_n += 1
        if GIL_ENABLED:
            self.recent_ms.append(latency_ms)  # atomic; snapshot() copies it in one C call
        else:
            with self._lock:
                self.recent_ms.append(latency_ms)
        if self.listeners:
            self._notify("ok", latency_ms)

    def on_failure(self, error: BaseException) -> None:
        name = type(error).__name__
        with self._lock:
            self.failed[name] += 1
        if self.listeners:
            self._notify(name, None)

    def on_cancel(self) -> None:
        with self._lock:
            self.cancelled += 1
        if self.listeners:
            self._notify("cancelled", None)

    def on_fallback(self) -> None:
        with self._lock:
            self.fallbacks += 1

    def mean_latency_s(self) -> float | None:
        """Mean provider time of successful attempts, seconds (None before the first)."""
        # Read on "auto" routing's submit path: no lock and no totals object, just the two sums
        # (the books are one tuple, replaced whole; each count is read once).
        retired, tallies = self._books
        n = retired.latency_n + sum(t.latency_n for t in tallies)
        if not n:
            return None
        return (retired.latency_sum_ms + sum(t.latency_sum_ms for t in tallies)) / n / 1000.0

    def snapshot(self, queued: int, submitted: int, paused_until: float | None,
                 fallbacks_in: int = 0) -> ProviderStats:
        with self._lock:
            total = self._totals()
            recent = sorted(self.recent_ms)
            failed = dict(self.failed)
            return ProviderStats(
                provider=self.name,
                queued=queued,
                in_flight=self.in_flight,
                submitted=submitted,
                completed=total.completed,
                failed=sum(failed.values()),
                failed_by_error=failed,
                cancelled=self.cancelled,
                attempts=total.attempts,
                retries=total.retries,
                fallbacks=self.fallbacks,
                latency_ms_mean=total.latency_sum_ms / total.latency_n if total.latency_n else None,
                latency_ms_p50=_percentile(recent, 0.50) if recent else None,
                latency_ms_p95=_percentile(recent, 0.95) if recent else None,
                queue_ms_mean=total.queue_sum_ms / total.queue_n if total.queue_n else None,
                prompt_tokens=total.prompt_tokens,
                completion_tokens=total.completion_tokens,
                tokens=total.tokens,
                max_in_flight=self.max_in_flight,
                max_starts_1s=self.max_starts_1s,
                max_parallel=self.max_parallel,
                qps=self.qps,
                paused_until=paused_until,
                fallbacks_in=fallbacks_in,
                tpm_reserved=self.tpm_reserved,
                learned=dict(self.learned),
            )


class PrometheusExporter:
    """Exports an executor's lanes to Prometheus (extra ``prometheus``: prometheus-client).

    Counters (requests by outcome, attempts, retries, tokens), a latency histogram and
    queued / in-flight gauges per provider. Counters and the histogram are fed as requests
    finish; gauges are read from ``stats()`` at scrape time.

    Args:
        executor: anything with ``stats()`` returning an ``ExecutorStats`` and ``_lanes`` metrics.
        registry: a prometheus_client CollectorRegistry (default: the global one).
        prefix: metric name prefix.
    """

    def __init__(self, stats: Callable[[], ExecutorStats], lanes: Mapping[str, LaneMetrics],
                 registry: Any = None, prefix: str = "llm_executor") -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the extra
            from .errors import ConfigError

            raise ConfigError(
                "Prometheus export needs prometheus-client: pip install 'llm-executor[prometheus]'"
            ) from exc
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self._requests = prom.Counter(f"{prefix}_requests_total", "Finished requests by outcome",
                                      ["provider", "outcome"], **kw)
        self._latency = prom.Histogram(f"{prefix}_latency_seconds", "Provider time of successful requests",
                                       ["provider"], **kw)
        self._stats = stats
        collector = _GaugeCollector(stats, prefix, prom)
        (registry or prom.REGISTRY).register(collector)
        self._collector = collector
        self._registry = registry or prom.REGISTRY
        self._lanes = list(lanes.values())
        for metrics in self._lanes:
            metrics.listeners.append(self._on_finish)

    def close(self) -> None:
        """Unregister every metric, so a new executor in this process can export again."""
        for metrics in self._lanes:
            if self._on_finish in metrics.listeners:
                metrics.listeners.remove(self._on_finish)
        for collector in (self._collector, self._requests, self._latency):
            try:
                self._registry.unregister(collector)
            except KeyError:  # pragma: no cover - already unregistered
                pass

    def _on_finish(self, provider: str, outcome: str, latency_ms: float | None) -> None:
        self._requests.labels(provider=provider, outcome=outcome).inc()
        if latency_ms is not None:
            self._latency.labels(provider=provider).observe(latency_ms / 1000.0)


class _GaugeCollector:
    def __init__(self, stats: Callable[[], ExecutorStats], prefix: str, prom: Any) -> None:
        self._stats, self._prefix, self._prom = stats, prefix, prom

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        p = self._prefix
        queued = GaugeMetricFamily(f"{p}_queued", "Requests accepted but not started", labels=["provider"])
        in_flight = GaugeMetricFamily(f"{p}_in_flight", "Provider calls running", labels=["provider"])
        attempts = CounterMetricFamily(f"{p}_attempts", "Provider calls made", labels=["provider"])
        retries = CounterMetricFamily(f"{p}_retries", "Attempts beyond the first", labels=["provider"])
        tokens = CounterMetricFamily(f"{p}_tokens", "Reported tokens of every attempt", labels=["provider"])
        learned = GaugeMetricFamily(f"{p}_learned_limit", "A limit configured auto, as learned",
                                    labels=["provider", "limit", "source"])
        for name, s in self._stats().items():
            for limit, value in s.learned.items():
                learned.add_metric([name, limit, value.source], value.value)
            queued.add_metric([name], s.queued)
            in_flight.add_metric([name], s.in_flight)
            attempts.add_metric([name], s.attempts)
            retries.add_metric([name], s.retries)
            tokens.add_metric([name], s.tokens)
        yield from (queued, in_flight, attempts, retries, tokens, learned)

    def describe(self) -> list[Any]:
        return []
