"""llm_executor.web: every error maps to one HTTP answer, in Flask and Starlette alike, without importing them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import CancelledError
from typing import Any

import pytest

from llm_executor import errors as E
from llm_executor.web import error_response, register_flask, register_starlette, retry_after_header

SECRET = "sk-SENTINEL-web-0123456789"


@pytest.mark.parametrize(
    ("exc", "status", "headers"),
    [
        (E.QueueFullError("openai queue is full", retry_after_s=0.03, provider="openai"), 429, {"Retry-After": "1"}),
        (E.QueueFullError("full", retry_after_s=2.01), 429, {"Retry-After": "3"}),
        (E.QueueFullError("full", retry_after_s=25.0), 429, {"Retry-After": "25"}),
        (E.QueueFullError("full"), 429, {"Retry-After": "1"}),
        (E.RateLimitedError("429 after retries", provider="gemini", retry_after_s=3.2), 429, {"Retry-After": "4"}),
        (E.RateLimitedError("insufficient_quota", retryable=False), 503, {}),
        (E.DeadlineExceededError("deadline passed", request_id="r1"), 504, {}),
        (TimeoutError(), 504, {}),
        (E.InvalidRequestError("LLMRequest.prompt must not be empty", field="prompt"), 400, {}),
        (E.ExecutorShutdownError("submit() after shutdown()"), 503, {"Retry-After": "1"}),
        (CancelledError(), 503, {"Retry-After": "1"}),
        (E.ProviderUnavailableError("503 after retries", provider="ollama", status=503), 502, {}),
        (E.ContentBlockedError("blocked", provider="gemini"), 502, {}),
        (E.SchemaValidationError("output is not valid JSON", provider="openai"), 502, {}),
        (E.ProviderError("400 bad request", provider="openai", status=400), 502, {}),
    ],
)
def test_each_error_maps_to_its_status_and_headers(exc: BaseException, status: int, headers: dict[str, str]) -> None:
    got_status, got_headers, body = error_response(exc)
    assert (got_status, got_headers) == (status, headers)
    assert body["error"]["type"] == type(exc).__name__ and body["error"]["status"] == status
    assert body["error"]["message"]
    json.dumps(body)  # serialisable as it is


def test_the_body_carries_what_a_client_needs() -> None:
    _, _, body = error_response(E.QueueFullError("openai queue is full", retry_after_s=1.5, provider="openai"))
    assert body == {"error": {"type": "QueueFullError", "status": 429, "message": "openai queue is full",
                              "retry_after_s": 1.5, "provider": "openai"}}
    _, _, body = error_response(E.InvalidRequestError("LLMRequest.prompt must not be empty", field="prompt"))
    assert body["error"]["field"] == "prompt"
    _, _, body = error_response(E.DeadlineExceededError("deadline passed", request_id="r1", provider="openai"))
    assert (body["error"]["request_id"], body["error"]["provider"]) == ("r1", "openai")


@pytest.mark.parametrize("exc", [E.ConfigError(f"OPENAI_API_KEY={SECRET!r} is odd"), ValueError(SECRET)])
def test_server_side_errors_are_500_and_do_not_show_their_text(exc: BaseException) -> None:
    status, headers, body = error_response(exc)
    assert (status, headers) == (500, {})
    assert body["error"]["message"] == "internal server error"
    assert SECRET not in json.dumps(body)


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.001, "1"), (1.0, "1"), (1.2, "2"), (59.9, "60"),
                                                 (None, "1"), (float("inf"), "1")])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds: float | None, header: str) -> None:
    assert retry_after_header(seconds) == header


def test_importing_the_module_imports_no_framework() -> None:
    code = ("import sys, llm_executor.web; "
            "bad = [m for m in ('flask', 'starlette', 'fastapi', 'werkzeug') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_flask_views_answer_with_the_mapping() -> None:
    flask = pytest.importorskip("flask")
    app = flask.Flask("t")
    register_flask(app)

    @app.get("/full")
    def full() -> str:
        raise E.QueueFullError("queue is full", retry_after_s=2.2)

    @app.get("/late")
    def late() -> str:
        raise TimeoutError

    @app.get("/boom")
    def boom() -> str:
        raise E.ProviderUnavailableError("down", provider="openai")

    client = app.test_client()
    r = client.get("/full")
    assert (r.status_code, r.headers["Retry-After"], r.get_json()["error"]["type"]) == (429, "3", "QueueFullError")
    assert client.get("/late").status_code == 504
    r = client.get("/boom")
    assert r.status_code == 502 and r.get_json()["error"]["provider"] == "openai"


def _asgi_get(app: Any, path: str) -> tuple[int, dict[str, str], Any]:
    """One GET through an ASGI app, without an HTTP client: (status, headers, JSON body)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def test_starlette_routes_answer_with_the_mapping() -> None:
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def full(request: Request) -> Response:
        raise E.QueueFullError("queue is full", retry_after_s=0.2)

    async def invalid(request: Request) -> Response:
        raise E.InvalidRequestError("LLMRequest.temperature must be in [0, 2]", field="temperature")

    app = Starlette(routes=[Route("/full", full), Route("/invalid", invalid)])
    register_starlette(app)
    status, headers, body = _asgi_get(app, "/full")
    assert (status, headers["retry-after"], body["error"]["retry_after_s"]) == (429, "1", 0.2)
    status, _, body = _asgi_get(app, "/invalid")
    assert status == 400 and body["error"]["field"] == "temperature"
