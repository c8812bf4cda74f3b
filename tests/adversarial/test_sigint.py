"""Ctrl-C at random points of submit(), result() and map(), then the executor is used again (issue 11 item 5).

A notebook user presses Ctrl-C and keeps the Executor. The issue saw a KeyboardInterrupt landing
inside ``submit()`` while the pool started a thread (3 in 400 tries) leave the lane's worker count
wrong, after which the provider saw 3 concurrent calls with MAX_PARALLEL=2. Here a real SIGINT is
sent to the main thread after a random delay during a burst of submits, results and maps; after
each interrupt the executor is used again. At the end: every Future handed out resolved exactly
once, the provider never saw more than MAX_PARALLEL calls at once, stats add up, and shutdown
returns with every thread back.
"""

from __future__ import annotations

import random
import signal
import threading
from concurrent.futures import Future
from types import FrameType
from typing import Any

import pytest

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from tests.adversarial.hostile_servers import wait_until

MAX_PARALLEL = 2
ROUNDS = 200


class CountingProvider:
    """Holds each call briefly and records the most calls in flight at once."""

    name = "counting"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self._pause = threading.Event()  # never set: wait() is a bounded, interruptible sleep

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self.lock:
            self.in_flight += 1
            self.calls += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._pause.wait(0.001)
            return LLMResponse(f"ok:{request.prompt}", self.name, "m", "stop", 1)
        finally:
            with self.lock:
                self.in_flight -= 1


class _Armed:
    """SIGINT raises KeyboardInterrupt only while armed, so a late signal never escapes the test."""

    def __init__(self) -> None:
        self.armed = False
        self.interrupts = 0

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            self.interrupts += 1
            raise KeyboardInterrupt


def _sender(delay_s: float, main_id: int, done: threading.Event) -> threading.Thread:
    """A thread (not started) that interrupts the main thread after ``delay_s`` unless ``done``."""
    def fire() -> None:
        if not done.wait(delay_s):
            signal.pthread_kill(main_id, signal.SIGINT)

    return threading.Thread(target=fire, name="sigint-sender", daemon=True)


def _workload(ex: Executor, kind: str, futures: list[Future[LLMResponse]]) -> None:
    if kind == "submit":
        for i in range(4):
            futures.append(ex.submit(LLMRequest("counting", "m", f"s{i}")))
    elif kind == "result":
        for i in range(2):
            future = ex.submit(LLMRequest("counting", "m", f"r{i}"))
            futures.append(future)
            future.result(timeout=10)
    else:
        for _ in ex.map([LLMRequest("counting", "m", f"m{i}") for i in range(4)]):
            pass


def _check_round(ex: Executor, provider: CountingProvider, futures: list[Future[LLMResponse]]) -> str | None:
    """Use the interrupted executor again, then say what broke (None when nothing did)."""
    futures.extend(ex.submit(LLMRequest("counting", "m", f"after{i}")) for i in range(30))
    if not wait_until(lambda: all(f.done() for f in futures), 20):
        return "a Future never resolved"
    stats = ex.stats()["counting"]
    if provider.max_in_flight > MAX_PARALLEL:
        return f"the provider saw {provider.max_in_flight} calls at once with MAX_PARALLEL={MAX_PARALLEL}"
    if stats.in_flight or stats.queued or stats.submitted != stats.completed + stats.failed + stats.cancelled:
        return f"stats do not add up: {stats}"
    return None


@pytest.mark.slow
def test_sigint_at_random_points_leaves_a_reusable_consistent_executor() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    state = _Armed()
    previous: Any = signal.signal(signal.SIGINT, state.handler)
    rng = random.Random(11)
    main_id = threading.get_ident()
    failures: list[str] = []
    try:
        for round_no in range(ROUNDS):
            # A fresh executor each round: its first submits start the lane's threads, the window
            # where the issue saw the worker count go wrong.
            provider = CountingProvider()
            cfg = ExecutorConfig(providers={"counting": ProviderConfig(max_parallel=MAX_PARALLEL)}, queue_size=0)
            ex = Executor(cfg, providers={"counting": provider})
            futures: list[Future[LLMResponse]] = []
            kind = rng.choice(["submit", "result", "map"])
            done = threading.Event()
            try:
                # Built before it starts: the signal may land before start() returns (seen under load,
                # when assigning start()'s result left `sender` unbound).
                sender = _sender(rng.uniform(0.0, 0.0006), main_id, done)
                try:
                    state.armed = True
                    sender.start()
                    _workload(ex, kind, futures)
                    state.armed = False
                except KeyboardInterrupt:
                    state.armed = False
                finally:
                    done.set()
                sender.join(5)
                problem = _check_round(ex, provider, futures)
                if problem is not None:
                    failures.append(f"round {round_no} ({kind}): {problem}")
            finally:
                shutdown = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
                shutdown.start()
                shutdown.join(20)
                if shutdown.is_alive():
                    failures.append(f"round {round_no} ({kind}): shutdown(wait=True) did not return")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert state.interrupts > ROUNDS // 4, f"only {state.interrupts} interrupts landed"
    assert not failures, f"{len(failures)} of {ROUNDS} rounds broke, e.g.\n" + "\n".join(failures[:5])
    assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("llm-executor")], 5)
