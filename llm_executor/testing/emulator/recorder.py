"""What the emulator saw: one ``RecordedRequest`` per request, ``EmulatorStats`` per provider.

Secrets never reach a record: auth headers become ``***`` (the scheme kept) and a key in the
query string is replaced. Imports: the stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["EmulatorStats", "RecordedRequest", "redact_headers", "redact_path"]

_SECRET_HEADERS = frozenset(
    {"authorization", "x-goog-api-key", "api-key", "x-api-key", "proxy-authorization"}
)
_SECRET_QUERY = frozenset({"key", "api_key", "apikey", "access_token"})


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received.

    Attributes:
        time: wall-clock arrival (``time.time()``).
        monotonic: arrival on ``time.monotonic()`` (what the 1 s windows use).
        provider: "openai", "gemini", "ollama", or None for an unknown route.
        method / path: the HTTP method and path (a key in the query string is redacted).
        model: the model named by the request ("" when none).
        body: the parsed JSON body (None when absent or not JSON).
        headers: request headers, auth values replaced by "***".
        status: the status answered (None while in flight or when the connection was dropped).
        fault: the injected fault kind, "rate_limited"/"busy" for a limit hit, else None.
        duration_s: time to the answer (None while in flight).
    """

    time: float
    monotonic: float
    provider: str | None
    method: str
    path: str
    model: str
    body: Any
    headers: Mapping[str, str]
    status: int | None = None
    fault: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class EmulatorStats:
    """What one provider saw (generation requests only).

    Attributes:
        provider: the provider name.
        requests: generation requests received (refused and faulted ones included).
        max_concurrency: most requests in flight at once, from arrival to answer.
        max_requests_per_1s: most arrivals in any sliding 1 s window.
        statuses: answered status → count (a dropped connection counts under 0).
        faults: injected fault kind (or limit refusal) → count.
        in_flight: requests not answered yet.
    """

    provider: str
    requests: int
    max_concurrency: int
    max_requests_per_1s: int
    statuses: Mapping[int, int]
    faults: Mapping[str, int]
    in_flight: int


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with auth values replaced by ``***`` (``Bearer ***`` keeps its scheme)."""
    out = {}
    for name, value in headers.items():
        if name.lower() in _SECRET_HEADERS:
            scheme = value.split(" ", 1)[0] + " " if value.startswith(("Bearer ", "Basic ")) else ""
            out[name] = f"{scheme}***"
        else:
            out[name] = value
    return out


def redact_path(path: str, query: str) -> str:
    """``path?query`` with key-like query values replaced by ``***``."""
    if not query:
        return path
    pairs = [
        (k, "***" if k.lower() in _SECRET_QUERY else v) for k, v in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{path}?{urlencode(pairs, safe='*')}"
