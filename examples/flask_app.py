"""A Flask service in front of an LLM: one Executor per worker process, errors mapped to HTTP.

Serve it with gunicorn (threads, so one worker process runs several handlers at once)::

    llm-executor emulate --port 8080 &                       # or a real provider and its key
    LLM_EXECUTOR_PROVIDERS=openai LLM_EXECUTOR_OPENAI_BASE_URL=http://127.0.0.1:8080/v1 \\
    LLM_EXECUTOR_OPENAI_MODEL=gpt-4o-mini LLM_EXECUTOR_QUEUE_SIZE=20 \\
        gunicorn --chdir examples --workers 2 --threads 16 --bind 127.0.0.1:8000 flask_app:app

    curl -s -X POST 127.0.0.1:8000/summarize -H 'content-type: application/json' -d '{"text": "..."}'

or run ``python examples/flask_app.py``, which starts the built-in emulator and Flask's own server.

Why it is shaped like this:

* **One Executor per worker process, built after the fork.** gunicorn forks its workers from a
  master process; an Executor's threads do not survive a fork, and MAX_PARALLEL/QPS are per
  process anyway (share them across processes with ``LLM_EXECUTOR_RATE_BACKEND=redis://...``).
  ``llm_executor.default_executor()`` builds it from the environment on the first request of each
  process, returns the same one to every handler thread after that, and builds a new one if the
  process id changed (``gunicorn --preload`` imports this module in the master).
* **Overload is an answer, not a crash.** With the default fail-fast backpressure a full queue
  raises ``QueueFullError`` at once; ``llm_executor.web.register_flask`` turns it into ``429`` with
  ``Retry-After: ceil(retry_after_s)``, a deadline into ``504``, a provider failure into ``502``,
  a bad request into ``400``, shutdown into ``503``. Never ``backpressure="block"`` in a handler: it
  holds a server thread while it waits.
* **Each request has a deadline** (``LLMRequest.timeout``, queue wait included), so a slow
  provider cannot hold a handler thread for longer than the client waits.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from llm_executor import LLMRequest, default_executor
from llm_executor.errors import InvalidRequestError
from llm_executor.web import register_flask

REQUEST_TIMEOUT_S = float(os.environ.get("APP_REQUEST_TIMEOUT", "20"))

app = Flask(__name__)
register_flask(app)


@app.get("/health")
def health() -> tuple[dict[str, object], int]:
    return {"ok": True, "pid": os.getpid()}, 200


@app.post("/summarize")
def summarize() -> object:
    payload = request.get_json(silent=True) or {}
    text = payload.get("text")
    if not isinstance(text, str):
        raise InvalidRequestError("body must be JSON with a string field 'text'", field="text")
    llm_request = LLMRequest(provider="openai", model="", prompt=f"Summarise in one sentence:\n\n{text}",
                             max_output_tokens=200, timeout=REQUEST_TIMEOUT_S)
    response = default_executor().run(llm_request, timeout=REQUEST_TIMEOUT_S + 1)
    return jsonify({"summary": response.text, "provider": response.provider, "queue_ms": response.queue_ms,
                    "pid": os.getpid()})


@app.get("/stats")
def stats() -> object:
    return jsonify({name: snapshot.as_dict() for name, snapshot in default_executor().stats().items()})


def main() -> None:
    """Serve on Flask's development server against the built-in emulator (no API key needed)."""
    from llm_executor.testing import Emulator, ProviderSim

    with Emulator(providers={"openai": ProviderSim(latency_s=0.2, max_concurrency=4)}) as emu:
        os.environ.setdefault("LLM_EXECUTOR_PROVIDERS", "openai")
        os.environ.setdefault("LLM_EXECUTOR_OPENAI_BASE_URL", emu.url("openai"))
        os.environ.setdefault("LLM_EXECUTOR_OPENAI_MODEL", "gpt-4o-mini")
        os.environ.setdefault("LLM_EXECUTOR_QUEUE_SIZE", "20")
        port = int(os.environ.get("PORT", "8000"))
        print(f"emulator at {emu.url('openai')}; try: curl -s -X POST 127.0.0.1:{port}/summarize "
              "-H 'content-type: application/json' -d '{\"text\": \"hello\"}'")
        app.run(host="127.0.0.1", port=port, threaded=True)


if __name__ == "__main__":
    main()
