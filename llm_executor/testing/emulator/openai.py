"""The OpenAI wire format: routes under ``/v1``, Chat Completions bodies and OpenAI error bodies.

Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, bearer, go_duration, split_messages

__all__ = ["OpenAIWire"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


class OpenAIWire(WireFormat):
    """OpenAI's API as the official SDK sees it."""

    provider = "openai"

    @staticmethod
    def error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Reply:
        """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return Reply.json(status, body, {"x-request-id": _request_id()})

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
        if method == "POST" and path == "/v1/chat/completions":
            return Route(self.provider, "chat", generation=True)
        if method == "GET" and path.rstrip("/") == "/v1/models":
            return Route(self.provider, "list_models")
        return None

    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        return path == "/v1" or path.startswith("/v1/")

    def route_not_found(self, method: str, path: str) -> Reply:
        return self.error(404, f"Invalid URL (GET {path})", "invalid_request_error", None)

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> Reply | None:
        if key is None:
            return None
        given = bearer(headers)
        if not given:
            return self.error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
            )
        if given != key:
            # The real message shows the key's last 4 characters; that is all we echo too.
            return self.error(
                401,
                f"Incorrect API key provided: sk-...{given[-4:]}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None

    def bad_json(self, raw: bytes) -> Reply:
        return self.error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)",
            "invalid_request_error",
            None,
        )

    def model_not_found(self, route: Route, model: str) -> Reply:
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )

    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self.error(400, "you must provide a model parameter", "invalid_request_error", None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self.error(
                400,
                "Missing required parameter: 'messages'.",
                "invalid_request_error",
                "missing_required_parameter",
                "messages",
            )
        prompt, system = split_messages(messages)
        schema: Mapping[str, Any] | None = None
        json_mode = False
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            if fmt.get("type") == "json_object":
                json_mode = True
                if "json" not in f"{prompt}\n{system or ''}".lower():
                    return self.error(
                        400,
                        "'messages' must contain the word 'json' in some form, to use 'response_format' of "
                        "type 'json_object'.",
                        "invalid_request_error",
                        None,
                        "messages",
                    )
            elif fmt.get("type") == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    return self.error(
                        400,
                        "Missing required parameter: 'response_format.json_schema.name'.",
                        "invalid_request_error",
                        "missing_required_parameter",
                        "response_format.json_schema.name",
                    )
                if not _NAME_RE.match(spec["name"]):
                    return self.error(
                        400,
                        "Invalid 'response_format.json_schema.name': string does not match pattern. "
                        "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                        "invalid_request_error",
                        "invalid_value",
                        "response_format.json_schema.name",
                    )
                raw_schema = spec.get("schema", {"type": "object"})
                if not isinstance(raw_schema, dict):
                    return self.error(
                        400,
                        "Invalid type for 'response_format.json_schema.schema': expected an object.",
                        "invalid_request_error",
                        "invalid_type",
                        "response_format.json_schema.schema",
                    )
                schema = raw_schema
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return Parsed(prompt, system, schema, json_mode, max_tokens if isinstance(max_tokens, int) else None)

    def limited(self, refusal: Refusal, model: str) -> Reply:
        retry_after_s = refusal.retry_after_s
        reply = self.error(
            429,
            f"Rate limit reached for {model} on requests per min (RPM): Limit reached. "
            f"Please try again in {go_duration(retry_after_s)}.",
            "requests",
            "rate_limit_exceeded",
        )
        reply.headers.update(
            {
                "retry-after": str(max(1, math.ceil(retry_after_s))),
                "retry-after-ms": str(max(1, round(retry_after_s * 1000))),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": go_duration(retry_after_s),
            }
        )
        return reply

    def server_error(self, status: int) -> Reply:
        if status == 503:
            return self.error(503, "The server is overloaded or not ready yet.", "server_error", None)
        return self.error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )

    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        finish = completion.finish
        message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None}
        completion_tokens = completion.completion_tokens
        if completion.blocked:
            message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."}
            finish, completion_tokens = "stop", 0
        prompt_tokens = completion.prompt_tokens
        body = {
            "id": f"chatcmpl-emu{uuid.uuid4().hex[:20]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": completion.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }
        return Reply.json(200, body, {"x-request-id": _request_id()})

    def info(self, route: Route, body: Any, models: Sequence[str]) -> Reply:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "emulator"} for m in models]
        return Reply.json(200, {"object": "list", "data": data})
