"""Shared limits proved through the public Executor API, across processes.

test_shared.py proves the limiter alone; here every process builds its own ``Executor`` from an
``ExecutorConfig`` naming the shared backend and namespace, submits requests, and reports the
wall-clock times its provider saw. The parent merges them and checks what a provider would see.
Children use the "spawn" context: an Executor runs threads, and fork() with threads is unsafe.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import ConfigError, InvalidRequestError
from llm_executor.testing import max_in_window

from . import _exec_workers
from ._exec_workers import StampProvider
from .conftest import MakeLimiter

CTX = multiprocessing.get_context("spawn")


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    """Most calls in flight at once; an end at the instant of a start does not overlap it."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def _gather(out: Any, n: int, procs: list[multiprocessing.process.BaseProcess], timeout_s: float) -> list[Any]:
    results = [out.get(timeout=timeout_s) for _ in range(n)]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0, f"child {p.pid} exited with {p.exitcode}"
    return results


def _start(procs: list[multiprocessing.process.BaseProcess], ready: Any, timeout_s: float = 30) -> None:
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=timeout_s)


@pytest.mark.slow
def test_executors_in_several_processes_share_qps_and_use_it(shared_url: str, namespace: str) -> None:
    # 4 processes x MAX_PARALLEL=8 through Redis; SQLite serialises on a file lock, 3 are plenty.
    processes = 4 if shared_url.startswith("redis") else 3
    qps, duration_s = 20, 3.0
    ready, out, go = CTX.Queue(), CTX.Queue(), CTX.Event()
    start = CTX.Value("d", 0.0)
    procs = [CTX.Process(target=_exec_workers.qps_worker,
                         args=(shared_url, namespace, qps, 8, 60, ready, go, start, duration_s, out))
             for _ in range(processes)]
    _start(procs, ready)
    start.value = time.time()
    go.set()
    results = _gather(out, processes, procs, duration_s + 30)
    stamps = [t for _, times in results for t in times]
    # Fairness between processes is not promised (a late starter may get little); sharing is.
    assert sum(1 for _, times in results if times) >= 2, "the budget was used by one process only"
    assert max_in_window(stamps) <= qps, f"{max_in_window(stamps)} starts in one 1 s window"
    in_run = [t for t in stamps if t < start.value + duration_s]
    assert len(in_run) >= 0.9 * qps * duration_s, f"only {len(in_run)} starts in {duration_s}s at QPS={qps}"


@pytest.mark.slow
def test_global_max_parallel_holds_across_executors_and_max_parallel_per_process(
        shared_url: str, namespace: str) -> None:
    cap, max_parallel, processes, requests, latency_s = 3, 2, 3, 12, 0.05
    ready, out, go = CTX.Queue(), CTX.Queue(), CTX.Event()
    # The first process starts alone for a while, so its own MAX_PARALLEL is what binds it then;
    # once all three run, their 6 workers compete for the 3 global slots.
    procs = [CTX.Process(target=_exec_workers.slot_worker,
                         args=(shared_url, namespace, cap, max_parallel, requests, latency_s, 0.2 * i,
                               ready, go, out))
             for i in range(processes)]
    _start(procs, ready)
    go.set()
    results = _gather(out, processes, procs, 60)
    per_process = []
    for pid, spans, errors in results:
        assert errors == [], f"process {pid}: {errors}"
        assert len(spans) == requests
        per_process.append(_max_overlap(spans))
    assert max(per_process) == max_parallel, f"in flight per process {per_process}, MAX_PARALLEL={max_parallel}"
    every = [span for _, spans, _ in results for span in spans]
    assert _max_overlap(every) == cap, f"{_max_overlap(every)} calls in flight for GLOBAL_MAX_PARALLEL={cap}"


def _sigkill_hog_then_reclaim(shared_url: str, namespace: str, hog: Any, ttl_s: float) -> None:
    cap = 3
    started = CTX.Queue()
    child = CTX.Process(target=hog, args=(shared_url, namespace, cap, ttl_s, started))
    child.start()
    provider = StampProvider()
    cfg = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=cap, global_max_parallel=cap)},
                         rate_backend=shared_url, namespace=namespace)
    try:
        for _ in range(cap):
            started.get(timeout=30)
        with Executor(cfg, providers={"fake": provider}) as executor:
            # Past one TTL the hog's leases live only because its Executor renews them.
            time.sleep(1.5 * ttl_s)
            futures = [executor.submit(LLMRequest(provider="fake", model="m", prompt=f"p{i}"))
                       for i in range(cap)]
            done, _ = _wait_all(futures, 0.3)
            assert not done, "a call ran while another process's Executor held every global slot"
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            killed = time.monotonic()
            child.join(timeout=10)
            for f in futures:
                f.result(timeout=ttl_s + 5)
            reclaimed_s = time.monotonic() - killed
    finally:
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
    assert reclaimed_s <= ttl_s + 0.5, f"slots came back {reclaimed_s:.2f}s after the kill (TTL {ttl_s}s)"


def _wait_all(futures: list[Any], timeout_s: float) -> tuple[list[Any], list[Any]]:
    import concurrent.futures

    done, pending = concurrent.futures.wait(futures, timeout=timeout_s)
    return list(done), list(pending)


@pytest.mark.slow
def test_executor_config_lease_ttl_bounds_the_reclaim_of_a_sigkilled_executors_slots(
        shared_url: str, namespace: str) -> None:
    _sigkill_hog_then_reclaim(shared_url, namespace, _exec_workers.slot_hog_configured, ttl_s=1.0)


def test_tpm_through_the_executor_settles_to_reported_usage_retries_included(
        shared_url: str, namespace: str, make_limiter: MakeLimiter) -> None:
    tpm, max_output = 10_000, 50
    prompts = [f"{i:03d}" + "x" * 397 for i in range(6)]  # 400 chars: estimate 100 + 50 = 150
    usage = {p: 30 + 100 * i for i, p in enumerate(prompts)}  # refunds and, for the last two, debits
    fail_first = frozenset({prompts[1], prompts[4]})
    provider = StampProvider(usage=lambda r: usage[r.prompt], fail_first=fail_first)
    cfg = ExecutorConfig(providers={"fake": ProviderConfig(tpm=tpm, max_parallel=2)},
                         rate_backend=shared_url, namespace=namespace)
    observer = make_limiter(shared_url, name="fake", tpm=tpm)  # another process's view of the lane
    with Executor(cfg, providers={"fake": provider}, sleep=lambda s: None) as executor:
        with pytest.raises(InvalidRequestError, match="TPM"):
            executor.submit(LLMRequest(provider="fake", model="m", prompt="big", max_output_tokens=tpm + 1))
        responses = list(executor.map(LLMRequest(provider="fake", model="m", prompt=p,
                                                 max_output_tokens=max_output) for p in prompts))
    assert [r.attempts for r in responses] == [2 if p in fail_first else 1 for p in prompts]
    assert "big" not in provider.attempts, "a request over the TPM reached the provider"
    # A failed attempt reports no usage, so its reservation (the estimate) stays spent.
    estimate = 400 // 4 + max_output
    assert observer.tpm_used() == sum(usage.values()) + len(fail_first) * estimate


def test_unreachable_backend_at_start_is_a_config_error_with_the_password_masked() -> None:
    url = "redis://user:hunter2-SENTINEL@127.0.0.1:1/0"
    cfg = ExecutorConfig(providers={"fake": ProviderConfig(qps=5)}, rate_backend=url)
    before = set(threading.enumerate())
    with pytest.raises(ConfigError) as info:
        Executor(cfg, providers={"fake": StampProvider()})
    message = str(info.value)
    assert "redis://user:***@127.0.0.1:1/0" in message and "unreachable" in message
    assert "SENTINEL" not in message and "SENTINEL" not in repr(info.value)
    leaked = [t for t in set(threading.enumerate()) - before if t.name.startswith("llm-executor")]
    assert leaked == []
