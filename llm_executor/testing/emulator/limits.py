"""One provider's live state: the limit windows, the concurrency count, the fault RNG and the counters.

Every method is called with the emulator's lock held; none blocks. Imports: the stdlib, ``.sim``
and ``.wire``.
"""

from __future__ import annotations

import math
import random
from collections import deque

from .sim import ProviderSim
from .wire import Refusal

__all__ = ["ProviderState"]


class ProviderState:
    """Counters, limit windows and the RNG of one provider; guarded by the emulator's lock."""

    def __init__(self, name: str, sim: ProviderSim, seed: int) -> None:
        self.name = name
        self.sim = sim
        self.rng = random.Random(f"{seed}:{name}")
        self.accepted: deque[float] = deque()  # accepted arrivals in the last second (rps limit)
        self.arrivals: deque[float] = deque()  # every arrival in the last second (recorder)
        self.in_service = 0  # accepted and not answered (concurrency limit)
        self.in_flight = 0  # arrived and not answered (recorder)
        self.requests = 0
        self.max_concurrency = 0
        self.max_per_1s = 0
        self.statuses: dict[int, int] = {}
        self.faults: dict[str, int] = {}

    def carry_over(self, old: ProviderState) -> None:
        """Keep what requests still in flight will settle, and the windows the limits enforce."""
        self.in_service, self.in_flight = old.in_service, old.in_flight
        self.accepted = old.accepted

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

    def admit(self, now: float) -> tuple[Refusal | None, str | None]:
        """Apply the limits and draw a fault: (refusal, None) or (None, fault kind or None).

        An admitted request holds a concurrency slot until ``release()``.
        """
        sim = self.sim
        while self.accepted and self.accepted[0] <= now - 1.0:
            self.accepted.popleft()
        if sim.rps is not None and len(self.accepted) >= max(1, math.floor(sim.rps)):
            return Refusal("rate_limited", max(0.001, self.accepted[0] + 1.0 - now)), None
        if sim.max_concurrency is not None and self.in_service >= sim.max_concurrency:
            return Refusal("busy", max(0.05, sim.latency_s)), None
        self.accepted.append(now)
        self.in_service += 1
        return None, self._draw_fault()

    def release(self) -> None:
        """Free the concurrency slot of an admitted request."""
        self.in_service -= 1

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
