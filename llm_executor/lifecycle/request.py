"""One accepted request: its Future, its one settle authority, and its structured log line.

A request is settled exactly once, by whoever wins ``Request.claim()`` — the attempt runner (a
response or an error), the deadline reaper, or a cancelling shutdown — and the same ``Request``
travels with the call across fallbacks, so every party asks the same authority. Metrics are
recorded before the Future is resolved (a caller woken by ``result()`` finds itself counted),
and a metrics listener that raises cannot strand the Future.

Two gates, as in ``concurrent.futures``:

* A *queued* request (its Future PENDING) belongs to whoever takes it off its lane's heap (a
  worker, the reaper, a cancelling shutdown; ``dequeue`` below). That party then calls
  ``future.set_running_or_notify_cancel()``; False means the caller cancelled it first, and the
  cancel path has already counted it.
* A *started* request (Future RUNNING) is settled by whoever wins ``claim()``.

``LLMFuture.cancel()`` frees the request's queue slot and counts the cancellation *before* it
runs the done-callbacks, so a callback that resubmits finds the room it just made (issue 10).
The request reaches its lane only through ``dequeue``, a callback the lane sets when it queues
the request: this module imports neither the lane nor the runner.
Imports: ``types``, ``errors``, ``metrics``, ``window`` (its ``WAKE_S``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

from ..metrics import LaneMetrics
from ..types import LLMRequest, LLMResponse
from ..window import WAKE_S

__all__ = ["LLMFuture", "Request", "log_finish"]

log = logging.getLogger("llm_executor")


class Request:
    """An accepted request on its way through one or more lanes (~300 bytes with its lock).

    Attributes:
        request: the caller's LLMRequest, as given.
        request_id / model: resolved at submit (a uuid4 for ""; the lane's default model).
        lane_name / metrics: the lane that holds it now (changes on a fallback).
        schema: the parsed JSON schema, or None.
        submit_s / deadline: clock values; deadline None without ``request.timeout``.
        auto: submitted with provider "auto" (may fall back without ``fallback=True``).
        queue_len: requests waiting in its first lane when it was admitted.
        started: its Future is RUNNING (set once, by the first worker to take it).
        queue_ms: submit to the first attempt's start.
        attempts: provider calls made for it, on every lane (retries, repairs, fallbacks).
        tried: lanes it left after retryable failures.
        dequeue: the holding lane's ``remove``; set while queued, else None (the lane's own
            dict of queued requests says who owns it; see ``lane``).
    """

    __slots__ = (
        "__weakref__", "_lock", "_settled", "attempts", "auto", "deadline", "dequeue", "future", "lane_name",
        "metrics", "model", "queue_len", "queue_ms", "request", "request_id", "schema",
        "started", "submit_s", "tried",
    )

    def __init__(self, request: LLMRequest, request_id: str, model: str, lane_name: str, metrics: LaneMetrics,
                 schema: dict[str, Any] | None, submit_s: float, deadline: float | None, auto: bool) -> None:
        self.request = request
        self.request_id = request_id
        self.model = model
        self.lane_name = lane_name
        self.metrics = metrics
        self.schema = schema
        self.submit_s = submit_s
        self.deadline = deadline
        self.auto = auto
        self.queue_len = 0
        self.started = False
        self.queue_ms = 0.0
        self.attempts = 0
        self.tried: tuple[str, ...] = ()
        self.dequeue: Callable[[Request], bool] | None = None
        self._lock = threading.Lock()
        self._settled = False
        self.future = LLMFuture(self)

    # -- the settle authority ------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """True once a party has claimed the right to settle (it may not have finished yet)."""
        return self._settled

    def claim(self) -> bool:
        """Take the one right to settle this request; False when another party has it."""
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            return True

    def succeed(self, response: LLMResponse) -> bool:
        """Settle with ``response`` (already completed); False when another party settled first."""
        if not self.claim():
            return False
        self.future._request = None
        try:
            self.metrics.on_success(response.latency_ms)
        finally:
            self.future.set_result(response)
        if log.isEnabledFor(logging.INFO):
            log_finish(self, response, "done", response.latency_ms)
        return True

    def fail(self, error: BaseException, latency_ms: float = 0.0) -> bool:
        """Settle with ``error``; False when another party settled first."""
        if not self.claim():
            return False
        self.future._request = None
        try:
            self.metrics.on_failure(error)
        finally:
            self.future.set_exception(error)
        log_finish(self, None, "error", latency_ms, error)
        return True

    def cancel_removed(self) -> None:
        """Cancel a not-started request its remover took off the heap (a cancelling shutdown)."""
        self.future.cancel()
        # The remover owns the gate: move CANCELLED to CANCELLED_AND_NOTIFIED, so wait() and
        # as_completed() count it (the user's own cancel() found it gone and left this to us).
        self.future.set_running_or_notify_cancel()

    def _cancelled_by_caller(self) -> bool:
        """Free the slot and count a caller's cancel; True when it was taken off the heap here."""
        dequeue = self.dequeue
        removed = dequeue is not None and dequeue(self)
        with self._lock:
            self._settled = True
        self.metrics.on_cancel()
        log_finish(self, None, "cancelled", 0.0)
        return removed

    # -- moving between lanes ------------------------------------------------------------------

    def move_to(self, lane_name: str, metrics: LaneMetrics, model: str) -> None:
        """Hand the request to another lane (a fallback): it keeps its Future and its authority."""
        self.tried = (*self.tried, self.lane_name)
        self.lane_name = lane_name
        self.metrics = metrics
        self.model = model


class _Condition(threading.Condition):
    """The stock ``threading.Condition`` over an RLock, minus five objects per instance.

    ``Condition.__init__`` binds five methods of its lock to the instance (acquire, release and
    three used by ``wait``): five objects the cyclic GC tracks, per Future. With thousands of
    Futures alive that made building one ~3x dearer (GC passes over them), 2 µs of every submit.
    Here they are looked up on the lock when used (only ``wait`` and ``notify`` use them, and
    ``concurrent.futures.wait``'s acquire/release); the behaviour is the stock Condition's.
    Used only where ``_LEAN_FUTURES`` found the stock classes built as expected.
    """

    _lock: Any
    _waiters: Any

    def __init__(self) -> None:  # the stock __init__ is what this replaces
        self._lock = threading.RLock()
        # Memory per queued request (target ≤ 2 KB): the stock waiter deque preallocates a 64-slot
        # block (~760 B) that almost no Future ever uses. Condition only appends to, indexes [0]
        # and removes from _waiters, which a list does as well at 56 B.
        self._waiters = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)  # type: ignore[no-any-return]

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[no-any-return]


def _lean_futures_fit() -> bool:
    """True when a stock Future and its Condition hold exactly what ``LLMFuture`` builds itself.

    A Python whose Future or Condition keeps other state gets the stock constructors instead.
    """
    try:
        probe = Future()  # type: ignore[var-annotated]
        condition: Any = probe._condition  # type: ignore[attr-defined]
        lock = condition._lock
        return (set(vars(probe)) == {"_condition", "_state", "_result", "_exception", "_waiters",
                                     "_done_callbacks"}
                and type(condition) is threading.Condition
                and set(vars(condition)) == {"_lock", "acquire", "release", "_release_save", "_acquire_restore",
                                             "_is_owned", "_waiters"}
                and type(lock) is type(threading.RLock())
                and all(hasattr(lock, name) for name in ("_release_save", "_acquire_restore", "_is_owned")))
    except Exception:  # pragma: no cover - another Python's internals
        return False


_LEAN_FUTURES = _lean_futures_fit()


_DONE = frozenset((FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED))


class LLMFuture(Future[LLMResponse]):
    """A Future whose ``cancel()`` frees the request's queue slot before running callbacks."""

    _request: Request | None

    def __init__(self, request: Request) -> None:
        if _LEAN_FUTURES:
            # Future.__init__, with the lean Condition (see ``_Condition``).
            self._condition = _Condition()
            self._state = PENDING
            self._result = None
            self._exception = None
            self._waiters: list[Any] = []
            self._done_callbacks: list[Any] = []
        else:  # pragma: no cover - another Python's Future
            super().__init__()
            condition = self._condition
            waiters = getattr(condition, "_waiters", None)
            if type(waiters) is deque and not waiters:
                condition._waiters = []  # type: ignore[attr-defined]
        self._request = request

    def result(self, timeout: float | None = None) -> LLMResponse:
        """As ``Future.result``; without a timeout it waits in ``WAKE_S`` slices, so a Ctrl-C
        is seen at once (see ``window.WAKE_S``), not when the request ends."""
        if timeout is None and self._state not in _DONE:
            self._wait_done()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As ``Future.exception``, waiting as ``result`` does."""
        if timeout is None and self._state not in _DONE:
            self._wait_done()
        return super().exception(timeout)

    def _wait_done(self) -> None:
        with self._condition:
            while self._state not in _DONE:
                self._condition.wait(WAKE_S)

    def cancel(self) -> bool:
        """Cancel the request if it has not started (then the provider never sees it).

        As ``Future.cancel``, but the queue slot is free and the cancellation counted in
        ``stats()`` before any done-callback runs.
        """
        with self._condition:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
            request, self._request = self._request, None
        if request is not None and request._cancelled_by_caller():
            # Taken off the heap here, so no worker will pass this Future through the gate:
            # without it, wait()/as_completed() would never count it as done.
            self.set_running_or_notify_cancel()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True


def log_finish(request: Request, response: LLMResponse | None, outcome: str, latency_ms: float,
               error: BaseException | None = None) -> None:
    """The one structured log line of a finished request (INFO on success, else WARNING)."""
    level = logging.INFO if error is None and outcome == "done" else logging.WARNING
    if outcome == "cancelled":
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    queue_ms = round(request.queue_ms, 3)
    extra = {
        "request_id": request.request_id,
        "provider": response.provider if response else request.lane_name,
        "model": response.model if response else request.model,
        "queue_len": request.queue_len,
        "latency_ms": round(latency_ms, 3),
        "queue_ms": queue_ms,
        "attempts": request.attempts,
        "finish_reason": response.finish_reason if response else outcome,
        "outcome": outcome,
    }
    if error is None:
        log.log(
            level,
            "request %s request_id=%s provider=%s model=%s queue_len=%d latency_ms=%.1f queue_ms=%.1f "
            "attempts=%d finish_reason=%s", outcome, extra["request_id"], extra["provider"], extra["model"],
            extra["queue_len"], latency_ms, queue_ms, request.attempts, extra["finish_reason"], extra=extra,
        )
    else:
        extra["error"] = type(error).__name__
        log.warning(
            "request failed request_id=%s provider=%s model=%s queue_len=%d latency_ms=%.1f queue_ms=%.1f "
            "attempts=%d finish_reason=%s error=%s", extra["request_id"], extra["provider"], extra["model"],
            extra["queue_len"], latency_ms, queue_ms, request.attempts, outcome, extra["error"], extra=extra,
        )
