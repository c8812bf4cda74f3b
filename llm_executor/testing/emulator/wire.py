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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Completion",
    "Parsed",
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
    """

    provider: str
    action: str
    generation: bool = False
    model: str = ""
    public: bool = False


@dataclass(frozen=True)
class Parsed:
    """A generation request, read from its wire body.

    Attributes:
        prompt: user text (all user messages joined by newlines).
        system: the system instruction, if any.
        schema: the JSON Schema asked for, if any.
        json_mode: JSON asked for without a schema.
        max_tokens: the output-token cap, if any.
        stream: the reply is to be streamed.
    """

    prompt: str
    system: str | None
    schema: Mapping[str, Any] | None
    json_mode: bool
    max_tokens: int | None
    stream: bool = False


@dataclass(frozen=True)
class Completion:
    """What the core decided to answer: the text, why it ended, and the token counts."""

    model: str
    text: str
    finish: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    blocked: bool = False


@dataclass(frozen=True)
class Refusal:
    """Why the core refused a request, and how long the client should wait.

    Attributes:
        reason: what the recorder counts: "rate_limited" (a rate limit or a rate_limit fault)
            or "busy" (the concurrency cap).
        retry_after_s: the wait that would have let this request through.
    """

    reason: str
    retry_after_s: float


class WireFormat(abc.ABC):
    """One provider's dialect: its routes, request bodies, replies and error bodies."""

    provider: ClassVar[str]

    @abc.abstractmethod
    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
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
    def info(self, route: Route, body: Any, models: Sequence[str]) -> Reply:
        """Answer a request that is not a generation (listings, model info)."""


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
    """A Go-style duration like OpenAI's reset headers: "20ms", "1.5s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def proto_duration(seconds: float) -> str:
    """A protobuf Duration JSON string like Gemini's retryDelay: "17s", "0.250s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"
