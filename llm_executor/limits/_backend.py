"""The storage seam of the limits package, the limit arithmetic, and the memory backend.

A ``Backend`` answers one question per start, without blocking: may this request start, and
when? ``Backend.admit(ask)`` takes, all or nothing, a global in-flight slot, a reservation of
the TPM budget and a rate entry, and says how long to wait; it never sleeps. ``LaneLimiter``
does the waiting, so all waits are interruptible and deadline-bounded in one place. A backend
whose store is unreachable raises ``BackendLostError`` (and nothing else from its driver);
``LaneLimiter`` applies the configured failure policy.

The arithmetic lives here as pure functions of the store's contents and the store's clock:
``rate_wait_ms`` (a sliding-window log), ``tpm_decide``/``tpm_refund_plan`` (1 s token
buckets) and ``admit_decide`` (the order of the three checks). The memory and SQLite backends
call them; the Redis backend mirrors them line for line in Lua, and one property suite runs
the same operations over every backend (tests/limits/test_properties.py).

Limits travel with each call (``Ask.rates``, ``Ask.tpm_limit``, ``Ask.cap``), never with the
store, so a lane's QPS/RPM can change at run time without rebuilding its backend.
Imports: ``config``.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import DEFAULT_WINDOW_MARGIN_MS, ProviderConfig, known

__all__ = [
    "SLOT_POLL_MS",
    "TPM_BUCKET_MS",
    "TPM_WINDOW_BUCKETS",
    "WINDOW_MARGIN_MS",
    "Admitted",
    "Ask",
    "Backend",
    "BackendLostError",
    "MemoryBackend",
    "Rate",
    "Verdict",
    "admit_decide",
    "build_rates",
    "rate_horizon_ms",
    "rate_wait_ms",
    "tpm_decide",
    "tpm_refund_plan",
]

# The store stamps a start when it is admitted; the request reaches the provider a little later
# (thread wake-up, connection). Widening each window by this margin keeps "max starts in any 1 s
# window" at or below the limit as seen by the provider, at a cost of 2% of throughput. 20 ms
# covers a request that opens a new connection (loopback); TLS to a remote provider can take
# longer on a cold start. The default of ``ProviderConfig.window_margin_ms``.
WINDOW_MARGIN_MS = DEFAULT_WINDOW_MARGIN_MS

# TPM is a counter per 1 s bucket. A bucket counts while it is within the last 61 buckets, so a
# reservation is held between 60 and 61 s: never less than the provider's minute.
TPM_BUCKET_MS = 1000
TPM_WINDOW_BUCKETS = 61

# A slot freed by another process cannot wake our waiters (that would need pub/sub); waiters
# look again this often. It bounds the extra latency of a contended global cap.
SLOT_POLL_MS = 20

# The pacing rate runs this much faster than QPS: the 1 s window stays the hard limit, and
# a timer that wakes a little late on each paced token costs no throughput.
_PACE_HEADROOM = 1.1


class BackendLostError(Exception):
    """The shared store did not answer (connection refused, timeout, I/O error, lock held too long)."""


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` starts in any window of ``interval_ms`` (a start counts while it is
    within ``interval_ms`` of now, both ends included, as pyrate-limiter counts)."""

    limit: int
    interval_ms: int


def _qps_rates(qps: float, margin_ms: int, burst: int | None = None, keep_fraction: bool = False) -> list[Rate]:
    """The window of a QPS (+ margin), and a pacing rate that spreads the starts over it.

    A configured QPS (DESIGN: never more than QPS starts in any 1 s window) is at most
    ``floor(qps)`` starts per 1 s; below 1, one start per 1/QPS s. A *learned* pace
    (``keep_fraction``: QPS=auto, where the bound is the provider's own limit, of which the pace
    is a fraction) keeps its fraction instead: ``n = ceil(qps)`` starts per ``n / qps`` s, so
    36.25/s is 37 starts per 1.021 s (35.5/s with the 20 ms margin), not 36 per 1 s (35.3/s); no
    1 s window then holds more than ``ceil(qps)``, which the provider's whole per-second limit
    above the pace allows. Whole and sub-1 paces get the same window either way.

    A burst of QPS requests taken at the same instant reaches the provider spread over tens of
    milliseconds (threads, GIL, connection setup), which is enough for the provider's own 1 s
    window to count QPS + 1 at the seam between two bursts. So next to the window rate, a pacing
    rate lets ``k`` requests (about QPS/20, or ``burst``) start every ``k/(1.1 QPS)`` s: bursts
    stay small, and the window, not the pace, sets the throughput (a pace of exactly QPS would
    lose the timer's lateness on every token: 0.965 of QPS measured at QPS 20).
    """
    if keep_fraction or qps < 1:
        n = max(1, math.ceil(qps))
        window = Rate(n, math.ceil(n * 1000 / qps) + margin_ms)
    else:
        n = math.floor(qps)
        window = Rate(n, 1000 + margin_ms)
    k = max(1, n // 20) if burst is None else min(n, burst)
    if k >= n:
        return [window]
    pace = Rate(k, max(1, math.floor(k * 1000 / (_PACE_HEADROOM * qps))))
    return [pace, window]


def build_rates(cfg: ProviderConfig, margin_ms: int | None = None, *, learned_qps: bool = False) -> tuple[Rate, ...]:
    """The rates for ``cfg``'s QPS and RPM, shortest window first (empty when neither is set).

    ``margin_ms`` defaults to ``cfg.window_margin_ms`` (``WINDOW_MARGIN_MS`` unless configured).
    ``learned_qps``: ``cfg.qps`` is a learned pace (QPS=auto), which keeps its fraction
    (``_qps_rates``); a configured QPS never allows more than itself in any 1 s window.
    """
    if margin_ms is None:
        margin_ms = cfg.window_margin_ms
    rates: list[Rate] = []
    qps, rpm_limit = known(cfg.qps), known(cfg.rpm)  # "auto" is fed in as a number (limits.learn)
    if qps is not None:
        rates.extend(_qps_rates(qps, margin_ms, cfg.burst, keep_fraction=learned_qps))
    if rpm_limit is not None:
        rpm = Rate(rpm_limit, 60_000 + margin_ms)
        # A shorter rate allowing as many requests as the RPM is implied by it and dropped; an
        # RPM looser than the QPS in the long run is implied and skipped.
        rates = [r for r in rates if r.limit < rpm_limit]
        if not rates or rpm_limit / rpm.interval_ms < rates[-1].limit / rates[-1].interval_ms:
            rates.append(rpm)
    return tuple(sorted(rates, key=lambda r: r.interval_ms))


# -- the arithmetic (mirrored in _redis.py's Lua) ---------------------------------------------------


def rate_wait_ms(now_ms: int, rates: Sequence[Rate], nth_newest: Callable[[int], int | None]) -> int:
    """Milliseconds from ``now_ms`` to the earliest start one more request may have.

    The log holds one start time per admitted request, some possibly ahead of now (reserved by
    callers sleeping until their turn). A new start goes at or after the newest one (first come,
    first served across processes), and for each rate after the ``limit``-th newest start has
    left its window, so every window ending at the new start holds at most ``limit`` starts.

    Args:
        now_ms: the store's clock.
        rates: the limits of this call.
        nth_newest: the start time of the n-th newest entry (0 = newest), None past the oldest.
    """
    start = now_ms
    newest = nth_newest(0)
    if newest is not None and newest > start:
        start = newest
    for rate in rates:
        blocking = nth_newest(rate.limit - 1)
        if blocking is not None and blocking + rate.interval_ms + 1 > start:
            start = blocking + rate.interval_ms + 1
    return start - now_ms


def rate_horizon_ms(now_ms: int, rates: Sequence[Rate]) -> int:
    """Entries older than this cannot limit a start at or after ``now_ms``: they may be deleted."""
    return now_ms - max((r.interval_ms for r in rates), default=0)


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


@dataclass(frozen=True, slots=True)
class Ask:
    """What one start asks of the store, all or nothing; the limits come with the ask.

    Attributes:
        rates: QPS/RPM limits; empty = no rate entry.
        member: unique name of the rate entry (``cancel`` removes it). An entry of the same
            member already in the log is replaced: asking again moves a reserved start.
        max_wait_ms: a start up to this far ahead is reserved and the caller sleeps until it;
            further ahead, nothing is taken (0 = now or never, as ``try_acquire``).
        tokens: TPM tokens to reserve when ``tpm_limit`` is set.
        tpm_limit: the TPM budget; None = no reservation.
        holder: name of the in-flight slot lease when ``cap`` is set.
        cap: the global in-flight cap; None = no slot.
        ttl_ms: the slot lease's lifetime (renewed by the holder while its call runs).
    """

    rates: tuple[Rate, ...] = ()
    member: str = ""
    max_wait_ms: int = 0
    tokens: int = 0
    tpm_limit: int | None = None
    holder: str = ""
    cap: int | None = None
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The store's answer to an ``Ask``.

    Attributes:
        taken: everything asked for was taken (the start is at ``wait_ms`` from now).
        wait_ms: when taken, how far ahead the reserved start is (0 = now); when not, how long
            until asking again may succeed.
        blocked_by: "" when taken, else the first limit that refused: "slot", "tokens" or "rate".
        now_ms: the store's clock when it decided (the reserved start is ``now_ms + wait_ms``).
    """

    taken: bool
    wait_ms: int
    blocked_by: str = ""
    now_ms: int = 0


def admit_decide(ask: Ask, now_ms: int, *, slot_taken: bool, slots_held: int, tpm_buckets: Mapping[int, int],
                 nth_newest: Callable[[int], int | None]) -> Verdict:
    """The verdict on ``ask`` given the store's state (expired leases and dead buckets removed).

    Checks run slot, tokens, rate; the first that refuses decides and nothing is taken.

    Args:
        slot_taken: ``ask.holder`` already holds a live lease (taking it again is a renewal).
        slots_held: live leases of every holder.
        tpm_buckets: live TPM buckets.
        nth_newest: see ``rate_wait_ms``.
    """
    if ask.cap is not None and not slot_taken and slots_held >= ask.cap:
        return Verdict(False, SLOT_POLL_MS, "slot", now_ms)
    if ask.tpm_limit is not None:
        tpm_wait = tpm_decide(tpm_buckets, now_ms, ask.tokens, ask.tpm_limit)
        if tpm_wait:
            return Verdict(False, tpm_wait, "tokens", now_ms)
    wait_ms = rate_wait_ms(now_ms, ask.rates, nth_newest) if ask.rates else 0
    if wait_ms > ask.max_wait_ms:
        return Verdict(False, wait_ms, "rate", now_ms)
    return Verdict(True, wait_ms, "", now_ms)


@dataclass(frozen=True, slots=True)
class Admitted:
    """What a local backend took while the shared store was lost, for recording into it later.

    Attributes:
        rate_entries: (member, age in ms) per rate entry: its start relative to now (positive =
            in the past; negative = reserved ahead), so the store can place it on its own clock.
            Recording an entry the store already has (same member) moves it, never adds it.
        tpm_ages_ms: per TPM bucket, (age of the bucket's start in ms, tokens).
        holders: in-flight slot holders still held.
    """

    rate_entries: tuple[tuple[str, int], ...] = ()
    tpm_ages_ms: tuple[tuple[int, int], ...] = ()
    holders: tuple[str, ...] = ()


# A learned-limits record nobody wrote for this long is dropped (the next process starts afresh).
LEARNED_TTL_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class LearnedRecord:
    """The learned limits of a lane as the store keeps them (``Backend.learned``).

    Attributes:
        version: bumped by every write (0: nothing written yet).
        changed_ms: the store's clock at the last write.
        data: what the learner wrote (JSON text; "" while version is 0).
        now_ms: the store's clock when it answered.
        applied: the write asked for was made.
    """

    version: int
    changed_ms: int
    data: str
    now_ms: int
    applied: bool = False


def learned_decide(version: int, changed_ms: int, now_ms: int, expected_version: int, min_age_ms: int) -> bool:
    """Whether a write of the learned record is made (mirrored in _redis.py's Lua).

    Compare-and-set on the version, and at most one write per ``min_age_ms`` (0: any time) so N
    processes that each want to raise a limit every interval raise it once per interval, not N
    times. A read asks with ``expected_version`` -1, which never matches.
    """
    return version == expected_version and (version == 0 or now_ms - changed_ms >= min_age_ms)


class Backend(Protocol):
    """Non-blocking limit operations of one lane; waits are returned, never slept."""

    url: str
    """The store's URL with any password masked (never the password)."""

    def admit(self, ask: Ask) -> Verdict:
        """Take what ``ask`` asks for, all or nothing (see ``admit_decide``)."""

    def cancel(self, member: str) -> None:
        """Remove a rate entry (a reserved start its caller will not use)."""

    def rate_wait_s(self, rates: Sequence[Rate]) -> float:
        """Seconds until a start under ``rates`` would be free; takes none."""

    def adjust_tokens(self, delta: int) -> None:
        """Debit (``delta`` > 0) or refund (< 0) the TPM window."""

    def tpm_used(self) -> int:
        """Tokens counted in the TPM window now."""

    def slots_held(self) -> int:
        """Unexpired in-flight slots held now, by every process."""

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        """Extend the leases of ``holders``; returns those that were lost (expired and reclaimed)."""

    def release_slot(self, holder: str) -> None:
        """Give a slot back (no-op when it is not held)."""

    def record(self, usage: Admitted, rates: Sequence[Rate], ttl_ms: int) -> None:
        """Add what a local fallback took (rate entries, TPM tokens, slot leases) to the store."""

    def learned(self, expected_version: int, data: str, min_age_ms: int) -> LearnedRecord:
        """Write the lane's learned-limits record if ``learned_decide`` says so; the record after.

        ``expected_version`` -1 only reads it.
        """

    def ping(self) -> None:
        """Raise BackendLostError unless the store answers (and would accept a write)."""

    def close(self) -> None:
        """Close connections; never blocks longer than the store's timeouts."""


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class MemoryBackend:
    """Limits of one process: a sorted log of starts, TPM buckets and a set of slot holders.

    Also the local fallback of a shared backend (``LLM_EXECUTOR_BACKEND_FAILURE=local``), which
    is why it can say what it took (``usage``), take in what was taken elsewhere (``record``),
    and be sealed while what it took is handed back to the shared store.
    """

    url = "memory"

    def __init__(self, now_ms: Callable[[], int] = _monotonic_ms) -> None:
        self._lock = threading.Lock()
        self._now_ms = now_ms
        self._log: list[tuple[int, str]] = []  # guarded by _lock: (start, member), ascending
        self._members: dict[str, int] = {}  # guarded by _lock: member -> start
        self._tpm: dict[int, int] = {}  # guarded by _lock
        self._slots: set[str] = set()  # guarded by _lock
        self._sealed = False  # guarded by _lock
        self._learned = (0, 0, "")  # guarded by _lock: version, changed_ms, data
        self.round_trips = 0

    def _nth_newest(self, n: int) -> int | None:
        return self._log[-1 - n][0] if 0 <= n < len(self._log) else None

    def _add_entry(self, start: int, member: str) -> None:
        old = self._members.pop(member, None)
        if old is not None:
            self._log.remove((old, member))
        bisect.insort(self._log, (start, member))
        self._members[member] = start

    def _trim(self, now: int, rates: Sequence[Rate]) -> None:
        cut = bisect.bisect_left(self._log, (rate_horizon_ms(now, rates),))
        if cut:
            for _, member in self._log[:cut]:
                self._members.pop(member, None)
            del self._log[:cut]

    def _live_tpm(self, now: int) -> dict[int, int]:
        since = tpm_live_since(now)
        for index in [i for i in self._tpm if i < since]:
            del self._tpm[index]
        return self._tpm

    def admit(self, ask: Ask) -> Verdict:
        with self._lock:
            if self._sealed:
                # Being handed to the shared store: ask again shortly, by then on the shared store.
                return Verdict(False, SLOT_POLL_MS, "rejoin", self._now_ms())
            now = self._now_ms()
            if ask.rates:
                self._remove(ask.member)
                self._trim(now, ask.rates)
            verdict = admit_decide(ask, now, slot_taken=ask.holder in self._slots, slots_held=len(self._slots),
                                   tpm_buckets=self._live_tpm(now) if ask.tpm_limit is not None else {},
                                   nth_newest=self._nth_newest)
            if verdict.taken:
                start = now + verdict.wait_ms
                if ask.cap is not None:
                    self._slots.add(ask.holder)
                if ask.tpm_limit is not None and ask.tokens:
                    index = start // TPM_BUCKET_MS
                    self._tpm[index] = self._tpm.get(index, 0) + ask.tokens
                if ask.rates:
                    self._add_entry(start, ask.member)
            return verdict

    def _remove(self, member: str) -> None:
        start = self._members.pop(member, None)
        if start is not None:
            self._log.remove((start, member))

    def cancel(self, member: str) -> None:
        with self._lock:
            self._remove(member)

    def rate_wait_s(self, rates: Sequence[Rate]) -> float:
        with self._lock:
            return rate_wait_ms(self._now_ms(), rates, self._nth_newest) / 1000.0

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
        with self._lock:
            return sum(self._live_tpm(self._now_ms()).values())

    def slots_held(self) -> int:
        with self._lock:
            return len(self._slots)

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        return set()  # a process's own memory cannot outlive it: nothing to lease

    def release_slot(self, holder: str) -> None:
        with self._lock:
            self._slots.discard(holder)

    def _usage(self) -> Admitted:
        now = self._now_ms()
        return Admitted(
            rate_entries=tuple((member, now - start) for start, member in self._log),
            tpm_ages_ms=tuple((now - i * TPM_BUCKET_MS, v) for i, v in sorted(self._live_tpm(now).items()) if v),
            holders=tuple(sorted(self._slots)),
        )

    def usage(self) -> Admitted:
        """What this backend holds now, relative to its clock (see ``Admitted``)."""
        with self._lock:
            return self._usage()

    def seal(self) -> Admitted:
        """Refuse every admission from now on ("rejoin": ask again shortly) and say what was taken."""
        with self._lock:
            self._sealed = True
            return self._usage()

    def unseal(self) -> None:
        """Admit again (handing over to the shared store failed)."""
        with self._lock:
            self._sealed = False

    def record(self, usage: Admitted, rates: Sequence[Rate], ttl_ms: int) -> None:
        with self._lock:
            now = self._now_ms()
            for member, age in usage.rate_entries:
                self._add_entry(now - age, member)
            for age, tokens in usage.tpm_ages_ms:
                index = (now - age) // TPM_BUCKET_MS
                self._tpm[index] = self._tpm.get(index, 0) + tokens
            self._slots.update(usage.holders)

    def learned(self, expected_version: int, data: str, min_age_ms: int) -> LearnedRecord:
        with self._lock:
            now = self._now_ms()
            version, changed, current = self._learned
            if version and now - changed > LEARNED_TTL_MS:
                version, changed, current = 0, 0, ""
            if learned_decide(version, changed, now, expected_version, min_age_ms):
                self._learned = (version + 1, now, data)
                return LearnedRecord(version + 1, now, data, now, applied=True)
            return LearnedRecord(version, changed, current, now)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
