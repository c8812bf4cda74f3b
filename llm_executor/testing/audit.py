"""Checking limits from timestamps: what a test asserts after a run, and the collector's pauses
that can explain a window over its limit.

Imports: the stdlib only.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["GcPauses", "max_in_window"]


def max_in_window(times: Iterable[float], window_s: float = 1.0) -> int:
    """The most timestamps in any half-open window ``[t, t + window_s)``.

    Feed it the start times your fake provider recorded (any clock, seconds) to check a rate
    limit end to end: ``assert max_in_window(starts) <= qps``.
    """
    stamps = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(stamps):
        while t - stamps[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class GcPauses:
    """Times the garbage collector's passes while registered (``with GcPauses() as pauses:``, or
    ``start()`` and ``stop()``).

    A pass stops every thread; one landing between a rate token and the request's arrival at a
    provider (or an in-process emulator) delays that request past ``window_margin_ms`` and can
    make a 1 s window hold one request too many (docs/failure-modes.md). The time of a pass
    includes the finalizers it runs, which may release the GIL, and explicit ``gc.collect()``
    calls are passes too.

    Attributes:
        count: passes seen.
        longest_s: the longest pass, seconds.
        long: ``(ms, generation, label)`` of every pass longer than ``threshold_ms``; ``label``
            is what the caller set in ``label`` when it ran (e.g. a test's name).
        label: set it to say what is running now.
    """

    def __init__(self, threshold_ms: float = 50.0) -> None:
        self.threshold_ms = threshold_ms
        self.count = 0
        self.longest_s = 0.0
        self.long: list[tuple[float, int, str | None]] = []
        self.label: str | None = None
        self._started = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        """The ``gc.callbacks`` entry (``start`` registers it)."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        took_s = time.perf_counter() - self._started
        self.count += 1
        self.longest_s = max(self.longest_s, took_s)
        if took_s * 1000.0 > self.threshold_ms:
            self.long.append((took_s * 1000.0, int(info.get("generation", -1)), self.label))

    def start(self) -> None:
        """Time every pass from now on."""
        if self.callback not in gc.callbacks:
            gc.callbacks.append(self.callback)

    def stop(self) -> None:
        """Stop timing (what was seen stays)."""
        if self.callback in gc.callbacks:
            gc.callbacks.remove(self.callback)

    def __enter__(self) -> GcPauses:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
