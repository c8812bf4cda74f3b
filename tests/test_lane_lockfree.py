"""The request path without shared locks (issue 10, overhead): what it must still guarantee.

A busy worker takes requests off its lane with ``heappop`` and ``dict.pop`` (atomic under the
GIL) and counts into its own per-thread tally, so no lock shared by the workers is taken per
request (a shared one convoys: 1-2 context switches per request). These tests pin that, and that
the guarantees the lock gave still hold when cancels, submitters and workers race.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, wait
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.metrics import LaneMetrics
from tests.fakes import FakeProvider, req


class CountingLock:
    """A ``threading.Lock`` that counts its acquisitions (works under a Condition too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.acquired += 1
        return got

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class FirstCallGate(FakeProvider):
    """Blocks its first call until ``gate`` is set; every later call answers at once."""

    def __init__(self, name: str = "fake") -> None:
        super().__init__(name)
        self.gate = threading.Event()
        self.first_started = threading.Event()
        self._first = True
        self._first_lock = threading.Lock()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self._first_lock:
            first, self._first = self._first, False
        if first:
            self.first_started.set()
            assert self.gate.wait(10), "test never opened the gate"
        return super().complete(request)


def test_a_busy_worker_takes_no_shared_lock_per_request() -> None:
    provider = FirstCallGate()
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=1)}, queue_size=0)
    n = 300
    with Executor(config, {"fake": provider}) as ex:
        first = ex.submit(req("fake", "first"))
        assert provider.first_started.wait(5)
        lane = ex._lanes["fake"]
        lane_lock, metrics_lock = CountingLock(), CountingLock()
        lane.lock, lane.not_full = lane_lock, threading.Condition(lane_lock)  # type: ignore[assignment]
        lane.metrics._lock = metrics_lock  # type: ignore[assignment]
        futures = [ex.submit(req("fake", f"p{i}")) for i in range(n)]
        submits = lane_lock.acquired  # admission takes the lane's lock once per submit
        provider.gate.set()
        first.result(5)
        for future in futures:
            future.result(5)
        # The worker drained n requests: a lock per request would be >= n acquisitions. What is
        # left is the loop's idle/leave decisions at the end and the first tally of the thread.
        assert submits == n
        assert lane_lock.acquired - submits <= 10
        assert metrics_lock.acquired <= 5
        assert ex.stats()["fake"].completed == n + 1


def test_cancels_racing_busy_workers_settle_each_request_once() -> None:
    for _ in range(3):
        provider = FakeProvider()
        config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=4)}, queue_size=0)
        n = 1500
        with Executor(config, {"fake": provider}) as ex:
            futures = [ex.submit(req("fake", f"p{i}")) for i in range(n)]
            cancelled = [f.cancel() for f in futures[::2]]  # races the four workers taking them
            _, not_done = wait(futures, timeout=20)
            assert not not_done
            lane = ex._lanes["fake"]
            assert lane.pending == 0 and not lane.heap
            stats = ex.stats()["fake"]
        was_cancelled = [f.cancelled() for f in futures]
        assert sum(was_cancelled) == sum(cancelled)  # cancel() said True exactly for these
        called = set(provider.prompts)
        for i, future in enumerate(futures):
            if future.cancelled():
                assert f"p{i}" not in called  # a cancelled request never reaches the provider
            else:
                assert future.result().text == f"echo:p{i}"
        assert len(provider.seen) == n - sum(was_cancelled) == stats.completed
        assert stats.cancelled == sum(was_cancelled)
        assert stats.completed + stats.failed + stats.cancelled == n
        assert stats.in_flight == 0


def test_concurrent_submitters_never_overfill_the_queue_while_workers_take_without_the_lock() -> None:
    provider = FakeProvider()
    capacity = 8
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=2)}, queue_size=capacity,
                            backpressure="block", block_timeout=20)
    with Executor(config, {"fake": provider}) as ex:
        lane = ex._lanes["fake"]
        seen: list[int] = []
        push = lane._push_locked

        def checked_push(request: Any, seq: int) -> bool:
            started = push(request, seq)
            seen.append(len(lane._queued))  # under the lane's lock, right after the push
            return started

        lane._push_locked = checked_push  # type: ignore[method-assign]
        futures: list[Future[LLMResponse]] = []
        futures_lock = threading.Lock()

        def submitter(k: int) -> None:
            for i in range(300):
                f = ex.submit(req("fake", f"s{k}-{i}"))
                with futures_lock:
                    futures.append(f)

        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for f in futures:
            f.result(10)
    assert len(futures) == 1200 and len(seen) == 1200
    assert max(seen) <= capacity


def test_an_async_caller_registering_as_a_slot_frees_is_admitted_at_once(monkeypatch: Any) -> None:
    gate_open = threading.Event()

    class Gate(FakeProvider):
        def complete(self, request: LLMRequest) -> LLMResponse:
            assert gate_open.wait(10)
            return super().complete(request)

    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=1)}, queue_size=1)
    with Executor(config, {"fake": Gate()}) as ex:
        ex.submit(req("fake", "running"))
        lane = ex._lanes["fake"]
        # A worker frees a slot between the full check and the watcher's registration: the lane
        # must see it on its second look rather than leave the caller waiting for a wake-up.
        answers = iter([False, True])
        monkeypatch.setattr(lane, "has_room", lambda: next(answers))

        class Watcher:
            woken = 0

            def alive(self) -> bool:
                return True

            def wake(self) -> bool:
                self.woken += 1
                return True

        future = ex._engine.submit(req("fake", "late"), block=False, block_timeout=None, watcher=Watcher())
        assert lane._room_watchers == []
        monkeypatch.undo()
        gate_open.set()
        assert future.result(5).text == "echo:late"


def test_per_thread_tallies_add_up_and_ended_threads_are_folded() -> None:
    metrics = LaneMetrics("m", 4, None)
    per_thread = 200

    def count() -> None:
        for _ in range(per_thread):
            metrics.on_attempt_start(False, 1.0)
            metrics.on_attempt_end(2, 3, None)
            metrics.on_success(4.0)

    for _ in range(30):  # one thread after another: each leaves a tally behind
        t = threading.Thread(target=count)
        t.start()
        t.join()
    count()  # this thread's own tally folds the 30 ended ones
    assert len(metrics._books[1]) == 1
    stats = metrics.snapshot(0, 0, None)
    total = 31 * per_thread
    assert (stats.attempts, stats.completed, stats.tokens, stats.prompt_tokens) == (total, total, 5 * total, 2 * total)
    assert stats.latency_ms_mean == 4.0 and stats.queue_ms_mean == 1.0
    assert stats.in_flight == 0 and stats.max_in_flight == 1 and stats.max_starts_1s >= 1


def test_max_in_flight_is_never_above_the_calls_really_running() -> None:
    metrics = LaneMetrics("m", 4, None)
    running = 0
    peak = 0
    guard = threading.Lock()
    barrier = threading.Barrier(4)

    def worker() -> None:
        nonlocal running, peak
        barrier.wait()
        for _ in range(2000):
            with guard:  # the truth, counted under a lock of the test's own
                running += 1
                peak = max(peak, running)
                metrics.on_attempt_start(True)
            with guard:
                running -= 1
                metrics.on_attempt_end(None, None, None)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = metrics.snapshot(0, 0, None)
    assert stats.in_flight == 0 and stats.attempts == stats.retries == 8000
    assert 1 <= stats.max_in_flight <= peak <= 4


def test_a_build_without_the_gil_takes_under_the_lock_and_still_serves_everyone(monkeypatch: Any) -> None:
    import llm_executor.lifecycle.lane as lane_module
    import llm_executor.metrics as metrics_module

    # The free-threaded branches, on this build: the lane's locked take, the metrics' locked updates.
    monkeypatch.setattr(lane_module, "GIL_ENABLED", False)
    monkeypatch.setattr(metrics_module, "GIL_ENABLED", False)
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=2)}, queue_size=4,
                            backpressure="block", block_timeout=10)
    with Executor(config, {"fake": FakeProvider()}) as ex:
        futures = [ex.submit(req("fake", f"p{i}")) for i in range(200)]  # blocked submitters too
        assert [f.result(10).text for f in futures] == [f"echo:p{i}" for i in range(200)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_a_fork_while_a_tally_is_folded_counts_every_request_once_in_the_child(monkeypatch: Any) -> None:
    """Another thread is half-way through folding an ended thread's tally when this one forks:
    the child must count that thread's requests once (the books are replaced whole)."""
    import llm_executor.metrics as metrics_module

    with Executor(ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=1)}), {"fake": FakeProvider()}) as ex:
        metrics = ex._lanes["fake"].metrics
        ended = threading.Thread(target=lambda: [metrics.on_success(1.0) for _ in range(100)])
        ended.start()
        ended.join()
        in_fold, go = threading.Event(), threading.Event()
        add = metrics_module._Tally.add

        def paused_add(self: Any, other: Any) -> None:
            add(self, other)
            if threading.current_thread().name == "folder" and other.completed == 100:
                in_fold.set()  # stands for a GIL switch right after the fold step
                go.wait(5)

        monkeypatch.setattr(metrics_module._Tally, "add", paused_add)
        folder = threading.Thread(target=lambda: metrics.on_success(1.0), name="folder")
        folder.start()
        assert in_fold.wait(5)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            os._exit(0 if ex.stats()["fake"].completed == 100 else 1)
        go.set()
        folder.join(5)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child counted the ended thread twice"
        assert ex.stats()["fake"].completed == 101
