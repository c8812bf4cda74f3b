"""Regressions of issue 10: promises that broke where features met (one test per item, 1-9).

Each test is named after the failure it pins and fails on the executor before the lifecycle
redesign (llm_executor/lifecycle). Waits are Events with timeouts; no test sleeps to "let things
happen".
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import random
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any

import pytest

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.errors import (
    DeadlineExceededError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
)
from llm_executor.testing import Emulator, ProviderSim, ScriptedProvider
from tests.fakes import FakeProvider, GateProvider, req, wait_for


class ReportingProvider(FakeProvider):
    """Answers at once and reports ``tokens`` of usage."""

    def __init__(self, name: str = "fake", tokens: int = 10, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.tokens = tokens

    def respond(self, request: LLMRequest) -> LLMResponse:
        return LLMResponse(text="ok", provider=self.name, model=request.model or "m", finish_reason="stop",
                           usage_tokens=self.tokens)


# -- item 1: a TPM reservation is given back when its request never starts ----------------------


def test_tpm_reservations_of_requests_that_miss_their_deadline_are_given_back() -> None:
    provider = ReportingProvider(tokens=10)
    config = ExecutorConfig(providers={"fake": ProviderConfig(qps=1, tpm=1000, max_parallel=3)})
    with Executor(config, {"fake": provider}) as ex:
        futures = [ex.submit(req(max_output_tokens=300, timeout=0.5)) for _ in range(3)]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(5).text)
            except DeadlineExceededError:
                outcomes.append("deadline")
        assert sorted(outcomes) == ["deadline", "deadline", "ok"]
        lane = ex._lanes["fake"]
        assert ex.stats()["fake"].tpm_reserved == 0
        assert lane.limiter.tpm_used() == 10  # the one call's reported usage, nothing reserved left
        # 500 tokens fit in 1000 - 10: the next request runs instead of waiting a minute.
        assert ex.run(req(max_output_tokens=490, timeout=5)).text == "ok"


# -- item 2: fallback + deadline settles once, and nothing is queued for a dead request ---------


def two_lane_config(**a: Any) -> ExecutorConfig:
    return ExecutorConfig(
        providers={"a": ProviderConfig(max_retries=0, fallback=True, model="m", **a),
                   "b": ProviderConfig(model="m")},
        fallbacks=("a", "b"))


def test_fallback_answering_after_the_deadline_is_counted_once() -> None:
    a = FakeProvider("a", reply=lambda r: ProviderUnavailableError("down", status=503))
    b = GateProvider("b")
    with Executor(two_lane_config(), {"a": a, "b": b}) as ex:
        future = ex.submit(req("a", timeout=0.3))
        b.wait_started()
        with pytest.raises(DeadlineExceededError):
            future.result(5)
        b.gate.set()
        assert wait_for(lambda: ex.stats()["b"].in_flight == 0)
        sa, sb = ex.stats()["a"], ex.stats()["b"]
    assert (sa.completed, sa.failed, sa.fallbacks) == (0, 0, 1)
    assert (sb.completed, sb.failed, sb.fallbacks_in) == (0, 1, 1)
    assert sa.finished + sb.finished == 1


def test_a_failure_after_the_deadline_does_not_queue_a_fallback() -> None:
    release = threading.Event()
    started = threading.Event()

    def late_failure(request: LLMRequest) -> Any:
        started.set()
        assert release.wait(5)
        return ProviderUnavailableError("down", status=503)

    a = FakeProvider("a", reply=late_failure)
    b = FakeProvider("b")
    with Executor(two_lane_config(), {"a": a, "b": b}) as ex:
        future = ex.submit(req("a", timeout=0.2))
        assert started.wait(5)
        with pytest.raises(DeadlineExceededError):
            future.result(5)
        release.set()
        assert wait_for(lambda: ex.stats()["a"].in_flight == 0)
        sa, sb = ex.stats()["a"], ex.stats()["b"]
    assert b.seen == []
    assert (sb.fallbacks_in, sb.submitted, sb.finished) == (0, 0, 0)
    assert (sa.failed, sa.fallbacks, sa.finished) == (1, 0, 1)


# -- item 3: a fallback lane and schema repairs keep their own retry budgets --------------------


def test_fallback_lane_retries_with_its_own_budget() -> None:
    a = FakeProvider("a", reply=lambda r: ProviderUnavailableError("a down", status=503))
    b = ScriptedProvider([ProviderUnavailableError("b blip", status=503), "b ok"], name="b")
    config = ExecutorConfig(
        providers={"a": ProviderConfig(max_retries=3, fallback=True, model="m"),
                   "b": ProviderConfig(max_retries=3, model="m")},
        fallbacks=("a", "b"))
    with Executor(config, {"a": a, "b": b}, sleep=lambda s: None) as ex:
        response = ex.run(req("a"), timeout=5)
    assert response.text == "b ok" and response.provider == "b"
    assert len(a.seen) == 4 and len(b.requests) == 2
    assert response.attempts == 6


def test_repairs_do_not_spend_the_transient_retry_budget() -> None:
    provider = ScriptedProvider(["not json", "still not json", ProviderUnavailableError("blip", status=500),
                                 json.dumps({"ok": True})], name="fake")
    config = ExecutorConfig(providers={"fake": ProviderConfig(repair_attempts=2, max_retries=1)})
    with Executor(config, {"fake": provider}, sleep=lambda s: None) as ex:
        response = ex.run(req(json_schema={"type": "object", "required": ["ok"]}), timeout=5)
    assert response.data == {"ok": True} and response.attempts == 4


# -- item 4: a rate token is taken only for an attempt that starts ------------------------------


def test_rate_tokens_taken_equal_attempts_started() -> None:
    provider = FakeProvider()
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig(qps=4, max_parallel=8)}),
                  {"fake": provider}) as ex:
        limiter = ex._lanes["fake"].limiter
        real = limiter.admit
        taken: list[float] = []

        def counting(*args: Any, **kwargs: Any) -> Any:
            admission = real(*args, **kwargs)  # returns once the rate token is taken
            taken.append(time.monotonic())
            return admission

        limiter.admit = counting  # type: ignore[method-assign]
        for f in [ex.submit(req(prompt=str(i))) for i in range(10)]:
            f.result(10)
        attempts = ex.stats()["fake"].attempts
    assert attempts == 10 and len(taken) == 10


# -- item 5: cancel frees the slot before the done-callbacks run --------------------------------


def test_a_done_callback_of_a_cancelled_request_can_resubmit_into_its_slot(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1,
                            backpressure="block", block_timeout=0.5)
    with Executor(config, {"gate": gate}) as ex:
        ex.submit(req("gate", "running"))
        gate.wait_started()
        queued = ex.submit(req("gate", "queued"))
        resubmitted: list[Future[LLMResponse]] = []
        errors: list[BaseException] = []

        def resubmit(f: Future[LLMResponse]) -> None:
            try:
                resubmitted.append(ex.submit(req("gate", "again")))
            except BaseException as exc:  # QueueFullError before the fix
                errors.append(exc)

        queued.add_done_callback(resubmit)
        assert queued.cancel()
        assert errors == [] and len(resubmitted) == 1
        assert ex.stats()["gate"].cancelled == 1  # counted before the callback ran
        gate.gate.set()
        assert resubmitted[0].result(5).text == "echo:again"


# -- item 6: a dropped Executor is collected and its threads end --------------------------------


def test_an_executor_dropped_without_shutdown_is_collected_and_its_threads_end(gate: GateProvider) -> None:
    ex = Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}), {"gate": gate})
    running = ex.submit(req("gate", "running", timeout=30))  # starts the deadline reaper too
    gate.wait_started()
    queued = ex.submit(req("gate", "queued", timeout=30))
    threads = ex._engine.threads()
    assert any(t.name == "llm-executor-deadlines" for t in threads)
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None, "something still holds the Executor"
    # The documented choice: a dropped executor cancels its queue (on a thread of its own).
    assert wait_for(queued.cancelled, 5)
    gate.gate.set()
    assert running.result(5).text == "echo:running"  # a running call finishes
    assert wait_for(lambda: not any(t.is_alive() for t in threads), 10)


def test_the_finalizer_of_a_dropped_executor_cannot_deadlock_a_thread_holding_a_lane_lock(
        gate: GateProvider) -> None:
    """The collector may run the finalizer on a worker that holds its lane's lock (not re-entrant):
    it must hand the work to another thread rather than take that lock again."""
    from llm_executor.lifecycle.engine import Engine

    ex = Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}), {"gate": gate})
    ex.submit(req("gate", "running"))
    gate.wait_started()
    queued = ex.submit(req("gate", "queued"))
    engine = ex._engine
    returned = threading.Event()

    def collector_on_a_lock_holder() -> None:
        with engine.lanes["gate"].lock:
            Engine.abandon(engine)  # what weakref.finalize calls when the Executor is collected
            returned.set()

    t = threading.Thread(target=collector_on_a_lock_holder, daemon=True)
    t.start()
    assert returned.wait(5), "the finalizer blocked on the lane lock its own thread holds"
    t.join(5)
    assert wait_for(queued.cancelled, 5)
    gate.gate.set()
    ex.shutdown()


def test_rebuilding_an_executor_in_a_loop_does_not_pile_up_threads() -> None:
    before = threading.active_count()
    for i in range(20):
        ex = Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": FakeProvider()})
        ex.run(req(prompt=str(i), timeout=5))  # a deadline: the reaper thread starts
    del ex
    gc.collect()
    assert wait_for(lambda: threading.active_count() <= before + 2, 10)


# -- item 7: a forked child gets a working executor -------------------------------------------

_FORK_EXECUTOR: Executor | None = None


def _child_submits(conn: Any) -> None:
    assert _FORK_EXECUTOR is not None
    try:
        response = _FORK_EXECUTOR.run(req(prompt="from the child", timeout=5), timeout=10)
        conn.send(("ok", response.text, os.getpid()))
    except BaseException as exc:  # reported to the parent, which fails the test
        conn.send(("error", repr(exc), os.getpid()))
    finally:
        conn.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_gets_a_working_executor_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    global _FORK_EXECUTOR
    gate = GateProvider()
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig(qps=100)}), {"fake": gate}) as ex:
        _FORK_EXECUTOR = ex
        busy = ex.submit(req(prompt="held in the parent", timeout=30))  # threads and a lock in use
        gate.wait_started()
        ctx = multiprocessing.get_context("fork")
        parent_conn, child_conn = ctx.Pipe()
        gate.gate.set()  # the child's copy of the gate is open too
        process = ctx.Process(target=_child_submits, args=(child_conn,))
        process.start()
        assert parent_conn.poll(20), "the forked child's request never finished"
        status, text, pid = parent_conn.recv()
        process.join(10)
        assert (status, text) == ("ok", "echo:from the child"), text
        assert pid != os.getpid()
        assert busy.result(5).text == "echo:held in the parent"
    _FORK_EXECUTOR = None


def test_after_fork_reset_logs_and_drops_the_parents_queue(caplog: pytest.LogCaptureFixture,
                                                           gate: GateProvider) -> None:
    with Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}), {"gate": gate}) as ex:
        ex.submit(req("gate", "a"))
        gate.wait_started()
        ex.submit(req("gate", "b"))
        engine = ex._engine
        old_lock = engine.lanes["gate"].lock
        with caplog.at_level(logging.INFO, logger="llm_executor"):
            # What os.register_at_fork runs in a child, called here to inspect its effect.
            engine.after_fork_in_child()
        assert engine.lanes["gate"].lock is not old_lock
        assert engine.lanes["gate"].pending == 0
        assert any("forked child" in r.getMessage() and "1 requests queued" in r.getMessage()
                   for r in caplog.records)
        gate.gate.set()


# -- item 8: a config built in code reads the providers' own key variables ----------------------


def test_provider_config_in_code_takes_the_key_from_openai_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-from-env")
    monkeypatch.delenv("LLM_EXECUTOR_OPENAI_API_KEY", raising=False)
    with Emulator(providers={"openai": ProviderSim(require_key="sk-test-from-env")}) as emu:
        config = ExecutorConfig(providers={"openai": ProviderConfig(base_url=emu.url("openai"),
                                                                    model="gpt-4o-mini")})
        with Executor(config) as ex:
            assert ex.run(LLMRequest("openai", "", "Hi"), timeout=10).text


# -- item 9 ------------------------------------------------------------------------------------------


def test_submit_auto_never_asks_a_limits_store(fake: FakeProvider) -> None:
    config = ExecutorConfig(providers={"fake": ProviderConfig(qps=50, model="m"),
                                       "other": ProviderConfig(qps=50, model="m")})
    with Executor(config, {"fake": fake, "other": FakeProvider("other")}) as ex:
        for lane in ex._lanes.values():
            def frozen() -> float:
                raise AssertionError("submit() asked the limits store")
            lane.limiter.expected_wait_s = frozen  # type: ignore[method-assign]
        assert ex.run(LLMRequest("auto", "", "hi"), timeout=5).text == "echo:hi"


def test_a_metrics_listener_that_raises_does_not_strand_the_future(fake: FakeProvider) -> None:
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": fake}) as ex:
        def broken(provider: str, outcome: str, latency_ms: float | None) -> None:
            raise RuntimeError("listener bug")
        ex._lanes["fake"].metrics.listeners.append(broken)
        assert ex.run(req(), timeout=5).text == "echo:hi"
        assert ex.stats()["fake"].completed == 1


def test_a_thread_that_cannot_start_is_reported_as_such_not_as_shutdown(fake: FakeProvider) -> None:
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": fake}) as ex:
        pool = ex._lanes["fake"].pool
        real_submit = pool.submit

        def no_threads(*a: Any, **kw: Any) -> Any:
            raise RuntimeError("can't start new thread")

        pool.submit = no_threads  # type: ignore[method-assign]
        with pytest.raises(ProviderUnavailableError, match="could not start a worker thread"):
            ex.submit(req()).result(5)
        pool.submit = real_submit  # type: ignore[method-assign]
        assert ex.run(req(prompt="after"), timeout=5).text == "echo:after"


def test_concurrent_pauses_never_shorten_the_pause(fake: FakeProvider) -> None:
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": fake}) as ex:
        lane = ex._lanes["fake"]
        waits = [random.uniform(100, 200) for _ in range(4000)]
        start = threading.Barrier(8)

        def pauser(chunk: list[float]) -> None:
            start.wait()
            for w in chunk:
                lane.pause(w)

        logging.getLogger("llm_executor").disabled = True
        try:
            threads = [threading.Thread(target=pauser, args=(waits[i::8],)) for i in range(8)]
            before = lane.clock()
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        finally:
            logging.getLogger("llm_executor").disabled = False
        assert lane.paused_until >= before + max(waits)
        lane.paused_until = 0.0


def test_a_retry_after_above_the_cap_on_a_503_keeps_its_class() -> None:
    provider = FakeProvider(reply=lambda r: ProviderUnavailableError("overloaded", status=503, retry_after_s=600.0))
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_retry_wait_s=60)})
    with Executor(config, {"fake": provider}, sleep=lambda s: None) as ex:
        with pytest.raises(ProviderUnavailableError) as info:
            ex.run(req(), timeout=5)
    assert not isinstance(info.value, RateLimitedError)
    assert info.value.retry_after_s == 600.0 and "above the retry cap" in str(info.value)


# -- issue 11 items 5 and 9: Ctrl-C inside submit, shutdown from a done-callback ------------------


def test_ctrl_c_while_the_pool_starts_a_thread_never_breaks_max_parallel() -> None:
    provider = GateProvider()
    with Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=2)}, queue_size=0),
                  {"gate": provider}) as ex:
        pool = ex._lanes["gate"].pool
        real_submit = pool.submit

        def interrupted(*a: Any, **kw: Any) -> Any:
            real_submit(*a, **kw)  # the loop is scheduled (or running) already ...
            raise KeyboardInterrupt  # ... when Ctrl-C lands

        lane = ex._lanes["gate"]
        provider.gate.set()
        for _ in range(3):
            # Each time the lane has no loop left, so the submit starts one (and is interrupted).
            assert wait_for(lambda: not lane.has_workers())
            pool.submit = interrupted  # type: ignore[method-assign]
            with pytest.raises(KeyboardInterrupt):
                ex.submit(req("gate", "interrupted"))
            pool.submit = real_submit  # type: ignore[method-assign]
        assert wait_for(lambda: not lane.has_workers())
        provider.gate.clear()
        futures = [ex.submit(req("gate", str(i))) for i in range(12)]
        provider.wait_started(2)
        provider.gate.set()
        for f in futures:
            f.result(10)
    assert provider.max_in_flight <= 2
    assert ex.stats()["gate"].max_in_flight <= 2


def test_shutdown_wait_from_a_done_callback_stops_every_thread(fake: FakeProvider) -> None:
    ex = Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": fake})
    done = threading.Event()
    errors: list[BaseException] = []

    def stop(f: Future[LLMResponse]) -> None:
        try:
            ex.shutdown(wait=True)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    future = ex.submit(req(timeout=30))  # a deadline: the reaper thread is running
    threads = ex._engine.threads()
    future.add_done_callback(stop)
    assert done.wait(5) and errors == []
    assert wait_for(lambda: not any(t.is_alive() for t in threads + ex._engine.threads()), 10)


def test_async_submit_under_block_backpressure_waits_without_blocking_the_loop(gate: GateProvider) -> None:
    import asyncio

    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1,
                            backpressure="block", block_timeout=10)

    async def main(ex: Executor) -> list[str]:
        first = await ex.asubmit(req("gate", "1"))
        await ex.asubmit(req("gate", "2"))  # fills the queue
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        third = asyncio.create_task(ex.arun(req("gate", "3"), timeout=10))  # waits for room
        await asyncio.sleep(0.1)
        assert not third.done() and ticks >= 5  # the loop kept running while submit waited
        gate.gate.set()
        texts = [(await asyncio.wrap_future(first)).text, (await third).text]
        tick_task.cancel()
        return texts

    with Executor(config, {"gate": gate}) as ex:
        assert asyncio.run(main(ex)) == ["echo:1", "echo:3"]


def test_async_submit_fail_fast_raises_queue_full(gate: GateProvider) -> None:
    import asyncio

    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1)

    async def main(ex: Executor) -> None:
        await ex.asubmit(req("gate", "1"))
        gate.wait_started()
        await ex.asubmit(req("gate", "2"))
        with pytest.raises(QueueFullError, match="Ways out"):
            await ex.asubmit(req("gate", "3"))

    with Executor(config, {"gate": gate}) as ex:
        asyncio.run(main(ex))
        gate.gate.set()


def test_map_takes_a_function_and_an_iterable_like_concurrent_futures(fake: FakeProvider) -> None:
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": fake}) as ex:
        texts = [r.text for r in ex.map(lambda row: req(prompt=f"row {row}"), range(5))]
    assert texts == [f"echo:row {i}" for i in range(5)]


def test_capabilities_check_uses_the_lanes_default_model() -> None:
    caps = Capabilities(max_output_tokens=100, model_max_output_tokens={"small": 10})
    provider = FakeProvider(caps=caps)
    config = ExecutorConfig(providers={"fake": ProviderConfig(model="small")})
    with Executor(config, {"fake": provider}) as ex:
        with pytest.raises(Exception, match="at most 10"):
            ex.submit(LLMRequest("fake", "", "hi", max_output_tokens=50))


# -- issue 14 item 1: an honest QueueFullError ----------------------------------------------------


def test_queue_full_says_what_to_do_and_estimates_one_slot_not_the_whole_queue(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=4, qps=50)}, queue_size=100)
    with Executor(config, {"gate": gate}) as ex:
        for i in range(104):
            ex.submit(req("gate", str(i)))
        gate.wait_started(4)
        with pytest.raises(QueueFullError) as info:
            ex.submit(req("gate", "one too many"))
        message = str(info.value)
        assert "Executor.map()" in message and "LLM_EXECUTOR_BACKPRESSURE=block" in message
        assert "LLM_EXECUTOR_QUEUE_SIZE" in message
        # Before any response: an assumed 0.5 s call over 4 workers, not 100 queued x 1 s / 4 = 25 s.
        assert info.value.retry_after_s == pytest.approx(0.125)
        gate.gate.set()


def test_queue_full_estimate_follows_the_measured_call_time() -> None:
    provider = FakeProvider()
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=2)}, queue_size=1)
    with Executor(config, {"fake": provider}) as ex:
        for _ in range(5):
            ex.run(req(), timeout=5)
        lane = ex._lanes["fake"]
        mean_s = lane.metrics.mean_latency_s()
        assert mean_s is not None and mean_s < 0.05
        assert lane.retry_after_estimate_s() == pytest.approx(max(0.05, mean_s / 2), abs=1e-3)


def test_llm_future_lean_condition_behaves_as_the_stock_one() -> None:
    """An LLMFuture builds its Condition without the five bound lock methods of the stock one
    (fewer objects for the GC per request): timed waits, wake-ups, ``wait()``/``as_completed()``
    (which acquire and release it) and reentrancy behave as the stock Future's."""
    import concurrent.futures as cf

    from llm_executor.lifecycle import request as request_module
    from llm_executor.metrics import LaneMetrics

    assert request_module._LEAN_FUTURES  # this Python's Future is built as LLMFuture expects
    entry = request_module.Request(req("fake"), "id", "m", "fake", LaneMetrics("fake", 1, None), None, 0.0, None,
                                   False)
    future = entry.future
    assert set(vars(future)) == set(vars(Future())) | {"_request"}
    assert set(vars(future._condition)) == {"_lock", "_waiters"}
    with pytest.raises(TimeoutError):
        future.result(timeout=0.01)  # wait(): _is_owned, _release_save, _acquire_restore
    assert cf.wait([future], timeout=0.01).not_done == {future}
    with future._condition:
        with future._condition:  # reentrant, as the stock RLock
            taken = []
            other = threading.Thread(target=lambda: taken.append(future._condition.acquire(False)))
            other.start()
            other.join(5)
            assert taken == [False]
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(future.result(timeout=5)))
    waiter.start()
    assert wait_for(lambda: future._condition._waiters)
    assert future.set_running_or_notify_cancel()
    response = LLMResponse("ok", "fake", "m", "stop", None)
    future.set_result(response)
    waiter.join(5)
    assert got == [response]
    assert list(cf.as_completed([future], timeout=1)) == [future]
    assert cf.wait([future], timeout=0).done == {future}


def test_result_without_timeout_waits_in_slices_so_a_ctrl_c_is_seen(gate: GateProvider) -> None:
    """A SIGINT landing between the GIL release and the blocking wait is only handled when the
    wait ends: ``LLMFuture.result()``/``exception()`` never wait longer than ``WAKE_S`` at once."""
    from llm_executor.window import WAKE_S

    with Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}), {"gate": gate}) as ex:
        future = ex.submit(req("gate"))
        gate.wait_started()
        condition = future._condition  # type: ignore[attr-defined]
        timeouts: list[float | None] = []
        plain_wait = condition.wait

        def wait(timeout: float | None = None) -> bool:
            timeouts.append(timeout)
            if len(timeouts) == 2:
                gate.gate.set()  # answer while result() waits
            return plain_wait(timeout)

        condition.wait = wait
        assert future.result().text
        assert future.exception() is None
        assert len(timeouts) >= 2 and set(timeouts) == {WAKE_S}
