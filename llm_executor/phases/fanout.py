"""Fan a phase's tasks out through an Executor and collect every outcome.

``fan_out`` is the one way a phase talks to providers. It feeds the executor through the shared
``SubmissionWindow`` (``llm_executor.window``: lazy, at most a window of outstanding requests, so a
100k-task phase never trips fail-fast backpressure), and returns every task's outcome in input
order: a result or a ``TaskError``. A failed task never costs the completed ones; Ctrl-C cancels
what has not started and keeps what finished (``FanOutInterrupted.result``).
Imports: the public API of ``llm_executor``, ``errors`` and ``window``; never the executor's internals.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from .. import Executor, LLMRequest, LLMResponse
from ..window import Settled, SubmissionWindow, Submit

__all__ = ["FanOutInterrupted", "FanOutResult", "TaskError", "fan_out", "provider_for"]

T = TypeVar("T")
R = TypeVar("R")

_DEFAULT_WINDOW = 256  # outstanding requests when the executor's queue is unbounded (queue_size=0)


@dataclass(frozen=True)
class TaskError:
    """Why one task of a fan-out has no result.

    Attributes:
        index: the task's position in the input.
        task: the task itself.
        error_type: the exception class name ("RateLimitedError", "CancelledError", "TimeoutError"...).
        message: the exception text.
        exception: the exception object, when there was one (not part of equality or repr).
    """

    index: int
    task: Any
    error_type: str
    message: str
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_exception(cls, index: int, task: Any, exc: BaseException) -> TaskError:
        """A TaskError naming ``exc``'s class and message."""
        return cls(index, task, type(exc).__name__, str(exc) or type(exc).__name__, exc)


@dataclass
class FanOutResult(Generic[T, R]):
    """Every task's outcome, in input order.

    Attributes:
        tasks: the tasks, in input order (empty when ``keep_results=False``).
        results: ``results[i]`` is task i's result, or None when it failed (see ``errors``).
        errors: one TaskError per task without a result, by index.
        complete: True when every task reached an outcome (a result or an error); False after
            a KeyboardInterrupt (tasks never submitted have no entry in ``errors`` then).
        elapsed_s: wall time of the fan-out.
        submitted: tasks read from the input.
        succeeded: tasks with a result.
    """

    tasks: list[T] = field(default_factory=list)
    results: list[R | None] = field(default_factory=list)
    errors: list[TaskError] = field(default_factory=list)
    complete: bool = True
    elapsed_s: float = 0.0
    submitted: int = 0
    succeeded: int = 0

    @property
    def failed(self) -> int:
        """Tasks without a result."""
        return len(self.errors)

    @property
    def ok(self) -> bool:
        """Every task ran and succeeded."""
        return self.complete and not self.errors

    def successes(self) -> Iterator[tuple[T, R]]:
        """(task, result) pairs of the tasks that succeeded, in input order."""
        for task, result in zip(self.tasks, self.results, strict=True):
            if result is not None:
                yield task, result

    def error_counts(self) -> dict[str, int]:
        """Failed tasks per error class."""
        return dict(Counter(e.error_type for e in self.errors))


class FanOutInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fan_out``: queued requests were cancelled; ``result`` keeps the finished work.

    It is a KeyboardInterrupt, so code that does not look for it still stops as on Ctrl-C.
    """

    def __init__(self, result: FanOutResult[Any, Any]) -> None:
        super().__init__(f"interrupted after {result.succeeded} of {result.submitted} tasks succeeded")
        self.result = result


@overload
def fan_out(
    executor: Executor,
    tasks: Iterable[T],
    make_request: Callable[[T], LLMRequest],
    *,
    parse: None = None,
    progress: str | bool | None = None,
    on_result: Callable[[int, T, LLMResponse | None, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[T, LLMResponse]: ...


@overload
def fan_out(
    executor: Executor,
    tasks: Iterable[T],
    make_request: Callable[[T], LLMRequest],
    *,
    parse: Callable[[T, LLMResponse], R],
    progress: str | bool | None = None,
    on_result: Callable[[int, T, R | None, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[T, R]: ...


def fan_out(
    executor: Executor,
    tasks: Iterable[Any],
    make_request: Callable[[Any], LLMRequest],
    *,
    parse: Callable[[Any, LLMResponse], Any] | None = None,
    progress: str | bool | None = None,
    on_result: Callable[[int, Any, Any, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[Any, Any]:
    """Run one request per task through ``executor`` and collect every outcome in input order.

    ``tasks`` is read lazily and at most ``window`` requests are outstanding at once, so a long
    task list never trips fail-fast backpressure; a ``QueueFullError`` caused by other users of
    the executor makes this call wait for its own requests to finish, then try again. The call
    returns only when every task has an outcome.

    Args:
        executor: the executor every request goes through.
        tasks: the phase's tasks (any iterable; a ``Sized`` one gives the progress bar a total).
        make_request: builds the request of one task; called once per task, in input order. An
            exception here (for example ``InvalidRequestError``) fails that task only.
        parse: turns (task, response) into the task's result; an exception fails that task only.
            Default: the result is the ``LLMResponse``.
        progress: a description to show a tqdm bar (True: "tasks"); None/False: no bar. The bar
            is hidden when stderr is not a terminal.
        on_result: called in the calling thread as each task ends, in completion order, with
            (index, task, result, None) or (index, task, None, TaskError). Not called for tasks
            cancelled by a KeyboardInterrupt. An exception here stops the fan-out (after
            cancelling what has not started) and propagates.
        timeout: seconds for the whole fan-out; tasks not finished by then fail with
            ``TimeoutError`` (queued requests are cancelled).
        window: the most outstanding requests; default the executor's ``queue_size``.
        total: the number of tasks, for the progress bar when ``tasks`` has no ``len``.
        keep_results: False keeps neither tasks nor results in the returned value (errors and
            counts only), for streams too long to hold in memory; use ``on_result``.

    Returns:
        A ``FanOutResult``: ``results[i]`` for task i (None when it failed) and ``errors``.

    Raises:
        FanOutInterrupted: on KeyboardInterrupt; requests not started are cancelled and
            ``.result`` holds every task that finished before.
    """
    if window is None:
        window = executor.config.queue_size or _DEFAULT_WINDOW
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    if total is None and isinstance(tasks, Sized):
        total = len(tasks)
    it = iter(tasks)
    sw: SubmissionWindow[Any, LLMRequest, LLMResponse] = SubmissionWindow(
        it, _public_submit(executor), make_request, window=window, block=False, timeout=timeout,
        isolate_errors=True, progress=progress, total=total, unit="task", label="fan-out")
    run = _Collector(parse, on_result, keep_results)
    outcomes = sw.as_completed()
    try:
        while True:
            try:
                settled = next(outcomes)
            except StopIteration:
                break
            except TimeoutError as exc:  # raised by the window only: the fan-out's own deadline
                run.expire(sw.close(), it, sw.read, str(exc))
                break
            run.settle(settled)
    except KeyboardInterrupt:
        run.abort(sw.close())
        raise FanOutInterrupted(run.result(sw.read)) from None
    except BaseException:
        sw.close()
        raise
    return run.result(max(sw.read, run.read))


def _public_submit(executor: Executor) -> Submit[LLMRequest, LLMResponse]:
    """``Executor.submit`` in the window's ``Submit`` shape.

    A phase sees only the public API, so the executor's own backpressure applies: under fail-fast a
    ``QueueFullError`` (other users filling the lane) makes the window wait for this fan-out's own
    requests, then submit again.
    """
    def submit(request: LLMRequest, /, *, block: bool, block_timeout: float | None) -> Future[LLMResponse]:
        return executor.submit(request)
    return submit


class _Collector:
    """The outcomes of one fan_out call, in input order; touched only by the calling thread."""

    def __init__(self, parse: Callable[[Any, LLMResponse], Any] | None,
                 on_result: Callable[[int, Any, Any, TaskError | None], None] | None, keep: bool) -> None:
        self.parse = parse
        self.on_result = on_result
        self.keep = keep
        self.t0 = time.monotonic()
        self.tasks: dict[int, Any] = {}
        self.results: dict[int, Any] = {}
        self.errors: list[TaskError] = []
        self.succeeded = 0
        self.read = 0
        self.complete = True

    def _outcome(self, index: int, task: Any) -> None:
        self.read = max(self.read, index + 1)
        if self.keep:
            self.tasks[index] = task

    def settle(self, settled: Settled[Any, LLMResponse], *, notify: bool = True) -> None:
        index, task = settled.index, settled.item
        self._outcome(index, task)
        try:
            response = settled.future.result(0)
        except CancelledError as exc:
            self.fail(index, task, exc, notify=notify)
            return
        except Exception as exc:  # the request failed, or make_request/submit rejected the task
            self.fail(index, task, exc, notify=notify)
            return
        if self.parse is None:
            value: Any = response
        else:
            try:
                value = self.parse(task, response)
            except Exception as exc:  # a reply that parses but makes no sense fails this task only
                self.fail(index, task, exc, notify=notify)
                return
        self.succeeded += 1
        if self.keep:
            self.results[index] = value
        if notify and self.on_result is not None:
            self.on_result(index, task, value, None)

    def fail(self, index: int, task: Any, exc: BaseException, *, notify: bool = True) -> None:
        self._outcome(index, task)
        error = TaskError.from_exception(index, task, exc)
        if isinstance(exc, CancelledError):
            error = TaskError(index, task, "CancelledError", "cancelled before it started", exc)
        self.errors.append(error)
        if notify and self.on_result is not None:
            self.on_result(index, task, None, error)

    def expire(self, left: list[Settled[Any, LLMResponse]], rest: Iterator[Any], read: int, message: str) -> None:
        """The fan-out deadline passed: keep what finished, every other task fails with TimeoutError."""
        for settled in left:
            future = settled.future
            if future.done() and not future.cancelled():
                self.settle(settled)
            else:
                self.fail(settled.index, settled.item, TimeoutError(message))
        for index, task in enumerate(rest, start=read):
            self.fail(index, task, TimeoutError(message))

    def abort(self, left: list[Settled[Any, LLMResponse]]) -> None:
        """Ctrl-C: keep what finished (without on_result), the rest was cancelled or still runs."""
        for settled in left:
            future = settled.future
            if future.done() and not future.cancelled():
                self.settle(settled, notify=False)
            else:
                self._outcome(settled.index, settled.item)
                self.errors.append(TaskError(settled.index, settled.item, "CancelledError",
                                             "interrupted before it finished", None))
        self.complete = False

    def result(self, submitted: int) -> FanOutResult[Any, Any]:
        self.errors.sort(key=lambda e: e.index)
        tasks = [self.tasks.get(i) for i in range(submitted)] if self.keep else []
        results = [self.results.get(i) for i in range(submitted)] if self.keep else []
        return FanOutResult(tasks, results, self.errors, self.complete, time.monotonic() - self.t0, submitted,
                            self.succeeded)


def provider_for(provider: str | Sequence[str], index: int) -> str:
    """Round-robin over a list of providers; a plain name (or "auto") for every task."""
    if isinstance(provider, str):
        return provider
    if not provider:
        raise ValueError("provider list is empty")
    return provider[index % len(provider)]
