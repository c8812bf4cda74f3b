"""Stateful property test of the request lifecycle (issue 10): features mixed, invariants after every step.

Hypothesis drives submit / cancel / deadline expiry (a fake clock) / retryable and final failures /
fallback / schema repair / blocked calls released / shutdown against scripted providers, and checks
after every step, and again when everything has settled:

* each Future settles at most once (one done-callback), and all are settled after shutdown;
* ``stats()`` counts each request once: completed + failed + cancelled over all lanes equals what
  the callers saw, with cancellations counted where ``cancel()`` returned True;
* no provider call starts for a request after its deadline (the time left it is given is > 0) or
  after ``cancel()`` returned True;
* rate tokens taken = attempts started; TPM reserved returns to 0 when idle;
* in flight never above MAX_PARALLEL; no worker thread after ``shutdown(wait=True)``.

``TestLearnedCap`` runs the same machine with ``MAX_PARALLEL=auto`` (ceiling MAX_PARALLEL) and a
rule that moves each lane's learned cap up or down at the next finished attempt: the same books
must balance while the cap moves under running calls.

``LLM_EXECUTOR_STATEFUL_EXAMPLES`` sets the number of examples (default 40; the long run recorded
in the CHANGELOG used 3000).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.errors import (
    ExecutorShutdownError,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
)

LANES = ("p0", "p1")
MAX_PARALLEL = 2
SCHEMA = {"type": "object", "required": ["ok"]}
ACTIONS = ("ok", "ok", "503", "400", "bad_json", "block")
EXAMPLES = int(os.environ.get("LLM_EXECUTOR_STATEFUL_EXAMPLES", "40"))


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()
        self.on_advance: list[Any] = []

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
        for wake in self.on_advance:
            wake()


@dataclass
class Call:
    request_id: str
    lane: str
    timeout: float | None
    started_at: float


@dataclass
class Submitted:
    future: Future[LLMResponse]
    request_id: str
    deadline: float | None
    callbacks: list[int] = field(default_factory=lambda: [0])
    cancel_returned_true: bool = False


class ScriptedLane:
    """A provider whose every call plays the next action of its request's script."""

    def __init__(self, name: str, machine: LifecycleMachine) -> None:
        self.name = name
        self.machine = machine
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def capabilities(self) -> Capabilities:
        return Capabilities(max_output_tokens=10_000, supports_json_schema=True, models=("m",))

    def complete(self, request: LLMRequest) -> LLMResponse:
        m = self.machine
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            m.record_call(Call(request.request_id, self.name, request.timeout, time.monotonic()))
            action = m.next_action(request.request_id)
            if action == "block" and not m.draining:
                gate = threading.Event()
                with m.lock:
                    m.blocked.append(gate)
                gate.wait(20)
                action = "ok"
            if action == "503":
                raise ProviderUnavailableError("scripted 503", status=503)
            if action == "400":
                raise ProviderError("scripted 400", status=400)
            text = "not json" if action == "bad_json" else json.dumps({"ok": True})
            return LLMResponse(text=text, provider=self.name, model="m", finish_reason="stop", usage_tokens=7)
        finally:
            with self.lock:
                self.in_flight -= 1


class LifecycleMachine(RuleBasedStateMachine):
    max_parallel: int | str = MAX_PARALLEL

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.clock = FakeClock()
        self.scripts: dict[str, deque[str]] = {}
        self.calls: list[Call] = []
        self.blocked: list[threading.Event] = []
        self.submitted: list[Submitted] = []
        self.rejected = 0
        self.is_shut_down = False
        self.draining = False  # teardown: "block" answers at once
        self.providers = {name: ScriptedLane(name, self) for name in LANES}
        config = ExecutorConfig(
            providers={name: ProviderConfig(max_parallel=self.max_parallel,  # type: ignore[arg-type]
                                            max_parallel_ceiling=MAX_PARALLEL, qps=100_000, tpm=10**9, max_retries=2,
                                            repair_attempts=1, fallback=True, model="m") for name in LANES},
            queue_size=4, fallbacks=LANES)
        self.ex = Executor(config, self.providers, sleep=lambda s: None, clock=self.clock)
        self.clock.on_advance.append(self.ex._engine.reaper.wake)
        self.tokens = {name: 0 for name in LANES}
        for name in LANES:
            self._count_tokens(name)
        self.seq = 0

    def _count_tokens(self, name: str) -> None:
        limiter = self.ex._lanes[name].limiter
        real = limiter.admit

        def counting(*args: Any, **kwargs: Any) -> Any:
            admission = real(*args, **kwargs)  # returns only once the rate token is taken
            with self.lock:
                self.tokens[name] += 1
            return admission

        limiter.admit = counting  # type: ignore[method-assign]

    # -- hooks of the scripted providers ------------------------------------------------------

    def record_call(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def next_action(self, request_id: str) -> str:
        with self.lock:
            script = self.scripts.get(request_id)
            return script.popleft() if script else "ok"

    # -- rules -----------------------------------------------------------------------------------

    @rule(lane=st.sampled_from(LANES), script=st.lists(st.sampled_from(ACTIONS), max_size=4),
          with_schema=st.booleans(), timeout=st.one_of(st.none(), st.sampled_from([0.5, 2.0, 10.0])),
          priority=st.integers(-1, 1))
    def submit(self, lane: str, script: list[str], with_schema: bool, timeout: float | None, priority: int) -> None:
        self.seq += 1
        request_id = f"r{self.seq}"
        with self.lock:
            self.scripts[request_id] = deque(script)
        request = LLMRequest(lane, "m", f"prompt {self.seq}", json_schema=SCHEMA if with_schema else None,
                             request_id=request_id, timeout=timeout, priority=priority)
        now = self.clock()
        try:
            future = self.ex.submit(request)
        except QueueFullError:
            self.rejected += 1
            return
        except ExecutorShutdownError:
            assert self.is_shut_down, "ExecutorShutdownError before shutdown()"
            return
        assert not self.is_shut_down, "submit() accepted a request after shutdown()"
        entry = Submitted(future, request_id, None if timeout is None else now + timeout)

        def count(f: Future[LLMResponse], counter: list[int] = entry.callbacks) -> None:
            counter[0] += 1

        future.add_done_callback(count)
        self.submitted.append(entry)

    @precondition(lambda self: self.submitted)
    @rule(index=st.integers(min_value=0))
    def cancel(self, index: int) -> None:
        entry = self.submitted[index % len(self.submitted)]
        if entry.future.cancel():
            entry.cancel_returned_true = True

    @rule(seconds=st.sampled_from([0.1, 0.6, 3.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def release_one_blocked_call(self) -> None:
        with self.lock:
            gate = self.blocked.pop(0) if self.blocked else None
        if gate is not None:
            gate.set()

    @precondition(lambda self: not self.is_shut_down)
    @rule(cancel_futures=st.booleans())
    def shutdown_without_waiting(self, cancel_futures: bool) -> None:
        self.is_shut_down = True
        self.ex.shutdown(wait=False, cancel_futures=cancel_futures)

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def futures_settle_at_most_once(self) -> None:
        for entry in self.submitted:
            assert entry.callbacks[0] <= 1, f"{entry.request_id} settled {entry.callbacks[0]} times"

    @invariant()
    def in_flight_never_above_max_parallel(self) -> None:
        for provider in self.providers.values():
            assert provider.max_in_flight <= MAX_PARALLEL

    @invariant()
    def no_call_after_deadline_or_cancel(self) -> None:
        with self.lock:
            calls = list(self.calls)
        by_id = {e.request_id: e for e in self.submitted}
        for call in calls:
            entry = by_id.get(call.request_id)
            assert entry is not None
            if entry.deadline is not None:
                assert call.timeout is not None and call.timeout > 0, f"{call} started past its deadline"
            # cancel() returns True only for a request whose Future never passed the gate.
            assert not entry.cancel_returned_true, f"{call.request_id} reached the provider, yet cancel() was True"

    @invariant()
    def stats_never_count_more_than_callers_can_see(self) -> None:
        stats = self.ex.stats()
        counted = sum(s.finished for s in stats.values())
        assert counted <= len(self.submitted)

    # -- the end: settle everything and check the books ----------------------------------------

    def teardown(self) -> None:
        self.draining = True
        try:
            for _ in range(3):
                with self.lock:
                    gates, self.blocked = list(self.blocked), []
                for gate in gates:
                    gate.set()
                self.clock.advance(100.0)  # every deadline passes: nothing can stay pending
            threads = self.ex._engine.threads()
            self.ex.shutdown(wait=True)
            with self.lock:
                for gate in self.blocked:
                    gate.set()
            self._check_books(threads)
        finally:
            with self.lock:
                for gate in self.blocked:
                    gate.set()
            self.ex.shutdown(wait=True, cancel_futures=True)

    def _check_books(self, threads: list[threading.Thread]) -> None:
        outcomes = {"completed": 0, "failed": 0, "cancelled": 0}
        for entry in self.submitted:
            future = entry.future
            assert future.done(), f"{entry.request_id} not settled after shutdown(wait=True)"
            assert entry.callbacks[0] == 1, f"{entry.request_id}: {entry.callbacks[0]} done-callbacks"
            try:
                future.result(0)
                outcomes["completed"] += 1
            except CancelledError:
                outcomes["cancelled"] += 1
            except BaseException:
                outcomes["failed"] += 1
        stats = self.ex.stats()
        assert sum(s.completed for s in stats.values()) == outcomes["completed"]
        assert sum(s.failed for s in stats.values()) == outcomes["failed"]
        assert sum(s.cancelled for s in stats.values()) == outcomes["cancelled"]
        with self.lock:
            calls_by_lane = {name: sum(1 for c in self.calls if c.lane == name) for name in LANES}
        for name in LANES:
            assert stats[name].attempts == calls_by_lane[name]
            assert self.tokens[name] == stats[name].attempts, f"{name}: tokens {self.tokens[name]} != attempts"
            assert stats[name].tpm_reserved == 0
            assert stats[name].in_flight == 0 and stats[name].queued == 0
        assert not [t for t in threads + self.ex._engine.threads() if t.is_alive()], "threads outlived shutdown"


LifecycleMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestLifecycle = LifecycleMachine.TestCase


class ChosenCap:
    """Stands in for a lane's GradientLimit: the next finished attempt sets the cap a rule chose."""

    def __init__(self) -> None:
        self.next: int | None = None
        self.value = 1
        self.last_reason = "chosen by the test"

    def on_sample(self, latency_s: float, ok: bool, in_flight: int) -> int | None:
        chosen, self.next = self.next, None
        if chosen is None or chosen == self.value:
            return None
        self.value = chosen
        return chosen


class LearnedCapMachine(LifecycleMachine):
    max_parallel = "auto"

    def __init__(self) -> None:
        super().__init__()
        self.caps = {name: ChosenCap() for name in LANES}
        for name in LANES:
            lane = self.ex._lanes[name]
            assert lane.max_parallel == 1
            lane.concurrency = self.caps[name]  # type: ignore[assignment]

    @rule(lane=st.sampled_from(LANES), value=st.integers(min_value=1, max_value=MAX_PARALLEL))
    def learn_cap(self, lane: str, value: int) -> None:
        self.caps[lane].next = value


LearnedCapMachine.TestCase.settings = LifecycleMachine.TestCase.settings
TestLearnedCap = LearnedCapMachine.TestCase
