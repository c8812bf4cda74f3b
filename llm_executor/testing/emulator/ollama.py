"""The Ollama wire format: the native ``/api`` routes, NDJSON streaming and ``{"error": "..."}`` bodies.

Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, base_model, bearer, digest, split_messages

__all__ = ["OllamaWire"]

_CONTENT_TYPE = "application/json; charset=utf-8"
_BUSY = "server busy, please try again.  maximum pending requests exceeded"


class OllamaWire(WireFormat):
    """Ollama's native API as ollama-python sees it."""

    provider = "ollama"

    @staticmethod
    def error(status: int, message: str) -> Reply:
        """An error in Ollama's shape: ``{"error": "message"}`` (a string, not an object)."""
        return Reply.json(status, {"error": message}, content_type=_CONTENT_TYPE)

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
        if method == "POST" and path in ("/api/chat", "/api/generate"):
            return Route(self.provider, path.rsplit("/", 1)[1], generation=True)
        if method == "GET" and path == "/api/version":
            return Route(self.provider, "version", public=True)
        if method == "GET" and path == "/api/tags":
            return Route(self.provider, "tags", public=True)
        return None

    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        return path.startswith("/api/")

    def route_not_found(self, method: str, path: str) -> Reply:
        # Go's ServeMux answer, as a real server gives it.
        return Reply(404, b"404 page not found", content_type="text/plain")

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> Reply | None:
        if key is not None and bearer(headers) != key:
            return self.error(401, "unauthorized")
        return None

    def bad_json(self, raw: bytes) -> Reply:
        return self.error(400, "invalid character in request body" if raw else "missing request body")

    def model_not_found(self, route: Route, model: str) -> Reply:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self.error(400, "model is required")
        if route.action == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return self.error(400, "messages is required")
            prompt, system = split_messages(messages)
        else:
            prompt = str(body.get("prompt") or "")
            system = body.get("system") if isinstance(body.get("system"), str) else None
        fmt = body.get("format")
        schema = fmt if isinstance(fmt, dict) else None
        if fmt is not None and fmt != "" and fmt != "json" and schema is None:
            return self.error(400, f"invalid format: {json.dumps(fmt)}")
        options = body.get("options") or {}
        max_tokens = options.get("num_predict") if isinstance(options, dict) else None
        if not isinstance(max_tokens, int) or max_tokens < 0:
            max_tokens = None
        # Ollama streams NDJSON unless told "stream": false, a classic adapter bug to catch.
        stream = body.get("stream", True) is not False
        return Parsed(prompt, system, schema, fmt == "json", max_tokens, stream=stream)

    def limited(self, refusal: Refusal, model: str) -> Reply:
        # Ollama sends no Retry-After: a full queue is a plain 503.
        return self.error(503, _BUSY)

    def server_error(self, status: int) -> Reply:
        if status == 503:
            return self.error(503, _BUSY)
        return self.error(500, "llama runner process has terminated: exit status 2")

    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        text = "" if completion.blocked else completion.text
        tokens = 0 if completion.blocked else completion.completion_tokens
        prompt_tokens = completion.prompt_tokens
        chat = route.action == "chat"
        body: dict[str, Any] = {
            "model": completion.model,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body.update(
            {
                "done": True,
                "done_reason": completion.finish,
                "total_duration": 1_000_000 * (1 + tokens),
                "load_duration": 1_000_000,
                "prompt_eval_duration": 1_000_000,
                "eval_duration": 1_000_000 * tokens,
            }
        )
        # Go's omitempty: a zero count is absent from the JSON, as on a real server.
        if prompt_tokens:
            body["prompt_eval_count"] = prompt_tokens
        if tokens:
            body["eval_count"] = tokens
        if parsed.stream:
            chunk: dict[str, Any] = {"model": completion.model, "created_at": body["created_at"], "done": False}
            if chat:
                chunk["message"] = {"role": "assistant", "content": text}
                body["message"] = {"role": "assistant", "content": ""}
            else:
                chunk["response"], body["response"] = text, ""
            lines = [json.dumps(chunk), json.dumps(body)]
            return Reply(200, "\n".join(lines).encode() + b"\n", content_type="application/x-ndjson")
        return Reply.json(200, body, content_type=_CONTENT_TYPE)

    def info(self, route: Route, body: Any, models: Sequence[str]) -> Reply:
        if route.action == "version":
            return Reply.json(200, {"version": "0.12.0"})
        tags = [
            {
                "name": f"{base_model(m)}:latest" if ":" not in m else m,
                "model": f"{base_model(m)}:latest" if ":" not in m else m,
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 2019393189,
                "digest": digest(m),
                "details": {
                    "format": "gguf",
                    "family": "llama",
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
            }
            for m in models
        ]
        return Reply.json(200, {"models": tags})
