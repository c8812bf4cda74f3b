"""One provider's lane: the bounded heap, admission, worker accounting, the 429 pause.

Why a lane never over-fills: a ThreadPoolExecutor's own work queue is unbounded, so we never
hand it requests. The lane starts at most MAX_PARALLEL worker loops in its pool; each loop takes
the best request from the lane's bounded heap when it is ready to serve one, and leaves when
the heap stays empty for a moment. The heap is the only queue, and admission bounds it.

Worker accounting is the lane's alone and cannot drift (issue 11, item 5): a loop counts itself
``active`` when it starts *inside its own thread*, and refuses to run when MAX_PARALLEL loops are
active already. ``scheduled`` (loops handed to the pool, not yet started) only avoids starting
too many; if Ctrl-C lands while the pool starts a thread, at worst one extra loop is scheduled,
and it leaves at once. So MAX_PARALLEL holds whatever the pool's own bookkeeping believes.

Under ``MAX_PARALLEL=auto`` the cap moves (``limits.concurrency.GradientLimit``, fed by the
runner after every attempt): the pool is sized to the ceiling and ``max_parallel`` is the learned
value. A lower value never cancels a call: a loop over the cap leaves after its call ends, and
none starts past it; a higher value starts loops for requests already waiting.

Idle loops linger on a SimpleQueue (cheap to wake) for new work before giving their thread back:
a steady stream of requests then never pays a pool.submit() per request.

A busy worker takes its next request without the lane's lock (issue 10, overhead). Under the
GIL a Python lock shared by threads that take it per request convoys: a thread preempted while
holding it leaves the others to block, and each blocked one then owns the lock while it waits
for the GIL, so every later acquisition blocks too (1-2 context switches per request, half the
executor's overhead in ``scripts/bench.py``). So the queue is a heap plus a dict of the requests
queued here: ``heappop`` and ``dict.pop`` are single C calls, atomic under the GIL, and whoever
pops a request from the dict (a worker, a cancel, the reaper, a cancelling shutdown) owns it.
Everything else — pushes, admission, worker accounting, the idle/leave decision — stays under
the lock, and a loop decides to idle or leave only under it, after looking at the heap again, so
no push can be missed. A free-threaded build (no GIL) takes the lock for the pop as well.
Imports: ``config``, ``errors``, ``metrics``, ``limits``, ``retry``, ``providers.protocol``, ``.request``.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from ..config import ExecutorConfig, ProviderConfig, known
from ..errors import ExecutorShutdownError, QueueFullError
from ..limits.concurrency import GradientLimit
from ..metrics import GIL_ENABLED, LaneMetrics
from ..providers.protocol import Provider
from ..types import Capabilities
from .request import Request

if TYPE_CHECKING:
    from ..limits import LaneLimiter
    from ..limits.learn import RateLearner
    from ..retry import RetryPolicy

__all__ = ["LINGER_S", "Lane", "RoomWatcher"]

log = logging.getLogger("llm_executor")

# An idle worker waits this long for new work before giving its thread back to the pool.
LINGER_S = 0.05
# Before the first response, how long one provider call is assumed to take (for estimates).
_ASSUMED_CALL_S = 0.5
_heappop, _heappush = heapq.heappop, heapq.heappush


class RoomWatcher(Protocol):
    """An async caller waiting for a queue slot (``Executor.asubmit`` under "block" backpressure).

    Both methods are called under the lane's lock from whichever thread frees a slot: they must
    not block.
    """

    def alive(self) -> bool:
        """False once the caller stopped waiting (timed out, cancelled, its loop closed)."""

    def wake(self) -> bool:
        """Tell the caller a slot is free; False when it no longer waits (the wake goes on)."""


class Lane:
    """One provider's lane: heap, admission, workers, limiter, metrics, retry policy, pause.

    Args:
        name: the provider (lane) name.
        provider: the adapter or custom provider.
        pcfg / ecfg: the lane's and the executor's configuration.
        limiter: the lane's rate limits (``limits.make_lane_limiter``).
        retry: the lane's retry policy.
        builtin: the provider is a built-in adapter (it needs a model name).
        clock: monotonic seconds (injectable; deadlines and aging use it).
    """

    def __init__(self, name: str, provider: Provider, pcfg: ProviderConfig, ecfg: ExecutorConfig,
                 limiter: LaneLimiter, retry: RetryPolicy, builtin: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.provider = provider
        self.pcfg = pcfg
        self.builtin = builtin
        # QPS=auto (set by attach_learner): the learned pace keeps its fraction (limits.build_rates);
        # a configured one never allows more than itself in a 1 s window.
        self._qps_learned = False
        self.capacity = ecfg.queue_size
        self.aging_s = ecfg.priority_aging_s
        # MAX_PARALLEL=auto: the learner, on the real clock (attempt latencies are wall time).
        self.concurrency = (GradientLimit(pcfg.max_parallel_ceiling) if pcfg.max_parallel == "auto" else None)
        # The cap in force (guarded by lock when learned): loops running at once.
        self.max_parallel: int = (self.concurrency.value if self.concurrency is not None
                                  else int(pcfg.max_parallel))
        self.caps: Capabilities = provider.capabilities()
        self.limiter = limiter
        # No rate, budget or global cap: an attempt skips the reservation machinery entirely.
        self.unlimited = not limiter.is_limited
        self.retry = retry
        self.metrics = LaneMetrics(name, self.max_parallel, known(pcfg.qps))
        if self.concurrency is not None:
            self.metrics.on_learned("max_parallel", self.max_parallel, "configured",
                                    f"MAX_PARALLEL=auto, ceiling {pcfg.max_parallel_ceiling}")
        self.clock = clock
        self._remove = self.remove  # every queued request's ``dequeue``: one bound method, not one each
        self._reset_threading()
        self.submitted = 0  # guarded by lock; requests accepted from callers
        self.received = 0  # guarded by lock; requests handed over by another lane (fallbacks)
        # Token waits seen by workers (EWMA, seconds): "auto" routing reads this instead of asking
        # a shared store on the caller's thread (issue 11, item 3: submit() returns at once).
        self.token_wait_s = 0.0
        self.learner: RateLearner | None = None  # set by attach_learner when QPS/RPM/TPM is "auto"

    def attach_learner(self, learner: RateLearner) -> None:
        """Let ``learner`` set this lane's QPS/RPM/TPM: every change goes to ``pcfg`` (what the
        estimates read) and to the limiter (from its next call on)."""
        self.learner = learner
        self._qps_learned = "qps" in learner.auto
        learner.start()

    def apply_learned(self, cfg: ProviderConfig) -> None:
        """Use ``cfg``'s learned QPS/RPM/TPM (a concrete copy of the configured ProviderConfig)."""
        self.pcfg = cfg
        self.limiter.reconfigure(cfg, learned_qps=self._qps_learned)

    def _reset_threading(self) -> None:
        """Fresh locks, heap, counters and pool (at start, and in a forked child)."""
        self.pool = ThreadPoolExecutor(max_workers=self.pcfg.parallel_cap,
                                       thread_name_prefix=f"llm-executor-{self.name}")
        self.lock = threading.Lock()
        self.not_full = threading.Condition(self.lock)
        # The queue: heap entries (key, seq, request), possibly stale (a request removed or taken
        # stays until popped), and the requests queued here now, whose dict.pop decides who owns
        # one. Pushes and clears happen under lock; a busy worker pops without it (module doc).
        self.heap: list[tuple[float, int, Request]] = []
        self._queued: dict[Request, bool] = {}
        self.active = 0  # worker loops running (each counted by its own thread)
        self.scheduled = 0  # worker loops handed to the pool, not yet running
        self.idle = 0  # active loops lingering for work
        self.wakeups = 0  # wake tokens put for lingering loops, not yet taken
        self.wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.closed = False
        self.paused_until = 0.0  # clock value
        self._room_watchers: list[RoomWatcher] = []
        self._blocked = 0  # submitters waiting in not_full (guarded by lock)

    @property
    def pending(self) -> int:
        """Requests queued here, not taken yet (admission bounds it)."""
        return len(self._queued)

    # -- admission -----------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Room for one more request (caller holds ``lock``); a closed lane has room to say so.

        Workers take requests without the lock, so the count read here can only be too high,
        never too low: admission never overfills.
        """
        return self.closed or self.capacity == 0 or len(self._queued) < self.capacity

    def admit(self, request: Request, seq: int, *, block: bool, timeout_s: float | None,
              watcher: RoomWatcher | None = None) -> bool:
        """Queue a caller's request, applying backpressure.

        Args:
            request: the new request.
            seq: a tie-breaker, increasing in submission order.
            block: wait for room ("block" backpressure) instead of failing at once.
            timeout_s: the longest wait when blocking (None = forever).
            watcher: when the lane is full and not blocking, wake this caller when a slot frees
                (how async callers wait for room without blocking a thread).

        Returns:
            True when the caller must start a worker loop (``start_worker``).

        Raises:
            QueueFullError: the queue is full (at once, or after ``timeout_s``).
            ExecutorShutdownError: the lane is closed.
        """
        with self.lock:
            if not self.has_room():
                if not block:
                    if watcher is None:
                        raise self._queue_full(waited_s=None)
                    if len(self._room_watchers) >= 32:  # callers that gave up: forget them
                        self._room_watchers = [w for w in self._room_watchers if w.alive()]
                    self._room_watchers.append(watcher)
                    # A worker frees slots without the lock and wakes watchers only when it sees
                    # one: a slot freed before the append above is seen here instead.
                    if not self.has_room():
                        raise self._queue_full(waited_s=None)
                    self._room_watchers.remove(watcher)
                else:
                    if timeout_s is not None:
                        timeout_s = min(timeout_s, threading.TIMEOUT_MAX)
                    # Counted before wait_for looks at the room: a worker that frees a slot after
                    # that look sees this count and notifies (under the lock).
                    self._blocked += 1
                    try:
                        room = self.not_full.wait_for(self.has_room, timeout=timeout_s)
                    finally:
                        self._blocked -= 1
                    if not room:
                        raise self._queue_full(waited_s=timeout_s)
            if self.closed:
                raise ExecutorShutdownError("submit() after shutdown()")
            request.queue_len = self.pending
            self.submitted += 1
            return self._push_locked(request, seq)

    def offer(self, request: Request, seq: int, model: str) -> tuple[bool, bool]:
        """Take over a request another lane gives up on (a fallback), if there is room now.

        Never blocks: the caller is a worker of another lane. The request keeps its Future and
        its settle authority; it is re-pointed here under this lane's lock.

        Returns:
            (accepted, start a worker loop).
        """
        with self.lock:
            if self.closed or not self.has_room():
                return False, False
            request.move_to(self.name, self.metrics, model)
            self.received += 1
            return True, self._push_locked(request, seq)

    def _push_locked(self, request: Request, seq: int) -> bool:
        # Aging as a static key: priority p+1 counts as if submitted aging_s earlier, so a waiting
        # request gains one step per aging_s and the heap never needs re-sorting.
        key = request.submit_s - request.request.priority * self.aging_s
        request.dequeue = self._remove
        self._queued[request] = True  # before the push: a popped entry is always found queued
        _heappush(self.heap, (key, seq, request))
        if self.idle > self.wakeups:
            # A lingering loop takes it: cheaper than handing the pool a new loop. One wake-up per
            # request, so a burst still starts up to MAX_PARALLEL loops.
            self.wakeups += 1
            self.wake.put(None)
            return False
        if self.active + self.scheduled < self.max_parallel:
            self.scheduled += 1
            return True
        return False

    def _queue_full(self, waited_s: float | None) -> QueueFullError:
        retry_after_s = self.retry_after_estimate_s()
        if waited_s is None:
            message = (f"{self.name} queue is full ({self.capacity} requests waiting); a slot frees in "
                       f"~{retry_after_s:.2f}s. Ways out: Executor.map() (it waits for room), "
                       f"LLM_EXECUTOR_BACKPRESSURE=block, or a larger LLM_EXECUTOR_QUEUE_SIZE")
        else:
            message = (f"{self.name} queue still full ({self.capacity} requests waiting) after {waited_s}s "
                       f"(LLM_EXECUTOR_BLOCK_TIMEOUT); a slot frees in ~{retry_after_s:.2f}s")
        return QueueFullError(message, retry_after_s=retry_after_s, provider=self.name)

    def _room_freed_locked(self) -> None:
        if self._blocked:  # Condition.notify() costs ~0.5 µs per request; most lanes have no waiter
            self.not_full.notify()
        # One free slot wakes one async caller that still waits: one that gave up passes it on.
        while self._room_watchers:
            if self._room_watchers.pop(0).wake():
                return

    def pass_room(self) -> None:
        """An async caller woken for a slot gave up before taking it: wake the next one."""
        with self.lock:
            if self.has_room():
                self._room_freed_locked()

    # -- taking requests off the heap ----------------------------------------------------------

    def _take(self, locked: bool = False) -> Request | None:
        """Pop the best request queued here, or None when the heap is empty (no lock needed).

        Stale entries (requests removed, or taken by another lane after a fallback) are skipped;
        the dict decides who owns a request, so a cancel racing this pop cannot both win.
        ``locked``: the caller holds ``lock`` (a free-threaded build).
        """
        heap, queued = self.heap, self._queued
        while True:
            try:
                request = _heappop(heap)[2]
            except IndexError:
                return None
            if not queued.pop(request, False):
                continue  # not queued here any more (removed, or moved on)
            request.dequeue = None
            if locked:
                self._room_freed_locked()
            elif self._blocked or self._room_watchers:  # a racy read; the waiters re-check under the lock
                with self.lock:
                    self._room_freed_locked()
            if request.settled and request.started:
                continue  # a fallback the reaper already failed: drop it, its slot is free now
            return request

    def remove(self, request: Request) -> bool:
        """Take ``request`` out of the queue if it is still there (True: the caller owns it now)."""
        with self.lock:
            if not self._queued.pop(request, False):
                return False
            request.dequeue = None
            self._room_freed_locked()
            if not self._queued:
                self.heap.clear()
            return True

    def drain(self) -> list[Request]:
        """Take every queued request off the heap (a cancelling shutdown owns them then)."""
        with self.lock:
            out = []
            queued = self._queued
            for request in queued.copy():  # in submission order; a worker may pop some meanwhile
                if queued.pop(request, False):
                    request.dequeue = None
                    out.append(request)
            self.heap.clear()
            self.not_full.notify_all()
            self._fire_all_watchers_locked()
            return out

    # -- worker accounting ---------------------------------------------------------------------

    def worker_enter(self) -> bool:
        """Count the calling loop as active; False when it must leave at once (cap reached)."""
        with self.lock:
            if self.scheduled:
                self.scheduled -= 1
            if self.active >= self.max_parallel or (self.closed and not self.pending):
                return False
            self.active += 1
            return True

    def next_request(self) -> Request | None:
        """The next request for an active loop; None when the loop must leave (it is uncounted).

        A busy loop takes requests without the lock (module doc); it decides to idle or leave
        only under the lock, after looking at the heap again (pushes happen under it).
        """
        while True:
            if self.active > self.max_parallel:  # racy read; decided under the lock
                with self.lock:
                    if self.active > self.max_parallel:
                        self.active -= 1  # the learned cap fell: leave between calls, never during one
                        return None
            if GIL_ENABLED:  # heappop and dict.pop are atomic
                request = self._take()
            else:  # a free-threaded build
                with self.lock:
                    request = self._take(locked=True)
            if request is not None:
                return request
            with self.lock:
                if self.heap:
                    continue  # a push landed since the pop
                if self.closed:
                    self.active -= 1
                    return None
                self.idle += 1
            try:
                self.wake.get(timeout=LINGER_S)
                got = True
            except queue.Empty:
                got = False
            with self.lock:
                self.idle -= 1
                if got:
                    self.wakeups -= 1
                if self.heap or (got and not self.closed):
                    continue
                self.active -= 1
                return None

    def learn(self, latency_s: float, ok: bool, in_flight: int) -> int:
        """Feed one finished attempt to the learned cap (``MAX_PARALLEL=auto``; else a no-op).

        Args:
            latency_s: the attempt's duration.
            ok: False for an overload answer (429, 503, timeout, connection error).
            in_flight: attempts in flight when it ended, itself included.

        Returns:
            How many worker loops the caller must start (``start_worker``): the cap rose while
            requests wait. They are counted as scheduled already.
        """
        limit = self.concurrency
        if limit is None:
            return 0
        with self.lock:
            value = limit.on_sample(latency_s, ok, in_flight)
            if value is None:
                return 0
            self.max_parallel = value
            start = 0 if self.closed else max(0, min(self.pending - self.idle,
                                                     value - self.active - self.scheduled))
            self.scheduled += start
        # One INFO line per change of the integer cap (the float moves every window).
        self.metrics.on_learned("max_parallel", value, "gradient", limit.last_reason)
        return start

    def unschedule(self) -> None:
        """A loop handed to the pool did not start (the pool refused it, or Ctrl-C hit)."""
        with self.lock:
            if self.scheduled:
                self.scheduled -= 1

    def has_workers(self) -> bool:
        with self.lock:
            return bool(self.active or self.scheduled)

    # -- shutdown --------------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new requests; wake blocked submitters, async watchers and lingering loops."""
        with self.lock:
            self.closed = True
            self.not_full.notify_all()
            self._fire_all_watchers_locked()
            for _ in range(self.idle - self.wakeups):
                self.wakeups += 1
                self.wake.put(None)

    def _fire_all_watchers_locked(self) -> None:
        watchers, self._room_watchers = self._room_watchers, []
        for watcher in watchers:
            watcher.wake()

    def discard_after_fork(self) -> int:
        """In a forked child: forget the parent's queue and threads; returns the queue length."""
        dropped = self.pending
        self._reset_threading()
        self.metrics.after_fork()
        self.token_wait_s = 0.0
        return dropped

    # -- pause after a 429 ------------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Hold every worker of this lane for ``seconds`` (the provider said 429 + Retry-After)."""
        until = self.clock() + seconds
        with self.lock:
            if until <= self.paused_until:
                return
            self.paused_until = until
        log.warning("lane %s paused for %.2fs after a rate-limit answer", self.name, seconds,
                    extra={"provider": self.name, "pause_s": round(seconds, 3)})

    def pause_remaining_s(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def paused_until_wall(self) -> float | None:
        remaining = self.paused_until - self.clock()
        return time.time() + remaining if remaining > 0 else None

    # -- estimates (no I/O, no provider call) ----------------------------------------------------

    def note_token_wait(self, waited_s: float) -> None:
        """Fold a worker's rate-token wait into the estimate "auto" routing reads."""
        self.token_wait_s += 0.2 * (waited_s - self.token_wait_s)

    def _call_s(self) -> float:
        return self.metrics.mean_latency_s() or _ASSUMED_CALL_S

    def retry_after_estimate_s(self) -> float:
        """Until the next queue slot frees (the next start), for QueueFullError.retry_after_s.

        A slot frees when a worker takes the next request: with every worker busy, about one
        call time divided by MAX_PARALLEL (the learned value under "auto"); under a QPS, at least
        1/QPS. Before the first response the call time is assumed (0.5 s) — not the whole queue's
        drain time, which swung the estimate 80× (issue 14).
        """
        by_workers = self._call_s() / self.max_parallel
        qps = known(self.pcfg.qps)
        by_rate = 1.0 / qps if qps else 0.0
        return round(max(0.05, by_workers, by_rate, self.pause_remaining_s()), 3)

    def expected_start_s(self) -> float:
        """Expected wait before a new request would start here (for provider "auto")."""
        call_s = self._call_s()
        with self.lock:
            backlog = self.pending + self.metrics.in_flight - self.max_parallel + 1
            pending = self.pending
        by_workers = max(0.0, backlog / self.max_parallel * call_s)
        qps = known(self.pcfg.qps)
        by_rate = (pending / qps) if qps else 0.0
        # The store's last answer (no I/O): an hour while a fail_closed store is lost, so "auto"
        # steers away from a lane that cannot start anything.
        token_wait_s = max(self.token_wait_s, self.limiter.last_known_wait_s())
        return max(by_workers, by_rate) + self.pause_remaining_s() + token_wait_s
