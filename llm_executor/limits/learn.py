"""Limits that find themselves: QPS, RPM and TPM set to ``auto`` are learned from the provider.

A lane whose ``qps``, ``rpm`` or ``tpm`` is ``"auto"`` gets a ``RateLearner``. The learner keeps
one request pace (requests per second) and feeds the lane's limiter a concrete ProviderConfig
(``dataclasses.replace`` with numbers), so everything downstream reads plain numbers.

* **Start**: ``SAFE_QPS`` (1 request/s; RPM 60 when only RPM is auto) and ``SAFE_TPM`` tokens per
  minute, source "configured" — unless the store already holds what another process learned.
* **Headers** (OpenAI-style ``x-ratelimit-limit-requests`` / ``-tokens`` on a reply, 429s
  included): the limit less ``HEADER_MARGIN`` (2 %) is adopted at once, source "headers". The
  request limit is taken as per minute (OpenAI's RPM): the pace becomes limit x 0.98 / 60 per
  second, so the minute's budget is spread evenly, never spent in a burst.
* **Probe** (no headers: Gemini, custom providers): slow start doubles the pace every
  ``INTERVAL_S`` while starts wait for their token (the pace, not the demand, is the bottleneck)
  and no 429 arrives. The first 429 halves it and remembers the pace that overran as the
  ceiling. Then AIMD: every interval the pace closes half the gap to 95 % of the ceiling (at
  least +2 %), past that it creeps up 1 % per interval; a 429 multiplies it by ``BETA`` (0.85),
  or by ``BETA_AGAIN`` (0.7) when the last change was a decrease too (the limit itself dropped),
  and lowers the ceiling to the pace that overran. The lane's Retry-After pause still applies.
  With headers seen, a 429 still decreases the pace (a hidden short window), and increases stop
  at the header's pace.
* **Once per episode**: each attempt carries the record version it started under; a 429 counts
  only when nothing changed since that start and the last decrease is ``DECREASE_HOLD_S`` (1 s,
  the provider's window) old, so a burst of 429s from requests sent at the old pace decreases once.
* **Shared**: the learned values are one record in the lane's store (memory, SQLite, Redis:
  ``Backend.learned``, a compare-and-set on its version; an increase is refused when the record
  changed less than ``INTERVAL_S`` ago on the store's clock). So N processes raise the shared pace
  once per interval, a 429 burst seen by all of them lowers it once, and every process re-reads
  the record every ``REFRESH_S`` (on its next start) and at once after a 429 it could not apply.

Imports: ``config`` and ``._backend`` (the record type) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import MAX_QPS, MIN_QPS, ProviderConfig
from ._backend import LearnedRecord

__all__ = [
    "BETA",
    "BETA_AGAIN",
    "DECREASE_HOLD_S",
    "HEADER_MARGIN",
    "INTERVAL_S",
    "REFRESH_S",
    "RESERVE_HORIZON_S",
    "SAFE_QPS",
    "SAFE_TPM",
    "LearnedState",
    "RateInfo",
    "RateLearner",
]

SAFE_QPS = 1.0  # the pace before anything is known: one request per second
SAFE_TPM = 10_000  # tokens per minute before the provider reports its token limit
HEADER_MARGIN = 0.02  # reported limits are adopted less 2 %: requests in flight, clock skew
INTERVAL_S = 1.0  # at most one increase per interval (across processes with a shared store)
REFRESH_S = 1.0  # a process re-reads the shared record at most this long after its last read
BETA = 0.85  # multiplicative decrease on a 429 after slow start
BETA_AGAIN = 0.7  # ... when the last change was a decrease too: the limit dropped, follow it faster
# After a decrease, 429s are the same episode for this long: the provider's 1 s window still
# holds the starts made at the old pace, so requests sent at the new pace may be refused too.
DECREASE_HOLD_S = 1.0
SLOW_START_BETA = 0.5  # the first 429 ends slow start: half the pace that overran
NEAR_CEILING = 0.95  # the probe closes half the gap to this fraction of the ceiling per interval
MIN_STEP = 0.02  # ... by at least 2 % of the pace
CREEP = 0.01  # past it, +1 % per interval (the limit may have risen)
BOUND_SHARE = 0.25  # an increase needs this share of the interval's starts to have waited for a token
MIN_RATE_S = 0.05  # the pace never drops below one request per 20 s
# A learned lane's callers reserve a start at most this far ahead (then ask again), so a pace
# that rises is used at once rather than after the starts reserved at the old pace.
RESERVE_HORIZON_S = 0.25


class RateInfo(Protocol):
    """What a reply reported (``types.RateLimitInfo``); only the limits are read."""

    @property
    def limit_requests(self) -> int | None: ...

    @property
    def limit_tokens(self) -> int | None: ...


class LearnedStore(Protocol):
    """The lane's store of the learned record (``LaneLimiter.learned``), and how far ahead its
    callers may reserve a start (``LaneLimiter.reserve_horizon_s``)."""

    reserve_horizon_s: float | None

    def learned(self, expected_version: int, data: str = "", min_age_ms: int = 0) -> LearnedRecord | None: ...


@dataclass(frozen=True, slots=True)
class LearnedState:
    """The learned values, as kept in the store (JSON).

    Attributes:
        rate_s: the request pace, requests per second.
        ceiling_s: the pace of the last 429 (None: still in slow start).
        header_rate_s: the pace the headers allow (None: no request limit reported).
        header_rpm / header_tpm: the reported limits less the margin (None: not reported).
        tokens_unreported: a reply came without a token limit: no local TPM (the probe backs off
            on every 429, token ones included).
        source: where ``rate_s`` came from: "configured", "headers" or "probe".
        decreases_in_row: decreases since the last increase (a second one in a row uses
            ``BETA_AGAIN``: the limit itself dropped).
    """

    rate_s: float = SAFE_QPS
    ceiling_s: float | None = None
    header_rate_s: float | None = None
    header_rpm: int | None = None
    header_tpm: int | None = None
    tokens_unreported: bool = False
    source: str = "configured"
    decreases_in_row: int = 0

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> LearnedState | None:
        """The state in ``text``; None when it is empty or not ours (a newer or older format)."""
        try:
            raw = json.loads(text)
            state = cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})
            if not (isinstance(state.rate_s, int | float) and math.isfinite(state.rate_s) and state.rate_s > 0):
                return None
            return state
        except (ValueError, TypeError, KeyError):
            return None


def _clamp_rate(rate_s: float) -> float:
    return min(MAX_QPS, max(MIN_RATE_S, MIN_QPS, rate_s))


class RateLearner:
    """Learns a lane's ``auto`` QPS / RPM / TPM (see the module docstring).

    Args:
        name: the lane.
        configured: the lane's ProviderConfig, with "auto" in some of qps, rpm, tpm.
        store: where the learned record lives (the lane's limiter); its callers reserve a start
            at most ``RESERVE_HORIZON_S`` ahead from now on.
        shared: the store is shared with other processes (re-read it every ``REFRESH_S``).
        apply: takes the concrete ProviderConfig whenever a learned value changes.
        on_learned: ``LaneMetrics.on_learned(limit, value, source, reason)``.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, name: str, configured: ProviderConfig, store: LearnedStore, *, shared: bool,
                 apply: Callable[[ProviderConfig], None] = lambda cfg: None,
                 on_learned: Callable[[str, float, str, str], None] = lambda *a: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.configured = configured
        self.auto = configured.auto_rates
        self._store = store
        store.reserve_horizon_s = RESERVE_HORIZON_S
        self._shared = shared
        self._apply = apply
        self._on_learned = on_learned
        self._clock = clock
        self._lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._state = LearnedState(rate_s=SAFE_QPS)  # guarded by _lock
        self._version = 0  # guarded by _lock: the store record's version this process paces at
        self._source = "configured"  # guarded by _lock: the source shown (a record read is "store")
        self._reason = "safe start"  # guarded by _lock
        self._window_start_s = clock()  # guarded by _lock: this interval's start counts
        self._starts = 0
        self._bound = 0
        self._last_decrease_s = -math.inf
        self._last_read_s = -math.inf
        self._reading = False  # guarded by _lock: one thread at a time re-reads the store
        self._shown: dict[str, tuple[float, str]] = {}  # guarded by _apply_lock: last value reported per limit
        record = store.learned(-1)
        loaded = None if record is None or not record.version else LearnedState.loads(record.data)
        if record is not None and loaded is not None:
            self._state, self._version, self._source = loaded, record.version, "store"
            self._reason = "learned by another process"
        self._last_read_s = clock()

    # -- what the lane reads -----------------------------------------------------------------------
    @property
    def learns_tpm(self) -> bool:
        return "tpm" in self.auto

    @property
    def version(self) -> int:
        """The record version this process paces at (an attempt's token, see ``on_start``)."""
        with self._lock:
            return self._version

    @property
    def state(self) -> LearnedState:
        with self._lock:
            return self._state

    def concrete(self) -> ProviderConfig:
        """The configured ProviderConfig with every "auto" replaced by its learned number."""
        with self._lock:
            return self._concrete(self._state)

    def _concrete(self, state: LearnedState) -> ProviderConfig:
        changes: dict[str, Any] = {}
        rate = _clamp_rate(state.rate_s)
        if "qps" in self.auto:
            changes["qps"] = rate
        if "rpm" in self.auto:
            if state.header_rpm is not None:
                changes["rpm"] = state.header_rpm
            elif "qps" in self.auto:
                changes["rpm"] = None  # the QPS paces the probe; a minute window adds nothing
            else:
                changes["rpm"] = max(1, math.floor(rate * 60))
        if "tpm" in self.auto:
            if state.header_tpm is not None:
                changes["tpm"] = state.header_tpm
            else:
                changes["tpm"] = None if state.tokens_unreported else SAFE_TPM
        return dataclasses.replace(self.configured, **changes)

    def bind(self, apply: Callable[[ProviderConfig], None],
             on_learned: Callable[[str, float, str, str], None]) -> None:
        """Where changes go (the lane is built after the learner: it needs its first numbers)."""
        self._apply, self._on_learned = apply, on_learned

    def start(self) -> None:
        """Report the starting values (one INFO line each) and hand them to the lane."""
        self._publish()

    def after_fork(self, store: LearnedStore) -> None:
        """In a forked child: fresh locks (the parent's may have been held by a thread) and the
        child's own store connection."""
        self._lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._reading = False
        self._store = store
        store.reserve_horizon_s = RESERVE_HORIZON_S

    # -- events from the runner --------------------------------------------------------------------
    def on_start(self, waited_s: float) -> int:
        """An attempt starts after waiting ``waited_s`` for its token; returns its version token."""
        now = self._clock()
        read = False
        with self._lock:
            self._starts += 1
            if waited_s > 0.001:
                self._bound += 1
            token = self._version
            due_increase = now - self._window_start_s >= INTERVAL_S
            if self._shared and not self._reading and now - self._last_read_s >= REFRESH_S:
                self._reading = read = True
        if read:
            self._refresh(now)
        if due_increase:
            self._maybe_increase(now)
        return token

    def on_reply(self, info: RateInfo | None, token: int) -> None:
        """A reply (success or error) came for an attempt started under ``token``."""
        self._adopt_headers(info)

    def on_rate_limited(self, info: RateInfo | None, token: int) -> None:
        """A 429 came for an attempt started under version ``token``: decrease once per episode."""
        self._adopt_headers(info)
        now = self._clock()
        with self._lock:
            if token != self._version or now - self._last_decrease_s < DECREASE_HOLD_S:
                stale = True
                state = self._state
            else:
                stale = False
                state = self._state
                overran = state.rate_s
                if state.ceiling_s is None and state.header_rate_s is None:
                    beta = SLOW_START_BETA  # slow start overshot: the pace doubled since the last good one
                else:
                    beta = BETA if state.decreases_in_row == 0 else BETA_AGAIN
                state = dataclasses.replace(state, rate_s=_clamp_rate(overran * beta), ceiling_s=overran,
                                            source="probe", decreases_in_row=state.decreases_in_row + 1)
        if stale:
            if self._shared:
                self._refresh(now)  # another process may have decreased it already
            return
        reason = f"429 at {overran:g}/s, x{beta:g}"
        if self._write(token, state, 0, reason):
            with self._lock:
                self._last_decrease_s = now
                self._reset_window(now)

    # -- header adoption ---------------------------------------------------------------------------
    def _adopt_headers(self, info: RateInfo | None) -> None:
        if info is None:
            with self._lock:
                if self._state.tokens_unreported or self._state.header_tpm is not None or not self.learns_tpm:
                    return
                state = dataclasses.replace(self._state, tokens_unreported=True)
                version = self._version
            self._write(version, state, 0, "the provider reports no token limit")
            return
        limit_requests, limit_tokens = info.limit_requests, info.limit_tokens
        for _ in range(2):  # once more after a lost compare-and-set (another process wrote first)
            with self._lock:
                old, version = self._state, self._version
                state = old
                if limit_requests is not None and limit_requests > 0:
                    rpm = max(1, math.floor(limit_requests * (1 - HEADER_MARGIN)))
                    if rpm != state.header_rpm:
                        rate = _clamp_rate(rpm / 60.0)
                        state = dataclasses.replace(state, header_rpm=rpm, header_rate_s=rate, rate_s=rate,
                                                    ceiling_s=None, source="headers")
                if limit_tokens is not None and limit_tokens > 0:
                    tpm = max(1, math.floor(limit_tokens * (1 - HEADER_MARGIN)))
                    if tpm != state.header_tpm:
                        state = dataclasses.replace(state, header_tpm=tpm, tokens_unreported=False)
                elif self.learns_tpm and state.header_tpm is None and not state.tokens_unreported:
                    state = dataclasses.replace(state, tokens_unreported=True)
            if state == old:
                return
            reason = f"x-ratelimit-limit-requests {limit_requests}, -tokens {limit_tokens}"
            if self._write(version, state, 0, reason):
                return

    # -- the probe -----------------------------------------------------------------------------------
    def _reset_window(self, now: float) -> None:
        self._window_start_s, self._starts, self._bound = now, 0, 0

    def _maybe_increase(self, now: float) -> None:
        with self._lock:
            if now - self._window_start_s < INTERVAL_S:
                return  # another thread took this interval
            starts, bound = self._starts, self._bound
            self._reset_window(now)
            state, version = self._state, self._version
            if now - self._last_decrease_s < INTERVAL_S or bound < max(1, BOUND_SHARE * starts):
                return  # just decreased, or the pace is not what holds the lane back
            rate = state.rate_s
            cap = state.header_rate_s if state.header_rate_s is not None else MAX_QPS
            if state.ceiling_s is None:
                new = rate * 2
                how = "slow start x2"
            elif rate < NEAR_CEILING * state.ceiling_s:
                new = rate + max(MIN_STEP * rate, (NEAR_CEILING * state.ceiling_s - rate) / 2)
                how = f"towards {NEAR_CEILING:g} x ceiling {state.ceiling_s:g}"
            else:
                new = rate * (1 + CREEP)
                how = f"+{CREEP:.0%}"
            new = _clamp_rate(min(new, cap))
            if new <= rate:
                return
            source = "headers" if state.header_rate_s is not None and new >= cap else "probe"
            state = dataclasses.replace(state, rate_s=new, source=source, decreases_in_row=0)
        self._write(version, state, int(INTERVAL_S * 1000), f"no 429 for {INTERVAL_S:g}s, {how}")

    # -- the store -----------------------------------------------------------------------------------
    def _write(self, expected: int, state: LearnedState, min_age_ms: int, reason: str) -> bool:
        """Compare-and-set ``state`` at version ``expected``; adopts whatever the store holds after.

        Returns:
            True when this write was made.
        """
        record = self._store.learned(expected, state.dumps(), min_age_ms)
        if record is not None and not record.applied and record.version < expected:
            # The record is older than ours: it expired (an hour unwritten) or the store was
            # emptied. What this process knows is the best there is: write it on top.
            record = self._store.learned(record.version, state.dumps(), min_age_ms)
            if record is not None and record.applied:
                with self._lock:
                    self._version = min(self._version, record.version - 1)
        if record is None:  # the store does not answer: go on alone until it does
            with self._lock:
                if self._version != expected:
                    return False
                self._state, self._source, self._reason = state, state.source, reason
            self._publish()
            return True
        if record.applied:
            with self._lock:
                if record.version > self._version:
                    self._state, self._version = state, record.version
                    self._source, self._reason = state.source, reason
            self._publish()
            return True
        self._adopt_record(record)
        return False

    def _refresh(self, now: float) -> None:
        try:
            record = self._store.learned(-1)
        finally:
            with self._lock:
                self._reading = False
                self._last_read_s = now
        if record is not None:
            self._adopt_record(record)

    def _adopt_record(self, record: LearnedRecord) -> None:
        state = LearnedState.loads(record.data) if record.version else None
        if state is None:
            return
        with self._lock:
            if record.version <= self._version:
                return
            changed = state != self._state
            if state.rate_s < self._state.rate_s:
                self._last_decrease_s = self._clock()  # another process's decrease holds here too
            self._state, self._version = state, record.version
            if changed:
                self._source, self._reason = "store", f"{state.source} in another process"
                # A change made elsewhere opens a new interval here too.
                self._reset_window(self._clock())
        if changed:
            self._publish()

    # -- telling the lane ----------------------------------------------------------------------------
    def _publish(self) -> None:
        with self._apply_lock:
            with self._lock:
                state, source, reason = self._state, self._source, self._reason
                cfg = self._concrete(state)
            self._apply(cfg)
            tpm_source = source if source in ("store", "configured") else (
                "headers" if state.header_tpm is not None else "probe")
            for limit in self.auto:
                value = getattr(cfg, limit)
                shown = (math.inf if value is None else float(value),
                         tpm_source if limit == "tpm" else source)
                if self._shown.get(limit) == shown:
                    continue
                self._shown[limit] = shown
                self._on_learned(limit, shown[0], shown[1], reason)

