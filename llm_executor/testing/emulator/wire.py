"""What every wire format shares: the route, request, completion and reply values, and the format ABC.

A wire module (``openai``, ``gemini``, ``ollama``) subclasses ``WireFormat``: it recognises its
routes by path shape, parses its request bodies, and builds its success, streaming and error
bodies. It never touches limits, faults, latency or the recorder: the server core decides *what*
happens to a request (refused, faulted, answered with which text) and asks the format *how* that
reads on its wire. Imports: the stdlib only.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Completion",
    "Parsed",
    "RateWindow",
    "Refusal",
    "Reply",
    "Route",
    "WireFormat",
    "base_model",
    "bearer",
    "digest",
    "go_duration",
    "header",
    "proto_duration",
    "rate_limit_headers",
    "sse",
    "split_messages",
    "text_content",
]


@dataclass
class Reply:
    """What the server sends back.

    Attributes:
        status: the HTTP status (ignored when ``drop``).
        raw: the body bytes (unused when ``chunks`` is set).
        headers: extra response headers.
        content_type: the Content-Type header.
        chunks: a streamed body, sent with chunked transfer encoding, one write per chunk.
        drop: close the connection without answering (a "hang" fault, or stop()).
    """

    status: int
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    chunks: list[bytes] | None = None
    drop: bool = False

    @classmethod
    def json(
        cls,
        status: int,
        body: Any,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        """A JSON reply."""
        return cls(status, json.dumps(body).encode(), dict(headers or {}), content_type)

    @classmethod
    def dropped(cls) -> Reply:
        """No answer: the connection is closed."""
        return cls(0, drop=True)

    def body_bytes(self) -> bytes:
        """The whole body, streamed or not."""
        return b"".join(self.chunks) if self.chunks is not None else self.raw


@dataclass(frozen=True)
class Route:
    """What a request asks for, recognised from its method and path (and headers where paths collide).

    Attributes:
        provider: "openai", "gemini" or "ollama".
        action: the endpoint, e.g. "chat", "generate", "list_models", "get_model".
        generation: a generation request: limited, faulted and counted in ``stats``.
        model: the model named in the path ("" when the body names it, or none).
        public: answered without a key even when ``require_key`` is set.
        version: the API version in the path (Gemini "v1" or "v1beta"), for messages.
        query: the query string (Gemini's ``alt=sse``).
    """

    provider: str
    action: str
    generation: bool = False
    model: str = ""
    public: bool = False
    version: str = ""
    query: str = ""


@dataclass(frozen=True)
class Parsed:
    """A generation request, read from its wire body.

    Attributes:
        prompt: user text (all user messages joined by newlines).
        system: the system instruction, if any.
        schema: the JSON Schema asked for, if any.
        json_mode: JSON asked for without a schema.
        max_tokens: the output-token cap, if any (thinking tokens count against it).
        stream: the reply is to be streamed.
        thinking: the model thinks before answering (when ``ProviderSim.thinking_tokens`` > 0).
        options: format-specific values the reply echoes (OpenAI ``service_tier``,
            ``stream_options.include_usage``, the Responses API's request fields).
    """

    prompt: str
    system: str | None
    schema: Mapping[str, Any] | None
    json_mode: bool
    max_tokens: int | None
    stream: bool = False
    thinking: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Completion:
    """What the core decided to answer: the text, why it ended, and the token counts."""

    model: str
    text: str
    finish: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int  # the answer's tokens, thoughts excluded
    blocked: bool = False
    thought_tokens: int = 0

    def pieces(self) -> list[str]:
        """The text cut into stream deltas (a few words each) that join back to it exactly."""
        words = re.findall(r"\S+\s*|\s+", self.text)
        return ["".join(words[i : i + 3]) for i in range(0, len(words), 3)] or [""]


@dataclass(frozen=True)
class Refusal:
    """Why the core refused a request, and how long the client should wait.

    Attributes:
        reason: what the recorder counts: "rate_limited" (a rate limit or a rate_limit fault)
            or "busy" (the concurrency cap).
        retry_after_s: the wait that would have let this request through.
        dimension: "requests" or "tokens".
        period_s: the window of the limit hit: 1 (rps), 60 (rpm, tpm) or 86400 (rpd).
        limit: the limit's value in its window (None for a fault or the concurrency cap).
        used: what the window held when the request came.
        requested: what this request needed (1 request, or its tokens).
    """

    reason: str
    retry_after_s: float
    dimension: str = "requests"
    period_s: float = 60.0
    limit: int | None = None
    used: int | None = None
    requested: int = 1


@dataclass(frozen=True)
class RateWindow:
    """One limit as the rate-limit headers show it: limit, what is left, and when it is back full."""

    limit: int
    remaining: int
    reset_s: float


class WireFormat(abc.ABC):
    """One provider's dialect: its routes, request bodies, replies and error bodies."""

    provider: ClassVar[str]

    @abc.abstractmethod
    def route(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Route | None:
        """The route this request names, or None when it is none of this API's."""

    @abc.abstractmethod
    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether an unknown ``path`` lies under this API (so its 404 shape answers)."""

    @abc.abstractmethod
    def route_not_found(self, method: str, path: str) -> Reply:
        """This API's answer to an unknown route (distinct from an unknown model)."""

    @abc.abstractmethod
    def check_key(self, key: str | None, headers: Mapping[str, str]) -> Reply | None:
        """The auth error when ``key`` is required and not given, else None."""

    @abc.abstractmethod
    def bad_json(self, raw: bytes) -> Reply:
        """The answer to a body that is not a JSON object."""

    @abc.abstractmethod
    def model_not_found(self, route: Route, model: str) -> Reply:
        """This API's 404 for an unknown model."""

    @abc.abstractmethod
    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        """Read a generation request, or answer its validation error."""

    @abc.abstractmethod
    def limited(self, refusal: Refusal, model: str) -> Reply:
        """The answer to a refused request (a limit hit or a rate_limit fault)."""

    @abc.abstractmethod
    def server_error(self, status: int) -> Reply:
        """A 500 or 503 in this API's shape."""

    @abc.abstractmethod
    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        """The reply carrying ``completion`` (streamed when ``parsed.stream``)."""

    @abc.abstractmethod
    def info(self, route: Route, body: Any, models: Sequence[str], recent: Mapping[str, float]) -> Reply:
        """Answer a request that is not a generation (listings, model info, token counts).

        ``models`` are the listed models; ``recent`` maps a model to its last generation's
        wall-clock time (Ollama's ``/api/ps`` lists those as loaded).
        """


# -- helpers the formats share ------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header ``name`` (lower case), whatever its case in ``headers``."""
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    value = header(headers, "authorization")
    if value is None or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :].strip()


def text_content(content: Any) -> str:
    """OpenAI/Ollama message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def split_messages(messages: list[Any]) -> tuple[str, str | None]:
    """(user text, system text or None) of a chat ``messages`` list."""
    users = [text_content(m.get("content")) for m in messages if m.get("role") == "user"]
    systems = [text_content(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return "\n".join(users), ("\n".join(systems) if systems else None)


def digest(text: str) -> str:
    """A stable fake digest for a model name."""
    return hashlib.sha256(text.encode()).hexdigest()


def base_model(name: str) -> str:
    """An Ollama model name without its ``:latest`` tag."""
    return name[: -len(":latest")] if name.endswith(":latest") else name


def go_duration(seconds: float) -> str:
    """A Go ``time.Duration`` string like OpenAI's reset headers: "20ms", "1.5s", "6m0s", "1h2m3.5s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    hours, rest = divmod(round(seconds, 3), 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    return f"{int(hours)}h{text}" if hours else text


def proto_duration(seconds: float) -> str:
    """A protobuf Duration JSON string like Gemini's retryDelay: "17s", "0.250s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def rate_limit_headers(requests: RateWindow | None, tokens: RateWindow | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the request and token windows that are limited."""
    out: dict[str, str] = {}
    for name, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            out[f"x-ratelimit-limit-{name}"] = str(window.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(window.remaining)
            out[f"x-ratelimit-reset-{name}"] = go_duration(window.reset_s) if window.reset_s > 0 else "0s"
    return out


def sse(events: Sequence[Any], done: bool = False) -> list[bytes]:
    """Server-sent events, one ``data: JSON`` per event (and OpenAI's ``data: [DONE]`` when asked)."""
    chunks = [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
    if done:
        chunks.append(b"data: [DONE]\n\n")
    return chunks
