"""A FastAPI service in front of an LLM: one Executor per worker, awaited without blocking the loop.

Serve it with uvicorn::

    llm-executor emulate --port 8080 &                       # or a real provider and its key
    LLM_EXECUTOR_PROVIDERS=openai LLM_EXECUTOR_OPENAI_BASE_URL=http://127.0.0.1:8080/v1 \\
    LLM_EXECUTOR_OPENAI_MODEL=gpt-4o-mini LLM_EXECUTOR_QUEUE_SIZE=20 \\
        uvicorn --app-dir examples --workers 2 --host 127.0.0.1 --port 8000 fastapi_app:app

    curl -s -X POST 127.0.0.1:8000/summarize -H 'content-type: application/json' -d '{"text": "..."}'

or run ``python examples/fastapi_app.py``, which starts the built-in emulator and one uvicorn worker.

Why it is shaped like this:

* **``await ex.arun(...)``, never ``fut.result()``, in an ``async def`` handler.** ``result()``
  blocks the thread, and in an async handler that thread is the event loop: every other request
  of the worker — ``/health`` too — waits behind it. ``arun`` (and ``asubmit``) await the
  executor's Future instead. With ``backpressure="block"``, ``asubmit`` waits for a queue slot
  asynchronously too (bounded by ``block_timeout``); the default fail-fast answers 429 at once,
  which is what a client with a retry policy wants.
* **One Executor per worker process, in the app's lifespan.** uvicorn ``--workers N`` starts N
  processes, each running the lifespan: the Executor is built at start-up (a bad configuration
  fails the start, not the first request) and shut down at exit with ``cancel_futures=True``.
  MAX_PARALLEL/QPS are per process; share them across workers with
  ``LLM_EXECUTOR_RATE_BACKEND=redis://...``. ``default_executor()`` would do as well: the lifespan
  only makes the start-up and shutdown explicit.
* **Overload is an answer, not a crash.** ``llm_executor.web.register_starlette(app)`` maps our
  errors: ``QueueFullError`` → 429 with ``Retry-After: ceil(retry_after_s)``, a deadline → 504, a
  provider failure → 502, a bad request → 400, shutdown → 503.
* **Each request has a deadline** (``LLMRequest.timeout``, queue wait included), so a slow provider
  cannot hold a client longer than it waits. A handler task that is cancelled (the server shutting
  down) cancels its request through ``arun`` if the request has not started.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel

from llm_executor import Executor, ExecutorConfig, LLMRequest
from llm_executor.web import register_starlette

REQUEST_TIMEOUT_S = float(os.environ.get("APP_REQUEST_TIMEOUT", "20"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """This worker's Executor: built before the first request, shut down after the last."""
    ex = Executor(ExecutorConfig.from_env())
    app.state.executor = ex
    try:
        yield
    finally:
        # Waiting for the calls still running is blocking work: off the loop, like everything else.
        await asyncio.to_thread(ex.shutdown, True, cancel_futures=True)


app = FastAPI(lifespan=lifespan)
register_starlette(app)


class Document(BaseModel):
    text: str


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"ok": True, "pid": os.getpid()}


@app.post("/summarize")
async def summarize(document: Document, request: Request) -> dict[str, Any]:
    ex: Executor = request.app.state.executor
    llm_request = LLMRequest(provider="openai", model="", prompt=f"Summarise in one sentence:\n\n{document.text}",
                             max_output_tokens=200, timeout=REQUEST_TIMEOUT_S)
    response = await ex.arun(llm_request, timeout=REQUEST_TIMEOUT_S + 1)
    return {"summary": response.text, "provider": response.provider, "queue_ms": response.queue_ms,
            "pid": os.getpid()}


@app.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    return request.app.state.executor.stats().as_dict()  # type: ignore[no-any-return]


def main() -> None:
    """Serve one uvicorn worker against the built-in emulator (no API key needed)."""
    import uvicorn

    from llm_executor.testing import Emulator, ProviderSim

    with Emulator(providers={"openai": ProviderSim(latency_s=0.2, max_concurrency=4)}) as emu:
        os.environ.setdefault("LLM_EXECUTOR_PROVIDERS", "openai")
        os.environ.setdefault("LLM_EXECUTOR_OPENAI_BASE_URL", emu.url("openai"))
        os.environ.setdefault("LLM_EXECUTOR_OPENAI_MODEL", "gpt-4o-mini")
        os.environ.setdefault("LLM_EXECUTOR_QUEUE_SIZE", "20")
        port = int(os.environ.get("PORT", "8000"))
        print(f"emulator at {emu.url('openai')}; try: curl -s -X POST 127.0.0.1:{port}/summarize "
              "-H 'content-type: application/json' -d '{\"text\": \"hello\"}'")
        uvicorn.run(app, host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
