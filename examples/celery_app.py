"""Celery tasks that call an LLM: one Executor per worker process, overload turned into Celery retries.

The tasks module (what ``celery -A celery_app worker`` loads) is this file; ``python
examples/celery_app.py`` runs the whole thing end to end: it starts the built-in emulator, a real
Celery worker (a subprocess, thread pool) on the Redis at 127.0.0.1:6379 (DB 12 by default), sends
``--tasks N`` documents, waits for every result (bounded by ``--timeout``), stops the worker and
deletes its Redis keys::

    python examples/celery_app.py --tasks 24

Deployed, start workers yourself against your configuration::

    LLM_EXECUTOR_PROVIDERS=openai OPENAI_API_KEY=... \\
        celery --workdir examples -A celery_app worker --pool threads --concurrency 16

Why it is shaped like this:

* **Thread pool, one Executor per worker process.** An LLM call waits on the network, so one
  process with many threads (``--pool threads``, or gevent) serves many tasks at once and its one
  Executor holds MAX_PARALLEL and QPS for all of them: ``llm_executor.default_executor()``, built
  from the environment by the first task and shared by every thread. Under the default prefork pool
  every child process builds its own (``default_executor()`` does so after a fork), and the limits
  then apply per child: share them with ``LLM_EXECUTOR_RATE_BACKEND=redis://...``.
* **A full queue is a retry, not a failure.** ``QueueFullError`` and a retryable
  ``RateLimitedError`` become ``self.retry(countdown=ceil(retry_after_s))``: the task goes back to
  the broker instead of holding a worker thread. Other errors fail the task (``max_retries``
  bounds the rest).
* **A deadline per request** (``LLMRequest.timeout``) below Celery's ``soft_time_limit``.
* **No shutdown hook.** Celery's warm shutdown waits for the running tasks, and each task waits for
  its own request, so nothing is queued in the Executor when the process exits. (The prefork
  pool's ``worker_process_shutdown`` signal is not sent under ``--pool threads``.)
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery, Task

from llm_executor import LLMRequest, default_executor
from llm_executor.errors import QueueFullError, RateLimitedError

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/12")
QUEUE = os.environ.get("CELERY_QUEUE", "llm")
MAX_COUNTDOWN_S = 10

app = Celery("celery_app", broker=BROKER_URL, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,              # a task whose worker dies goes back to the queue
    worker_prefetch_multiplier=1,     # do not hoard tasks another worker could start
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)


@app.task(bind=True, max_retries=20, soft_time_limit=120)
def summarize(self: Task, doc_id: str, text: str) -> dict[str, Any]:
    """Summarise one document; overload sends the task back to the broker for later."""
    request = LLMRequest(provider="openai", model="", prompt=f"Summarise in one sentence.\n\nText:\n{text}",
                         max_output_tokens=200, timeout=60, metadata={"doc_id": doc_id})
    try:
        response = default_executor().run(request)
    except (QueueFullError, RateLimitedError) as exc:
        if isinstance(exc, RateLimitedError) and not exc.retryable:
            raise  # a quota, not a rate: retrying soon will not help
        # retry_after_s is the executor's estimate of the wait; parked in the broker meanwhile.
        countdown = min(MAX_COUNTDOWN_S, max(1, math.ceil(exc.retry_after_s or 1)))
        raise self.retry(exc=exc, countdown=countdown) from None
    return {"doc_id": doc_id, "summary": response.text, "retries": self.request.retries, "pid": os.getpid()}


# -- run it end to end ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for all results")
    args = parser.parse_args(argv)

    from llm_executor.testing import Emulator, ProviderSim

    queue = f"{QUEUE}-{uuid.uuid4().hex[:8]}"  # a queue of this run's own: nothing else consumes it
    with Emulator(providers={"openai": ProviderSim(latency_s=0.5, max_concurrency=4)}) as emu:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXECUTOR_")}
        env.update({
            "CELERY_BROKER_URL": BROKER_URL, "CELERY_QUEUE": queue,
            "LLM_EXECUTOR_PROVIDERS": "openai", "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"),
            "LLM_EXECUTOR_OPENAI_MODEL": "gpt-4o-mini", "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": "4",
            # Smaller than the worker's threads: the overload path (QueueFullError -> retry) runs too.
            "LLM_EXECUTOR_QUEUE_SIZE": "2",
        })
        here = Path(__file__).resolve().parent
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "--workdir", str(here), "-A", "celery_app", "worker", "--pool", "threads",
             "--concurrency", str(args.concurrency), "--queues", queue, "--loglevel", "WARNING", "--without-heartbeat",
             "--without-mingle", "--without-gossip"], env=env)
        sent: list[Any] = []
        try:
            app.conf.task_default_queue = queue
            started = time.monotonic()
            sent = [summarize.delay(f"doc-{i}", f"Report {i} of Halvorsen Robotics in Port Aldine.")
                    for i in range(args.tasks)]
            deadline = started + args.timeout
            results = [r.get(timeout=max(0.1, deadline - time.monotonic())) for r in sent]
            elapsed_s = time.monotonic() - started
        finally:
            worker.terminate()  # SIGTERM: Celery's warm shutdown
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
            _delete_keys(queue, [r.id for r in sent])
    retried = sum(1 for r in results if r["retries"] > 0)
    print(f"{len(results)}/{args.tasks} tasks done by {len({r['pid'] for r in results})} worker process "
          f"in {elapsed_s:.1f}s; {retried} went back to the broker after QueueFullError; every summary present: "
          f"{all(r['summary'] for r in results)}")
    return 0 if len(results) == args.tasks and all(r["summary"] for r in results) else 1


def _delete_keys(queue: str, task_ids: list[str]) -> None:
    """Remove what this run left in Redis: its queue and its results (never anything else)."""
    import redis

    client = redis.Redis.from_url(BROKER_URL)
    keys = [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
            *(f"celery-task-meta-{tid}" for tid in task_ids)]
    client.delete(*keys)


if __name__ == "__main__":
    sys.exit(main())
