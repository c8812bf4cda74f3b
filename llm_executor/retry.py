"""Retry policy: what is retryable, how long to wait, when to stop (tenacity strategies).

Each decision is one small tenacity strategy, configured at construction and pure on call,
so one ``RetryPolicy`` is shared by every thread of a lane:

* ``retry_if_retryable``: a ``ProviderError`` whose ``retryable`` is True (the adapters decide
  it at their HTTP boundary: connection errors, timeouts, 408, 429 except quota, 5xx...).
* ``WaitRetryAfter``: the server's hint (Retry-After, retry-after-ms, Gemini RetryInfo) when it
  gave one, else exponential backoff with full jitter capped at ``backoff_max_s``.
* ``stop_after_attempt(max_retries + 1) | stop_when_event_set(stopping)``.

The executor drives the loop itself (it must take a fresh rate token and re-check the deadline
before every attempt), so the happy path costs nothing: ``RetryPolicy.next_wait`` is only
called after a failure. Sleeping goes through ``sleep``, by default an interruptible wait on the
executor's ``stopping`` Event; tests inject ``sleep=recorded.append``.
Imports: ``errors``, ``config``, tenacity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import tenacity
from tenacity.stop import stop_after_attempt, stop_base
from tenacity.wait import wait_base, wait_random_exponential

from .config import ProviderConfig
from .errors import ProviderError, RateLimitedError

__all__ = [
    "RetryPolicy",
    "WaitRetryAfter",
    "is_retryable",
    "retry_if_retryable",
    "stop_when_event_set",
]


def is_retryable(exc: BaseException) -> bool:
    """True for a provider error that another attempt may cure."""
    return isinstance(exc, ProviderError) and exc.retryable


retry_if_retryable = tenacity.retry_if_exception(is_retryable)


class stop_when_event_set(stop_base):
    """Stop retrying once ``event`` is set (a cancelling shutdown)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.event.is_set()


class WaitRetryAfter(wait_base):
    """Honour the server's Retry-After hint; fall back to our own backoff when absent."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        hint = getattr(exc, "retry_after_s", None)
        if hint is None:
            return float(self.fallback(retry_state))
        return max(0.0, float(hint))


class RetryPolicy:
    """The retry decisions of one lane.

    Args:
        cfg: the lane's ProviderConfig (max_retries, backoff_max_s, max_retry_wait_s).
        stopping: set by a cancelling shutdown; ends retries and interrupts the default sleep.
        sleep: how to wait between attempts; default ``stopping.wait`` (interruptible).
    """

    def __init__(
        self,
        cfg: ProviderConfig,
        stopping: threading.Event,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.max_retries = cfg.max_retries
        self.max_retry_wait_s = cfg.max_retry_wait_s
        self.retry = retry_if_retryable
        self.wait = WaitRetryAfter(wait_random_exponential(multiplier=0.5, max=cfg.backoff_max_s))
        self.stop = stop_after_attempt(cfg.max_retries + 1) | stop_when_event_set(stopping)
        self.sleep: Callable[[float], object] = sleep if sleep is not None else stopping.wait

    def new_state(self) -> tenacity.RetryCallState:
        """Per-request state (attempt number, last outcome); the policy itself holds none."""
        return tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]

    def next_wait(self, state: tenacity.RetryCallState, exc: BaseException) -> float | None:
        """Record the failed attempt in ``state`` and decide.

        Returns:
            The seconds to wait before the next attempt, or None when ``exc`` must be raised.

        Raises:
            RateLimitedError: the server asked for a wait above ``max_retry_wait_s``: failing
                now beats holding a worker for minutes (``retry_after_s`` says when to come back).
        """
        state.outcome = tenacity.Future.construct(state.attempt_number, exc, True)
        if not self.retry(state):
            return None
        hint = getattr(exc, "retry_after_s", None)
        if hint is not None and hint > self.max_retry_wait_s:
            assert isinstance(exc, ProviderError)
            raise RateLimitedError(
                f"{exc.provider or 'provider'} asked to wait {hint:.1f}s, above the retry cap of "
                f"{self.max_retry_wait_s:.1f}s (max_retry_wait_s): {exc}",
                provider=exc.provider, status=exc.status, request_id=exc.request_id,
                retryable=False, retry_after_s=hint,
            ) from exc
        if self.stop(state):
            return None
        wait_s = float(self.wait(state))
        state.attempt_number += 1
        return wait_s
