"""One provider's live state: the limit windows, the concurrency count, the fault RNG and the counters.

Limits are sliding windows over *accepted* requests: ``rps`` over 1 s, ``rpm`` and ``tpm`` over
60 s, ``rpd`` over 24 h. The rate-limit headers are computed from the same windows, so
``remaining`` and ``reset`` tell a client exactly what the server will enforce. The latency
model is processor sharing: up to ``capacity`` requests are served at full speed, past it each
progresses at ``capacity / n`` of full speed (a GPU batch), so latency grows linearly with load.

Every method is called with the emulator's lock held; none blocks. Imports: the stdlib, ``.sim``
and ``.wire``.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque

from .sim import ProviderSim
from .wire import RateWindow, Refusal

__all__ = ["ProviderState", "ServiceModel"]

_MINUTE_S = 60.0
_DAY_S = 86400.0


class _Window:
    """Accepted (time, weight) pairs of the last ``span_s`` seconds, with their running sum."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self.items: deque[tuple[float, int]] = deque()
        self.total = 0

    def expire(self, now: float) -> None:
        while self.items and self.items[0][0] <= now - self.span_s:
            self.total -= self.items.popleft()[1]

    def add(self, now: float, weight: int) -> None:
        self.items.append((now, weight))
        self.total += weight

    def wait_for_room(self, now: float, limit: int, weight: int) -> float:
        """Seconds until ``weight`` more fits under ``limit`` (the oldest entries expiring first)."""
        excess = self.total + weight - limit
        for stamp, item_weight in self.items:
            excess -= item_weight
            if excess <= 0:
                return max(0.001, stamp + self.span_s - now)
        return self.span_s  # heavier than the whole limit: a full window is the honest wait

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's "resets to its initial state")."""
        return max(0.0, self.items[-1][0] + self.span_s - now) if self.items else 0.0


class ProviderState:
    """Counters, limit windows and the RNG of one provider; guarded by the emulator's lock."""

    def __init__(self, name: str, sim: ProviderSim, seed: int) -> None:
        self.name = name
        self.sim = sim
        self.rng = random.Random(f"{seed}:{name}")
        self.second = _Window(1.0)  # accepted requests (rps)
        self.minute = _Window(_MINUTE_S)  # accepted requests (rpm)
        self.minute_tokens = _Window(_MINUTE_S)  # charged tokens (tpm)
        self.day = _Window(_DAY_S)  # accepted requests (rpd)
        self.arrivals: deque[float] = deque()  # every arrival in the last second (recorder)
        self.in_service = 0  # accepted and not answered (concurrency limit)
        self.in_flight = 0  # arrived and not answered (recorder)
        self.requests = 0
        self.max_concurrency = 0
        self.max_per_1s = 0
        self.statuses: dict[int, int] = {}
        self.faults: dict[str, int] = {}
        self.last_used: dict[str, float] = {}  # model → last generation (wall clock), for Ollama's /api/ps
        self.service = ServiceModel()

    def carry_over(self, old: ProviderState) -> None:
        """Keep what requests still in flight will settle, and the windows the limits enforce."""
        self.in_service, self.in_flight = old.in_service, old.in_flight
        self.second, self.minute, self.minute_tokens, self.day = old.second, old.minute, old.minute_tokens, old.day
        self.service, self.last_used = old.service, old.last_used

    # -- the recorder's view ---------------------------------------------------------------------

    def arrive(self, now: float) -> None:
        """Count an arriving generation request (the recorder's view, before any limit)."""
        self.requests += 1
        self.in_flight += 1
        self.max_concurrency = max(self.max_concurrency, self.in_flight)
        self.arrivals.append(now)
        while self.arrivals and self.arrivals[0] <= now - 1.0:
            self.arrivals.popleft()
        self.max_per_1s = max(self.max_per_1s, len(self.arrivals))

    def settle(self, status: int | None, fault: str | None) -> None:
        """Count an answered (or dropped: status None) generation request."""
        self.in_flight -= 1
        self.statuses[status or 0] = self.statuses.get(status or 0, 0) + 1
        if fault is not None:
            self.faults[fault] = self.faults.get(fault, 0) + 1

    # -- limits ------------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for window in (self.second, self.minute, self.minute_tokens, self.day):
            window.expire(now)

    def admit(self, now: float, tokens: int) -> tuple[Refusal | None, str | None]:
        """Apply the limits and draw a fault: (refusal, None) or (None, fault kind or None).

        ``tokens`` is what the request is charged against ``tpm``. When several limits refuse,
        the one with the longest wait is reported (waiting less would meet the other one).
        An admitted request holds a concurrency slot until ``release()``.
        """
        sim = self.sim
        self._expire(now)
        refusals: list[Refusal] = []
        checks: tuple[tuple[int | None, _Window, int, str], ...] = (
            (max(1, math.floor(sim.rps)) if sim.rps is not None else None, self.second, 1, "requests"),
            (sim.rpm, self.minute, 1, "requests"),
            (sim.tpm, self.minute_tokens, tokens, "tokens"),
            (sim.rpd, self.day, 1, "requests"),
        )
        for limit, window, weight, dimension in checks:
            if limit is not None and window.total + weight > limit:
                wait_s = window.wait_for_room(now, limit, weight)
                refusals.append(Refusal("rate_limited", wait_s, dimension, window.span_s, limit,
                                        window.total, weight))
        if refusals:
            return max(refusals, key=lambda r: r.retry_after_s), None
        if sim.max_concurrency is not None and self.in_service >= sim.max_concurrency:
            return Refusal("busy", max(0.05, sim.latency_s), "requests", 1.0), None
        for window, weight in ((self.second, 1), (self.minute, 1), (self.minute_tokens, tokens), (self.day, 1)):
            window.add(now, weight)
        self.in_service += 1
        return None, self._draw_fault()

    def release(self) -> None:
        """Free the concurrency slot of an admitted request."""
        self.in_service -= 1

    def rate_windows(self, now: float) -> tuple[RateWindow | None, RateWindow | None]:
        """(requests, tokens) as the rate-limit headers show them; None where nothing is limited.

        Requests come from ``rpm`` (else ``rps``, over its 1 s window), tokens from ``tpm``.
        """
        sim = self.sim
        self._expire(now)
        requests: RateWindow | None = None
        if sim.rpm is not None:
            requests = self._rate(sim.rpm, self.minute, now)
        elif sim.rps is not None:
            requests = self._rate(max(1, math.floor(sim.rps)), self.second, now)
        tokens = self._rate(sim.tpm, self.minute_tokens, now) if sim.tpm is not None else None
        return requests, tokens

    @staticmethod
    def _rate(limit: int, window: _Window, now: float) -> RateWindow:
        return RateWindow(limit, max(0, limit - window.total), window.reset_s(now))

    def _draw_fault(self) -> str | None:
        sim = self.sim
        # Draw for every accepted request, so the fault sequence depends only on arrival order.
        roll = self.rng.random()
        pick = self.rng.random()
        if roll >= sim.fault_rate:
            return None
        kinds = [(k, w) for k, w in sim.faults.items() if w > 0]
        total = sum(w for _, w in kinds)
        acc = 0.0
        for kind, weight in kinds:
            acc += weight
            if pick * total < acc:
                return kind
        return kinds[-1][0]


class ServiceModel:
    """Processor sharing: virtual service time advances at ``min(1, capacity / serving)`` per second.

    A request needing ``work_s`` of full-speed time finishes when the virtual clock has advanced
    by ``work_s`` since it entered; with ``capacity`` None the rate is always 1 (constant latency).
    """

    def __init__(self) -> None:
        self.serving = 0
        self.virtual_s = 0.0
        self.virtual_stamp = time.monotonic()

    def _rate(self, capacity: int | None) -> float:
        return 1.0 if capacity is None or self.serving <= capacity else capacity / self.serving

    def _advance(self, now: float, capacity: int | None) -> None:
        self.virtual_s += max(0.0, now - self.virtual_stamp) * self._rate(capacity)
        self.virtual_stamp = now

    def start(self, now: float, work_s: float, capacity: int | None) -> float:
        """Enter service needing ``work_s`` of full-speed time; returns the virtual finish time."""
        self._advance(now, capacity)
        self.serving += 1
        return self.virtual_s + work_s

    def left_s(self, now: float, finish_virtual_s: float, capacity: int | None) -> float:
        """Wall seconds until ``finish_virtual_s`` at the current sharing rate (0 when done)."""
        self._advance(now, capacity)
        left = finish_virtual_s - self.virtual_s
        return left / self._rate(capacity) if left > 1e-9 else 0.0

    def end(self, now: float, capacity: int | None) -> None:
        """Leave service (the others speed up)."""
        self._advance(now, capacity)
        self.serving -= 1
