"""Limits of one provider lane: QPS/RPM, a TPM budget and an in-flight cap, local or shared.

``make_lane_limiter`` picks the store from ``ExecutorConfig.rate_backend``:

* ``memory``: this process only. N processes get N x the limit.
* ``sqlite:///path``: every process on one host (one database file, the host's monotonic clock).
* ``redis://host:port/db`` (``rediss://`` for TLS): every process on every host.
* ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://``): the same through Redis Cluster.

Shared keys are ``{namespace}:{provider}`` plus a short sha256 of the provider's API key when
one is set (never the key), so two teams sharing a Redis do not share limits by accident.

One start takes what it needs in one call to the store (``LaneLimiter.admit``: a global slot,
a TPM reservation and a rate entry, all or nothing). A rate entry may be reserved ahead: the
store answers "yours, at now + w" and the caller sleeps w; so a hundred waiting threads cost a
hundred calls, not a hundred per freed token. ``LaneLimiter`` never sleeps inside a store: it
waits on the executor's ``stopping`` Event, so a cancelling shutdown or a request deadline ends
every wait at once (and gives back what it had reserved).

QPS is enforced as "at most floor(QPS) starts in any window of 1 s (+ a safety margin)"; a QPS
below 1 becomes one start per 1/QPS seconds. A learned pace (QPS=auto) keeps its fraction
instead: ceil(QPS) starts per ceil(QPS)/QPS s, its bound being the provider's limit. The margin absorbs
the gap between the token and the moment the request reaches the wire. The limits travel with
each call, so ``reconfigure`` changes them at run time.

A shared store lost mid-run is handled by ``ExecutorConfig.backend_failure``: ``fail_closed``
fails the request with ``ProviderUnavailableError``; ``local`` logs one WARNING and carries on
with limits of this process only (seeded with what this process had taken from the shared
store), asks the store again on demand (at most every ``RECOVERY_CHECK_S``), and before it goes
back records everything it took locally into the store, so the way back never exceeds the
shared limits.
Imports: ``errors``, ``config``; redis-py only when a redis URL is configured.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ..config import ExecutorConfig, ProviderConfig, known, mask_url
from ..errors import (
    ConfigError,
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
    ProviderUnavailableError,
)
from ._backend import (
    WINDOW_MARGIN_MS,
    Admitted,
    Ask,
    Backend,
    BackendLostError,
    LearnedRecord,
    MemoryBackend,
    Rate,
    Verdict,
    build_rates,
)

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "RECOVERY_CHECK_S",
    "SLOT_POLL_MAX_S",
    "WINDOW_MARGIN_MS",
    "Admission",
    "LaneLimiter",
    "Rate",
    "build_rates",
    "estimate_tokens",
    "lane_key",
    "make_lane_limiter",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A slot's lease outlives a hung or killed holder by at most this long; the holder renews it
# every third of it while its call runs.
DEFAULT_LEASE_TTL_S = 30.0

# While running on local limits after losing the shared store, a call asks the store again
# when this long has passed since the last try (one caller at a time; the others stay local).
RECOVERY_CHECK_S = 0.5

# Without a deadline a start may be reserved this far ahead (about 24 days: no limit in practice).
_NO_DEADLINE_MS = 2**31 - 1



def _late_wake_s(cfg: ProviderConfig) -> float:
    """How much later than its reserved start a caller may start before it asks again for a start
    it can keep: the window margin less 8 ms (which covers the way to the wire), at least 2 ms.
    A move costs the lane the start it gives up (later ones are already reserved), so only
    lateness that could break a window moves."""
    return max(0.002, (cfg.window_margin_ms - 8) / 1000.0)


MAX_MOVES = 2  # on a starved machine, the third late start goes ahead rather than loop

# A caller refused a global slot looks again after SLOT_POLL_MS, doubling up to this.
SLOT_POLL_MAX_S = 0.25

# "auto" routing steers away from a lane whose store is lost under fail_closed.
LOST_WAIT_S = 3600.0

ReleaseSlot = Callable[[], None]


def lane_key(namespace: str, provider: str, api_key: str | None) -> str:
    """The shared-store key of a lane: ``{namespace}:{provider}[:{sha256(api_key)[:12]}]``."""
    key = f"{namespace}:{provider}"
    if api_key:
        key += ":" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:12]
    return key


def estimate_tokens(prompt: str, system: str | None, max_output_tokens: int | None) -> int:
    """A request's token estimate for TPM budgets: characters / 4 plus the output cap."""
    chars = len(prompt) + (len(system) if system else 0)
    return max(1, chars // 4) + (max_output_tokens or 0)


def _no_release() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Admission:
    """What ``LaneLimiter.admit`` took for one attempt.

    Attributes:
        release: gives the global in-flight slot back (idempotent; a no-op without a global
            cap); call it in ``finally`` when the attempt ends.
        tokens: TPM tokens reserved (0 without a TPM); settle them with ``settle_tokens``.
    """

    release: ReleaseSlot = _no_release
    tokens: int = 0


class LaneLimiter:
    """QPS/RPM, TPM and global in-flight gate of one lane.

    Args:
        name: the lane (provider) name.
        cfg: the lane's ProviderConfig.
        backend: the store; None = this process's memory.
        backend_failure: "fail_closed" or "local" (see the module docstring).
        lease_ttl_s: lease of a global in-flight slot (shared stores).
        clock_s: monotonic clock in seconds for deadlines (injectable for tests).
    """

    def __init__(
        self,
        name: str,
        cfg: ProviderConfig,
        *,
        backend: Backend | None = None,
        backend_failure: str = "fail_closed",
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self._clock_s = clock_s
        self._rates: tuple[Rate, ...] = build_rates(cfg)
        self._shared: Backend = backend if backend is not None else MemoryBackend()
        self._is_shared = backend is not None and not isinstance(backend, MemoryBackend)
        self._backend_failure = backend_failure
        self._lease_ttl_ms = max(1, int(lease_ttl_s * 1000))
        self._holder_prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._local: MemoryBackend | None = None  # guarded by _lock: set while the shared store is lost
        self._probing = False  # guarded by _lock: one caller at a time asks a lost store again
        self._next_probe_s = 0.0  # guarded by _lock
        self._generation = 0  # written under _lock: how many times the lane went back to the store
        self._leases: dict[str, Backend] = {}  # guarded by _lock: held slots and their store
        # guarded by _lock: this process's recent starts on the shared store (monotonic ms, member),
        # to seed the local fallback so losing the store does not hand out a second budget.
        self._recent: collections.deque[tuple[int, str]] = collections.deque()
        self._wait_at_s, self._wait_s = 0.0, 0.0  # guarded by _lock: last known rate wait
        # guarded by _lock: per store (id), recent (round trip s, store clock - ours s) samples
        self._offsets: dict[int, collections.deque[tuple[float, float]]] = {}
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None  # guarded by _lock
        self.reserve_horizon_s: float | None = None  # set for learned limits: see ``_take``

    # -- properties --------------------------------------------------------------------------
    @property
    def is_limited(self) -> bool:
        """True when the lane has a QPS, RPM or TPM limit or a global in-flight cap."""
        return bool(self._rates) or self.cfg.tpm is not None or self.cfg.global_max_parallel is not None

    @property
    def _horizon_ms(self) -> int | None:
        horizon_s = self.reserve_horizon_s
        return None if horizon_s is None else max(1, int(horizon_s * 1000))

    @property
    def is_shared(self) -> bool:
        """True when the store is shared with other processes (SQLite, Redis)."""
        return self._is_shared

    @property
    def is_degraded(self) -> bool:
        """True while a lost shared store is replaced by local limits."""
        with self._lock:
            return self._local is not None

    @property
    def backend_url(self) -> str:
        """The store's URL with any password masked."""
        return mask_url(self._shared.url)

    @property
    def store_round_trips(self) -> int:
        """Calls made to the shared store so far (0 for the memory backend)."""
        return int(getattr(self._shared, "round_trips", 0)) if self._is_shared else 0

    def __repr__(self) -> str:
        return f"LaneLimiter(name={self.name!r}, backend={self.backend_url!r}, degraded={self.is_degraded})"

    def reconfigure(self, cfg: ProviderConfig, *, learned_qps: bool = False) -> None:
        """Use ``cfg``'s QPS, RPM, burst, TPM and global cap from the next call on.

        ``learned_qps``: ``cfg.qps`` is a learned pace, which keeps its fraction (``build_rates``).

        The store keeps no limits (each call carries them), so nothing is rebuilt: starts already
        taken count against the new limits. Shortening an RPM window to a QPS one forgets the
        older starts; lengthening it counts only the starts the store still keeps.
        """
        rates = build_rates(cfg, learned_qps=learned_qps)
        with self._lock:
            self.cfg, self._rates = cfg, rates

    def learned(self, expected_version: int, data: str = "", min_age_ms: int = 0) -> LearnedRecord | None:
        """Read (``expected_version`` -1) or compare-and-set the lane's learned-limits record in
        the store (``Backend.learned``); None when the store does not answer (the learner keeps
        its own values until it does)."""
        try:
            return self._shared.learned(expected_version, data, min_age_ms)
        except BackendLostError:
            return None

    # -- failure policy ------------------------------------------------------------------------
    def _current(self) -> Backend:
        with self._lock:
            local = self._local
            if local is None:
                return self._shared
            if self._probing or self._clock_s() < self._next_probe_s:
                return local
            self._probing = True
        try:
            return self._rejoin(local)
        finally:
            with self._lock:
                self._probing = False

    def _rejoin(self, local: MemoryBackend) -> Backend:
        """Go back to a store that answers again, first recording what was taken locally."""
        try:
            self._shared.ping()
        except BackendLostError:
            with self._lock:
                self._next_probe_s = self._clock_s() + RECOVERY_CHECK_S
            return local
        # Sealed, the local backend takes nothing more (its callers ask again in a moment), so
        # what it hands over is all it took; recorded, the shared limits count it.
        usage = local.seal()
        try:
            self._shared.record(usage, self._rates, self._lease_ttl_ms)
        except BackendLostError:
            local.unseal()
            with self._lock:
                self._next_probe_s = self._clock_s() + RECOVERY_CHECK_S
            return local
        with self._lock:
            self._local = None
            self._generation += 1
            for holder, backend in self._leases.items():
                if backend is local:
                    self._leases[holder] = self._shared
            if self._leases:
                self._start_renewer()
            # Slots released between the seal and now were recorded as held: give them back.
            released = set(usage.holders) - set(self._leases)
        for holder in released:
            try:
                self._shared.release_slot(holder)
            except BackendLostError:
                break  # their leases expire within the TTL
        log.warning("rate backend %s answers again; %s uses shared limits again (%d starts, %d slots of this "
                    "process recorded into it)", self.backend_url, self.name, len(usage.rate_entries),
                    len(usage.holders), extra={"provider": self.name})
        return self._shared

    def _lost(self, exc: BackendLostError) -> Backend:
        if self._backend_failure != "local":
            with self._lock:
                self._wait_at_s, self._wait_s = self._clock_s(), LOST_WAIT_S
            raise ProviderUnavailableError(
                f"rate backend {self.backend_url} is unreachable ({exc}); {self.name} fails closed "
                f"(LLM_EXECUTOR_BACKEND_FAILURE=fail_closed)", provider=self.name, retryable=False,
            ) from exc
        with self._lock:
            if self._local is not None:
                return self._local
            local = MemoryBackend()
            now_ms = time.monotonic_ns() // 1_000_000
            # What this process holds on the lost store keeps counting here: its recent starts
            # and the slots its calls still hold.
            local.record(Admitted(rate_entries=tuple((m, now_ms - t) for t, m in self._recent),
                                  holders=tuple(self._leases)), self._rates, self._lease_ttl_ms)
            self._local = local
            self._next_probe_s = self._clock_s() + RECOVERY_CHECK_S
        log.warning("rate backend %s is unreachable (%s); %s falls back to limits of this process until it "
                    "answers", self.backend_url, exc, self.name, extra={"provider": self.name})
        return local

    def _run(self, op: Callable[[Backend], T]) -> tuple[Backend, T]:
        generation = self._generation
        backend = self._current()
        try:
            return backend, op(backend)
        except BackendLostError as first:
            exc = first
            if backend is not self._shared:
                raise  # pragma: no cover - the memory backend never loses its store
            if generation != self._generation:
                # This call timed out on the store as it was before the lane went back to it:
                # the store answers now. Ask again rather than fall back a second time (which
                # would hand this process a fresh local budget while the others share one).
                backend = self._current()
                try:
                    return backend, op(backend)
                except BackendLostError as again:
                    if backend is not self._shared:
                        raise  # pragma: no cover
                    exc = again
            local = self._lost(exc)
            return local, op(local)

    def _admit_once(self, ask: Ask) -> tuple[Backend, Verdict]:
        backend, verdict = self._run(lambda b: b.admit(ask))
        if ask.rates:
            now_s = self._clock_s()
            with self._lock:
                self._wait_at_s, self._wait_s = now_s, verdict.wait_ms / 1000.0
                if verdict.taken and backend is self._shared and self._is_shared:
                    now_ms = time.monotonic_ns() // 1_000_000
                    self._recent.append((now_ms + verdict.wait_ms, ask.member))
                    horizon = now_ms - max(r.interval_ms for r in ask.rates)
                    while self._recent and self._recent[0][0] < horizon:
                        self._recent.popleft()
                    local = self._local
                    if local is not None:
                        # Another thread found the store lost between this grant and now, and
                        # built the local limits without this start: it counts there too.
                        local.record(Admitted(rate_entries=((ask.member, -verdict.wait_ms),)), ask.rates,
                                     self._lease_ttl_ms)
        return backend, verdict

    # -- one start: slot, tokens, rate ---------------------------------------------------------
    def _ask(self, *, rate: bool, tokens: int | None, slot: bool, max_wait_ms: int) -> Ask:
        cfg, rates = self.cfg, self._rates
        seq = next(self._seq)
        return Ask(
            rates=rates if rate else (),
            member=f"{self._holder_prefix}:{seq}",
            max_wait_ms=max_wait_ms,
            tokens=tokens or 0,
            tpm_limit=known(cfg.tpm) if tokens is not None else None,
            holder=f"{self._holder_prefix}:s{seq}" if slot else "",
            cap=cfg.global_max_parallel if slot else None,
            ttl_ms=self._lease_ttl_ms,
        )

    def _take(self, make: Callable[[int], Ask], what: str, stopping: threading.Event,
              deadline_monotonic: float | None) -> tuple[Backend, Ask]:
        """Ask until everything is taken, then sleep until the reserved start; waits on ``stopping``.

        Returns the store and the ask that took the slot, tokens and entry.
        """
        taken: tuple[Backend, Ask] | None = None
        moves = refused = 0
        try:
            while True:
                if stopping.is_set():
                    raise ExecutorShutdownError(f"executor shut down while {self.name} waited for {what}")
                remaining_s = None if deadline_monotonic is None else deadline_monotonic - self._clock_s()
                if remaining_s is not None and remaining_s <= 0:
                    raise DeadlineExceededError(f"request deadline passed while {self.name} waited for {what}",
                                                provider=self.name)
                max_wait_ms = _NO_DEADLINE_MS if remaining_s is None else int(remaining_s * 1000)
                horizon_ms = self._horizon_ms
                capped = horizon_ms is not None and horizon_ms < max_wait_ms
                if taken is None:
                    ask = make(horizon_ms if capped and horizon_ms is not None else max_wait_ms)
                else:
                    # Woken too late for the reserved start: the entry moves to a start this caller
                    # can still keep (the store replaces an entry of the same member).
                    ask = Ask(rates=taken[1].rates, member=taken[1].member, max_wait_ms=max_wait_ms)
                asked_s = self._clock_s()
                backend, verdict = self._admit_once(ask)
                wait_s = verdict.wait_ms / 1000.0
                if verdict.taken:
                    if taken is None:
                        taken = (backend, ask)
                    # The reserved start on our clock: sleep until then, not ``wait_s`` from now (the
                    # answer may have come back slowly).
                    start_s = self._our_time_s(backend, asked_s, verdict.now_ms) + wait_s
                    if start_s > self._clock_s():
                        stopping.wait(start_s - self._clock_s())
                        if stopping.is_set():
                            continue
                    # A caller that starts later than its entry says (starved, woke late) would be
                    # counted by the provider in a later window than the store counted it: it asks
                    # again (twice at most) for a start it can keep.
                    if ask.rates and moves < MAX_MOVES and self._clock_s() - start_s > _late_wake_s(self.cfg):
                        moves += 1
                        continue
                    result, taken = taken, None
                    return result
                if verdict.blocked_by == "rate" and capped and (remaining_s is None or wait_s < remaining_s):
                    # A learned rate may rise any moment: reserve no further ahead than the
                    # horizon, and ask again (under the rate in force then) when it is reached.
                    horizon_s = (horizon_ms or 0) / 1000.0
                    stopping.wait(max(0.001, min(wait_s - horizon_s, horizon_s)))
                    continue
                if verdict.blocked_by == "rate":
                    raise DeadlineExceededError(
                        f"request deadline passes before {self.name}'s rate token is free (next in {wait_s:.3f}s)",
                        provider=self.name)
                if remaining_s is not None and verdict.blocked_by == "tokens" and wait_s > remaining_s:
                    raise DeadlineExceededError(
                        f"request deadline passes before {self.name}'s token budget is free (next in "
                        f"{wait_s:.3f}s)", provider=self.name)
                if verdict.blocked_by == "slot":
                    # Another process's release cannot wake us: look again, backing off (with
                    # jitter) while the cap stays full. With N callers polling, a freed slot is
                    # still found within about interval / N; the store sees far fewer calls.
                    refused += 1
                    wait_s = min(SLOT_POLL_MAX_S, wait_s * 2 ** min(refused - 1, 8)) * random.uniform(0.5, 1.0)
                stopping.wait(wait_s if remaining_s is None else max(0.001, min(wait_s, remaining_s)))
        finally:
            if taken is not None:  # leaving with an error: give back what was taken
                self._give_back(*taken)

    def _our_time_s(self, backend: Backend, asked_s: float, store_ms: int) -> float:
        """The store's "now" of an answer to a call made at ``asked_s``, on our clock.

        The store decided between ``asked_s`` and now: a fast round trip pins its clock to ours
        within half of it, a slow one (a connection opened, a starved thread) says little, so the
        fastest of the recent ones is used. The result is pushed late by that half, so a start
        is never taken early.
        """
        received_s = self._clock_s()
        with self._lock:
            samples = self._offsets.setdefault(id(backend), collections.deque(maxlen=32))
            samples.append((received_s - asked_s, store_ms / 1000.0 - (asked_s + received_s) / 2))
            rtt_s, offset_s = min(samples)
        return store_ms / 1000.0 - offset_s + rtt_s / 2

    def _give_back(self, backend: Backend, ask: Ask) -> None:
        """Return what ``ask`` took (a shutdown or deadline ended the wait for its reserved start)."""
        try:
            if ask.rates:
                backend.cancel(ask.member)
            if ask.tpm_limit is not None and ask.tokens:
                backend.adjust_tokens(-ask.tokens)
            if ask.cap is not None:
                backend.release_slot(ask.holder)
        except BackendLostError:
            pass  # the entry ages out of its window; a lease expires within its TTL

    def _lease(self, backend: Backend, holder: str) -> ReleaseSlot:
        with self._lock:
            self._leases[holder] = backend
            if backend is self._shared and self._is_shared:
                self._start_renewer()
                if self._local is not None:
                    # The store was found lost after it granted this slot, and the local limits
                    # were built without it: the slot counts there too (release frees both).
                    self._local.record(Admitted(holders=(holder,)), self._rates, self._lease_ttl_ms)
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                owner = self._leases.pop(holder, None)
                local = self._local
            for store in {owner, local} - {None}:
                try:
                    store.release_slot(holder)  # type: ignore[union-attr]
                except BackendLostError:
                    pass  # the lease expires on its own within the TTL
        return release

    def admit(self, estimate: int | None, stopping: threading.Event,
              deadline_monotonic: float | None = None) -> Admission:
        """Take everything one attempt needs, in one call to the store: a global in-flight slot,
        a TPM reservation of ``estimate`` and a rate token; then wait until the token's start.

        Each part applies only when the lane has that limit. Nothing is taken until all of them
        are free (a busy slot is asked for again every ``SLOT_POLL_MS``).

        Returns:
            an ``Admission`` (release the slot in ``finally``; settle the tokens after the call).

        Raises:
            InvalidRequestError: ``estimate`` exceeds the TPM (it would wait forever).
            ExecutorShutdownError: ``stopping`` was set while waiting (what was taken is given back).
            DeadlineExceededError: the start would come after ``deadline_monotonic``.
            ProviderUnavailableError: the shared store is lost and the policy is fail_closed.
        """
        cfg = self.cfg
        tokens = None
        if cfg.tpm is not None:
            self.check_estimate(estimate or 0)
            tokens = max(0, int(estimate or 0))
        slot = cfg.global_max_parallel is not None
        if not (self._rates or tokens is not None or slot):
            return Admission()
        backend, ask = self._take(lambda w: self._ask(rate=True, tokens=tokens, slot=slot, max_wait_ms=w),
                                  "its limits", stopping, deadline_monotonic)
        release = self._lease(backend, ask.holder) if slot else _no_release
        return Admission(release=release, tokens=tokens or 0)

    # -- QPS / RPM -----------------------------------------------------------------------------
    def try_acquire(self) -> float:
        """Take a request token if one is free now.

        Returns:
            0.0 when a token was taken, else the seconds to wait before trying again.
        """
        if not self._rates:
            return 0.0
        _, verdict = self._admit_once(self._ask(rate=True, tokens=None, slot=False, max_wait_ms=0))
        return 0.0 if verdict.taken else max(0.001, verdict.wait_ms / 1000.0)

    def acquire(self, stopping: threading.Event, deadline_monotonic: float | None = None) -> None:
        """Take one request token (QPS and RPM) for one attempt, waiting as the rates require.

        Raises:
            ExecutorShutdownError: ``stopping`` was set while waiting.
            DeadlineExceededError: the token would come after ``deadline_monotonic``.
            ProviderUnavailableError: the shared store is lost and the policy is fail_closed.
        """
        if self._rates:
            self._take(lambda w: self._ask(rate=True, tokens=None, slot=False, max_wait_ms=w), "rate token",
                       stopping, deadline_monotonic)

    def expected_wait_s(self) -> float:
        """Seconds until a request token would be free (0 when one is free now); takes none.

        Asks the store (one round trip). A lost store (fail_closed) reports an hour, so "auto"
        routing steers away from the lane. ``last_known_wait_s`` answers without asking.
        """
        rates = self._rates
        if not rates:
            return 0.0
        try:
            _, wait_s = self._run(lambda b: b.rate_wait_s(rates))
        except ProviderUnavailableError:
            return LOST_WAIT_S
        with self._lock:
            self._wait_at_s, self._wait_s = self._clock_s(), wait_s
        return wait_s

    def last_known_wait_s(self) -> float:
        """The rate wait the store last reported, less the time since: no I/O, never blocks.

        For routing decisions on the submit path. ``LOST_WAIT_S`` while the store is lost under
        fail_closed; 0 before any call, or when the lane has no QPS/RPM.
        """
        with self._lock:
            if self._wait_s >= LOST_WAIT_S:
                return LOST_WAIT_S  # until a call reaches the store again
            return max(0.0, self._wait_s - (self._clock_s() - self._wait_at_s))

    # -- TPM -----------------------------------------------------------------------------------
    def check_estimate(self, estimate: int) -> None:
        """Reject a request that could never fit in the TPM budget.

        Raises:
            InvalidRequestError: ``estimate`` exceeds the lane's TPM.
        """
        tpm = known(self.cfg.tpm)
        if tpm is not None and estimate > tpm:
            raise InvalidRequestError(
                f"request needs ~{estimate} tokens, more than LLM_EXECUTOR_{self.name.upper()}_TPM={tpm}; "
                "it could never run", field="prompt",
            )

    def reserve_tokens(self, estimate: int, stopping: threading.Event,
                       deadline_monotonic: float | None = None) -> None:
        """Reserve ``estimate`` tokens of the TPM budget before a call (no-op without a TPM).

        Raises:
            InvalidRequestError: ``estimate`` exceeds the TPM (it would wait forever).
            ExecutorShutdownError, DeadlineExceededError, ProviderUnavailableError: as ``acquire``.
        """
        if self.cfg.tpm is None:
            return
        self.check_estimate(estimate)
        amount = max(0, int(estimate))
        self._take(lambda w: self._ask(rate=False, tokens=amount, slot=False, max_wait_ms=w), "token budget",
                   stopping, deadline_monotonic)

    def settle_tokens(self, reserved: int, actual: int | None) -> None:
        """Reconcile a reservation with the provider's reported usage.

        Args:
            reserved: what ``reserve_tokens`` took for this call.
            actual: the provider's total tokens; None keeps the estimate.

        A debit is never refused (the tokens are spent); a lost store under fail_closed is
        logged, not raised: the call has already succeeded.
        """
        if self.cfg.tpm is None or actual is None or actual == reserved:
            return
        delta = int(actual) - int(reserved)
        try:
            self._run(lambda b: b.adjust_tokens(delta))
        except ProviderUnavailableError as exc:
            log.warning("%s: token settlement of %+d not recorded: %s", self.name, delta, exc,
                        extra={"provider": self.name})

    def tpm_used(self) -> int | None:
        """Tokens counted in the lane's TPM window now (None without a TPM limit)."""
        if self.cfg.tpm is None:
            return None
        return self._run(lambda b: b.tpm_used())[1]

    # -- global in-flight slots ----------------------------------------------------------------
    def acquire_slot(self, stopping: threading.Event,
                     deadline_monotonic: float | None = None) -> ReleaseSlot | None:
        """Take one of the lane's GLOBAL_MAX_PARALLEL in-flight slots (across processes).

        Returns:
            None when the lane has no global cap, else a callable that gives the slot back
            (idempotent; call it in ``finally``).

        Raises:
            ExecutorShutdownError, DeadlineExceededError, ProviderUnavailableError: as ``acquire``.
        """
        if self.cfg.global_max_parallel is None:
            return None
        backend, ask = self._take(lambda w: self._ask(rate=False, tokens=None, slot=True, max_wait_ms=w),
                                  f"one of its {self.cfg.global_max_parallel} global in-flight slots", stopping,
                                  deadline_monotonic)
        return self._lease(backend, ask.holder)

    def slots_held(self) -> int | None:
        """Global in-flight slots held now by every process (None without a global cap)."""
        if self.cfg.global_max_parallel is None:
            return None
        return self._run(lambda b: b.slots_held())[1]

    def _start_renewer(self) -> None:
        """Start the lease renewer (caller holds _lock)."""
        if self._renewer is None and not self._closed.is_set():
            self._renewer = threading.Thread(target=self._renew_leases, daemon=True,
                                             name=f"llm-executor-{self.name}-leases")
            self._renewer.start()

    def _renew_leases(self) -> None:
        while not self._closed.wait(self._lease_ttl_ms / 3000.0):
            with self._lock:
                held = [h for h, b in self._leases.items() if b is self._shared]
            if not held:
                continue
            try:
                lost = self._shared.renew_slots(held, self._lease_ttl_ms)
            except BackendLostError as exc:
                log.debug("%s: lease renewal failed: %s", self.name, exc)
                continue
            for holder in lost:
                log.warning("%s: a global in-flight slot expired before its call ended (stalled > %.1fs); "
                            "the cap may be exceeded by one until it ends", self.name,
                            self._lease_ttl_ms / 1000.0, extra={"provider": self.name})
                with self._lock:
                    self._leases.pop(holder, None)

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the lease renewer, give back held slots and close the store's connections.

        Bounded by the store's timeouts (a lost or locked store costs at most one timeout per
        held slot, then the leases expire on their own).
        """
        self._closed.set()
        with self._lock:
            renewer, self._renewer = self._renewer, None
            leases, self._leases = dict(self._leases), {}
        if renewer is not None:
            renewer.join(timeout=5)
        for holder, backend in leases.items():
            try:
                backend.release_slot(holder)
            except BackendLostError:
                break  # the store is gone: the other leases expire within their TTL too
        self._shared.close()


def make_lane_limiter(name: str, pcfg: ProviderConfig, ecfg: ExecutorConfig, *,
                      lease_ttl_s: float | None = None) -> LaneLimiter:
    """The limiter of lane ``name`` on the store ``ecfg.rate_backend`` names.

    Args:
        name: the provider (lane) name.
        pcfg: its ProviderConfig (qps, rpm, tpm, global_max_parallel, api_key).
        ecfg: the ExecutorConfig (rate_backend, namespace, backend_failure).
        lease_ttl_s: lease of a global in-flight slot; None takes ``ecfg.lease_ttl_s`` when the
            config has one, else ``DEFAULT_LEASE_TTL_S`` as it is at call time.

    Raises:
        ConfigError: the store is unreachable at start, its URL is malformed, or redis-py is
            missing for a redis URL; the message names the URL with its password masked.
    """
    if lease_ttl_s is None:
        # The Executor builds its limiters without a TTL argument; reading the config (when it
        # has the field) and the module default here, at call time, is what lets a deployment
        # (or a multi-process test) shorten the lease without touching the executor.
        lease_ttl_s = getattr(ecfg, "lease_ttl_s", None) or DEFAULT_LEASE_TTL_S
    url = ecfg.rate_backend
    key = lane_key(ecfg.namespace, name, pcfg.api_key)
    backend: Backend | None = None
    try:
        if url.startswith("sqlite:///"):
            from ._sqlite import SQLiteBackend

            backend = SQLiteBackend(url, key)
        elif url != "memory":
            try:
                from ._redis import RedisBackend
            except ImportError:
                raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: a redis backend needs "
                                  "redis-py (pip install 'llm-executor[redis]')") from None
            backend = RedisBackend(url, key)
    except BackendLostError as exc:
        raise ConfigError(f"LLM_EXECUTOR_RATE_BACKEND={mask_url(url)!r}: the rate backend is unreachable "
                          f"({exc}); expected a reachable store") from None
    return LaneLimiter(name, pcfg, backend=backend, backend_failure=ecfg.backend_failure,
                       lease_ttl_s=lease_ttl_s)
