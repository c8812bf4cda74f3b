"""The storage seam of the limits package, the TPM window arithmetic, and the memory backend.

A ``Backend`` answers five questions for one lane, each without blocking: take a request token,
reserve or adjust tokens of the TPM budget, take or release an in-flight slot. Every method that
would have to wait returns the seconds to wait instead; ``LaneLimiter`` does the waiting, so all
waits are interruptible and deadline-bounded in one place. A backend whose store is unreachable
raises ``BackendLostError`` (and nothing else from its driver); ``LaneLimiter`` applies the
configured failure policy.
Imports: ``config``, pyrate-limiter.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

# pyrate-limiter is imported where a rate is built: it pulls in asyncio and multiprocessing,
# half of ``import llm_executor``'s time, and a lane without QPS/RPM never needs it.
if TYPE_CHECKING:
    from pyrate_limiter import AbstractBucket, Rate

from ..config import ProviderConfig

__all__ = [
    "SLOT_POLL_S",
    "TPM_BUCKET_MS",
    "TPM_WINDOW_BUCKETS",
    "WINDOW_MARGIN_MS",
    "Backend",
    "BackendLostError",
    "MemoryBackend",
    "RequestGate",
    "build_rates",
    "tpm_decide",
    "tpm_refund_plan",
]

# The bucket stamps a token when it is taken; the request reaches the provider a little later.
# Widening each window by this margin keeps "max starts in any 1 s window" at or below the
# limit as seen by the provider, at a cost of 2% of throughput. 20 ms covers a request that
# opens a new connection (loopback); TLS to a remote provider can take longer on a cold start.
WINDOW_MARGIN_MS = 20

# TPM is a counter per 1 s bucket. A bucket counts while it is within the last 61 buckets, so a
# reservation is held between 60 and 61 s: never less than the provider's minute.
TPM_BUCKET_MS = 1000
TPM_WINDOW_BUCKETS = 61

# A slot freed by another process cannot wake our waiters (that would need pub/sub); waiters
# look again this often. It bounds the extra latency of a contended global cap.
SLOT_POLL_S = 0.02

# Expired request entries are deleted this often (pyrate's Leaker, without its thread).
LEAK_EVERY_MS = 10_000


class BackendLostError(Exception):
    """The shared store did not answer (connection refused, timeout, I/O error)."""


# The pacing rate runs this much faster than QPS: the 1 s window stays the hard limit, and
# a timer that wakes a little late on each paced token costs no throughput.
_PACE_HEADROOM = 1.1


def _qps_rates(qps: int, margin_ms: int, burst: int | None = None) -> list[Rate]:
    """At most ``qps`` starts in any 1 s window (+ margin), spread over the window.

    A burst of QPS requests taken at the same instant reaches the provider spread over tens of
    milliseconds (threads, GIL, connection setup), which is enough for the provider's own 1 s
    window to count QPS + 1 at the seam between two bursts. So next to the window rate, a pacing
    rate lets ``k`` requests (about QPS/20, or ``burst``) start every ``k/(1.1 QPS)`` s: bursts
    stay small, and the window, not the pace, sets the throughput (a pace of exactly QPS would
    lose the timer's lateness on every token: 0.965 of QPS measured at QPS 20).
    """
    from pyrate_limiter import Rate

    window = Rate(qps, 1000 + margin_ms)
    k = max(1, qps // 20) if burst is None else min(qps, burst)
    if k >= qps:
        return [window]
    pace = Rate(k, max(1, math.floor(k * 1000 / (_PACE_HEADROOM * qps))))
    return [pace, window]


def build_rates(cfg: ProviderConfig, margin_ms: int = WINDOW_MARGIN_MS) -> list[Rate]:
    """The pyrate-limiter rates for ``cfg``'s QPS and RPM (empty when neither is set)."""
    if cfg.qps is None and cfg.rpm is None:
        return []
    from pyrate_limiter import Rate

    rates: list[Rate] = []
    if cfg.qps is not None:
        if cfg.qps >= 1:
            rates.extend(_qps_rates(math.floor(cfg.qps), margin_ms, cfg.burst))
        else:
            rates.append(Rate(1, math.ceil(1000 / cfg.qps) + margin_ms))
    if cfg.rpm is not None:
        rpm = Rate(cfg.rpm, 60_000 + margin_ms)
        # pyrate-limiter accepts only rate lists whose limits grow and whose density falls
        # (issue #239 there): a shorter rate allowing as many requests as the RPM is implied by
        # it and dropped; an RPM looser than the QPS in the long run is implied and skipped.
        rates = [r for r in rates if r.limit < cfg.rpm]
        if not rates or cfg.rpm / rpm.interval < rates[-1].limit / rates[-1].interval:
            rates.append(rpm)
    return sorted(rates, key=lambda r: r.interval)


def tpm_decide(buckets: Mapping[int, int], now_ms: int, estimate: int, limit: int) -> int:
    """Whether ``estimate`` tokens fit in the TPM window, as a wait.

    Args:
        buckets: tokens per bucket index (``ms // TPM_BUCKET_MS``), only the live ones.
        now_ms: the store's clock.
        estimate: tokens to reserve.
        limit: the TPM budget.

    Returns:
        0 when they fit now, else the milliseconds until enough old buckets expire.
    """
    used = sum(buckets.values())
    if used + estimate <= limit:
        return 0
    freed = 0
    for index in sorted(buckets):
        freed += buckets[index]
        if used - freed + estimate <= limit:
            return max(1, (index + TPM_WINDOW_BUCKETS) * TPM_BUCKET_MS - now_ms)
    return TPM_WINDOW_BUCKETS * TPM_BUCKET_MS  # only when estimate > limit, rejected before


def tpm_refund_plan(buckets: Mapping[int, int], refund: int) -> dict[int, int]:
    """New values of the buckets a refund of ``refund`` tokens lowers, oldest first.

    Settlement does not know which bucket holds the reservation it corrects. Taking the refund
    from the oldest buckets keeps the window's total exact now and errs on the safe side later:
    the tokens left in younger buckets stay counted longer, never shorter.
    """
    plan: dict[int, int] = {}
    for index in sorted(buckets):
        if refund <= 0:
            break
        take = min(refund, max(0, buckets[index]))
        if take:
            plan[index] = buckets[index] - take
            refund -= take
    return plan


def tpm_live_since(now_ms: int) -> int:
    """The oldest bucket index still counted at ``now_ms``."""
    return now_ms // TPM_BUCKET_MS - (TPM_WINDOW_BUCKETS - 1)


class Backend(Protocol):
    """Non-blocking limit operations of one lane; waits are returned, never slept."""

    url: str

    def try_acquire_request(self) -> float:
        """Take a QPS/RPM token: 0.0 when taken, else seconds until one may be free."""

    def request_wait_s(self) -> float:
        """Seconds until a request token would be free; takes none."""

    def try_reserve_tokens(self, estimate: int, limit: int) -> float:
        """Reserve ``estimate`` TPM tokens: 0.0 when reserved, else seconds to wait."""

    def adjust_tokens(self, delta: int) -> None:
        """Debit (``delta`` > 0) or refund (< 0) the TPM window."""

    def tpm_used(self) -> int:
        """Tokens counted in the TPM window now."""

    def slots_held(self) -> int:
        """Unexpired in-flight slots held now, by every process."""

    def try_acquire_slot(self, holder: str, cap: int, ttl_ms: int) -> bool:
        """Take an in-flight slot leased to ``holder`` for ``ttl_ms``; False when all are held."""

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        """Extend the leases of ``holders``; returns those that were lost (expired and reclaimed)."""

    def release_slot(self, holder: str) -> None:
        """Give a slot back (no-op when it is not held)."""

    def ping(self) -> None:
        """Raise BackendLostError unless the store answers."""

    def close(self) -> None:
        """Close connections."""


class RequestGate:
    """QPS/RPM over one pyrate-limiter bucket, driven without pyrate's Limiter.

    Limiter's non-blocking acquire fails at once when another process holds the SQLite file
    lock, and it stamps the item before taking that lock, so a token could carry a time older
    than its real start. Here the caller holds the store's lock (``critical``) while it reads
    the clock and puts the item. Leaking runs inline every ``LEAK_EVERY_MS``, so no Leaker
    thread is left behind.
    """

    def __init__(
        self,
        name: str,
        bucket: AbstractBucket,
        now_ms: Callable[[], int],
        on_leak: Callable[[int], None] | None = None,
    ) -> None:
        from pyrate_limiter import RateItem

        self._item_cls = RateItem
        self.name = name
        self.bucket = bucket
        self.rates: list[Rate] = list(bucket.rates)
        self._now_ms = now_ms
        self._on_leak = on_leak
        self._next_leak_ms = 0

    def try_acquire(self) -> float:
        """Take a token (caller holds the store's lock): 0.0, or the seconds to wait."""
        now = self._now_ms()
        self._maybe_leak(now)
        item = self._item_cls(self.name, now, weight=1)
        if self.bucket.put(item):
            return 0.0
        wait_ms = self.bucket.waiting(item)
        return wait_ms / 1000.0 if isinstance(wait_ms, int) and wait_ms > 0 else 0.001

    def wait_s(self) -> float:
        """Seconds until a token would be free, from the newest entries; takes none."""
        now = self._now_ms()
        wait_ms = 0
        for rate in self.rates:
            blocking = self.bucket.peek(rate.limit - 1)
            if isinstance(blocking, self._item_cls) and blocking.timestamp >= now - rate.interval:
                wait_ms = max(wait_ms, blocking.timestamp + rate.interval + 1 - now)
        return wait_ms / 1000.0

    def _maybe_leak(self, now: int) -> None:
        if now >= self._next_leak_ms:
            self._next_leak_ms = now + LEAK_EVERY_MS
            self.bucket.leak(now)
            if self._on_leak is not None:
                self._on_leak(now)


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class MemoryBackend:
    """Limits of one process: pyrate's InMemoryBucket, a TPM counter and a slot count.

    Also the local fallback of a shared backend (``LLM_EXECUTOR_BACKEND_FAILURE=local``).
    """

    url = "memory"

    def __init__(self, name: str, rates: list[Rate], now_ms: Callable[[], int] = _monotonic_ms) -> None:
        self._lock = threading.Lock()
        self._now_ms = now_ms
        if rates:
            from pyrate_limiter import InMemoryBucket

            self._gate: RequestGate | None = RequestGate(name, InMemoryBucket(rates), now_ms)
        else:
            self._gate = None
        self._tpm: dict[int, int] = {}  # guarded by _lock
        self._slots: set[str] = set()  # guarded by _lock

    def try_acquire_request(self) -> float:
        if self._gate is None:
            return 0.0
        with self._lock:
            return self._gate.try_acquire()

    def request_wait_s(self) -> float:
        if self._gate is None:
            return 0.0
        with self._lock:
            return self._gate.wait_s()

    def _live_tpm(self, now: int) -> dict[int, int]:
        since = tpm_live_since(now)
        for index in [i for i in self._tpm if i < since]:
            del self._tpm[index]
        return self._tpm

    def try_reserve_tokens(self, estimate: int, limit: int) -> float:
        with self._lock:
            now = self._now_ms()
            live = self._live_tpm(now)
            wait_ms = tpm_decide(live, now, estimate, limit)
            if wait_ms == 0:
                index = now // TPM_BUCKET_MS
                live[index] = live.get(index, 0) + estimate
            return wait_ms / 1000.0

    def adjust_tokens(self, delta: int) -> None:
        with self._lock:
            now = self._now_ms()
            live = self._live_tpm(now)
            if delta > 0:
                index = now // TPM_BUCKET_MS
                live[index] = live.get(index, 0) + delta
            elif delta < 0:
                live.update(tpm_refund_plan(live, -delta))

    def tpm_used(self) -> int:
        """Tokens counted in the window now (for tests and stats)."""
        with self._lock:
            return sum(self._live_tpm(self._now_ms()).values())

    def try_acquire_slot(self, holder: str, cap: int, ttl_ms: int) -> bool:
        with self._lock:
            if len(self._slots) >= cap:
                return False
            self._slots.add(holder)
            return True

    def slots_held(self) -> int:
        with self._lock:
            return len(self._slots)

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        return set()  # a process's own memory cannot outlive it: nothing to lease

    def release_slot(self, holder: str) -> None:
        with self._lock:
            self._slots.discard(holder)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
