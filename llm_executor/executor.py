"""Executor: the facade every caller uses — submit, run, map, async, stats, shutdown.

Data flow of one request (the parts live in ``llm_executor.lifecycle``)::

    submit() ─ validate, resolve provider ("auto": routing.py) and model, give a request_id
       │  admission (lane.py): at most queue_size requests accepted-but-not-started per lane
       │             (fail_fast: QueueFullError now | block: wait, optional timeout)
       ▼
    lane heap (priority with aging) ─► lane worker loop (runner.py; ≤ MAX_PARALLEL per lane)
       worker: take the best request → pass its Future's gate → [429 pause] → [global slot,
       TPM reservation, rate token: AttemptHolds] → provider.complete() → retryable error:
       tenacity backoff, new token → invalid JSON: repair → settle once (request.py) or hand
       the request to a fallback lane
    deadline reaper (reaper.py): fails queued or running requests at their deadline

The facade holds the engine; nothing in the engine holds the facade, so an Executor dropped
without ``shutdown()`` is collected: its finalizer cancels what is queued and its threads end.
Imports: ``config``, ``errors``, ``metrics``, ``types``, ``providers.protocol``, ``lifecycle``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from types import TracebackType
from typing import Any, TypeVar

from .config import ExecutorConfig, validate_provider_names
from .errors import QueueFullError
from .lifecycle.engine import Engine
from .lifecycle.lane import Lane
from .metrics import ExecutorStats, PrometheusExporter, ProviderStats
from .providers.protocol import Provider
from .types import Capabilities, LLMRequest, LLMResponse

__all__ = ["Executor", "ExecutorStats", "ProviderStats"]

T = TypeVar("T")


class Executor:
    """The entry point for LLM calls: ``submit`` returns a Future at once.

    Args:
        config: limits and providers; default ``ExecutorConfig.from_env()``.
        providers: custom or test providers by name (any object of the ``Provider`` protocol);
            they take precedence over built-in adapters of the same name. A custom provider with
            no ``ProviderConfig`` in ``config`` runs with the defaults.
        sleep: how retries wait (default: an interruptible wait); tests pass ``recorded.append``.
        clock: monotonic seconds for deadlines, aging and pauses (default ``time.monotonic``);
            tests pass a fake clock.

    Raises:
        ConfigError: a configured provider has no adapter, a fallback is not an enabled provider
            (``config.validate_provider_names``), or a limits backend is unreachable.
    """

    def __init__(
        self,
        config: ExecutorConfig | None = None,
        providers: Mapping[str, Provider] | None = None,
        *,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config if config is not None else ExecutorConfig.from_env()
        custom = dict(providers or {})
        # The same check as ``llm-executor config``, so both refuse exactly the same names.
        validate_provider_names(self.config, custom)
        self._engine = Engine(self.config, custom, sleep=sleep, clock=clock or time.monotonic)
        self._exporter: PrometheusExporter | None = None
        # Dropped without shutdown(): cancel the queue and let the threads end (not at exit: there
        # the pool threads are joined first, and they finish the queue, as ThreadPoolExecutor's do).
        self._finalizer = weakref.finalize(self, Engine.abandon, self._engine)
        self._finalizer.atexit = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def providers(self) -> tuple[str, ...]:
        """The enabled lane names, in configuration order."""
        return tuple(self._engine.lanes)

    @property
    def _lanes(self) -> dict[str, Lane]:
        return self._engine.lanes

    def capabilities(self, provider: str) -> Capabilities:
        """The cached capabilities of ``provider``'s adapter."""
        return self._engine.lane(provider).caps

    def check_providers(self, timeout: float = 10.0) -> dict[str, tuple[bool, str]]:
        """Ask every lane's provider whether it answers (for ``llm-executor check``).

        Uses the adapter's ``health_check()`` (a models or version call) where it has one, else
        one tiny request through the lane (limits apply).

        Returns:
            {provider: (answered, description or error message)}.
        """
        out: dict[str, tuple[bool, str]] = {}
        for name, lane in self._engine.lanes.items():
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
        return self._engine.submit(request, block=self.config.backpressure == "block",
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

    async def asubmit(self, request: LLMRequest) -> Future[LLMResponse]:
        """``submit`` for async code: never blocks the event loop, also under "block" backpressure.

        With ``backpressure="block"`` a full lane is waited for asynchronously (a slot freed on
        any thread wakes this coroutine), bounded by ``block_timeout``.

        Returns:
            The request's ``concurrent.futures.Future`` (``await asyncio.wrap_future(f)``, or use
            ``arun``).

        Raises:
            The errors of ``submit``.
        """
        loop = asyncio.get_running_loop()
        block = self.config.backpressure == "block"
        timeout_s = self.config.block_timeout
        give_up = None if timeout_s is None else loop.time() + timeout_s
        while True:
            waiter = _RoomWaiter(loop) if block else None
            try:
                return self._engine.submit(request, block=False, block_timeout=None, watcher=waiter)
            except QueueFullError as exc:
                if waiter is None:
                    raise
                remaining = None if give_up is None else give_up - loop.time()
                try:
                    await asyncio.wait_for(waiter.room, remaining)
                except BaseException as stop:
                    if waiter.woken():
                        # Woken for a slot this caller will not take now: the next waiter gets it.
                        self._engine.pass_room(exc.provider)
                    if isinstance(stop, TimeoutError):
                        raise QueueFullError(
                            f"{exc.provider} queue still full after {timeout_s}s (LLM_EXECUTOR_BLOCK_TIMEOUT)",
                            retry_after_s=exc.retry_after_s, provider=exc.provider) from None
                    raise

    async def arun(self, request: LLMRequest, timeout: float | None = None) -> LLMResponse:
        """Submit ``request`` and await its response without blocking the event loop.

        Cancelling the awaiting task (or ``timeout``) cancels the request if it has not started.

        Raises:
            TimeoutError: no result within ``timeout``.
            Any error of ``submit`` or of the request.
        """
        future = await self.asubmit(request)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except BaseException:
            future.cancel()
            raise

    def map(self, fn_or_requests: Callable[[Any], LLMRequest] | Iterable[LLMRequest],
            iterable: Iterable[Any] | None = None, *, timeout: float | None = None,
            return_exceptions: bool = False, progress: str | bool | None = None) -> Iterator[Any]:
        """Run requests and yield their responses in input order.

        Two shapes: ``map(requests)``, and ``map(fn, iterable)`` as in ``concurrent.futures``,
        where ``fn(item)`` builds the ``LLMRequest`` of each item (called in the iterating thread,
        once per item, in input order)::

            for row, response in zip(rows, ex.map(make_request, rows)):
                ...
            out = list(ex.map(make_request, rows, return_exceptions=True, progress="enrich"))

        The input is read lazily (``llm_executor.window.SubmissionWindow``): at most
        ``queue_size`` + the lanes' MAX_PARALLEL requests are outstanding, and submission waits for
        room instead of failing fast, so a long iterable never trips backpressure by itself.
        Stopping the iteration early — ``break``, an error reaching the caller, ``close()`` on the
        iterator, or Ctrl-C / a notebook interrupt while it waits — cancels every request that
        has not started (the provider never sees them; ``stats()`` counts them as cancelled);
        calls already running finish. An interrupt that lands in the caller's loop body leaves
        the iterator suspended until it is closed or collected: wrap it in
        ``contextlib.closing(...)`` to cancel at once.

        Args:
            timeout: seconds from this call for the whole iteration, as in
                ``concurrent.futures``: a response that is ready is yielded even after it passed;
                waiting for one that is not raises ``TimeoutError`` and cancels what has not
                started. Measured on the executor's ``clock``.
            return_exceptions: yield a failed item's exception in its place and go on — the
                request's error, or what ``fn`` or ``submit`` raised for it (an empty prompt:
                ``InvalidRequestError``). Default False: that exception is raised when its
                position is reached (the items before it are yielded first) and the rest are
                cancelled.
            progress: show a ``tqdm.auto`` progress bar (a description, or True). It hides
                itself when stderr is not a terminal; in Jupyter it is a widget when ipywidgets
                is installed, and hidden otherwise.

        Raises:
            TimeoutError: ``timeout`` seconds passed before the next response was ready.
            The error of a failed item, when reached (unless ``return_exceptions``).
        """
        from .window import SubmissionWindow

        make_request: Callable[[Any], LLMRequest] | None
        if iterable is None:
            if callable(fn_or_requests) and not isinstance(fn_or_requests, Iterable):
                raise TypeError("map(fn, iterable): the iterable is missing")
            items: Iterable[Any] = fn_or_requests  # type: ignore[assignment]
            make_request = None
        else:
            if not callable(fn_or_requests):
                raise TypeError(f"map(fn, iterable): fn must be callable, got {type(fn_or_requests).__name__}")
            items, make_request = iterable, fn_or_requests
        window = (self.config.queue_size or 256) + sum(lane.pcfg.parallel_cap for lane in self._engine.lanes.values())
        # Errors of ``fn`` and ``submit`` always go onto the item's own Future, so that without
        # ``return_exceptions`` they are raised when reached, after the rows before them (as
        # ThreadPoolExecutor.map does), not when the window happens to read the bad row.
        submission: SubmissionWindow[Any, LLMRequest, LLMResponse] = SubmissionWindow(
            items, self._engine.submit, make_request, window=window, block=True, timeout=timeout,
            isolate_errors=True, progress=progress, unit="request", label="map()", clock=self._engine.clock)
        return _responses(submission, return_exceptions)

    def stats(self) -> ExecutorStats:
        """A snapshot of every lane (queue length, in flight, outcomes, latency, auditor)."""
        return self._engine.stats()

    def enable_prometheus(self, registry: Any = None, prefix: str = "llm_executor") -> PrometheusExporter:
        """Export this executor's metrics to Prometheus (needs the ``prometheus`` extra)."""
        if self._exporter is None:
            # The engine's stats, not this facade's: a registry must not keep a dropped Executor alive.
            self._exporter = PrometheusExporter(
                self._engine.stats, {n: lane.metrics for n, lane in self._engine.lanes.items()}, registry, prefix)
        return self._exporter

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting requests; optionally cancel queued ones; optionally wait for the rest.

        Callable from any thread, also from a done-callback (it then joins every thread but the
        one running the callback, which ends right after it).

        Args:
            wait: join every worker thread (and release limiter resources) before returning.
            cancel_futures: cancel every request that has not started and interrupt retry
                backoffs and rate-limit waits (those requests fail with ExecutorShutdownError).
        """
        if self._exporter is not None:
            self._exporter.close()
            self._exporter = None
        self._engine.shutdown(wait, cancel_futures=cancel_futures)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Ctrl-C in the caller: do not make the user sit through the whole queue.
        self.shutdown(wait=True, cancel_futures=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    def __repr__(self) -> str:
        state = "shutdown" if self._engine.closed else "running"
        return f"<Executor {state} providers={list(self._engine.lanes)}>"


def _responses(submission: Any, return_exceptions: bool) -> Iterator[Any]:
    with submission:  # leaving early cancels what has not started
        for settled in submission.in_order():
            if return_exceptions:
                future = settled.future
                error = CancelledError() if future.cancelled() else future.exception()
                yield error if error is not None else future.result()
            else:
                yield settled.future.result()


class _RoomWaiter:
    """An ``asubmit`` waiting for a queue slot on ``loop`` (a ``lifecycle.lane.RoomWatcher``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.room: asyncio.Future[None] = loop.create_future()
        self._woken = False

    def alive(self) -> bool:
        # Read from the thread freeing a slot: a stale "alive" only costs that slot's wake-up,
        # which the waiter passes on when it finds it did not need it (``woken``).
        return not self.room.done() and not self.loop.is_closed()

    def wake(self) -> bool:
        if not self.alive():
            return False
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    def _set(self) -> None:
        if not self.room.done():
            self._woken = True
            self.room.set_result(None)

    def woken(self) -> bool:
        return self._woken
