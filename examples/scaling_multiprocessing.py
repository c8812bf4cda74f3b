"""Scaling out with multiprocessing: N processes, one Executor each, one QPS budget shared in Redis.

Runs with no API key: the parent starts the built-in emulator (``llm_executor.testing.Emulator``)
and points the workers' "openai" provider at it. The emulator enforces the same QPS itself and
answers 429 past it, like the real service, so "no 429s" and "max requests in any 1 s window <= QPS"
are what a provider would see.

    python examples/scaling_multiprocessing.py                        # Redis on localhost:6379/0
    python examples/scaling_multiprocessing.py --processes 8 --qps 20 --requests 200
    python examples/scaling_multiprocessing.py --backend sqlite:////tmp/llm-limits.db

Every process builds its Executor from the environment (``ExecutorConfig.from_env()``), exactly as
a deployed worker would: the parent only sets LLM_EXECUTOR_* variables before starting the pool.
Needs redis-py for a redis URL (``pip install 'llm-executor[redis]'``) and a Redis server.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter

from llm_executor import Executor, ExecutorConfig, LLMRequest
from llm_executor.testing import Emulator, ProviderSim

_executor: Executor | None = None


def _init_worker() -> None:
    """Pool initializer: one Executor per process, configured by the inherited environment."""
    global _executor
    _executor = Executor(ExecutorConfig.from_env())


def run_batch(prompts: list[str]) -> tuple[int, int, int]:
    """Send one batch through this process's Executor; returns (pid, answered, failed)."""
    assert _executor is not None, "the pool initializer did not run"
    requests = [LLMRequest(provider="openai", model="gpt-4o-mini", prompt=p, timeout=120) for p in prompts]
    futures = [_executor.submit(r) for r in requests]
    failed = sum(1 for f in futures if f.exception() is not None)
    return os.getpid(), len(futures) - failed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--requests", type=int, default=120, help="requests in total")
    parser.add_argument("--qps", type=int, default=20, help="QPS shared by all processes")
    parser.add_argument("--max-parallel", type=int, default=8, help="MAX_PARALLEL of each process")
    parser.add_argument("--backend", default=os.environ.get("LLM_EXECUTOR_RATE_BACKEND", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--namespace", default=f"example-{uuid.uuid4().hex[:8]}",
                        help="shared-key prefix (a fresh one per run by default)")
    args = parser.parse_args(argv)

    sim = ProviderSim(rps=args.qps, latency_s=0.05)
    with Emulator(providers={"openai": sim}) as emu:
        # The children inherit these; in production they would come from the deployment.
        os.environ.update({
            "LLM_EXECUTOR_PROVIDERS": "openai",
            "LLM_EXECUTOR_RATE_BACKEND": args.backend,
            "LLM_EXECUTOR_NAMESPACE": args.namespace,
            "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"),
            "LLM_EXECUTOR_OPENAI_QPS": str(args.qps),
            "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": str(args.max_parallel),
            "LLM_EXECUTOR_QUEUE_SIZE": "0",  # each worker submits its whole batch at once
        })
        prompts = [f"Summarise document {i}" for i in range(args.requests)]
        batches = [prompts[i::args.processes] for i in range(args.processes)]
        # "spawn": an Executor runs threads, and forking a process with threads is unsafe.
        ctx = multiprocessing.get_context("spawn")
        started = time.monotonic()
        with ctx.Pool(args.processes, initializer=_init_worker) as pool:
            results = pool.map(run_batch, batches, chunksize=1)
        elapsed_s = time.monotonic() - started
        stats = emu.stats("openai")

    answered = Counter[int]()
    for pid, ok, failed in results:
        answered[pid] += ok
        print(f"process {pid}: {ok} answered, {failed} failed")
    statuses = dict(stats.statuses)
    print(f"{sum(answered.values())}/{args.requests} answered by {len(answered)} processes in {elapsed_s:.1f}s "
          f"on {args.backend.split('@')[-1]}")
    print(f"emulator saw {stats.requests} requests, max {stats.max_requests_per_1s} in any 1 s window "
          f"(shared QPS {args.qps}), statuses {statuses}")
    return _verdict(stats.max_requests_per_1s, args.qps, sum(answered.values()) == args.requests, "processes")


def _verdict(max_per_1s: int, qps: int, all_answered: bool, who: str) -> int:
    # The window is measured at the server: a request whose token was taken in time can reach it a
    # few tens of ms late (a cold or busy worker), so one over is jitter (docs/testing.md), not N x.
    if not all_answered:
        print("FAILED: some requests failed")
        return 1
    if max_per_1s <= qps:
        print(f"OK: the {who} kept one shared budget")
        return 0
    if max_per_1s == qps + 1:
        print(f"OK: the {who} kept one shared budget (one over at the server: token-to-wire jitter)")
        return 0
    print(f"FAILED: the {who} exceeded the shared budget ({max_per_1s} > {qps} per 1 s)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
