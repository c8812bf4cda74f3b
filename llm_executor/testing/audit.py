"""Checking limits from timestamps: what a test asserts after a run.

Imports: the stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["max_in_window"]


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
