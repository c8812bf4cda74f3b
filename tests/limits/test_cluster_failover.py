"""A Redis Cluster master dies with its replica present: the limits do what LLM_EXECUTOR_BACKEND_FAILURE says.

The test runs a cluster of its own (3 masters + 3 replicas, 1 s node timeout), kills the master
that serves the lane's slot, and checks both policies through the failover and after the dead
master comes back as a replica: ``fail_closed`` fails fast with ``ProviderUnavailableError`` and
works again once the replica has taken over; ``local`` carries on with this process's limits and
goes back to the cluster, recording what it took there first. No call waits without bound.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llm_executor import limits
from llm_executor.errors import ProviderUnavailableError

from .conftest import MakeLimiter
from .servers import RedisClusterNodes

CALL_BOUND_S = 5.0  # a cluster call: two tries at the socket timeouts plus a topology refresh


def _timed(fn: object) -> tuple[float, object]:
    started = time.monotonic()
    try:
        result = fn()  # type: ignore[operator]
    except ProviderUnavailableError as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.mark.slow
def test_a_killed_master_fails_over_and_both_policies_hold(tmp_path: Path, make_limiter: MakeLimiter,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "RECOVERY_CHECK_S", 0.1)
    with RedisClusterNodes(tmp_path, node_timeout_ms=1000) as cluster:
        # Two processes' view of one lane (one slot, one master), one per policy.
        closed = make_limiter(cluster.url, qps=50, burst=50, global_max_parallel=2)
        local = make_limiter(cluster.url, backend_failure="local", qps=50, burst=50, global_max_parallel=2)
        stopping = threading.Event()
        assert closed.try_acquire() == 0.0 and local.try_acquire() == 0.0
        master = cluster.master_of("{" + closed._shared.lane_key + "}:rate")  # type: ignore[attr-defined]
        master.kill()
        killed = time.monotonic()

        # Until the replica takes over: fail_closed fails fast with the typed error; local runs on
        # this process's limits. No call waits longer than the client's bounds.
        closed_failed = local_degraded = False
        while True:
            took, result = _timed(closed.try_acquire)
            assert took < CALL_BOUND_S, f"a fail_closed call took {took:.1f}s during the failover"
            took, local_result = _timed(local.try_acquire)
            assert took < CALL_BOUND_S, f"a local call took {took:.1f}s during the failover"
            assert not isinstance(local_result, BaseException), local_result
            local_degraded = local_degraded or local.is_degraded
            if isinstance(result, ProviderUnavailableError):
                closed_failed = True
                assert result.retryable is False and "fails closed" in str(result)
            elif closed_failed:
                break  # the replica answers for the slot now
            if time.monotonic() - killed > 30:
                pytest.fail("the cluster did not fail over within 30 s")
            stopping.wait(0.05)
        assert closed_failed and local_degraded, "no call noticed the dead master"
        # The replica took the slot over (master_of raises if no node's view says so within 10 s).
        cluster.master_of("{" + closed._shared.lane_key + "}:rate", other_than=master)  # type: ignore[attr-defined]

        # Back on the cluster: the local lane rejoins on its next call after RECOVERY_CHECK_S.
        stopping.wait(0.2)
        took, _ = _timed(local.try_acquire)
        assert took < CALL_BOUND_S and not local.is_degraded and not closed.is_degraded

        # The dead master comes back, as a replica of the new one; nothing changes for callers.
        master.start()
        cluster.wait_ok()
        for limiter in (closed, local):
            release = limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + CALL_BOUND_S)
            assert release is not None
            release()
        assert closed.slots_held() == 0
