"""The engine behind an Executor: lanes, admission, worker start-up, shutdown, fork.

The ``Executor`` facade owns one ``Engine`` and nothing inside the engine refers back to the
facade: worker loops, the deadline reaper and Futures reach only the engine's parts, so an
Executor dropped without ``shutdown()`` is collected, and its finalizer (``Engine.abandon``)
cancels what is still queued and lets its threads end (issue 10, item 6).

After ``os.fork()`` (gunicorn ``--preload``, multiprocessing's fork start method) a child's copy
of an engine has the parent's locks (maybe held) and no threads. ``os.register_at_fork`` gives
every live engine in the child fresh locks, pools, limiters (new store connections), built-in
adapters (new HTTP sessions) and reaper, forgets the parent's queue, and logs that it did
(item 7). A custom provider object is kept as it is.
Imports: ``config``, ``errors``, ``limits``, ``metrics``, ``retry``, ``types``, ``validation``,
``providers``, and the other ``lifecycle`` modules.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from ..config import ExecutorConfig, ProviderConfig, api_key_from_env
from ..errors import (
    ConfigError,
    ExecutorShutdownError,
    InvalidRequestError,
    ProviderUnavailableError,
    QueueFullError,
    UnknownProviderError,
)
from ..limits import estimate_tokens, make_lane_limiter
from ..limits.learn import RateLearner
from ..metrics import ExecutorStats, ProviderStats
from ..providers.protocol import Provider
from ..providers.registry import create_builtin
from ..types import LLMRequest, LLMResponse
from ..validation import check_capabilities, normalize_schema
from .lane import Lane, RoomWatcher
from .reaper import DeadlineReaper
from .request import Request
from .routing import choose_auto, model_for
from .runner import Runner

__all__ = ["Engine"]

log = logging.getLogger("llm_executor")

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _uuid4_hex() -> str:
    """A random (version 4) UUID as 32 hex digits, 5x cheaper than uuid.uuid4().hex.

    A request id needs uniqueness, not secrecy: ``random`` (reseeded in a forked child by CPython)
    instead of a ``urandom`` system call per request.
    """
    n = (random.getrandbits(128) & _UUID_CLEAR) | _UUID4_BITS
    return f"{n:032x}"


_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_BITS = (0x4000 << 64) | (0x8000 << 48)


def _with_env_key(name: str, pcfg: ProviderConfig) -> ProviderConfig:
    """``pcfg`` with the key ``from_env`` would read, when it was built in code without one."""
    if pcfg.api_key is not None:
        return pcfg
    key = api_key_from_env(name)
    if key is None:
        return pcfg
    import dataclasses

    return dataclasses.replace(pcfg, api_key=key)


class Engine:
    """Lanes, admission, worker start-up, shutdown and fork handling of one Executor.

    Args:
        config: the executor's configuration.
        custom: custom or test providers by name (they win over built-ins of the same name).
        sleep: how retries and pauses wait (default: an interruptible wait on ``stopping``).
        clock: monotonic seconds for deadlines, aging and pauses (tests inject a fake).

    Raises:
        ConfigError: a configured built-in provider has no adapter, a fallback is unknown, or a
            backend is unreachable.
    """

    def __init__(self, config: ExecutorConfig, custom: Mapping[str, Provider], *,
                 sleep: Callable[[float], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._sleep = sleep
        self._seq = itertools.count()
        self.closed = False
        self._shutdown_lock = threading.Lock()
        self.stopping = threading.Event()
        self.reaper = DeadlineReaper(clock)
        self.lanes: dict[str, Lane] = {}
        names = list(config.providers) + [n for n in custom if n not in config.providers]
        try:
            for name in names:
                if name == "auto":
                    raise UnknownProviderError("auto", ("gemini", "openai", "ollama"))
                if name in custom:
                    provider, builtin = custom[name], False
                    if not isinstance(provider, Provider):
                        raise InvalidRequestError(
                            f"providers[{name!r}] must have name, capabilities() and complete(request)",
                            field="providers")
                    pcfg = config.provider(name)
                else:
                    pcfg = _with_env_key(name, config.provider(name))
                    provider, builtin = create_builtin(name, pcfg), True
                self.lanes[name] = self._build_lane(name, provider, pcfg, builtin)
            unknown = [n for n in config.fallbacks if n not in self.lanes]
            if unknown:
                raise ConfigError(
                    f"LLM_EXECUTOR_FALLBACKS={','.join(config.fallbacks)!r}: unknown provider "
                    f"{unknown[0]!r}; expected names of enabled providers: {', '.join(self.lanes)}")
        except BaseException:
            for lane in self.lanes.values():
                lane.pool.shutdown(wait=False)
                lane.limiter.close()
            raise
        self.runner = self._build_runner()
        _ENGINES.add(self)

    def _build_lane(self, name: str, provider: Provider, pcfg: ProviderConfig, builtin: bool) -> Lane:
        from ..retry import RetryPolicy  # tenacity is loaded with the first lane, not at import

        limiter = make_lane_limiter(name, pcfg, self.config)
        learner = None
        if pcfg.auto_rates:
            # "auto" limits: the limiter and the lane see numbers only, the learner's.
            learner = RateLearner(name, pcfg, limiter, shared=limiter.is_shared)
            pcfg = learner.concrete()
            limiter.reconfigure(pcfg, learned_qps="qps" in learner.auto)
        retry = RetryPolicy(pcfg, self.stopping, self._sleep, self.clock)
        lane = Lane(name, provider, pcfg, self.config, limiter, retry, builtin, self.clock)
        if learner is not None:
            learner.bind(lane.apply_learned, lane.metrics.on_learned)
            lane.attach_learner(learner)
        return lane

    def _build_runner(self) -> Runner:
        return Runner(self.lanes, self.config.fallbacks, self.stopping, self.clock, self._seq.__next__,
                      self.start_worker)

    # -- submission ------------------------------------------------------------------------------

    def lane(self, name: str) -> Lane:
        lane = self.lanes.get(name)
        if lane is None:
            raise UnknownProviderError(name, list(self.lanes))
        return lane

    def submit(self, request: LLMRequest, *, block: bool, block_timeout: float | None,
               watcher: RoomWatcher | None = None) -> Future[LLMResponse]:
        """Validate, route and admit ``request``; its Future at once (see ``Executor.submit``)."""
        if self.closed:
            raise ExecutorShutdownError("submit() after shutdown()")
        if not isinstance(request, LLMRequest):
            raise InvalidRequestError(f"submit() takes an LLMRequest, got {type(request).__name__}",
                                      field="request")
        request.validate()
        schema = None if request.json_schema is None else normalize_schema(request.json_schema)
        auto = request.provider == "auto"
        if auto:
            lane = choose_auto(self.lanes.values(), request, schema)
            model = model_for(lane, request)
        else:
            named = self.lanes.get(request.provider)
            if named is None:
                raise UnknownProviderError(request.provider, list(self.lanes))
            lane = named
            model = request.model or lane.pcfg.model or ""
            if not model and lane.builtin:
                raise InvalidRequestError(
                    f"LLMRequest.model is empty and LLM_EXECUTOR_{lane.name.upper()}_MODEL is not set: "
                    "expected a model name", field="model")
        if request.max_output_tokens is not None:
            check_capabilities(request, lane.caps, lane.name, model)
        if lane.pcfg.tpm is not None and (lane.learner is None or not lane.learner.learns_tpm):
            lane.limiter.check_estimate(estimate_tokens(request.prompt, request.system, request.max_output_tokens))
        now = self.clock()
        deadline = None if request.timeout is None else now + request.timeout
        entry = Request(request, request.request_id or _uuid4_hex(), model, lane.name, lane.metrics, schema,
                        now, deadline, auto)
        try:
            if lane.admit(entry, next(self._seq), block=block, timeout_s=block_timeout, watcher=watcher):
                self.start_worker(lane)
            if deadline is not None:
                self.reaper.add(entry)
        except BaseException as exc:
            if isinstance(exc, QueueFullError | ExecutorShutdownError):
                raise
            # Ctrl-C (or a failure) after the request was queued: the caller never gets its Future,
            # so it must not run, and a loop we may have counted as scheduled may not exist.
            lane.unschedule()
            if lane.remove(entry):
                entry.cancel_removed()
            raise
        return entry.future

    def pass_room(self, lane_name: str | None) -> None:
        """An async caller gave up a slot it was woken for: wake the next waiter of that lane."""
        lane = self.lanes.get(lane_name or "")
        if lane is not None:
            lane.pass_room()

    def start_worker(self, lane: Lane) -> None:
        """Hand the pool one more worker loop for ``lane`` (counted as scheduled already)."""
        try:
            lane.pool.submit(self.runner.work, lane)
        except RuntimeError as exc:
            lane.unschedule()
            if lane.has_workers():
                return  # a running loop serves the queue
            # Nothing will run the queue: fail it with what happened, not strand it (issue 10,
            # item 9: a thread that cannot start is not a shutdown).
            error: BaseException
            if lane.closed or self.closed:
                error = ExecutorShutdownError("executor shut down before the request started")
            else:
                error = ProviderUnavailableError(f"could not start a worker thread for {lane.name}: {exc}",
                                                 provider=lane.name, retryable=False)
                log.error("lane %s: could not start a worker thread: %s", lane.name, exc)
            self._fail_queued(lane, error)
        except BaseException:
            lane.unschedule()
            raise

    def _fail_queued(self, lane: Lane, error: BaseException) -> None:
        for request in lane.drain():
            if request.started or request.future.set_running_or_notify_cancel():
                request.fail(error)

    # -- observation -----------------------------------------------------------------------------

    def stats(self) -> ExecutorStats:
        """A snapshot of every lane (queue length, in flight, outcomes, latency, auditor)."""
        out: dict[str, ProviderStats] = {}
        for name, lane in self.lanes.items():
            with lane.lock:
                queued, submitted, received = lane.pending, lane.submitted, lane.received
            out[name] = lane.metrics.snapshot(queued, submitted, lane.paused_until_wall(), received)
        return ExecutorStats(out)

    def threads(self) -> list[threading.Thread]:
        """The engine's live threads (pool workers and the reaper), for tests and diagnostics."""
        out = [t for lane in self.lanes.values() for t in list(getattr(lane.pool, "_threads", ())) if t.is_alive()]
        reaper = self.reaper.thread
        if reaper is not None and reaper.is_alive():
            out.append(reaper)
        return out

    # -- shutdown --------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting requests; optionally cancel queued ones; optionally join every thread.

        Safe from any thread, including a done-callback on one of the engine's own threads (it
        joins every thread but its own, which ends when the callback returns).
        """
        with self._shutdown_lock:
            self.closed = True
        for lane in self.lanes.values():
            lane.close()
        if cancel_futures:
            self.stopping.set()
            for lane in self.lanes.values():
                for request in lane.drain():
                    if request.started:
                        # A fallback already running for the caller: it fails rather than hangs.
                        request.fail(ExecutorShutdownError("executor shut down before the fallback started"))
                    else:
                        request.cancel_removed()
        if not wait:
            for lane in self.lanes.values():
                lane.pool.shutdown(wait=False)
            self.reaper.retire()
            return
        for lane in self.lanes.values():
            _join_pool(lane.pool)
        self.reaper.stop()
        # The HTTP watchdog thread lingers between attempts; none may outlive shutdown(wait=True).
        transport = sys.modules.get("llm_executor.providers.transport")
        if transport is not None:
            transport.quiesce_watchdog()
        for lane in self.lanes.values():
            lane.limiter.close()
            if lane.builtin:
                close = getattr(lane.provider, "close", None)
                if callable(close):
                    close()

    @staticmethod
    def abandon(engine: Engine) -> None:
        """The finalizer of a dropped Executor: cancel what is queued, let the threads end.

        A finalizer runs wherever the collector happens to run, which may be a worker holding its
        lane's lock (a lane lock is not re-entrant: closing the lane there would deadlock), so the
        work is done on a short-lived thread of its own.
        """
        if engine.closed:
            return
        try:
            threading.Thread(target=Engine._abandon, args=(engine,), name="llm-executor-abandon",
                             daemon=True).start()
        except RuntimeError:  # the interpreter is shutting down: no new threads
            Engine._abandon(engine)

    @staticmethod
    def _abandon(engine: Engine) -> None:
        if engine.closed:
            return
        queued = sum(lane.pending for lane in engine.lanes.values())
        if queued:
            log.warning("an Executor was dropped without shutdown(): %d queued requests cancelled "
                        "(running calls finish; use `with Executor(...)` or shutdown())", queued)
        engine.shutdown(wait=False, cancel_futures=True)

    # -- fork ------------------------------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Make this engine's copy in a forked child work (fresh threads, locks, connections)."""
        self._shutdown_lock = threading.Lock()
        self.stopping = threading.Event()
        self.reaper = DeadlineReaper(self.clock)
        dropped = 0
        for name, lane in self.lanes.items():
            dropped += lane.discard_after_fork()
            lane.limiter = make_lane_limiter(name, lane.pcfg, self.config)
            if lane.learner is not None:
                lane.learner.after_fork(lane.limiter)
            from ..retry import RetryPolicy

            lane.retry = RetryPolicy(lane.pcfg, self.stopping, self._sleep, self.clock)
            if lane.builtin:
                lane.provider = create_builtin(name, lane.pcfg)
            if self.closed:
                lane.closed = True
        self.runner = self._build_runner()
        log.info("llm_executor: forked child (pid %d): executor reset with fresh threads, locks and "
                 "connections; %d requests queued in the parent are not run here", os.getpid(), dropped,
                 extra={"pid": os.getpid(), "dropped": dropped})


def _join_pool(pool: ThreadPoolExecutor) -> None:
    """``pool.shutdown(wait=True)``, except that the calling thread (a callback) is not joined."""
    pool.shutdown(wait=False)
    current = threading.current_thread()
    for thread in list(getattr(pool, "_threads", ())):
        if thread is not current:
            thread.join()


def _after_fork_in_child() -> None:
    # Our hook may run before those of modules imported later (the HTTP transport's watchdog lock):
    # reset that first, since rebuilding the built-in adapters below takes it.
    transport = sys.modules.get("llm_executor.providers.transport")
    if transport is not None:
        transport.after_fork()
    for engine in list(_ENGINES):
        try:
            engine.after_fork_in_child()
        except Exception:  # pragma: no cover - a child must not die in an at-fork hook
            log.exception("llm_executor: resetting an executor after fork failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

