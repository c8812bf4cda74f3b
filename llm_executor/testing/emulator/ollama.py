"""The Ollama wire format: the native ``/api`` routes, NDJSON streaming and ``{"error": "..."}`` bodies.

Routes: ``POST /api/chat`` and ``POST /api/generate`` (NDJSON stream unless ``"stream": false``),
``POST /api/show``, ``POST /api/embed``, ``GET /api/tags``, ``GET /api/ps`` (models used in the last
five minutes, as loaded ones), ``GET /api/version``. Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, base_model, bearer, digest, split_messages

__all__ = ["OllamaWire"]

_CONTENT_TYPE = "application/json; charset=utf-8"
_BUSY = "server busy, please try again.  maximum pending requests exceeded"
_KEEP_ALIVE_S = 300.0
_EMBEDDING_DIMENSIONS = 768
_DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}
_SIZE = 2019393189


def _rfc3339(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e9):09d}Z"


def _tag(model: str) -> str:
    return f"{base_model(model)}:latest" if ":" not in model else model


class OllamaWire(WireFormat):
    """Ollama's native API as ollama-python sees it."""

    provider = "ollama"

    @staticmethod
    def error(status: int, message: str) -> Reply:
        """An error in Ollama's shape: ``{"error": "message"}`` (a string, not an object)."""
        return Reply.json(status, {"error": message}, content_type=_CONTENT_TYPE)

    def route(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Route | None:
        if method == "POST" and path in ("/api/chat", "/api/generate"):
            return Route(self.provider, path.rsplit("/", 1)[1], generation=True)
        if method == "GET" and path == "/api/version":
            return Route(self.provider, "version", public=True)
        if method == "GET" and path == "/api/tags":
            return Route(self.provider, "tags", public=True)
        if method == "GET" and path == "/api/ps":
            return Route(self.provider, "ps", public=True)
        if method == "POST" and path in ("/api/show", "/api/embed"):
            return Route(self.provider, path.rsplit("/", 1)[1])
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
        if route.action in ("show", "embed"):
            return self.error(404, f"model '{model}' not found")
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
        chat = route.action == "chat"
        created = _rfc3339(time.time())

        def line(piece: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": completion.model, "created_at": created}
            if chat:
                out["message"] = {"role": "assistant", "content": piece}
            else:
                out["response"] = piece
            out["done"] = done
            return out

        final = line("" if parsed.stream else text, True)
        final.update({
            "done_reason": completion.finish,
            "total_duration": 1_000_000 * (2 + tokens),
            "load_duration": 1_000_000,
            "prompt_eval_duration": 1_000_000,
            "eval_duration": 1_000_000 * max(1, tokens),
        })
        if not chat:
            final["context"] = [1, 2, 3]
        # Go's omitempty: a zero count is absent from the JSON, as on a real server.
        if completion.prompt_tokens:
            final["prompt_eval_count"] = completion.prompt_tokens
        if tokens:
            final["eval_count"] = tokens
        if not parsed.stream:
            return Reply.json(200, final, content_type=_CONTENT_TYPE)
        pieces = [p for p in (completion.pieces() if text else []) if p]
        lines = [line(p, False) for p in pieces] + [final]
        return Reply(200, content_type="application/x-ndjson",
                     chunks=[json.dumps(item).encode() + b"\n" for item in lines])

    def info(self, route: Route, body: Any, models: Sequence[str], recent: Mapping[str, float]) -> Reply:
        if route.action == "version":
            return Reply.json(200, {"version": "0.12.0"})
        if route.action in ("show", "embed") and not _body_model(body):
            return self.error(400, "model is required")
        if route.action == "show":
            return Reply.json(200, self._show(_body_model(body)), content_type=_CONTENT_TYPE)
        if route.action == "embed":
            return self._embed(body)
        if route.action == "ps":
            now = time.time()
            loaded = [
                {"name": _tag(m), "model": _tag(m), "size": _SIZE, "digest": digest(_tag(m)),
                 "details": _DETAILS, "expires_at": _rfc3339(used + _KEEP_ALIVE_S), "size_vram": _SIZE,
                 "context_length": 4096}
                for m, used in sorted(recent.items()) if now - used < _KEEP_ALIVE_S
            ]
            return Reply.json(200, {"models": loaded})
        tags = [
            {"name": _tag(m), "model": _tag(m), "modified_at": "2025-01-01T00:00:00Z", "size": _SIZE,
             "digest": digest(_tag(m)), "details": _DETAILS}
            for m in models
        ]
        return Reply.json(200, {"models": tags})

    @staticmethod
    def _show(model: str) -> dict[str, Any]:
        return {
            "license": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT (emulated)",
            "modelfile": f"# Modelfile generated by the llm_executor emulator\nFROM {_tag(model)}\n",
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": _DETAILS,
            "model_info": {
                "general.architecture": "llama",
                "general.parameter_count": 3212749888,
                "general.quantization_version": 2,
                "llama.context_length": 131072,
                "llama.embedding_length": 3072,
                "llama.block_count": 28,
            },
            "capabilities": ["completion", "tools"],
            "modified_at": "2025-01-01T00:00:00.000000000Z",
        }

    def _embed(self, body: Any) -> Reply:
        model = _body_model(body)
        given = body.get("input") if isinstance(body, dict) else None
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return self.error(400, "invalid input type")
        dims = body.get("dimensions") if isinstance(body, dict) else None
        size = dims if isinstance(dims, int) and dims > 0 else _EMBEDDING_DIMENSIONS
        tokens = sum(len(text.split()) for text in inputs)
        return Reply.json(200, {
            "model": model,
            "embeddings": [_embedding(text, size) for text in inputs],
            "total_duration": 1_000_000 * (1 + tokens),
            "load_duration": 1_000_000,
            "prompt_eval_count": tokens,
        }, content_type=_CONTENT_TYPE)


def _body_model(body: Any) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


def _embedding(text: str, size: int) -> list[float]:
    """A unit vector that is a pure function of the text (the same text always embeds the same)."""
    rng = random.Random(digest(text))
    vector = [rng.gauss(0.0, 1.0) for _ in range(size)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [round(v / norm, 6) for v in vector]
