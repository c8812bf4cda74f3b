"""The web examples under their real servers and a few hundred concurrent clients.

Overload must come back as mapped HTTP answers (200, 429 with Retry-After, 502/503/504), never as
a 500 or a dropped connection. Each server in ``SERVERS`` gets the same load and assertions; the
async one (FastAPI under uvicorn, handlers awaiting ``ex.arun``) must also keep its event loop
free: every ``/health`` probe made during the load answers within 100 ms.
"""

from __future__ import annotations

import sys

import pytest

from llm_executor.testing import Emulator, ProviderSim

from .servers import EXAMPLES, ServerSpec, app_env, load, running

WORKERS = 2
MAX_PARALLEL = 2
CLIENTS = 300
QUEUE_SIZE = 4

SERVERS = [
    ServerSpec("flask-gunicorn", lambda port: [
        sys.executable, "-m", "gunicorn", "--chdir", str(EXAMPLES), "--workers", str(WORKERS), "--threads", "16",
        "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "5", "--log-level", "warning", "flask_app:app"]),
    ServerSpec("fastapi-uvicorn", lambda port: [
        sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "--workers", str(WORKERS),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", "5",
        "fastapi_app:app"], health_within_s=0.1),
]
NEEDS = {"flask-gunicorn": ("flask", "gunicorn"), "fastapi-uvicorn": ("fastapi", "uvicorn")}
MAPPED = {200, 429, 502, 503, 504}


@pytest.mark.slow
@pytest.mark.parametrize("spec", SERVERS, ids=[s.name for s in SERVERS])
def test_overload_is_answered_with_mapped_statuses_and_retry_after(spec: ServerSpec) -> None:
    for module in NEEDS[spec.name]:
        pytest.importorskip(module)
    sim = ProviderSim(latency_s=0.5, max_concurrency=WORKERS * MAX_PARALLEL)
    with Emulator(providers={"openai": sim}) as emu:
        env = app_env({
            "LLM_EXECUTOR_PROVIDERS": "openai",
            "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"),
            "LLM_EXECUTOR_OPENAI_MODEL": "gpt-4o-mini",
            "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": str(MAX_PARALLEL),
            "LLM_EXECUTOR_QUEUE_SIZE": str(QUEUE_SIZE),  # small on purpose: most of the burst is turned away
            "LLM_EXECUTOR_STRICT": "1",  # a misspelt variable here would fail the start-up, not pass silently
        })
        with running(spec, env) as base:
            # /health is probed once the burst has been answered (all but the admitted few, with
            # room to spare), while the admitted requests wait for the provider.
            admitted = WORKERS * (QUEUE_SIZE + MAX_PARALLEL)
            result = load(base, "/summarize", [{"text": f"document {i}"} for i in range(CLIENTS)],
                          health_every_s=0.05 if spec.health_within_s else None, health_after=CLIENTS - 2 * admitted)
        peak = emu.stats("openai").max_concurrency
    counts = result.statuses()
    assert len(result.replies) == CLIENTS
    assert set(counts) <= MAPPED, counts
    assert 500 not in counts and 0 not in counts, [r.error or r.body for r in result.replies if r.status in (0, 500)]
    assert counts.get(200, 0) > 0 and counts.get(429, 0) > 0, counts  # both paths were exercised
    for reply in result.replies:
        if reply.status == 429:
            assert reply.retry_after is not None and reply.retry_after.isdigit() and int(reply.retry_after) >= 1
            assert reply.body["error"]["type"] == "QueueFullError"
        if reply.status == 200:
            assert reply.body["summary"]
    # One Executor per worker process, each holding its own MAX_PARALLEL.
    pids = {r.body["pid"] for r in result.replies if r.status == 200}
    assert 1 <= len(pids) <= WORKERS
    assert peak <= WORKERS * MAX_PARALLEL
    if spec.health_within_s is not None:
        assert len(result.health_s) >= 3, "too few /health probes ran during the load"
        slow = sorted(s for s in result.health_s if s > spec.health_within_s)
        assert not slow, f"/health took {slow} s (of {len(result.health_s)} probes): the event loop was blocked"
