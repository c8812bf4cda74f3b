"""A latency-gradient concurrency limit (``MAX_PARALLEL=auto``): pure, clock injected, no I/O.

For a provider whose cost is concurrency (Ollama, a self-hosted OpenAI-compatible server) the
right in-flight cap is its capacity: below it, calls take the unloaded latency and throughput
grows with concurrency; past it, calls share the hardware, latency grows with every extra call
and throughput stays flat. ``GradientLimit`` finds that knee from latency alone, in the spirit of
Netflix's concurrency-limits ``Gradient2Limit`` / ``VegasLimit``, with two differences that suit
LLM calls (seconds long, few per second):

* The reference is the *unloaded* latency (the lowest median of a window of at least 3 samples,
  re-measured whenever a window ran at most one call at a time), not Gradient2's long-term average: a long average
  follows the loaded latency upward, so the limit would creep past the knee.
* Updates happen once per *window*: a window closes when it holds ``max(5, limit)`` samples of
  attempts that *started after the window opened* (3 for the first, the unloaded reference;
  ``max(2, limit)`` in slow start, the limit the window opened at: one round at it), so each
  decision sees the latency of the limit it set (one update per round trip, as TCP does), never
  the tail of the previous one. Slow start's growth alone is per sample (below).

Per window, with ``ratio = window median / baseline``:

* ``ratio <= TOLERANCE`` (latency flat): grow. In slow start (until the first rise or drop) the
  unloaded reference's window doubles the limit, and from then on every sample whose own latency
  is flat adds one as it arrives (TCP's slow start: one per ACK, a doubling per round trip, with
  no wait for a full window); after slow start ``limit += 1`` per flat window. No growth while
  fewer than half the limit are in flight (the caller, not the provider, limits throughput then).
* ``ratio > TOLERANCE``: ``limit = limit * max(0.5, TOLERANCE / ratio)``; the window that ends
  slow start scales the load it measured (its most calls in flight), not the limit its flat
  samples grew meanwhile. At a provider of
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
# The unloaded reference's window doubles the limit (1 -> 2); after it, slow start adds one per
# flat sample, which is also a doubling per round trip (TCP's per-ACK growth).
SLOW_START_FACTOR = 2.0
# The fewest samples a window needs (a median of fewer is noise).
MIN_WINDOW_SAMPLES = 5
# The first window's calls (one at a time): the unloaded reference. Few, because they run at a
# twentieth of a capacity's throughput; the baseline is still refined by every later window
# of as many samples whose median is lower, and re-measured whenever a window runs one call at a
# time. (A smaller window does not lower it: the fastest of two calls is no reference.)
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
        self._window_limit = self.limit

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
        started = now - latency_s
        before = self.value
        if (ok and self.slow_start and self.baseline_s is not None
                and latency_s <= self.tolerance * self.baseline_s and in_flight * 2 >= self.limit):
            # Slow start grows by one per flat sample, as TCP's by one per ACK: still a doubling per
            # round trip, but each slot opens as soon as a call shows latency flat, not when a
            # window of calls started after the last change is full (up to two call times later).
            self._set(self.limit + 1.0, f"slow start, latency flat ({latency_s / self.baseline_s:.2f}x unloaded)")
        if started < self._window_start:
            return self._changed(before)  # started under an older limit: the last decision already saw it
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
        calls. A slow-start window closes after one round at the limit it opened at; it only
        decides when slow start ends (growth there is per sample), and a noisy median of so few
        samples only ends it early (additive growth from there). Every later window needs
        ``MIN_WINDOW_SAMPLES``. The cold start to 8 thus takes 3 + 1 + 1 + 1 call times.
        """
        if self.baseline_s is None:
            return BASELINE_SAMPLES
        if self.slow_start:  # the limit the window opened at: it grows per sample meanwhile
            return max(SLOW_START_MIN_SAMPLES, math.ceil(self._window_limit))
        return max(MIN_WINDOW_SAMPLES, math.ceil(self.limit))

    def _close_window(self, now: float) -> None:
        samples = sorted(self._window)
        median = samples[len(samples) // 2]
        first = self.baseline_s is None
        unloaded = self._window_max_in_flight <= 1
        if (self.baseline_s is None or unloaded
                or (median < self.baseline_s and len(samples) >= BASELINE_SAMPLES)):
            # One call at a time cannot queue at the provider: that median *is* the unloaded
            # latency, also when it rose (a bigger model): the only way the baseline goes up.
            self.baseline_s = median
        ratio = median / self.baseline_s if self.baseline_s > 0 else 1.0
        if ratio <= self.tolerance:
            if self._window_max_in_flight * 2 >= self.limit and (first or not self.slow_start):
                # Slow start grew per sample already; only the unloaded reference's window doubles.
                grown = self.limit * SLOW_START_FACTOR if self.slow_start else self.limit + 1.0
                self._set(grown, f"latency flat ({ratio:.2f}x unloaded)")
        else:
            # The window measured the load it had in flight; in slow start the limit may have grown
            # past that since (per flat sample), so the decrease applies to what was measured.
            measured = min(self.limit, float(max(1, self._window_max_in_flight))) if self.slow_start else self.limit
            self.slow_start = False
            gradient = max(MIN_GRADIENT, self.tolerance / ratio)
            self._set(measured * gradient, f"latency {ratio:.2f}x unloaded")
        self._open_window(now)

    def _set(self, limit: float, reason: str) -> None:
        self.limit = min(float(self.ceiling), max(1.0, limit))
        self.last_reason = reason

    def _open_window(self, now: float) -> None:
        self._window = []
        self._window_max_in_flight = 0
        self._window_start = now
        self._window_limit = self.limit

    def _changed(self, before: int) -> int | None:
        after = self.value
        return after if after != before else None
