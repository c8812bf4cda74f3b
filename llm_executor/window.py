"""One windowed, lazy submission loop: feed an iterable to a submit callable, a window at a time.

``Executor.map`` and ``phases.fan_out`` both read a possibly endless iterable, turn each item into
a request, submit it and hand the outcomes back. Both must hold at most a window of outstanding
requests (a 100k-item input submitted at once fills the admission queue and trips fail-fast
backpressure), keep going past one bad item when asked to, honour a ``concurrent.futures``-style
overall ``timeout`` and cancel what has not started when the caller stops. ``SubmissionWindow`` is
that loop, written once.

It sees the executor only through the ``Submit`` seam — ``submit(request, *, block, block_timeout)
-> Future`` — so it is tested with a fake submit, and a submit that ignores ``block`` and raises
``QueueFullError`` at once (the public ``Executor.submit`` under fail-fast) works too: the window
then waits for one of its own requests to finish, or for the error's ``retry_after_s``, and
submits the same request again.

Imports: the stdlib and ``errors`` only (tqdm lazily, for the optional progress bar).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import Future, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, cast

from .errors import QueueFullError

__all__ = ["Settled", "Submit", "SubmissionWindow"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Q = TypeVar("Q")
R = TypeVar("R")
Q_contra = TypeVar("Q_contra", contravariant=True)

# QueueFullError.retry_after_s is an estimate, and before any request has finished it can be far
# off (issue 14 saw 25 s for a slot that freed 0.03 s later): with no Future of our own to wait
# for, look again at least this often.
_MAX_NAP_S = 0.5
_DEFAULT_NAP_S = 0.05  # a QueueFullError without a hint
# The longest single wait for an outcome (here and in ``LLMFuture.result``). A Ctrl-C whose
# signal lands after the main thread has let go of the GIL but before it blocks in the lock's
# wait is only seen when that wait ends (CPython checks for signals on EINTR, and the signal has
# come and gone): an unbounded wait could hold the KeyboardInterrupt until the next request
# finishes, minutes later. Seen under load: 10 s late, so a request that should have been
# cancelled started.
WAKE_S = 0.25


class Submit(Protocol[Q_contra, R]):
    """The seam to the executor: ``Executor._submit`` has this shape.

    ``block=True`` asks the callee to wait for admission up to ``block_timeout`` seconds (None: no
    limit) and raise ``QueueFullError`` only then; a callee that cannot block raises it at once. Any
    other exception means this request was refused (an invalid field, an unknown provider, shutdown).
    """

    def __call__(self, request: Q_contra, /, *, block: bool, block_timeout: float | None) -> Future[R]: ...


@dataclass(frozen=True, slots=True)
class Settled(Generic[T, R]):
    """One item's outcome.

    Attributes:
        index: the item's position in the input (0-based).
        item: the item as read from the input.
        future: its Future; done when yielded by ``in_order``/``as_completed``. An item that
            ``make_request`` or ``submit`` rejected (with ``isolate_errors``) has a Future that
            holds that exception; one handed back by ``close()`` may be cancelled or still running.
    """

    index: int
    item: T
    future: Future[R]


class SubmissionWindow(Generic[T, Q, R]):
    """Submit ``items`` lazily through ``submit``, at most ``window`` outstanding, and yield outcomes.

    Contract:

    * ``items`` is read only as room frees up: at most ``window`` items are submitted and not yet
      yielded at any time, and an item is read only when it can be submitted next.
    * ``make_request(item)`` is called once per item, in input order, in the iterating thread.
    * ``submit`` is called with ``block=block`` and ``block_timeout`` = the time left of ``timeout``
      (None without one). A ``QueueFullError`` is not an outcome: the window waits for one of its
      own Futures to finish (or ``retry_after_s``, at most 0.5 s, when it has none) and submits the
      same request again, until ``timeout``.
    * An exception from ``make_request`` or ``submit`` (an ``Exception``, not ``QueueFullError``):
      with ``isolate_errors`` it fails that item's own Future, which is yielded in its place, and the
      loop goes on; without, it propagates from the iterator (earlier items stay outstanding until
      ``close()``).
    * ``timeout`` (seconds, from construction) works as in ``concurrent.futures.Executor.map``: an
      outcome that is ready is yielded even after it passed; waiting for one that is not raises
      ``TimeoutError`` from the iterator. ``close()`` then hands back every outstanding item (the
      one being submitted when time ran out has a Future failed with ``TimeoutError``).
    * ``close()`` (also on leaving the iterator early, on any exception in it, and on ``__exit__``)
      cancels every outstanding Future that has not started, so the provider never sees it, and
      returns all outstanding items in input order, so a caller can keep what finished meanwhile.
      An item interrupted (KeyboardInterrupt) while being built or submitted comes back with a
      cancelled Future. Idempotent: later calls return the same list.
    * Progress: ``progress`` (a description, or True) shows a ``tqdm.auto`` bar that ticks once per
      yielded outcome; it hides itself when stderr is not a terminal.

    One iteration per window: call ``in_order()`` (outcomes in input order, like ``map``) or
    ``as_completed()`` (as they finish; those finishing together in input order), once, from one thread.

    Args:
        items: the input; a ``Sized`` one gives the bar its total.
        submit: see ``Submit``.
        make_request: builds the request of one item; None submits the items themselves.
        window: the most outstanding items (>= 1).
        block: passed to ``submit``.
        timeout: seconds for the whole iteration, from construction; None = no limit.
        isolate_errors: a bad item fails its own Future instead of the loop.
        progress: tqdm description (True: ``unit``); None/False: no bar.
        total: the bar's total when ``items`` has no ``len``.
        unit: the bar's unit, and the word used in messages.
        label: names the caller in timeout messages ("map()", "fan-out").
        clock: monotonic seconds; tests pass a fake one.

    Raises:
        ValueError: ``window`` < 1 or ``timeout`` < 0.
    """

    def __init__(
        self,
        items: Iterable[T],
        submit: Submit[Q, R],
        make_request: Callable[[T], Q] | None = None,
        *,
        window: int,
        block: bool = True,
        timeout: float | None = None,
        isolate_errors: bool = False,
        progress: str | bool | None = None,
        total: int | None = None,
        unit: str = "item",
        label: str = "window",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if total is None and isinstance(items, Sized):
            total = len(items)
        self._it = iter(items)
        self._submit = submit
        self._make_request = make_request
        self._window = window
        self._block = block
        self._timeout = timeout
        self._isolate = isolate_errors
        self._label = label
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._progress, self._total, self._unit = progress, total, unit
        self._bar: Any = None
        # Outstanding items by Future, in input order; ``_order``: the same Futures in a deque (in_order only).
        self._outstanding: dict[Future[R], Settled[T, R]] = {}
        self._order: deque[Future[R]] = deque()
        self._finished: queue.SimpleQueue[Future[R]] = queue.SimpleQueue()  # fed by done-callbacks
        self._held: tuple[int, T, Q] | None = None  # read and built, refused by a full queue
        self._building: tuple[int, T] | None = None  # read, request being built
        self._read = 0
        self._exhausted = False
        self._started = False
        self._ordered = False
        self._closed: list[Settled[T, R]] | None = None
        self._nap = threading.Event()  # never set: an interruptible sleep

    # -- public ----------------------------------------------------------------------------------

    @property
    def read(self) -> int:
        """Items read from the input so far (the next item's index)."""
        return self._read

    def in_order(self) -> Iterator[Settled[T, R]]:
        """Yield every item's outcome in input order (each Future done)."""
        return self._run(ordered=True)

    def as_completed(self) -> Iterator[Settled[T, R]]:
        """Yield every item's outcome as it finishes (each Future done)."""
        return self._run(ordered=False)

    def close(self) -> list[Settled[T, R]]:
        """Cancel what has not started; return every outstanding item, in input order."""
        if self._closed is not None:
            return self._closed
        for future in self._outstanding:
            future.cancel()  # False for a running or finished one: it is handed back as it is
        left = sorted(self._outstanding.values(), key=lambda s: s.index)
        for pending in (self._building, self._held[:2] if self._held is not None else None):
            if pending is not None:
                left.append(Settled(pending[0], pending[1], _cancelled_future()))
        self._outstanding.clear()
        self._order.clear()
        self._held = self._building = None
        self._closed = sorted(left, key=lambda s: s.index)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return self._closed

    def __enter__(self) -> SubmissionWindow[T, Q, R]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self, *, ordered: bool) -> Iterator[Settled[T, R]]:
        if self._started:
            raise RuntimeError("a SubmissionWindow is iterated once")
        self._started = True
        self._ordered = ordered
        self._bar = _progress_bar(self._progress, self._total, self._unit)
        try:
            while True:
                hint_s = self._fill()
                if not self._outstanding and self._held is None and self._exhausted:
                    return
                done = self._harvest(ordered, hint_s)
                if not done and self._expired():
                    self._expire()
                for settled in done:
                    if self._bar is not None:
                        self._bar.update(1)
                    yield settled
        finally:
            self.close()

    def _remaining_s(self) -> float | None:
        return None if self._deadline is None else self._deadline - self._clock()

    def _expired(self) -> bool:
        remaining = self._remaining_s()
        return remaining is not None and remaining <= 0

    def _fill(self) -> float | None:
        """Submit until the window is full; the wait hint when the queue refused the next request."""
        while len(self._outstanding) < self._window and not self._expired():
            if self._held is None:
                try:
                    item = next(self._it)
                except StopIteration:
                    self._exhausted = True
                    return None
                index = self._read
                self._read += 1
                self._building = (index, item)
                try:
                    request = cast(Q, item) if self._make_request is None else self._make_request(item)
                except Exception as exc:  # a bad item: its own Future, or the loop's error
                    self._building = None
                    self._fail_item(index, item, exc)
                    continue
                self._building = None
                self._held = (index, item, request)
            index, item, request = self._held
            try:
                future = self._submit(request, block=self._block, block_timeout=self._block_timeout())
            except QueueFullError as exc:
                # Someone else fills the lane too (or we cannot block): wait for room, then again.
                hint = exc.retry_after_s
                return _DEFAULT_NAP_S if hint is None or hint <= 0 else hint
            except Exception as exc:
                self._held = None
                self._fail_item(index, item, exc)
                continue
            self._held = None
            self._add(Settled(index, item, future))
        return None

    def _block_timeout(self) -> float | None:
        remaining = self._remaining_s()
        return None if remaining is None else max(0.0, remaining)

    def _fail_item(self, index: int, item: T, exc: Exception) -> None:
        if not self._isolate:
            raise exc
        failed: Future[R] = Future()
        failed.set_exception(exc)
        self._add(Settled(index, item, failed))

    def _add(self, settled: Settled[T, R]) -> None:
        self._outstanding[settled.future] = settled
        if self._ordered:
            self._order.append(settled.future)
        settled.future.add_done_callback(self._finished.put)

    def _harvest(self, ordered: bool, hint_s: float | None) -> list[Settled[T, R]]:
        """Wait for outcomes (bounded by the deadline, and by ``hint_s`` when a request is held)."""
        remaining = self._remaining_s()
        wait_s = WAKE_S if remaining is None else min(max(0.0, remaining), WAKE_S)
        if hint_s is not None:
            wait_s = min(hint_s, _MAX_NAP_S, wait_s)
        if not self._outstanding:  # nothing of ours can free room: someone else's requests must
            if hint_s is not None and wait_s > 0:
                self._nap.wait(wait_s)
            return []
        if ordered and hint_s is None:
            wait([self._order[0]], timeout=wait_s)
        else:
            # Any of ours finishing frees room for the held request (or is an outcome, unordered).
            try:
                first = self._finished.get(timeout=wait_s) if wait_s != 0 else self._finished.get_nowait()
            except queue.Empty:
                first = None
            if first is not None and not ordered:
                return self._drain(first)
        if ordered:
            self._drain_signals()
            out = []
            while self._order and self._order[0].done():
                out.append(self._outstanding.pop(self._order.popleft()))
            return out
        return self._drain(None)

    def _drain(self, first: Future[R] | None) -> list[Settled[T, R]]:
        futures = [] if first is None else [first]
        while True:
            try:
                futures.append(self._finished.get_nowait())
            except queue.Empty:
                break
        out = [s for s in (self._outstanding.pop(f, None) for f in futures) if s is not None]
        return sorted(out, key=lambda s: s.index)

    def _drain_signals(self) -> None:
        # in_order pops from ``_order``; the done-callback queue only wakes the held-request wait.
        while True:
            try:
                self._finished.get_nowait()
            except queue.Empty:
                return

    def _expire(self) -> None:
        """The timeout passed with no outcome ready: the held request fails, the iterator raises."""
        message = f"{self._label} timeout of {self._timeout}s passed before every {self._unit} finished"
        if self._held is not None:
            index, item, _ = self._held
            self._held = None
            late: Future[R] = Future()
            late.set_exception(TimeoutError(message))
            self._add(Settled(index, item, late))
        raise TimeoutError(message)


def _cancelled_future() -> Future[Any]:
    future: Future[Any] = Future()
    future.cancel()
    return future


def _progress_bar(progress: str | bool | None, total: int | None, unit: str) -> Any:
    """A tqdm.auto bar on stderr (rate and ETA), or None; tqdm hides itself when stderr is no TTY."""
    if progress is None or progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never worth a crash
        return None
    desc = f"{unit}s" if progress is True else str(progress)
    # In a Jupyter kernel stderr is no TTY, yet a bar is wanted: tqdm.auto draws a widget, or a
    # text bar when ipywidgets is missing, but only if it is not disabled for the missing TTY.
    in_kernel = _in_jupyter_kernel()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=False if in_kernel else None,
                dynamic_ncols=True, smoothing=0.1)


def _in_jupyter_kernel() -> bool:
    """True when running in a Jupyter kernel (IPython's ZMQ shell), not merely with IPython imported."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return type(shell).__name__ == "ZMQInteractiveShell"
