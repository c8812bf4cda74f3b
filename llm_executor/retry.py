"""Retry policy: what is retryable, how long to wait, when to stop (tenacity strategies).

Each decision is one small tenacity strategy, configured at construction and pure on call:

* ``retry_if_retryable``: a ``ProviderError`` whose ``retryable`` is True (the adapters decide
  it at their HTTP boundary: connection errors, timeouts, 408, 429 except quota, 5xx...) and
  whose wait hint, if any, is within ``max_retry_wait_s``.
* ``WaitRetryAfter``: the server's hint (Retry-After, retry-after-ms, Gemini RetryInfo) when it
  gave one, else exponential backoff with full jitter capped at ``backoff_max_s``.
* ``stop_after_attempt(retries left + 1) | stop_when_event_set(stopping) | stop_before_deadline``.

``RetryPolicy.retrying`` composes them into a ``tenacity.Retrying`` for one request on one lane.
The executor makes a request's first attempt without tenacity (the happy path costs nothing:
a ``Retrying`` costs more than the whole request overhead) and hands the loop to tenacity after
the first retryable failure, replaying that failure as tenacity's attempt 1 (see
``lifecycle/runner.py``). Sleeping goes through ``sleep``, by default an interruptible wait on the
executor's ``stopping`` Event; tests inject ``sleep=recorded.append``.
Imports: ``errors``, ``config``, tenacity.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import tenacity
from tenacity.stop import stop_after_attempt, stop_base
from tenacity.wait import wait_base, wait_random_exponential

from .config import ProviderConfig
from .errors import DeadlineExceededError, ExecutorShutdownError, ProviderError

__all__ = [
    "RetryPolicy",
    "WaitRetryAfter",
    "hint_above_cap",
    "is_retryable",
    "retry_if_retryable",
    "stop_before_deadline",
    "stop_when_event_set",
]

# The longest single wait we ever sleep: threading's TIMEOUT_MAX is ~292 years, but a finite,
# sane bound keeps arithmetic on monotonic deadlines exact (issue 11: a 1e300 s Retry-After).
MAX_WAIT_S = 86_400.0


def is_retryable(exc: BaseException) -> bool:
    """True for a provider error that another attempt may cure."""
    return isinstance(exc, ProviderError) and exc.retryable


def hint_above_cap(exc: BaseException, cap_s: float) -> bool:
    """True when ``exc`` asks for a wait longer than ``cap_s`` (retrying would hold a worker)."""
    hint = getattr(exc, "retry_after_s", None)
    return isinstance(hint, int | float) and not hint <= cap_s


class retry_if_retryable(tenacity.retry_base):
    """Retry a retryable ProviderError whose wait hint is within ``cap_s``."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        return exc is not None and is_retryable(exc) and not hint_above_cap(exc, self.cap_s)


class stop_when_event_set(stop_base):
    """Stop retrying once ``event`` is set (a cancelling shutdown)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.event.is_set()


class stop_before_deadline(stop_base):
    """Stop when the next attempt would start at or after ``deadline`` (a ``clock`` value)."""

    def __init__(self, deadline: float | None, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if self.deadline is None:
            return False
        return self.clock() + retry_state.upcoming_sleep >= self.deadline


class WaitRetryAfter(wait_base):
    """Honour the server's Retry-After hint; fall back to our own backoff when absent."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        hint = getattr(exc, "retry_after_s", None)
        if not isinstance(hint, int | float) or math.isnan(hint):
            return float(self.fallback(retry_state))
        return min(MAX_WAIT_S, max(0.0, float(hint)))


class _GiveUp:
    """tenacity's ``retry_error_callback``: raise what the caller must see when retries stop."""

    def __init__(self, deadline: float | None, clock: Callable[[], float], stopping: threading.Event,
                 timeout_s: float | None) -> None:
        self.deadline, self.clock, self.stopping, self.timeout_s = deadline, clock, stopping, timeout_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> NoReturn:
        outcome = retry_state.outcome
        assert outcome is not None and outcome.failed
        exc = outcome.exception()
        assert exc is not None
        if self.stopping.is_set():
            raise ExecutorShutdownError("executor shut down before a retry") from exc
        if self.deadline is not None and self.clock() + retry_state.upcoming_sleep >= self.deadline:
            raise DeadlineExceededError(
                f"request deadline of {self.timeout_s}s passes before the next attempt "
                f"(backoff {retry_state.upcoming_sleep:.2f}s after: {exc})",
                request_id=getattr(exc, "request_id", None), provider=getattr(exc, "provider", None)) from exc
        raise exc


class RetryPolicy:
    """The retry decisions of one lane.

    Args:
        cfg: the lane's ProviderConfig (max_retries, backoff_max_s, max_retry_wait_s).
        stopping: set by a cancelling shutdown; ends retries and interrupts the default sleep.
        sleep: how to wait between attempts; default ``stopping.wait`` (interruptible).
        clock: monotonic seconds, the clock request deadlines are measured on.
    """

    def __init__(
        self,
        cfg: ProviderConfig,
        stopping: threading.Event,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_retries = cfg.max_retries
        self.max_retry_wait_s = cfg.max_retry_wait_s
        self.stopping = stopping
        self.clock = clock
        self.retry = retry_if_retryable(cfg.max_retry_wait_s)
        self.wait = WaitRetryAfter(wait_random_exponential(multiplier=0.5, max=cfg.backoff_max_s))
        self.sleep: Callable[[float], object] = sleep if sleep is not None else stopping.wait

    def _sleep_none(self, seconds: float) -> None:
        self.sleep(seconds)

    def retrying(
        self,
        *,
        retries_left: int,
        deadline: float | None,
        timeout_s: float | None,
        before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> tenacity.Retrying:
        """A ``Retrying`` for one request on this lane, whose attempt 1 has already failed.

        Args:
            retries_left: transient retries this request may still make on this lane.
            deadline: the request's deadline on ``clock`` (None = none).
            timeout_s: the request's timeout, for messages.
            before_sleep: called before each backoff (logging, pausing the lane on a 429).
            sleep: how this loop waits (default: the policy's ``sleep``).
        """
        return tenacity.Retrying(
            retry=self.retry,
            wait=self.wait,
            stop=(stop_after_attempt(retries_left + 1) | stop_when_event_set(self.stopping)
                  | stop_before_deadline(deadline, self.clock)),
            sleep=self._sleep_none if sleep is None else sleep,
            before_sleep=before_sleep,
            retry_error_callback=_GiveUp(deadline, self.clock, self.stopping, timeout_s),
        )
