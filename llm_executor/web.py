"""Turn llm_executor's errors into HTTP answers, for any web framework.

A handler that calls ``ex.run(request, timeout=...)`` (or awaits a Future) lets our errors
propagate; one registration maps each to a status, headers and a JSON body::

    error                                      status  headers
    QueueFullError                             429     Retry-After: ceil(retry_after_s), at least 1
    RateLimitedError (retryable)               429     Retry-After: ceil(retry_after_s), at least 1
    RateLimitedError (not retryable: quota)    503     (the provider account is out of quota)
    DeadlineExceededError, TimeoutError        504
    InvalidRequestError                        400
    ExecutorShutdownError                      503     Retry-After: 1 (a worker is restarting)
    other ProviderError                        502
    ConfigError, anything else                 500     (the message is not shown)

The body is ``{"error": {"type": ..., "message": ..., "status": ...}}`` plus ``retry_after_s``,
``provider``, ``request_id`` and ``field`` when the error has them. Our messages never hold a key
(DESIGN property 6), so they are safe to return; the message of an unexpected exception is not.

``error_response(exc)`` is the neutral ``(status, headers, body)`` form; ``register_flask(app)``
and ``register_starlette(app)`` (Starlette and FastAPI) install it as the framework's error
handler. Neither framework is imported by this module until an adapter is called.
Imports: ``errors`` only (and the framework lazily, inside its adapter).
"""

from __future__ import annotations

import math
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import (
    ConfigError,
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
    LLMExecutorError,
    ProviderError,
    QueueFullError,
    RateLimitedError,
)

if TYPE_CHECKING:
    import flask
    import starlette.applications
    import starlette.requests
    import starlette.responses

__all__ = [
    "HANDLED",
    "ErrorResponse",
    "error_response",
    "flask_response",
    "register_flask",
    "register_starlette",
    "retry_after_header",
    "starlette_response",
]

# The exception types the adapters register for: ours, the TimeoutError of ``fut.result(timeout)``
# and the CancelledError of a request cancelled under the handler (a shutdown with cancel_futures).
HANDLED: tuple[type[Exception], ...] = (LLMExecutorError, TimeoutError, CancelledError)


class ErrorResponse(NamedTuple):
    """An HTTP answer for an error: unpack as ``status, headers, body``."""

    status: int
    headers: dict[str, str]
    body: dict[str, Any]


def retry_after_header(retry_after_s: float | None) -> str:
    """``Retry-After`` in whole seconds: ``ceil(retry_after_s)``, at least 1 (RFC 9110 delay-seconds)."""
    if retry_after_s is None or not math.isfinite(retry_after_s):
        return "1"
    return str(max(1, math.ceil(retry_after_s)))


def error_response(exc: BaseException) -> ErrorResponse:
    """The HTTP status, headers and JSON body for ``exc`` (see the module docstring's table)."""
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFullError):
        status = 429
        headers["Retry-After"] = retry_after_header(exc.retry_after_s)
    elif isinstance(exc, RateLimitedError):
        status = 429 if exc.retryable else 503
        if exc.retryable:
            headers["Retry-After"] = retry_after_header(exc.retry_after_s)
    elif isinstance(exc, TimeoutError):  # DeadlineExceededError, and fut.result(timeout) running out
        status = 504
    elif isinstance(exc, InvalidRequestError):
        status = 400
    elif isinstance(exc, ExecutorShutdownError | CancelledError):
        status = 503
        headers["Retry-After"] = "1"
    elif isinstance(exc, ProviderError):
        status = 502
    else:  # ConfigError, or not ours: a bug on the server side, whose text may say too much
        status = 500
    error: dict[str, Any] = {"type": type(exc).__name__, "status": status}
    if isinstance(exc, LLMExecutorError | TimeoutError) and not isinstance(exc, ConfigError):
        error["message"] = str(exc) or type(exc).__name__
    elif isinstance(exc, CancelledError):
        error["message"] = "the request was cancelled (the server is shutting down)"
    else:
        error["message"] = "internal server error"
    if isinstance(exc, DeadlineExceededError) and not str(exc):
        error["message"] = "the request's deadline passed"
    for attr in ("retry_after_s", "provider", "request_id", "field"):
        value = getattr(exc, attr, None)
        if value is not None:
            error[attr] = value
    return ErrorResponse(status, headers, {"error": error})


# -- Flask ------------------------------------------------------------------------------------------


def flask_response(exc: BaseException) -> flask.Response:
    """``error_response(exc)`` as a ``flask.Response`` (JSON)."""
    from flask import jsonify

    status, headers, body = error_response(exc)
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


def register_flask(app: flask.Flask) -> None:
    """Answer every error in ``HANDLED`` raised by a view of ``app`` with ``flask_response``."""
    for exc_type in HANDLED:
        app.register_error_handler(exc_type, flask_response)


# -- Starlette / FastAPI ----------------------------------------------------------------------------


def starlette_response(exc: BaseException) -> starlette.responses.JSONResponse:
    """``error_response(exc)`` as a Starlette/FastAPI ``JSONResponse``."""
    from starlette.responses import JSONResponse

    status, headers, body = error_response(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _starlette_handler(request: starlette.requests.Request, exc: Exception) -> starlette.responses.Response:
    return starlette_response(exc)


def register_starlette(app: starlette.applications.Starlette) -> None:
    """Answer every error in ``HANDLED`` raised by a route of ``app`` (Starlette or FastAPI)."""
    for exc_type in HANDLED:
        app.add_exception_handler(exc_type, _starlette_handler)
