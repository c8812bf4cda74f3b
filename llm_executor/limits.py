"""Rate limits of one provider lane: QPS and RPM through a pyrate-limiter Limiter.

``LaneLimiter.acquire`` takes one request token right before a provider attempt. It never
sleeps inside pyrate-limiter (whose blocking acquire cannot be interrupted): it asks the
bucket for a token without blocking and, when refused, waits on the executor's ``stopping``
Event for the time the bucket says, so a cancelling shutdown or a request deadline ends the
wait at once.

QPS is enforced as "at most floor(QPS) starts in any window of 1 s (+ a safety margin)"; a
QPS below 1 becomes one start per 1/QPS seconds. The margin absorbs the gap between the token
and the moment the request reaches the wire, so an observer (the emulator, the provider)
never counts more than QPS in any 1 s window.
Imports: ``errors``, ``config``, pyrate-limiter.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pyrate_limiter import InMemoryBucket, Limiter, Rate, RateItem

from .config import ProviderConfig
from .errors import DeadlineExceededError, ExecutorShutdownError

__all__ = ["WINDOW_MARGIN_MS", "LaneLimiter", "build_rates"]

# The bucket stamps a token when it is taken; the request reaches the provider a little later.
# Widening each window by this margin keeps "max starts in any 1 s window" at or below the
# limit as seen by the provider, at a cost of 1% of throughput.
WINDOW_MARGIN_MS = 10


def build_rates(cfg: ProviderConfig, margin_ms: int = WINDOW_MARGIN_MS) -> list[Rate]:
    """The pyrate-limiter rates for ``cfg``'s QPS and RPM (empty when neither is set)."""
    rates: list[Rate] = []
    if cfg.qps is not None:
        if cfg.qps >= 1:
            rates.append(Rate(int(math.floor(cfg.qps)), 1000 + margin_ms))
        else:
            rates.append(Rate(1, int(math.ceil(1000 / cfg.qps)) + margin_ms))
    if cfg.rpm is not None:
        rates.append(Rate(cfg.rpm, 60_000 + margin_ms))
    return sorted(rates, key=lambda r: r.interval)


class LaneLimiter:
    """QPS/RPM gate of one lane (in-process memory backend).

    Args:
        name: the lane name (bucket key).
        cfg: the lane's ProviderConfig.
        clock_s: monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, name: str, cfg: ProviderConfig, *, clock_s: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock_s = clock_s
        self._rates = build_rates(cfg)
        self._bucket: InMemoryBucket | None = None
        self._limiter: Limiter | None = None
        self._lock = threading.Lock()
        if self._rates:
            self._bucket = InMemoryBucket(self._rates)
            self._limiter = Limiter(self._bucket)

    @property
    def is_limited(self) -> bool:
        """True when the lane has a QPS or RPM limit."""
        return self._limiter is not None

    def try_acquire(self) -> float:
        """Take a token if one is free now.

        Returns:
            0.0 when a token was taken, else the seconds to wait before trying again.
        """
        if self._limiter is None or self._bucket is None:
            return 0.0
        with self._lock:
            if self._limiter.try_acquire(self.name, blocking=False):
                return 0.0
            item = RateItem(self.name, self._bucket.now(), weight=1)
            wait_ms = self._bucket.waiting(item)
        if isinstance(wait_ms, int) and wait_ms > 0:
            return wait_ms / 1000.0
        return 0.001

    def acquire(self, stopping: threading.Event, deadline_monotonic: float | None = None) -> None:
        """Take one request token, waiting as long as the rates require.

        Raises:
            ExecutorShutdownError: ``stopping`` was set while waiting.
            DeadlineExceededError: the token would come after ``deadline_monotonic``.
        """
        while True:
            if stopping.is_set():
                raise ExecutorShutdownError(f"executor shut down while {self.name} waited for a rate token")
            wait_s = self.try_acquire()
            if wait_s <= 0.0:
                return
            if deadline_monotonic is not None and self._clock_s() + wait_s > deadline_monotonic:
                raise DeadlineExceededError(
                    f"request deadline passes before {self.name}'s rate limit frees a slot "
                    f"(next slot in {wait_s:.3f}s)", provider=self.name,
                )
            stopping.wait(wait_s)

    def expected_wait_s(self) -> float:
        """Seconds until a token would be free (0 when one is free now); does not take one."""
        if self._limiter is None or self._bucket is None:
            return 0.0
        with self._lock:
            item = RateItem(self.name, self._bucket.now(), weight=1)
            for rate in self._rates:
                count = sum(1 for it in self._bucket.items if it.timestamp >= item.timestamp - rate.interval)
                if count >= rate.limit:
                    oldest = self._bucket.items[-rate.limit].timestamp
                    return max(0.0, (oldest + rate.interval + 1 - item.timestamp) / 1000.0)
        return 0.0

    def close(self) -> None:
        """Stop pyrate-limiter's background leak thread."""
        if self._limiter is not None:
            self._limiter.close()


def estimate_tokens(prompt: str, system: str | None, max_output_tokens: int | None) -> int:
    """A request's token estimate for TPM budgets: characters / 4 plus the output cap."""
    chars = len(prompt) + (len(system) if system else 0)
    return max(1, chars // 4) + (max_output_tokens or 0)
