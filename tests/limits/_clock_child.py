"""A child process of test_clocks.py: one Executor from the environment, on a skewed wall clock.

Its wall clock (``time.time``/``time.time_ns``, patched before the library is imported) reads
``CLOCK_TEST_SKEW_S`` seconds off the host's, plus the number of seconds in
``CLOCK_TEST_STEP_FILE`` (re-read on every call), so the parent can step it mid-run as NTP does.
Every clock the library reads goes through the ``time`` module, so this fakes what libfaketime
faked for it, without libfaketime's cost: under it every lock hand-off between threads of this
process took ~20 ms (measured: the rate token to the wire went from ~2 ms to 20-70 ms), past the
20 ms window margin, which is scheduling jitter and not the clocks under test.

Protocol on stdout/stdin (one line each): sends one warm-up request, prints ``ready <time.time()>``;
waits for ``go <seconds>``; submits more requests than the run can start, shuts down (cancelling
the rest) after ``seconds`` on its monotonic clock; prints ``done <answered> <failed> <time.time()> <error classes>``.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _skew_wall_clock() -> None:
    skew_s = float(os.environ.get("CLOCK_TEST_SKEW_S", "0"))
    step_file = os.environ.get("CLOCK_TEST_STEP_FILE")
    real_time, real_time_ns = time.time, time.time_ns

    def offset_s() -> float:
        if not step_file:
            return skew_s
        with open(step_file, encoding="ascii") as f:
            return skew_s + float(f.read().strip() or 0)

    time.time = lambda: real_time() + offset_s()  # type: ignore[assignment]
    time.time_ns = lambda: real_time_ns() + int(offset_s() * 1e9)  # type: ignore[assignment]


_skew_wall_clock()

from llm_executor import Executor, ExecutorConfig, LLMRequest  # noqa: E402  (after the clock is skewed)


def main() -> int:
    executor = Executor(ExecutorConfig.from_env())
    # Warm: the first request of a process (a new connection, first-use imports) reaches the
    # provider tens of ms after its token, more than the window margin covers; a fleet is warm.
    executor.run(LLMRequest(provider="openai", model="gpt-4o-mini", prompt="warm-up"), timeout=30)
    print(f"ready {time.time()!r}", flush=True)
    word, seconds = sys.stdin.readline().split()
    assert word == "go"
    end = time.monotonic() + float(seconds)
    futures = [executor.submit(LLMRequest(provider="openai", model="gpt-4o-mini", prompt=f"p{i}"))
               for i in range(500)]
    threading.Event().wait(max(0.0, end - time.monotonic()))
    executor.shutdown(wait=True, cancel_futures=True)
    done = [f for f in futures if not f.cancelled()]
    # Requests still waiting for their turn when the run ends get ExecutorShutdownError: not failures.
    errors = [type(f.exception()).__name__ for f in done if f.exception() is not None]
    failed = [e for e in errors if e != "ExecutorShutdownError"]
    print(f"done {len(done) - len(errors)} {len(failed)} {time.time()!r} {','.join(failed) or '-'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
