"""Scaling out with Dask: one Executor per worker process, built lazily, limits shared in Redis.

Runs with no API key: the parent starts the built-in emulator (``llm_executor.testing.Emulator``)
and a ``LocalCluster(processes=True)``; every worker process builds one Executor from the
LLM_EXECUTOR_* environment the first time a task needs it, and all of them share one QPS budget
through the rate backend. The emulator enforces the same QPS and answers 429 past it.

    pip install 'dask[distributed]' redis      # the optional dependencies of this example
    python examples/scaling_dask.py                                   # Redis on localhost:6379/0
    python examples/scaling_dask.py --workers 4 --qps 20 --requests 200

The pattern for a real cluster: put ``executor()`` and the task functions in a module your
workers import by name (as here: the tasks are sent as ``scaling_dask.ask``, not pickled from
``__main__``), so the cache is one per process; set the LLM_EXECUTOR_* variables on every worker
host (LLM_EXECUTOR_RATE_BACKEND=redis://..., the same LLM_EXECUTOR_NAMESPACE everywhere).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
import uuid
from collections import Counter

from llm_executor import Executor, ExecutorConfig, LLMRequest

_lock = threading.Lock()
_executor: Executor | None = None  # guarded by _lock


def executor() -> Executor:
    """This process's Executor, built from the environment on first use.

    A Dask worker runs tasks on several threads; the lock makes the first ones that arrive at
    once build a single Executor (functools.lru_cache would let each of them build one).
    """
    global _executor
    with _lock:
        if _executor is None:
            _executor = Executor(ExecutorConfig.from_env())
            atexit.register(_executor.shutdown)
        return _executor


def ask(prompt: str) -> tuple[int, str]:
    """A Dask task: one LLM call through this worker process's Executor."""
    response = executor().run(LLMRequest(provider="openai", model="gpt-4o-mini", prompt=prompt), timeout=120)
    return os.getpid(), response.text


def main(argv: list[str] | None = None) -> int:
    from dask.distributed import Client, LocalCluster

    from llm_executor.testing import Emulator, ProviderSim

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--threads", type=int, default=8, help="task threads per worker (= its MAX_PARALLEL)")
    parser.add_argument("--requests", type=int, default=120, help="tasks in total")
    parser.add_argument("--qps", type=int, default=20, help="QPS shared by every worker")
    parser.add_argument("--backend", default=os.environ.get("LLM_EXECUTOR_RATE_BACKEND", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--namespace", default=f"example-{uuid.uuid4().hex[:8]}",
                        help="shared-key prefix (a fresh one per run by default)")
    args = parser.parse_args(argv)

    # Send the tasks by reference (module "scaling_dask"), not pickled by value from __main__.
    import scaling_dask

    with Emulator(providers={"openai": ProviderSim(rps=args.qps, latency_s=0.05)}) as emu:
        # Worker processes started by LocalCluster inherit this environment.
        os.environ.update({
            "LLM_EXECUTOR_PROVIDERS": "openai",
            "LLM_EXECUTOR_RATE_BACKEND": args.backend,
            "LLM_EXECUTOR_NAMESPACE": args.namespace,
            "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"),
            "LLM_EXECUTOR_OPENAI_QPS": str(args.qps),
            "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": str(args.threads),
        })
        with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.upload_file(scaling_dask.__file__)  # workers on other hosts can import it too
            started = time.monotonic()
            futures = client.map(scaling_dask.ask, [f"Summarise document {i}" for i in range(args.requests)])
            results = client.gather(futures, errors="skip")
            elapsed_s = time.monotonic() - started
        stats = emu.stats("openai")

    per_process = Counter(pid for pid, _ in results)
    for pid, count in sorted(per_process.items()):
        print(f"worker process {pid}: {count} answered")
    statuses = dict(stats.statuses)
    print(f"{len(results)}/{args.requests} answered by {len(per_process)} worker processes in {elapsed_s:.1f}s")
    print(f"emulator saw {stats.requests} requests, max {stats.max_requests_per_1s} in any 1 s window "
          f"(shared QPS {args.qps}), statuses {statuses}")
    return _verdict(stats.max_requests_per_1s, args.qps, len(results) == args.requests, "workers")


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
