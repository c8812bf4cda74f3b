"""A child process of test_clocks.py: one Executor from the environment, run under libfaketime.

Protocol on stdout/stdin (one line each): sends one warm-up request, prints ``ready <time.time()>``;
waits for ``go <seconds>``; submits more requests than the run can start, shuts down (cancelling
the rest) after ``seconds`` on its monotonic clock; prints ``done <answered> <failed> <time.time()> <error classes>``.
It waits on an Event, not ``time.sleep``: libfaketime 0.9.10 breaks ``clock_nanosleep`` (EINVAL);
the library itself never sleeps that way.
"""

from __future__ import annotations

import sys
import threading
import time

from llm_executor import Executor, ExecutorConfig, LLMRequest


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
