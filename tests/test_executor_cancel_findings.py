"""Cancellation bugs the soak found in executor.py (both fixed; these tests keep them fixed).

1. A request cancelled while queued (by ``future.cancel()`` or ``shutdown(cancel_futures=True)``)
   leaves the heap at once, so no worker ever calls ``set_running_or_notify_cancel()`` on it: the
   Future stays CANCELLED instead of CANCELLED_AND_NOTIFIED, and ``concurrent.futures.wait()`` and
   ``as_completed()`` (which count only CANCELLED_AND_NOTIFIED and FINISHED) block until their timeout,
   forever without one.
2. ``Future.cancel()`` returns True again on an already cancelled Future; ``_LLMFuture.cancel`` then
   counts ``stats().cancelled`` and logs a "cancelled" record once more per call.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging

import pytest

from llm_executor import Executor, ExecutorConfig, ProviderConfig
from tests.fakes import GateProvider, req

BUG_NOTIFY = ("executor.py _LLMFuture.cancel: a queued request removed from the heap is never moved to "
              "CANCELLED_AND_NOTIFIED, so concurrent.futures.wait/as_completed never see it")
BUG_COUNT = ("executor.py _LLMFuture.cancel: every cancel() returning True calls lane.on_cancelled, so a "
             "second cancel of the same Future counts stats().cancelled twice and logs twice")


def one_lane(gate: GateProvider) -> Executor:
    return Executor(ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}), {"gate": gate})


def test_wait_sees_a_request_cancelled_in_the_queue(gate: GateProvider) -> None:
    with one_lane(gate) as ex:
        running = ex.submit(req("gate"))
        gate.wait_started()
        queued = ex.submit(req("gate"))
        assert queued.cancel()
        done, not_done = cf.wait([queued], timeout=0.5)
        gate.gate.set()
        running.result(5)
    assert queued in done and not not_done


def test_as_completed_yields_a_request_cancelled_in_the_queue(gate: GateProvider) -> None:
    with one_lane(gate) as ex:
        running = ex.submit(req("gate"))
        gate.wait_started()
        queued = ex.submit(req("gate"))
        queued.cancel()
        try:
            seen = list(cf.as_completed([queued], timeout=0.5))
        except cf.TimeoutError:
            seen = []
        gate.gate.set()
        running.result(5)
    assert seen == [queued]


def test_wait_sees_requests_cancelled_by_shutdown(gate: GateProvider) -> None:
    ex = one_lane(gate)
    running = ex.submit(req("gate"))
    gate.wait_started()
    queued = [ex.submit(req("gate")) for _ in range(3)]
    ex.shutdown(wait=False, cancel_futures=True)
    try:
        assert all(f.cancelled() for f in queued)
        assert not cf.wait(queued, timeout=0.5).not_done
    finally:
        gate.gate.set()
        running.result(5)
        ex.shutdown()


def test_cancel_twice_counts_one_cancellation(gate: GateProvider, caplog: pytest.LogCaptureFixture) -> None:
    with one_lane(gate) as ex:
        running = ex.submit(req("gate"))
        gate.wait_started()
        queued = ex.submit(req("gate"))
        with caplog.at_level(logging.INFO, logger="llm_executor"):
            assert queued.cancel() and queued.cancel()
        gate.gate.set()
        running.result(5)
    assert ex.stats()["gate"].cancelled == 1
    assert len([r for r in caplog.records if "cancelled" in r.getMessage()]) == 1


def test_user_cancel_after_shutdown_cancelled_counts_once(gate: GateProvider) -> None:
    ex = one_lane(gate)
    running = ex.submit(req("gate"))
    gate.wait_started()
    queued = ex.submit(req("gate"))
    ex.shutdown(wait=False, cancel_futures=True)
    assert queued.cancel()  # the caller's own cleanup, e.g. Executor.map's finally
    gate.gate.set()
    running.result(5)
    ex.shutdown()
    stats = ex.stats()["gate"]
    assert stats.cancelled == 1
    assert stats.completed + stats.failed + stats.cancelled == stats.submitted
