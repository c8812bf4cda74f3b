"""The deadline reaper: one thread per executor that fails requests whose deadline passed.

It holds only weak references to requests (a request resolved long before its deadline must not
be kept alive, with its response, by this heap) and nothing of the executor: its thread cannot
keep a dropped Executor alive (issue 10, item 6 — as CPython's ``thread.py`` gives its workers
only a weakref). Where a request stands decides what happens at its deadline:

* queued: taken off its lane's heap (the slot frees at once) and failed without ever reaching
  the provider;
* started (a call running, a backoff, a wait for a token, or queued again on a fallback lane):
  failed now through the request's settle authority; the late answer, if any, is dropped;
* taken by a worker that has not yet passed the Future's gate: left to that worker, which
  checks the deadline before any call.
Imports: ``errors``, ``.request``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable

from ..errors import DeadlineExceededError
from .request import Request

__all__ = ["DeadlineReaper", "expire"]

log = logging.getLogger("llm_executor")


def expire(request: Request, clock: Callable[[], float]) -> None:
    """Fail ``request`` at its deadline, wherever it stands (see the module docstring)."""
    if request.settled:
        return
    dequeue = request.dequeue
    if dequeue is not None and dequeue(request):
        if not request.started and not request.future.set_running_or_notify_cancel():
            return  # the caller cancelled it first; the cancel path counted it
        where = "in the queue"
    elif request.started:
        where = "while running"
    else:
        return  # a worker holds it before its gate; it will not start a call past the deadline
    waited_s = clock() - request.submit_s
    request.fail(DeadlineExceededError(
        f"request {request.request_id} to {request.lane_name} exceeded its timeout of {request.request.timeout}s "
        f"({waited_s:.2f}s {where})", request_id=request.request_id, provider=request.lane_name))
    # A fallback may have been queued on another lane meanwhile: free that slot too.
    dequeue = request.dequeue
    if dequeue is not None:
        dequeue(request)


class DeadlineReaper:
    """Fails requests at their deadline (queued or running); one lazily started thread.

    Args:
        clock: monotonic seconds (deadlines are values of this clock).
        name: thread name.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "llm-executor-deadlines") -> None:
        self._clock = clock
        self._name = name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, weakref.ref[Request]]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._retiring = False  # guarded by _lock: leave once no live request is left
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def add(self, request: Request) -> None:
        """Watch ``request``'s deadline (it must have one)."""
        when = request.deadline
        assert when is not None
        with self._cond:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            entry = (when, next(self._seq), weakref.ref(request))
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
            elif len(self._heap) > self._compact_at:
                # Amortised: compact only when the heap doubled since the last compaction.
                self._heap = [e for e in self._heap if (r := e[2]()) is not None and not r.settled]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))

    def wake(self) -> None:
        """Look at the clock again now (a test clock moved)."""
        with self._cond:
            self._cond.notify()

    def retire(self) -> None:
        """Stop once every watched request has settled (``shutdown(wait=False)``: calls may run on)."""
        with self._cond:
            self._retiring = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._retiring:
                        self._heap = [e for e in self._heap if (r := e[2]()) is not None and not r.settled]
                        heapq.heapify(self._heap)
                        if not self._heap:
                            self._stopped = True
                            break
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait_s = self._heap[0][0] - self._clock()
                    if wait_s <= 0:
                        break
                    # Cap the wait: a deadline years away would overflow threading.TIMEOUT_MAX; a
                    # retiring reaper looks again each second for requests that settled meanwhile.
                    self._cond.wait(min(wait_s, 1.0 if self._retiring else 3600.0))
                if self._stopped:
                    return
                request = heapq.heappop(self._heap)[2]()
            if request is not None and not request.settled:
                try:
                    expire(request, self._clock)
                except Exception:  # pragma: no cover - never let one request stop every deadline
                    log.exception("deadline handling failed for request %s", request.request_id)
            del request

    def stop(self, wait: bool = True) -> None:
        """Stop the thread (joined unless called from it, or ``wait`` is False)."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()
