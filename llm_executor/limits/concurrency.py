"""A latency-gradient concurrency limit (``MAX_PARALLEL=auto``): pure, clock injected, no I/O.

For a provider whose cost is concurrency (Ollama, a self-hosted OpenAI-compatible server) the
right in-flight cap is its capacity: below it, calls take the unloaded latency and throughput
grows with concurrency; past it, calls share the hardware, latency grows with every extra call
and throughput stays flat. ``GradientLimit`` finds that knee from latency alone, in the spirit of
Netflix's concurrency-limits ``Gradient2Limit`` / ``VegasLimit``, with two differences that suit
LLM calls (seconds long, few per second):

* The reference is the *unloaded* latency (the lowest window median seen, re-measured whenever a
  window ran at most one call at a time), not Gradient2's long-term average: a long average
  follows the loaded latency upward, so the limit would creep past the knee.
* Updates happen once per *window*: a window closes when it holds ``max(5, limit)`` samples of
  attempts that *started after the window opened* (3 for the first, the unloaded reference;
  ``max(2, limit)`` in slow start: one round at the limit), so each decision sees the latency of the limit it
  set (one update per round trip, as TCP does), never the tail of the previous one.

Per window, with ``ratio = window median / baseline``:

* ``ratio <= TOLERANCE`` (latency flat): grow. In slow start (until the first rise or drop)
  ``limit *= 2``; after it ``limit += 1``. No growth while the window never had more than
  half the limit in flight (the caller, not the provider, limits throughput then).
* ``ratio > TOLERANCE``: ``limit = limit * max(0.5, TOLERANCE / ratio)``. At a provider of
  capacity C whose latency grows as n / C past C, that is ``TOLERANCE * C``: the limit moves
  between C and C + 1 (a flat window at C adds one, the next steps back; C = 6: 6..7 in flight,
  latency 1.0-1.17x unloaded, full throughput), and at most halves per window. Gradient2 adds a
  queue allowance here (+sqrt(limit)); over a capacity of 1 or 2 that alone is 1.5-2x latency.
* A drop (429, 503, timeout, connection error): ``limit *= DROP_FACTOR`` at once, at most once per
  window (drops of attempts started before the last decrease are the same overload).

The limit is a float in ``[1, ceiling]``; callers use its floor (``value``). Not thread-safe:
the lane calls it under its own lock.
Imports: the stdlib and ``config`` (the default ceiling).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..config import DEFAULT_PARALLEL_CEILING

__all__ = [
    "DEFAULT_CEILING",
    "DROP_FACTOR",
    "INITIAL_LIMIT",
    "TOLERANCE",
    "GradientLimit",
]

# The default upper bound of a learned MAX_PARALLEL (LLM_EXECUTOR_<NAME>_MAX_PARALLEL_CEILING).
DEFAULT_CEILING = DEFAULT_PARALLEL_CEILING
# Where a learned MAX_PARALLEL starts: one call at a time is safe for any server, and its first
# window measures the true unloaded latency (a start above a capacity of 1 would take the loaded
# latency as its baseline and never see the knee). Slow start then reaches 8 in three call times.
INITIAL_LIMIT = 1
# A window median up to this much above the baseline counts as flat: absorbs jitter, and sets
# how far past the knee the limit may stand (TOLERANCE * capacity).
TOLERANCE = 1.1
# The multiplicative decrease on a drop (429, 503, timeout, connection error).
DROP_FACTOR = 0.7
# Slow start's growth per flat window (doubling, as TCP's): at most one window at twice a capacity.
SLOW_START_FACTOR = 2.0
# The fewest samples a window needs (a median of fewer is noise).
MIN_WINDOW_SAMPLES = 5
# The first window's calls (one at a time): the unloaded reference. Few, because they run at a
# twentieth of a capacity's throughput; the baseline is still refined by every later window
# whose median is lower, and re-measured whenever a window runs one call at a time.
BASELINE_SAMPLES = 3
# The fewest samples of a slow-start window, once the baseline is known: one round at the limit.
SLOW_START_MIN_SAMPLES = 2
# The largest decrease per window from latency alone (Gradient2's floor of the gradient).
MIN_GRADIENT = 0.5


class GradientLimit:
    """A concurrency limit fed one sample per finished attempt.

    Args:
        ceiling: the largest limit (>= 1).
        initial: the starting limit (clamped to ``[1, ceiling]``).
        clock: monotonic seconds; a sample's attempt started at ``clock() - latency_s``.
        tolerance: see ``TOLERANCE``.
        drop_factor: see ``DROP_FACTOR``.

    Raises:
        ValueError: ceiling < 1, tolerance < 1 or drop_factor outside (0, 1).
    """

    def __init__(self, ceiling: int = DEFAULT_CEILING, *, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] = time.monotonic, tolerance: float = TOLERANCE,
                 drop_factor: float = DROP_FACTOR) -> None:
        if ceiling < 1 or tolerance < 1.0 or not 0.0 < drop_factor < 1.0:
            raise ValueError(f"GradientLimit: expected ceiling >= 1, tolerance >= 1, 0 < drop_factor < 1; got "
                             f"{ceiling}, {tolerance}, {drop_factor}")
        self.ceiling = ceiling
        self.tolerance = tolerance
        self.drop_factor = drop_factor
        self._clock = clock
        self.limit = float(min(max(1, initial), ceiling))
        self.baseline_s: float | None = None  # the unloaded latency (lowest window median)
        self.slow_start = True
        self.last_reason = "start"
        self._window: list[float] = []
        self._window_max_in_flight = 0
        self._window_start = clock()

    @property
    def value(self) -> int:
        """The limit in force: calls that may be in flight at once."""
        return max(1, int(self.limit))

    def on_sample(self, latency_s: float, ok: bool, in_flight: int) -> int | None:
        """Fold one finished attempt in.

        Args:
            latency_s: how long the attempt took.
            ok: False for an overload signal (429, 503, timeout, connection error).
            in_flight: attempts in flight when it finished, itself included.

        Returns:
            The new ``value`` when it changed, else None.
        """
        now = self._clock()
        if now - latency_s < self._window_start:
            return None  # started under an older limit: the last decision already saw it
        before = self.value
        if not ok:
            self._set(self.limit * self.drop_factor, "drop")
            self.slow_start = False
            self._open_window(now)
            return self._changed(before)
        self._window.append(latency_s)
        self._window_max_in_flight = max(self._window_max_in_flight, in_flight)
        if len(self._window) >= self._window_size():
            self._close_window(now)
        return self._changed(before)

    def _window_size(self) -> int:
        """Samples that close the current window.

        The first window, one call at a time, is the unloaded reference: ``BASELINE_SAMPLES``
        calls. A slow-start window closes after one round at its limit, so the ramp doubles once
        per call time, as TCP's does per round trip; a noisy median of so few samples only ends
        slow start early (additive growth from there). Every later window needs
        ``MIN_WINDOW_SAMPLES``. The cold start to 8 thus takes 3 + 1 + 1 + 1 call times, not ~13.
        """
        if self.baseline_s is None:
            return BASELINE_SAMPLES
        if self.slow_start:
            return max(SLOW_START_MIN_SAMPLES, math.ceil(self.limit))
        return max(MIN_WINDOW_SAMPLES, math.ceil(self.limit))

    def _close_window(self, now: float) -> None:
        samples = sorted(self._window)
        median = samples[len(samples) // 2]
        unloaded = self._window_max_in_flight <= 1
        if self.baseline_s is None or median < self.baseline_s or unloaded:
            # One call at a time cannot queue at the provider: that median *is* the unloaded
            # latency, also when it rose (a bigger model): the only way the baseline goes up.
            self.baseline_s = median
        ratio = median / self.baseline_s if self.baseline_s > 0 else 1.0
        if ratio <= self.tolerance:
            if self._window_max_in_flight * 2 >= self.limit:
                grown = self.limit * SLOW_START_FACTOR if self.slow_start else self.limit + 1.0
                self._set(grown, f"latency flat ({ratio:.2f}x unloaded)")
        else:
            self.slow_start = False
            gradient = max(MIN_GRADIENT, self.tolerance / ratio)
            self._set(self.limit * gradient, f"latency {ratio:.2f}x unloaded")
        self._open_window(now)

    def _set(self, limit: float, reason: str) -> None:
        self.limit = min(float(self.ceiling), max(1.0, limit))
        self.last_reason = reason

    def _open_window(self, now: float) -> None:
        self._window = []
        self._window_max_in_flight = 0
        self._window_start = now

    def _changed(self, before: int) -> int | None:
        after = self.value
        return after if after != before else None
