"""Executor: admission, per-provider lanes, futures, deadlines, retries, shutdown.

Data flow of one request::

    submit() ─ validate, resolve provider and model, give a request_id
       │  admission: at most queue_size requests accepted-but-not-started per lane
       │             (fail_fast: QueueFullError now | block: wait, optional timeout)
       ▼
    lane heap (priority with aging) ─► lane worker (one of MAX_PARALLEL threads)
       worker: wait out a 429 pause → take a rate token → pop the best queued request →
       set_running_or_notify_cancel() → [global slot, TPM reservation] → provider.complete()
       → on a retryable error back off and take a new token → validate JSON → settle the Future

Why a lane never over-fills: a ThreadPoolExecutor's own work queue is unbounded, so we never
hand it requests. A lane starts at most MAX_PARALLEL worker loops in its pool; each loop takes
the best request from the lane's bounded heap when it is ready to call the provider, and exits
when the heap is empty. The heap is the only queue, and admission bounds it.

Every Future settles exactly once: a queued request leaves the heap under the lane lock to
exactly one party (a worker, the deadline reaper, or a cancelling shutdown), which then calls
``set_running_or_notify_cancel()``; results are set with ``set_result``/``set_exception``, whose
``InvalidStateError`` tells a late writer (a provider call that outlived its deadline) to drop its
result. Nothing calls a provider or a user callback while holding a lock.
Imports: everything below it; providers only through the Provider protocol and the registry.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from . import limits as _limits
from .config import BUILTIN_PROVIDER_NAMES, ExecutorConfig, ProviderConfig
from .errors import (
    ConfigError,
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
    LLMExecutorError,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    SchemaValidationError,
    UnknownProviderError,
)
from .metrics import ExecutorStats, LaneMetrics, PrometheusExporter, ProviderStats
from .providers.protocol import Provider
from .providers.registry import create_builtin
from .types import Capabilities, LLMRequest, LLMResponse
from .validation import check_capabilities, normalize_schema, parse_structured

__all__ = ["Executor", "ExecutorStats", "ProviderStats"]

log = logging.getLogger("llm_executor")

_QUEUED, _TAKEN, _REMOVED = 0, 1, 2
# An idle worker waits this long for new work before giving its thread back to the pool: a
# steady stream of requests then never pays a pool.submit() per request.
_LINGER_S = 0.05
# Guards _Item.settled: whoever claims an item first settles its Future and its metrics, so
# stats() already counts a result when the caller's result() returns.
_SETTLE_LOCK = threading.Lock()


def _claim(item: _Item) -> bool:
    with _SETTLE_LOCK:
        if item.settled:
            return False
        item.settled = True
        return True
_REPAIR_PROMPT = (
    "{prompt}\n\nYour previous answer was not valid: {error}\n"
    "Answer again with JSON only, valid against the JSON schema."
)


class _Item:
    """One accepted request on its way through a lane (slots: ~200 bytes per queued request)."""

    __slots__ = (
        "__weakref__", "attempts_before", "auto", "deadline", "future", "lane", "queue_len", "request",
        "schema", "settled", "started", "state", "submit_s", "tried",
    )

    def __init__(self, request: LLMRequest, future: _LLMFuture, lane: _Lane, schema: dict[str, Any] | None,
                 submit_s: float, deadline: float | None) -> None:
        self.request = request
        self.future = future
        self.lane = lane
        self.schema = schema
        self.submit_s = submit_s
        self.deadline = deadline
        self.state = _QUEUED
        self.queue_len = 0
        self.started = False
        self.attempts_before = 0
        self.auto = False
        self.settled = False  # claimed by exactly one settler, under _SETTLE_LOCK
        self.tried: tuple[str, ...] = ()


class _LLMFuture(Future[LLMResponse]):
    """A Future whose cancel() also frees the request's admission slot at once."""

    _llm_item: _Item | None = None

    def __init__(self) -> None:
        super().__init__()
        # Memory per queued request (target ≤ 2 KB): the Condition's waiter deque preallocates a
        # 64-slot block (~760 B) that almost no Future ever uses. Condition only appends to,
        # indexes [0] and removes from _waiters, which a list does as well at 56 B.
        waiters = getattr(self._condition, "_waiters", None)
        if isinstance(waiters, deque) and not waiters:
            self._condition._waiters = []  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            # Future.cancel() also returns True for an already cancelled Future: count and free
            # the slot once (review: run() after a cancelling shutdown counted it twice).
            with self._condition:
                item, self._llm_item = self._llm_item, None
            if item is not None:
                if item.lane.remove(item):
                    # Nobody else will pass this Future through the gate now; without it the
                    # state stays CANCELLED and concurrent.futures.wait()/as_completed() never
                    # count it as done (found by the soak).
                    self.set_running_or_notify_cancel()
                item.lane.on_cancelled(item)
        return cancelled


class _Lane:
    """One provider's lane: bounded heap, worker pool, limiter, metrics, pause."""

    def __init__(self, name: str, provider: Provider, pcfg: ProviderConfig, ecfg: ExecutorConfig,
                 stopping: threading.Event, sleep: Callable[[float], object] | None, builtin: bool) -> None:
        self.name = name
        self.provider = provider
        self.pcfg = pcfg
        self.builtin = builtin
        self.capacity = ecfg.queue_size
        self.aging_s = ecfg.priority_aging_s
        self.caps: Capabilities = provider.capabilities()
        self.limiter = _limits.make_lane_limiter(name, pcfg, ecfg)
        # With a global slot or a TPM budget to wait for, the rate token is taken last.
        self.token_last = bool(pcfg.global_max_parallel or pcfg.tpm)
        self.metrics = LaneMetrics(name, pcfg.max_parallel, pcfg.qps)
        from .retry import RetryPolicy  # tenacity is loaded with the first lane, not at import

        self.retry = RetryPolicy(pcfg, stopping, sleep)
        self.pool = ThreadPoolExecutor(max_workers=pcfg.max_parallel, thread_name_prefix=f"llm-executor-{name}")
        self.lock = threading.Lock()
        self.not_full = threading.Condition(self.lock)
        self.heap: list[tuple[float, int, _Item]] = []
        self.pending = 0
        self.submitted = 0  # guarded by lock; read by stats()
        self.workers = 0
        # Idle workers linger on a SimpleQueue (C-level, cheap to wake) for new work before giving
        # their thread back to the pool; guarded by lock: idle = lingering, wakeups = tokens put.
        self.idle = 0
        self.wakeups = 0
        self.wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.closed = False
        self.paused_until = 0.0  # monotonic

    # -- admission ---------------------------------------------------------------------------

    def has_room(self) -> bool:
        return self.closed or self.capacity == 0 or self.pending < self.capacity

    def push_locked(self, item: _Item, seq: int) -> bool:
        """Queue ``item``; returns True when a new worker loop must be started."""
        # Aging as a static key: priority p+1 counts as if submitted aging_s earlier, so a waiting
        # request gains one step per aging_s and the heap never needs re-sorting.
        key = item.submit_s - item.request.priority * self.aging_s
        item.queue_len = self.pending
        heapq.heappush(self.heap, (key, seq, item))
        self.pending += 1
        self.submitted += 1
        if self.idle > self.wakeups:
            # A lingering worker takes it: cheaper than handing the pool a new worker loop. One
            # wake-up per request, so a burst still starts up to MAX_PARALLEL workers.
            self.wakeups += 1
            self.wake.put(None)
            return False
        if self.workers < self.pcfg.max_parallel:
            self.workers += 1
            return True
        return False

    def linger(self) -> bool:
        """Wait a moment for new work (lock not held); False when the worker should leave."""
        with self.lock:
            if self.closed or self.pending:
                return bool(self.pending)
            self.idle += 1
        try:
            self.wake.get(timeout=_LINGER_S)
            got = True
        except queue.Empty:
            got = False
        with self.lock:
            self.idle -= 1
            if got:
                self.wakeups -= 1
            return self.pending > 0 or (got and not self.closed)

    def pop_locked(self) -> _Item | None:
        heap = self.heap
        while heap:
            item = heapq.heappop(heap)[2]
            if item.state == _QUEUED:
                item.state = _TAKEN
                self.pending -= 1
                self.not_full.notify()
                return item
        return None

    def remove(self, item: _Item) -> bool:
        """Take ``item`` out of the queue if it is still there (lazy deletion)."""
        with self.lock:
            if item.state != _QUEUED:
                return False
            item.state = _REMOVED
            self.pending -= 1
            self.not_full.notify()
            if not self.pending:
                self.heap.clear()
            return True

    def on_cancelled(self, item: _Item) -> None:
        self.metrics.on_cancel()
        _log_finish(item, None, "cancelled", 0.0, 0)

    def retry_after_estimate_s(self) -> float:
        """How long until a queue slot frees, for QueueFullError.retry_after_s."""
        mean_s = self.metrics.mean_latency_s() or 1.0
        by_workers = (self.pending / self.pcfg.max_parallel) * mean_s
        by_rate = self.pending / self.pcfg.qps if self.pcfg.qps else 0.0
        return round(max(0.1, by_workers, by_rate, self.paused_until - time.monotonic()), 3)

    def expected_start_s(self) -> float:
        """Expected wait before a new request would start here (for provider "auto")."""
        mean_s = self.metrics.mean_latency_s() or 0.5
        with self.lock:
            backlog = self.pending + self.metrics.in_flight - self.pcfg.max_parallel + 1
        by_workers = max(0.0, backlog / self.pcfg.max_parallel * mean_s)
        by_rate = (self.pending / self.pcfg.qps) if self.pcfg.qps else 0.0
        pause = max(0.0, self.paused_until - time.monotonic())
        return max(by_workers, by_rate) + pause + self.limiter.expected_wait_s()

    def paused_until_wall(self) -> float | None:
        remaining = self.paused_until - time.monotonic()
        return time.time() + remaining if remaining > 0 else None

    def pause(self, seconds: float) -> None:
        """Hold every worker of this lane for ``seconds`` (the provider said 429 + Retry-After)."""
        until = time.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until = until
            log.warning("lane %s paused for %.2fs after a rate-limit answer", self.name, seconds)


def _uuid4_hex() -> str:
    """A random (version 4) UUID as 32 hex digits; 3x cheaper than uuid.uuid4().hex."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def _log_finish(item: _Item, response: LLMResponse | None, outcome: str, latency_ms: float, attempts: int,
                error: BaseException | None = None) -> None:
    level = logging.INFO if error is None else logging.WARNING
    if not log.isEnabledFor(level):
        return
    request = item.request
    queue_ms = round((response.queue_ms if response else 0.0), 3)
    extra = {
        "request_id": request.request_id,
        "provider": response.provider if response else item.lane.name,
        "model": response.model if response else request.model,
        "queue_len": item.queue_len,
        "latency_ms": round(latency_ms, 3),
        "queue_ms": queue_ms,
        "attempts": attempts,
        "finish_reason": response.finish_reason if response else outcome,
        "outcome": outcome,
    }
    if error is None:
        log.info(
            "request %s request_id=%s provider=%s model=%s queue_len=%d latency_ms=%.1f queue_ms=%.1f "
            "attempts=%d finish_reason=%s", outcome, extra["request_id"], extra["provider"], extra["model"],
            extra["queue_len"], latency_ms, queue_ms, attempts, extra["finish_reason"], extra=extra,
        )
    else:
        extra["error"] = type(error).__name__
        log.warning(
            "request failed request_id=%s provider=%s model=%s queue_len=%d latency_ms=%.1f queue_ms=%.1f "
            "attempts=%d finish_reason=%s error=%s", extra["request_id"], extra["provider"], extra["model"],
            extra["queue_len"], latency_ms, queue_ms, attempts, outcome, extra["error"], extra=extra,
        )


class _DeadlineReaper:
    """One thread per executor that fails requests whose deadline passed (queued or running)."""

    def __init__(self, fail: Callable[[_Item], None]) -> None:
        self._fail = fail
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Weak references: a request resolved long before its deadline must not be kept alive
        # (with its response) by this heap; dead entries are skipped and compacted away.
        self._heap: list[tuple[float, int, weakref.ref[_Item]]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    def add(self, item: _Item, deadline: float | None = None) -> None:
        when = item.deadline if deadline is None else deadline
        assert when is not None
        with self._cond:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llm-executor-deadlines", daemon=True)
                self._thread.start()
            entry = (when, next(self._seq), weakref.ref(item))
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
            elif len(self._heap) > self._compact_at:
                # Amortised: compact only when the heap doubled since the last compaction.
                self._heap = [e for e in self._heap if (it := e[2]()) is not None and not it.settled]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait_s = self._heap[0][0] - time.monotonic()
                    if wait_s <= 0:
                        break
                    # Cap the wait: a deadline years away would overflow threading.TIMEOUT_MAX.
                    self._cond.wait(min(wait_s, 3600.0))
                if self._stopped:
                    return
                item = heapq.heappop(self._heap)[2]()
            if item is not None and not item.settled:
                try:
                    self._fail(item)
                except Exception:  # pragma: no cover - never let one request stop every deadline
                    log.exception("deadline handling failed for request %s", item.request.request_id)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


class Executor:
    """The entry point for LLM calls: ``submit`` returns a Future at once.

    Args:
        config: limits and providers; default ``ExecutorConfig.from_env()``.
        providers: custom or test providers by name (any object of the ``Provider`` protocol);
            they take precedence over built-in adapters of the same name. A custom provider with
            no ``ProviderConfig`` in ``config`` runs with the defaults.
        sleep: how retries wait (default: an interruptible wait); tests pass ``recorded.append``.

    Raises:
        ConfigError: a configured built-in provider has no adapter, or a backend is unreachable.
    """

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        providers: Mapping[str, Provider] | None = None,
        *,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.config = config if config is not None else ExecutorConfig.from_env()
        self._stopping = threading.Event()
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._seq = itertools.count()
        self._reaper = _DeadlineReaper(self._fail_on_deadline)
        self._lanes: dict[str, _Lane] = {}
        custom = dict(providers or {})
        names = list(self.config.providers) + [n for n in custom if n not in self.config.providers]
        try:
            for name in names:
                if name == "auto":
                    raise UnknownProviderError("auto", BUILTIN_PROVIDER_NAMES)
                pcfg = self.config.provider(name)
                if name in custom:
                    provider, builtin = custom[name], False
                    if not isinstance(provider, Provider):
                        raise InvalidRequestError(
                            f"providers[{name!r}] must have name, capabilities() and complete(request)",
                            field="providers",
                        )
                else:
                    provider, builtin = create_builtin(name, pcfg), True
                self._lanes[name] = _Lane(name, provider, pcfg, self.config, self._stopping, sleep, builtin)
            unknown = [n for n in self.config.fallbacks if n not in self._lanes]
            if unknown:
                raise ConfigError(
                    f"LLM_EXECUTOR_FALLBACKS={','.join(self.config.fallbacks)!r}: unknown provider "
                    f"{unknown[0]!r}; expected names of enabled providers: {', '.join(self._lanes)}")
        except BaseException:
            for lane in self._lanes.values():
                lane.pool.shutdown(wait=False)
                lane.limiter.close()
            raise
        self._exporter: PrometheusExporter | None = None

    # -- public API ------------------------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        """The enabled lane names, in configuration order."""
        return tuple(self._lanes)

    def capabilities(self, provider: str) -> Capabilities:
        """The cached capabilities of ``provider``'s adapter."""
        return self._lane(provider).caps

    def check_providers(self, timeout: float = 10.0) -> dict[str, tuple[bool, str]]:
        """Ask every lane's provider whether it answers (for ``llm-executor check``).

        Uses the adapter's ``health_check()`` (a models or version call) where it has one, else
        one tiny request through the lane (limits apply).

        Returns:
            {provider: (answered, description or error message)}.
        """
        out: dict[str, tuple[bool, str]] = {}
        for name, lane in self._lanes.items():
            probe = getattr(lane.provider, "health_check", None)
            try:
                if callable(probe):
                    out[name] = (True, str(probe()))
                else:
                    r = self.run(LLMRequest(name, lane.pcfg.model or "", "Reply with OK.", max_output_tokens=5,
                                            timeout=timeout), timeout=timeout)
                    out[name] = (True, f"answered with model {r.model!r} in {r.latency_ms:.0f} ms")
            except Exception as exc:  # reported, not raised: a check lists every provider
                out[name] = (False, f"{type(exc).__name__}: {exc}")
        return out

    def submit(self, request: LLMRequest) -> Future[LLMResponse]:
        """Accept ``request`` and return its Future at once.

        Raises:
            InvalidRequestError: a field is invalid (named in the message).
            UnknownProviderError: ``request.provider`` is not enabled.
            QueueFullError: the lane's queue is full (fail_fast, or block after block_timeout).
            ExecutorShutdownError: after ``shutdown()``.
        """
        return self._submit(request, block=self.config.backpressure == "block",
                            block_timeout=self.config.block_timeout)

    def run(self, request: LLMRequest, timeout: float | None = None) -> LLMResponse:
        """Submit ``request`` and wait for its response.

        Raises:
            TimeoutError: no result within ``timeout`` (the request is cancelled if still queued).
            Any error of ``submit`` or of the request.
        """
        future = self.submit(request)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def map(self, requests: Iterable[LLMRequest], timeout: float | None = None) -> Iterator[LLMResponse]:
        """Run ``requests`` and yield their responses in input order.

        The iterable is read lazily: at most ``queue_size`` requests (plus the lanes' workers) are
        outstanding, and submission waits for room instead of failing fast, so a long iterable
        never trips backpressure by itself. A failed request raises its error when reached;
        stopping the iteration cancels what has not started.

        Raises:
            TimeoutError: ``timeout`` seconds passed since the call before a response was ready.
        """
        window = self.config.queue_size or 256
        window += sum(lane.pcfg.max_parallel for lane in self._lanes.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._map(iter(requests), window, deadline)

    def _map(self, it: Iterator[LLMRequest], window: int, deadline: float | None) -> Iterator[LLMResponse]:
        pending: deque[Future[LLMResponse]] = deque()
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        request = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    try:
                        pending.append(self._submit(request, block=True, block_timeout=remaining))
                    except QueueFullError as exc:
                        if deadline is None:  # pragma: no cover - blocking without timeout never raises it
                            raise
                        raise TimeoutError(f"map() timeout passed while waiting for room: {exc}") from exc
                if not pending:
                    return
                future = pending.popleft()
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    response = future.result(remaining)
                except BaseException:
                    # Popped already: the finally below would not cancel it (cf. CPython gh-95166).
                    future.cancel()
                    raise
                yield response
        finally:
            for future in pending:
                future.cancel()

    def stats(self) -> ExecutorStats:
        """A snapshot of every lane (queue length, in flight, outcomes, latency, auditor)."""
        out: dict[str, ProviderStats] = {}
        for name, lane in self._lanes.items():
            with lane.lock:
                queued, submitted = lane.pending, lane.submitted
            out[name] = lane.metrics.snapshot(queued, submitted, lane.paused_until_wall())
        return ExecutorStats(out)

    def enable_prometheus(self, registry: Any = None, prefix: str = "llm_executor") -> PrometheusExporter:
        """Export this executor's metrics to Prometheus (needs the ``prometheus`` extra)."""
        if self._exporter is None:
            self._exporter = PrometheusExporter(
                self.stats, {n: lane.metrics for n, lane in self._lanes.items()}, registry, prefix
            )
        return self._exporter

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting requests; optionally cancel queued ones; optionally wait for the rest.

        Args:
            wait: join every worker thread (and release limiter resources) before returning.
            cancel_futures: cancel every request that has not started and interrupt retry
                backoffs and rate-limit waits (those requests fail with ExecutorShutdownError).
        """
        with self._shutdown_lock:
            self._shutdown = True
        for lane in self._lanes.values():
            with lane.lock:
                lane.closed = True
                lane.not_full.notify_all()
                for _ in range(lane.idle - lane.wakeups):
                    lane.wakeups += 1
                    lane.wake.put(None)
        if cancel_futures:
            self._stopping.set()
            for lane in self._lanes.values():
                with lane.lock:
                    items = [entry[2] for entry in lane.heap if entry[2].state == _QUEUED]
                for item in items:
                    if item.started:
                        # A fallback already running for the caller: it fails rather than hangs.
                        if lane.remove(item):
                            self._settle_error(item, ExecutorShutdownError("executor shut down"), 0.0, 0)
                    else:
                        item.future.cancel()
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None
        if wait:
            for lane in self._lanes.values():
                lane.pool.shutdown(wait=True)
            self._reaper.stop()
            for lane in self._lanes.values():
                lane.limiter.close()
        else:
            for lane in self._lanes.values():
                lane.pool.shutdown(wait=False)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Ctrl-C in the caller: do not make the user sit through the whole queue.
        self.shutdown(wait=True, cancel_futures=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    def __repr__(self) -> str:
        state = "shutdown" if self._shutdown else "running"
        return f"<Executor {state} providers={list(self._lanes)}>"

    # -- submission ------------------------------------------------------------------------------

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            raise UnknownProviderError(name, list(self._lanes))
        return lane

    def _prepare(self, request: LLMRequest) -> tuple[LLMRequest, _Lane, dict[str, Any] | None]:
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"submit() takes an LLMRequest, got {type(request).__name__}",
                                      field="request")
        request.validate()
        schema = None if request.json_schema is None else normalize_schema(request.json_schema)
        if request.provider == "auto":
            lane, model = self._choose_auto(request, schema, exclude=())
        else:
            lane = self._lane(request.provider)
            model = request.model or lane.pcfg.model or ""
            if not model and lane.builtin:
                raise InvalidRequestError(
                    f"LLMRequest.model is empty and LLM_EXECUTOR_{lane.name.upper()}_MODEL is not set: "
                    "expected a model name", field="model")
        r = request
        # A positional copy: dataclasses.replace costs 3x more on this hot path.
        request = LLMRequest(lane.name, model, r.prompt, r.system, r.max_output_tokens, r.temperature,
                             r.json_schema if schema is None else schema, r.request_id or _uuid4_hex(),
                             r.priority, r.timeout, r.metadata)
        check_capabilities(request, lane.caps, lane.name)
        if lane.pcfg.tpm is not None:
            lane.limiter.check_estimate(_limits.estimate_tokens(request.prompt, request.system,
                                                               request.max_output_tokens))
        return request, lane, schema

    def _capable(self, lane: _Lane, request: LLMRequest, schema: dict[str, Any] | None) -> str | None:
        """Why ``lane`` cannot serve ``request`` as "auto"/fallback, or None when it can."""
        is_configured = getattr(lane.provider, "is_configured", None)
        if callable(is_configured) and not is_configured():
            return f"{lane.name}: not configured (no API key)"
        if request.model and request.model in lane.caps.models:
            model = request.model
        elif lane.pcfg.model:
            model = lane.pcfg.model
        else:
            return f"{lane.name}: no default model (LLM_EXECUTOR_{lane.name.upper()}_MODEL)"
        cap = lane.caps.max_output_tokens_for(model)
        if request.max_output_tokens and cap is not None and request.max_output_tokens > cap:
            return f"{lane.name}: max_output_tokens above {cap}"
        if schema is not None and not (lane.caps.supports_json_schema or lane.caps.supports_json_mode):
            return f"{lane.name}: no JSON output"
        return None

    def _choose_auto(self, request: LLMRequest, schema: dict[str, Any] | None,
                     exclude: tuple[str, ...]) -> tuple[_Lane, str]:
        best: tuple[float, int, _Lane] | None = None
        reasons = []
        for idx, lane in enumerate(self._lanes.values()):
            if lane.name in exclude:
                continue
            why = self._capable(lane, request, schema)
            if why is not None:
                reasons.append(why)
                continue
            score = lane.expected_start_s()
            if best is None or (score, idx) < best[:2]:
                best = (score, idx, lane)
        if best is None:
            raise InvalidRequestError(
                "provider 'auto': no enabled provider can serve this request ("
                + ("; ".join(reasons) or "no providers enabled") + ")", field="provider")
        lane = best[2]
        model = request.model if request.model in lane.caps.models else (lane.pcfg.model or "")
        return lane, model

    def _submit(self, request: LLMRequest, *, block: bool, block_timeout: float | None) -> Future[LLMResponse]:
        if self._shutdown:
            raise ExecutorShutdownError("submit() after shutdown()")
        is_auto = request.provider == "auto"
        request, lane, schema = self._prepare(request)
        submit_s = time.monotonic()
        deadline = submit_s + request.timeout if request.timeout is not None else None
        future = _LLMFuture()
        item = _Item(request, future, lane, schema, submit_s, deadline)
        item.auto = is_auto
        with lane.lock:
            if not lane.has_room():
                if not block:
                    retry_after_s = lane.retry_after_estimate_s()
                    raise QueueFullError(
                        f"{lane.name} queue is full ({lane.capacity} requests waiting); retry after "
                        f"~{retry_after_s:.2f}s", retry_after_s=retry_after_s, provider=lane.name)
                if block_timeout is not None:
                    block_timeout = min(block_timeout, threading.TIMEOUT_MAX)
                if not lane.not_full.wait_for(lane.has_room, timeout=block_timeout):
                    raise QueueFullError(
                        f"{lane.name} queue still full ({lane.capacity} requests waiting) after "
                        f"{block_timeout}s (LLM_EXECUTOR_BLOCK_TIMEOUT)",
                        retry_after_s=lane.retry_after_estimate_s(), provider=lane.name)
            if lane.closed:
                raise ExecutorShutdownError("submit() after shutdown()")
            future._llm_item = item
            spawn = lane.push_locked(item, next(self._seq))
        try:
            if deadline is not None:
                self._reaper.add(item)
        finally:
            # Even if Ctrl-C lands here: push_locked counted a worker, so one must be started,
            # or the lane would wait forever for a worker that does not exist.
            if spawn:
                self._start_worker(lane)
        return future

    def _start_worker(self, lane: _Lane) -> None:
        try:
            lane.pool.submit(self._worker_loop, lane)
        except RuntimeError:
            # The pool is shut down (shutdown(wait=False) raced us): nothing will run the
            # queue, so fail what is left rather than strand it.
            with lane.lock:
                lane.workers -= 1
            self._drain_failed(lane)
        except BaseException:
            with lane.lock:
                lane.workers -= 1
            raise

    def _drain_failed(self, lane: _Lane) -> None:
        while True:
            with lane.lock:
                item = lane.pop_locked()
            if item is None:
                return
            if item.started or item.future.set_running_or_notify_cancel():
                self._settle_error(item, ExecutorShutdownError("executor shut down before the request started"),
                                   0.0, item.attempts_before)

    # -- workers -----------------------------------------------------------------------------

    def _worker_loop(self, lane: _Lane) -> None:
        # token_first: take the rate token before choosing the request, so the best request at
        # that moment goes. Not when the lane also waits for a global slot or TPM budget: a token
        # held through those waits would be spent late, bunching starts (review finding 4); the
        # token is then taken last, in _attempt.
        token_first = lane.limiter.is_limited and not lane.token_last
        first_token_ready = token_first or not lane.limiter.is_limited
        while True:
            item: _Item | None = None
            try:
                if token_first or lane.paused_until:
                    with lane.lock:
                        idle = not lane.pending
                    if idle and not lane.linger():
                        with lane.lock:
                            if not lane.pending:
                                lane.workers -= 1
                                return
                        continue
                    gate_error: BaseException | None = None
                    try:
                        self._wait_ready(lane, None, take_token=token_first)
                    except ExecutorShutdownError:
                        # Cancelling shutdown: it cancels the queue itself; leave now.
                        with lane.lock:
                            lane.workers -= 1
                        return
                    except Exception as exc:
                        # The limiter itself failed (e.g. a shared backend lost with fail_closed): the
                        # request this token was for fails with that error; the lane keeps going.
                        gate_error = exc if isinstance(exc, LLMExecutorError) else ProviderUnavailableError(
                            f"{lane.name} rate limiter failed: {type(exc).__name__}: {exc}",
                            provider=lane.name, retryable=False)
                    with lane.lock:
                        item = lane.pop_locked()
                    if item is None:
                        continue
                    if gate_error is not None:
                        if item.started or item.future.set_running_or_notify_cancel():
                            self._settle_error(item, gate_error, 0.0, item.attempts_before)
                        continue
                else:
                    # No rate limit, no pause: take the next request or leave, in one lock hold.
                    with lane.lock:
                        item = lane.pop_locked()
                    if item is None:
                        if lane.linger():
                            continue
                        with lane.lock:
                            if lane.pending:
                                continue  # arrived as we decided to leave: do not strand it
                            lane.workers -= 1
                            return
                # A fallback from another lane (started) already has a running Future.
                if item.started or item.future.set_running_or_notify_cancel():
                    self._execute(lane, item, token_taken=first_token_ready)
            except BaseException as exc:  # pragma: no cover - a bug here; fail the one request
                log.exception("lane %s worker: unexpected error", lane.name)
                if item is not None:
                    self._settle_error(item, exc, 0.0, 0)

    def _wait_ready(self, lane: _Lane, deadline: float | None, *, take_token: bool = True) -> None:
        """Wait out a lane pause, then (unless ``take_token`` is False) take one rate token."""
        pause_s = lane.paused_until - time.monotonic()
        if pause_s > 0:
            if deadline is not None and time.monotonic() + pause_s > deadline:
                raise DeadlineExceededError(
                    f"request deadline passes while {lane.name} is paused by a rate limit ({pause_s:.2f}s)",
                    provider=lane.name)
            lane.retry.sleep(pause_s)
            if self._stopping.is_set():
                raise ExecutorShutdownError(f"executor shut down while {lane.name} was paused")
        if take_token:
            lane.limiter.acquire(self._stopping, deadline)

    def _remaining_request(self, request: LLMRequest, deadline: float | None, lane: _Lane) -> LLMRequest:
        if deadline is None:
            return request
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(
                f"request {request.request_id} deadline of {request.timeout}s passed before an attempt "
                f"to {lane.name} could start", request_id=request.request_id, provider=lane.name)
        return dataclasses.replace(request, timeout=remaining)

    def _execute(self, lane: _Lane, item: _Item, *, token_taken: bool) -> None:
        """Run the attempts of ``item`` on ``lane`` and settle its Future (never raises)."""
        request = item.request
        start_s = time.monotonic()
        queue_ms = (start_s - item.submit_s) * 1000.0
        first_queue_ms: float | None = None
        if not item.started:
            item.started = True
            first_queue_ms = queue_ms
        attempts = item.attempts_before
        state = None
        repairs_left = lane.pcfg.repair_attempts
        prompt = request.prompt
        latency_ms = 0.0
        try:
            while True:
                if item.settled:
                    return  # the deadline reaper settled it (e.g. during a backoff): no more calls
                if self._stopping.is_set():
                    raise ExecutorShutdownError("executor shut down before the attempt started")
                if not token_taken:
                    self._wait_ready(lane, item.deadline, take_token=not lane.token_last)
                token_taken = False
                attempts += 1
                try:
                    outcome = self._attempt(lane, item, prompt, attempts > 1, first_queue_ms)
                    if outcome is None:
                        return  # settled by the deadline reaper while waiting for a slot or budget
                    response, latency_ms = outcome
                    first_queue_ms = None
                    if item.schema is not None:
                        data = parse_structured(response.text, item.schema, provider=lane.name,
                                                request_id=request.request_id)
                        response = dataclasses.replace(response, data=data)
                except SchemaValidationError as exc:
                    if repairs_left <= 0:
                        raise
                    repairs_left -= 1
                    # A repair is a new request to the provider: it takes a fresh token too.
                    prompt = _REPAIR_PROMPT.format(prompt=request.prompt, error=str(exc)[:500])
                    continue
                except ProviderError as exc:
                    if exc.provider is None:
                        exc.provider = lane.name
                    if exc.request_id is None:
                        exc.request_id = request.request_id
                    if not exc.retryable:
                        raise
                    if state is None:
                        state = lane.retry.new_state()
                        state.attempt_number = attempts
                    wait_s = lane.retry.next_wait(state, exc)
                    if wait_s is None:
                        if self._stopping.is_set():
                            # Retries were cut by a cancelling shutdown, not exhausted.
                            raise ExecutorShutdownError("executor shut down before a retry") from exc
                        raise
                    if exc.retry_after_s is not None and exc.status == 429:
                        lane.pause(wait_s)
                    if item.deadline is not None and time.monotonic() + wait_s > item.deadline:
                        raise DeadlineExceededError(
                            f"request {request.request_id} deadline of {request.timeout}s passes before the "
                            f"next attempt (backoff {wait_s:.2f}s after: {exc})",
                            request_id=request.request_id, provider=lane.name) from exc
                    if log.isEnabledFor(logging.WARNING):
                        log.warning("retrying request_id=%s provider=%s attempt=%d in %.2fs after %s",
                                    request.request_id, lane.name, attempts, wait_s, type(exc).__name__,
                                    extra={"request_id": request.request_id, "provider": lane.name,
                                           "attempts": attempts, "backoff_s": round(wait_s, 3),
                                           "error": type(exc).__name__})
                    if wait_s > 0 and not (exc.status == 429 and exc.retry_after_s is not None):
                        lane.retry.sleep(wait_s)
                    if self._stopping.is_set():
                        raise ExecutorShutdownError("executor shut down during a retry backoff") from exc
                    continue
                p = response
                response = LLMResponse(p.text, lane.name, p.model, p.finish_reason, p.usage_tokens,
                                       p.raw_finish_reason, p.prompt_tokens, p.completion_tokens,
                                       request.request_id, latency_ms, queue_ms, attempts, p.data)
                break
        except BaseException as exc:
            if self._try_fallback(lane, item, exc, attempts):
                return
            self._settle_error(item, exc, latency_ms, attempts, queue_ms)
            return
        if not _claim(item):
            return  # the deadline reaper failed it while the provider was still answering
        lane.metrics.on_success(latency_ms)
        item.future._llm_item = None
        try:
            item.future.set_result(response)
        except InvalidStateError:  # pragma: no cover - only settled after a claim
            pass
        if log.isEnabledFor(logging.INFO):
            _log_finish(item, response, "done", latency_ms, attempts)

    def _attempt(self, lane: _Lane, item: _Item, prompt: str, is_retry: bool,
                 queue_ms: float | None) -> tuple[LLMResponse, float] | None:
        """One provider call: global slot, TPM reservation, (rate token), call, metrics.

        Returns None when the request was settled (deadline) while waiting for the slot, the
        budget or the token: then the provider never sees it.
        """
        limiter = lane.limiter
        deadline = item.deadline
        release = limiter.acquire_slot(self._stopping, deadline) if lane.pcfg.global_max_parallel else None
        estimate = 0
        try:
            request = item.request
            if lane.pcfg.tpm is not None:
                estimate = _limits.estimate_tokens(prompt, request.system, request.max_output_tokens)
                limiter.reserve_tokens(estimate, self._stopping, deadline)
            if lane.token_last:
                limiter.acquire(self._stopping, deadline)
            if item.settled:
                if estimate:
                    limiter.settle_tokens(estimate, 0)
                return None
            # The time left is measured after the waits: it is the provider's HTTP timeout.
            call_request = self._remaining_request(request, deadline, lane)
            if prompt is not request.prompt:
                call_request = dataclasses.replace(call_request, prompt=prompt)
            metrics = lane.metrics
            metrics.on_attempt_start(is_retry, queue_ms)
            t0 = time.perf_counter()
            response: LLMResponse | None = None
            try:
                response = lane.provider.complete(call_request)
            finally:
                latency_ms = (time.perf_counter() - t0) * 1000.0
                if response is not None and isinstance(response, LLMResponse):
                    metrics.on_attempt_end(response.prompt_tokens, response.completion_tokens,
                                           response.usage_tokens)
                else:
                    metrics.on_attempt_end(None, None, None)
                if estimate:
                    limiter.settle_tokens(estimate, response.usage_tokens if isinstance(response, LLMResponse)
                                          else None)
                    estimate = 0
        finally:
            if release is not None:
                release()
        if not isinstance(response, LLMResponse):
            raise ProviderError(
                f"provider {lane.name!r} returned {type(response).__name__} from complete(), expected LLMResponse",
                provider=lane.name, request_id=request.request_id, retryable=False)
        return response, latency_ms

    def _try_fallback(self, lane: _Lane, item: _Item, exc: BaseException, attempts: int) -> bool:
        """Hand ``item`` to the next capable provider after a retryable failure; True if handed on."""
        if not isinstance(exc, ProviderError) or not exc.retryable or self._stopping.is_set():
            return False
        request = item.request
        if not (item.auto or lane.pcfg.fallback) or not self.config.fallbacks:
            return False
        tried = (*item.tried, lane.name)
        for name in self.config.fallbacks:
            target = self._lanes.get(name)
            if target is None or name in tried:
                continue
            if self._capable(target, request, item.schema) is not None:
                continue
            model = request.model if request.model in target.caps.models else (target.pcfg.model or "")
            moved = _Item(dataclasses.replace(request, model=model, provider=name), item.future, target,
                          item.schema, item.submit_s, item.deadline)
            moved.started = True
            moved.auto = item.auto
            moved.tried = tried
            moved.attempts_before = attempts
            with target.lock:
                if target.closed:
                    # Shutting down: the target's pool may already be joined; fail with the real error.
                    return False
                spawn = target.push_locked(moved, next(self._seq))
            lane.metrics.on_fallback()
            log.warning("request_id=%s falls back from %s to %s after %s", request.request_id, lane.name, name,
                        type(exc).__name__, extra={"request_id": request.request_id, "provider": lane.name,
                                                   "fallback": name, "error": type(exc).__name__})
            if spawn:
                self._start_worker(target)
            return True
        return False

    def _settle_error(self, item: _Item, exc: BaseException, latency_ms: float, attempts: int,
                      queue_ms: float = 0.0) -> None:
        if not _claim(item):
            return
        # Metrics before the Future: a caller woken by result() must find itself counted.
        item.lane.metrics.on_failure(exc)
        item.future._llm_item = None
        try:
            item.future.set_exception(exc)
        except InvalidStateError:  # pragma: no cover - only settled after a claim
            pass
        _log_finish(item, None, "error", latency_ms, attempts, error=exc)

    def _fail_on_deadline(self, item: _Item) -> None:
        lane = item.lane
        waited = time.monotonic() - item.submit_s
        request = item.request
        if lane.remove(item):
            if not item.started and not item.future.set_running_or_notify_cancel():
                return
            where = "in the queue"
        elif item.future.running():
            where = "while running"
        elif item.future.done():
            return
        else:
            # A worker has taken it but not yet passed set_running_or_notify_cancel(): failing
            # the still-PENDING Future now would break that gate (review finding 1). Look again
            # in a moment; the worker also refuses to start a request whose deadline passed.
            self._reaper.add(item, time.monotonic() + 0.005)
            return
        self._settle_error(item, DeadlineExceededError(
            f"request {request.request_id} to {lane.name} exceeded its timeout of {request.timeout}s "
            f"({waited:.2f}s {where})", request_id=request.request_id, provider=lane.name), 0.0, 0)
