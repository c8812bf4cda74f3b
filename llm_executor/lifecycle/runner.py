"""The attempt runner: one request's attempts on a lane, its retries, repairs and fallback.

What used to live in flags and locals of three methods is one small structure per concern:

* ``Runner.work`` is a lane's worker loop: take the best request, pass its Future's gate, serve
  it. A request is taken off the heap *before* any rate token is taken, and a token is taken only
  when its attempt is about to start (issue 10, item 4: no token for an attempt that never starts).
* ``Budget`` counts, per request and per lane, transient retries and schema repairs separately:
  a repair never eats a retry, and a fallback lane starts with its own full budget (item 3).
* ``AttemptHolds`` is what one attempt holds — a global in-flight slot, a TPM reservation, a rate
  token — taken together after the last check (one store round trip) and given back on every
  path: a reservation whose call never started is refunded whole, one whose call ran is settled
  with the reported usage (item 1).
* Transient retries are driven by tenacity's ``Retrying`` (stop, wait, sleep, before_sleep,
  ``lane.retry.retrying``). The first attempt runs without it — a ``Retrying`` costs more than the
  whole per-request overhead — and its failure is replayed as tenacity's attempt 1.
* A final retryable failure hands the same ``Request`` (its Future and its settle authority) to
  the next capable fallback lane with room; otherwise the request fails with the real error.
Imports: ``errors``, ``types``, ``limits``, ``retry``, ``validation``, ``.lane``, ``.request``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import tenacity

from ..errors import (
    DeadlineExceededError,
    ExecutorShutdownError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    SchemaValidationError,
)
from ..limits import estimate_tokens
from ..limits.learn import RateLearner
from ..retry import hint_above_cap, is_retryable
from ..types import LLMResponse
from ..validation import parse_structured
from .lane import Lane
from .request import Request
from .routing import model_for, why_not

__all__ = ["REPAIR_PROMPT", "AttemptHolds", "Budget", "Runner"]

log = logging.getLogger("llm_executor")

REPAIR_PROMPT = (
    "{prompt}\n\nYour previous answer was not valid: {error}\n"
    "Answer again with JSON only, valid against the JSON schema."
)


class _Settled(Exception):
    """Another party (the reaper, a cancelling shutdown) settled the request: stop quietly."""


class Budget:
    """What a request may still spend on one lane: transient retries and schema repairs."""

    __slots__ = ("repairs", "retries")

    def __init__(self, retries: int, repairs: int) -> None:
        self.retries = retries
        self.repairs = repairs


class AttemptHolds:
    """A global slot, a TPM reservation and a rate token for one attempt, given back on every path.

    Use as ``with AttemptHolds(lane, stopping) as holds: holds.take(...); call; holds.spend(usage)``.
    """

    __slots__ = ("_lane", "_release_slot", "_reserved", "_stopping")

    def __init__(self, lane: Lane, stopping: threading.Event) -> None:
        self._lane = lane
        self._stopping = stopping
        self._release_slot: Callable[[], None] | None = None
        self._reserved = 0

    def __enter__(self) -> AttemptHolds:
        return self

    def take(self, estimate: int, deadline_monotonic: float | None, ready: Callable[[], None]) -> float:
        """Check ``ready`` (raises to abort), then take the slot, the budget and the token at once.

        The three are taken in one call to the store (``LaneLimiter.admit``: one round trip, and
        nothing is held while another part is waited for), after the last check: the token goes
        to an attempt that is about to start. ``admit`` then waits for the token's start; that
        wait is bounded by the deadline and ends on a cancelling shutdown (it gives back what it
        took).

        Args:
            estimate: tokens to reserve (ignored without a TPM limit).
            deadline_monotonic: the request's deadline on ``time.monotonic`` (the limiter's clock).
            ready: raises when the attempt must not start any more (settled, deadline, shutdown).

        Returns:
            Seconds spent waiting in ``admit``.
        """
        lane = self._lane
        ready()
        t0 = time.monotonic()
        admission = lane.limiter.admit(estimate if lane.pcfg.tpm is not None else None, self._stopping,
                                       deadline_monotonic)
        self._release_slot = admission.release
        if admission.tokens:
            self._reserved = admission.tokens
            lane.metrics.on_tpm_reserved(admission.tokens)
        return time.monotonic() - t0

    def spend(self, usage_tokens: int | None) -> None:
        """The call ran: settle the reservation with the reported usage (None keeps the estimate)."""
        reserved, self._reserved = self._reserved, 0
        if reserved:
            self._lane.metrics.on_tpm_reserved(-reserved)
            self._lane.limiter.settle_tokens(reserved, usage_tokens)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        reserved, self._reserved = self._reserved, 0
        try:
            if reserved:
                # The call never started: the whole reservation goes back to the budget.
                self._lane.metrics.on_tpm_reserved(-reserved)
                self._lane.limiter.settle_tokens(reserved, 0)
        finally:
            release, self._release_slot = self._release_slot, None
            if release is not None:
                release()


class Runner:
    """Serves requests on lanes: the worker loop, attempts, retries, repairs and fallbacks.

    Args:
        lanes: every lane by name (fallback targets).
        fallbacks: the ordered fallback lane names (``ExecutorConfig.fallbacks``).
        stopping: set by a cancelling shutdown.
        clock: monotonic seconds, the clock of request deadlines.
        next_seq: heap tie-breakers in submission order.
        start_worker: starts a worker loop on a lane (after a fallback was queued there).
    """

    def __init__(self, lanes: Mapping[str, Lane], fallbacks: tuple[str, ...], stopping: threading.Event,
                 clock: Callable[[], float], next_seq: Callable[[], int],
                 start_worker: Callable[[Lane], None]) -> None:
        self._lanes = lanes
        self._fallbacks = fallbacks
        self._stopping = stopping
        self._clock = clock
        self._next_seq = next_seq
        self._start_worker = start_worker

    # -- the worker loop -----------------------------------------------------------------------

    def work(self, lane: Lane) -> None:
        """One worker loop of ``lane`` (runs in its pool until the heap stays empty)."""
        if not lane.worker_enter():
            return
        while True:
            request = lane.next_request()
            if request is None:
                return
            if not request.started:
                if not request.future.set_running_or_notify_cancel():
                    continue  # the caller cancelled it; the cancel path counted it
                request.started = True
            self.run(request, lane)
            del request

    def run(self, request: Request, lane: Lane) -> None:
        """Serve ``request`` on ``lane`` and settle it, or hand it to a fallback (never raises)."""
        try:
            response = self._serve(request, lane)
        except _Settled:
            return
        except BaseException as exc:
            try:
                if self._hand_off(request, lane, exc):
                    return
            except BaseException:  # pragma: no cover - a bug in the hand-off must not strand the caller
                log.exception("fallback of request %s failed", request.request_id)
            request.fail(self._final_error(exc, lane, request))
            return
        request.succeed(response)

    # -- one lane: repairs around retries around attempts --------------------------------------

    def _serve(self, request: Request, lane: Lane) -> LLMResponse:
        prompt = request.request.prompt
        max_tokens = request.request.max_output_tokens
        budget: Budget | None = None  # made on the first failure: the happy path needs none
        while True:
            try:
                response, latency_ms = self._attempt(request, lane, prompt, max_tokens)
            except ProviderError as exc:
                if budget is None:
                    budget = Budget(lane.pcfg.max_retries, lane.pcfg.repair_attempts)
                response, latency_ms = self._retry(request, lane, prompt, max_tokens, budget, exc)
            data = None
            if request.schema is not None:
                try:
                    data = parse_structured(response.text, request.schema, provider=lane.name,
                                            request_id=request.request_id, finish_reason=response.finish_reason)
                except SchemaValidationError as exc:
                    if budget is None:
                        budget = Budget(lane.pcfg.max_retries, lane.pcfg.repair_attempts)
                    if budget.repairs <= 0:
                        raise
                    budget.repairs -= 1
                    # A repair is a new request to the provider (it takes a fresh token too), but
                    # not a retry: it does not spend the transient-retry budget.
                    prompt = REPAIR_PROMPT.format(prompt=request.request.prompt, error=str(exc)[:500])
                    if getattr(exc, "truncated", False):
                        # Cut at max_output_tokens: asking the same again would be cut again.
                        max_tokens = self._raised_limit(lane, request, max_tokens)
                    continue
            return response.completed(provider=lane.name, request_id=request.request_id, latency_ms=latency_ms,
                                      queue_ms=request.queue_ms, attempts=request.attempts, data=data)

    @staticmethod
    def _raised_limit(lane: Lane, request: Request, max_tokens: int | None) -> int | None:
        """A repair of output cut at max_output_tokens asks for twice the room (within the cap)."""
        if max_tokens is None:
            return None
        cap = lane.caps.max_output_tokens_for(request.model)
        doubled = max_tokens * 2
        return doubled if cap is None else max(max_tokens, min(doubled, cap))

    def _retry(self, request: Request, lane: Lane, prompt: str, max_tokens: int | None, budget: Budget,
               first: ProviderError) -> tuple[LLMResponse, float]:
        """After attempt ``first`` failed: tenacity retries it within ``budget``, or re-raises."""
        self._annotate(first, lane, request)
        if not is_retryable(first) or budget.retries <= 0 or hint_above_cap(first, lane.pcfg.max_retry_wait_s):
            raise first
        replay: list[ProviderError] = [first]
        paused = [False]

        def before_sleep(state: tenacity.RetryCallState) -> None:
            paused[0] = self._before_sleep(state, request, lane)

        def sleep(seconds: float) -> None:
            # After a 429 with a wait hint the lane is paused: the next attempt waits the pause
            # out like every other worker of the lane, so this loop does not wait it twice.
            if not paused[0]:
                lane.retry.sleep(seconds)

        retrying = lane.retry.retrying(retries_left=budget.retries, deadline=request.deadline,
                                       timeout_s=request.request.timeout, before_sleep=before_sleep, sleep=sleep)
        for attempt in retrying:
            with attempt:
                if replay:
                    raise replay.pop()  # attempt 1 already ran (and failed) outside tenacity
                budget.retries -= 1
                try:
                    return self._attempt(request, lane, prompt, max_tokens)
                except ProviderError as exc:
                    self._annotate(exc, lane, request)
                    raise
        raise AssertionError("unreachable: tenacity ends with a result or an exception")  # pragma: no cover

    def _before_sleep(self, state: tenacity.RetryCallState, request: Request, lane: Lane) -> bool:
        """Log the retry; pause the whole lane after a 429 with a wait hint (True: it did)."""
        if request.settled:
            raise _Settled()
        exc = state.outcome.exception() if state.outcome is not None else None
        wait_s = state.upcoming_sleep
        paused = isinstance(exc, ProviderError) and exc.status == 429 and exc.retry_after_s is not None
        if paused:
            lane.pause(wait_s)  # the provider said so: hold every worker of the lane, not just this one
        if log.isEnabledFor(logging.WARNING):
            log.warning("retrying request_id=%s provider=%s attempt=%d in %.2fs after %s",
                        request.request_id, lane.name, request.attempts, wait_s, type(exc).__name__,
                        extra={"request_id": request.request_id, "provider": lane.name,
                               "attempts": request.attempts, "backoff_s": round(wait_s, 3),
                               "error": type(exc).__name__})
        return paused

    @staticmethod
    def _annotate(exc: ProviderError, lane: Lane, request: Request) -> None:
        if exc.provider is None:
            exc.provider = lane.name
        if exc.request_id is None:
            exc.request_id = request.request_id

    # -- one attempt ---------------------------------------------------------------------------

    def _attempt(self, request: Request, lane: Lane, prompt: str,
                 max_tokens: int | None) -> tuple[LLMResponse, float]:
        if request.settled:
            raise _Settled()
        if self._stopping.is_set():
            raise ExecutorShutdownError("executor shut down before the attempt started")
        if lane.paused_until:
            self._wait_out_pause(request, lane)
        if lane.unlimited:
            remaining_s = None if request.deadline is None else self._check_ready(request, lane)
            return self._call(request, lane, prompt, max_tokens, None, remaining_s)
        deadline = request.deadline
        deadline_monotonic = None if deadline is None else time.monotonic() + (deadline - self._clock())
        estimate = (estimate_tokens(prompt, request.request.system, max_tokens)
                    if lane.pcfg.tpm is not None else 0)
        if lane.learner is not None and lane.learner.learns_tpm and lane.pcfg.tpm is not None:
            # A learned TPM may still be the safe start: a request larger than it takes all of it
            # rather than fail (the provider's own limit decides).
            estimate = min(estimate, int(lane.pcfg.tpm))
        ready: list[float | None] = []
        with AttemptHolds(lane, self._stopping) as holds:
            waited_s = holds.take(estimate, deadline_monotonic, lambda: ready.append(self._check_ready(request, lane)))
            lane.note_token_wait(waited_s)
            # From the token on, the attempt starts: a token is never wasted. The token wait was
            # bounded by the deadline, so the time left is what the last check saw minus the wait.
            remaining_s = ready[0]
            if remaining_s is not None:
                remaining_s = max(remaining_s - waited_s, 0.001)
            return self._call(request, lane, prompt, max_tokens, holds, remaining_s, waited_s)

    def _check_ready(self, request: Request, lane: Lane) -> float | None:
        """The last check before an attempt starts; returns the time left (None: no deadline)."""
        if request.settled:
            raise _Settled()
        if self._stopping.is_set():
            raise ExecutorShutdownError(f"executor shut down while {lane.name} waited to start an attempt")
        if request.deadline is None:
            return None
        remaining_s = request.deadline - self._clock()
        if remaining_s <= 0:
            raise self._deadline_error(request, lane, "before an attempt could start")
        return remaining_s

    def _wait_out_pause(self, request: Request, lane: Lane) -> None:
        pause_s = lane.pause_remaining_s()
        if pause_s <= 0:
            return
        if request.deadline is not None and self._clock() + pause_s >= request.deadline:
            raise self._deadline_error(request, lane, f"while {lane.name} is paused by a rate limit ({pause_s:.2f}s)")
        lane.retry.sleep(pause_s)
        if self._stopping.is_set():
            raise ExecutorShutdownError(f"executor shut down while {lane.name} was paused")

    def _call(self, request: Request, lane: Lane, prompt: str, max_tokens: int | None,
              holds: AttemptHolds | None, remaining_s: float | None,
              waited_s: float = 0.0) -> tuple[LLMResponse, float]:
        """Start the attempt: every check is done, nothing here may abort it."""
        request.attempts += 1
        first = request.attempts == 1
        if first:
            request.queue_ms = (self._clock() - request.submit_s) * 1000.0
        # The time left, measured after every wait, is the provider's HTTP timeout.
        call_request = request.request.for_attempt(
            provider=lane.name, model=request.model, request_id=request.request_id, prompt=prompt,
            max_output_tokens=max_tokens, json_schema=request.schema, timeout=remaining_s)
        metrics = lane.metrics
        metrics.on_attempt_start(not first, request.queue_ms if first else None)
        learner = lane.learner
        token = learner.on_start(waited_s) if learner is not None else 0
        t0 = time.perf_counter()
        response: Any = None
        failure: BaseException | None = None
        try:
            response = lane.provider.complete(call_request)
        except BaseException as exc:
            failure = exc
            if learner is not None and isinstance(exc, ProviderError):
                self._learn_from_error(learner, exc, token)
            raise
        finally:
            latency_ms = (time.perf_counter() - t0) * 1000.0
            in_flight = metrics.in_flight  # this attempt included
            if isinstance(response, LLMResponse):
                metrics.on_attempt_end(response.prompt_tokens, response.completion_tokens, response.usage_tokens)
                usage = response.usage_tokens
            else:
                metrics.on_attempt_end(None, None, None)
                usage = None
            if holds is not None:
                holds.spend(usage)
            if lane.concurrency is not None:  # last: the books above are kept whatever happens here
                self._learn(lane, latency_ms / 1000.0, failure, in_flight)
        if not isinstance(response, LLMResponse):
            raise ProviderError(
                f"provider {lane.name!r} returned {type(response).__name__} from complete(), expected LLMResponse",
                provider=lane.name, request_id=request.request_id, retryable=False)
        if learner is not None:
            learner.on_reply(response.rate_limit, token)
        return response, latency_ms

    def _learn(self, lane: Lane, latency_s: float, failure: BaseException | None, in_flight: int) -> None:
        """MAX_PARALLEL=auto: one sample per attempt; start the loops a higher cap allows."""
        if failure is None:
            ok = True
        elif _is_overload(failure):
            ok = False
        else:
            return  # a bad request or a refused key says nothing about the provider's load
        for _ in range(lane.learn(latency_s, ok, in_flight)):
            self._start_worker(lane)

    @staticmethod
    def _learn_from_error(learner: RateLearner, exc: ProviderError, token: int) -> None:
        """A failed attempt teaches the lane's learner: a retryable 429 decreases the pace (a
        quota exhausted for the day is no rate), and any reported limits are adopted."""
        try:
            if isinstance(exc, RateLimitedError) and exc.retryable:
                learner.on_rate_limited(exc.rate_limit, token)
            elif exc.rate_limit is not None:
                learner.on_reply(exc.rate_limit, token)
        except Exception:  # pragma: no cover - learning must never change the attempt's outcome
            log.exception("%s: learning from a failed attempt failed", learner.name)

    @staticmethod
    def _deadline_error(request: Request, lane: Lane, when: str) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"request {request.request_id} deadline of {request.request.timeout}s passed {when} on {lane.name}",
            request_id=request.request_id, provider=lane.name)

    # -- giving up: fallback or the final error ------------------------------------------------

    def _hand_off(self, request: Request, lane: Lane, exc: BaseException) -> bool:
        """Queue ``request`` on the next capable fallback lane with room; True when handed on."""
        if not isinstance(exc, ProviderError) or not exc.retryable or self._stopping.is_set():
            return False
        if not (request.auto or lane.pcfg.fallback) or not self._fallbacks or request.settled:
            return False
        if request.deadline is not None and self._clock() >= request.deadline:
            return False  # the reaper fails it (or has): no queue slot or token for a dead request
        tried = (*request.tried, lane.name)
        for name in self._fallbacks:
            target = self._lanes.get(name)
            if target is None or name in tried or why_not(target, request.request, request.schema) is not None:
                continue
            accepted, spawn = target.offer(request, self._next_seq(), model_for(target, request.request))
            if not accepted:
                continue  # full or closed: try the next one rather than block this worker
            lane.metrics.on_fallback()
            log.warning("request_id=%s falls back from %s to %s after %s", request.request_id, lane.name, name,
                        type(exc).__name__, extra={"request_id": request.request_id, "provider": lane.name,
                                                   "fallback": name, "error": type(exc).__name__})
            if spawn:
                self._start_worker(target)
            return True
        return False

    @staticmethod
    def _final_error(exc: BaseException, lane: Lane, request: Request) -> BaseException:
        """The error the caller sees: a wait hint above the cap is said so, in the same class."""
        if not (isinstance(exc, ProviderError) and exc.retryable
                and hint_above_cap(exc, lane.pcfg.max_retry_wait_s)):
            return exc
        hint = exc.retry_after_s
        assert hint is not None
        message = (f"{exc.provider or lane.name} asked to wait {hint:.1f}s, above the retry cap of "
                   f"{lane.pcfg.max_retry_wait_s:.1f}s (max_retry_wait_s): {exc}")
        kwargs: dict[str, Any] = {"provider": exc.provider, "status": exc.status, "request_id": exc.request_id,
                                  "retryable": False, "retry_after_s": hint}
        try:
            capped: ProviderError = type(exc)(message, **kwargs)
        except TypeError:  # a custom subclass with another signature
            capped = RateLimitedError(message, **kwargs)
        capped.__cause__ = exc
        return capped


def _is_overload(exc: BaseException) -> bool:
    """A failure that says the provider is over its capacity: 429, 503, timeouts, lost connections."""
    if isinstance(exc, RateLimitedError | ProviderUnavailableError | TimeoutError):
        return True
    return isinstance(exc, ProviderError) and exc.status in (429, 503)
