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
from pyrate_limiter.limiter import SingleBucketFactory

from .config import ExecutorConfig, ProviderConfig, mask_url
from .errors import ConfigError, DeadlineExceededError, ExecutorShutdownError, InvalidRequestError

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
            rates.append(Rate(math.floor(cfg.qps), 1000 + margin_ms))
        else:
            rates.append(Rate(1, math.ceil(1000 / cfg.qps) + margin_ms))
    if cfg.rpm is not None:
        rates.append(Rate(cfg.rpm, 60_000 + margin_ms))
    return sorted(rates, key=lambda r: r.interval)


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


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
        self._last_leak_ms = 0
        if self._rates:
            self._bucket = InMemoryBucket(self._rates)
            # No background Leaker thread (it would outlive shutdown): we leak on acquire.
            self._limiter = Limiter(SingleBucketFactory(self._bucket, schedule_leak=False))

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
            now_ms = _now_ms()
            if now_ms - self._last_leak_ms > 1000:
                self._bucket.leak(now_ms)
                self._last_leak_ms = now_ms
            if self._limiter.try_acquire(self.name, blocking=False):
                return 0.0
            item = RateItem(self.name, _now_ms(), weight=1)
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
            item = RateItem(self.name, _now_ms(), weight=1)
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


class MemoryLaneLimiter(LaneLimiter):
    """The in-process backend: QPS/RPM through pyrate-limiter, TPM and slots in memory."""

    def __init__(self, name: str, cfg: ProviderConfig, *, clock_s: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, cfg, clock_s=clock_s)
        self._tpm = cfg.tpm
        self._tokens_lock = threading.Condition()
        self._token_log: list[tuple[float, int]] = []

    def check_estimate(self, estimate: int) -> None:
        """Reject a request that could never fit the TPM budget.

        Raises:
            InvalidRequestError: ``estimate`` is above the lane's TPM.
        """
        if self._tpm is not None and estimate > self._tpm:
            raise InvalidRequestError(
                f"request needs ~{estimate} tokens (prompt/4 + max_output_tokens), more than "
                f"LLM_EXECUTOR_{self.name.upper()}_TPM={self._tpm}; it could never run",
                field="max_output_tokens")

    def _used(self, now: float) -> int:
        horizon = now - 60.0
        log_ = self._token_log
        while log_ and log_[0][0] <= horizon:
            log_.pop(0)
        return sum(n for _, n in log_)

    def reserve_tokens(self, estimate: int, stopping: threading.Event,
                       deadline_monotonic: float | None = None) -> None:
        """Reserve ``estimate`` tokens of the TPM budget, waiting for the window to slide."""
        if self._tpm is None:
            return
        while True:
            if stopping.is_set():
                raise ExecutorShutdownError(f"executor shut down while {self.name} waited for TPM budget")
            with self._tokens_lock:
                now = self._clock_s()
                if self._used(now) + estimate <= self._tpm:
                    self._token_log.append((now, estimate))
                    return
                wait_s = max(0.01, self._token_log[0][0] + 60.0 - now) if self._token_log else 0.01
            if deadline_monotonic is not None and self._clock_s() + wait_s > deadline_monotonic:
                raise DeadlineExceededError(f"request deadline passes before {self.name}'s TPM budget frees",
                                            provider=self.name)
            stopping.wait(wait_s)

    def settle_tokens(self, reserved: int, actual: int | None) -> None:
        """Replace a reservation by the reported usage (refund or debit the difference)."""
        if self._tpm is None or actual is None or actual == reserved:
            return
        with self._tokens_lock:
            self._token_log.append((self._clock_s(), actual - reserved))

    def acquire_slot(self, stopping: threading.Event,
                     deadline_monotonic: float | None = None) -> Callable[[], None] | None:
        """No global slots in memory: MAX_PARALLEL already bounds this process."""
        return None


def make_lane_limiter(name: str, pcfg: ProviderConfig, ecfg: ExecutorConfig) -> MemoryLaneLimiter:
    """The limiter of lane ``name`` for ``ecfg.rate_backend``."""
    if ecfg.rate_backend != "memory":
        raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(ecfg.rate_backend)!r}: "
                          "expected 'memory' (shared backends are not available in this build)")
    return MemoryLaneLimiter(name, pcfg)
