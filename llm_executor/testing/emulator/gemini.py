"""The Gemini wire format: ``models/{model}:generateContent`` and Google's error bodies.

Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, header, proto_duration

__all__ = ["GeminiWire"]

_GENERATE_RE = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")
_MODEL_RE = re.compile(r"^/v1beta/models/([^/:]+)$")
_CONTENT_TYPE = "application/json; charset=UTF-8"


class GeminiWire(WireFormat):
    """The Gemini Developer API (generativelanguage.googleapis.com) as python-genai sees it."""

    provider = "gemini"

    @staticmethod
    def error(status: int, rpc: str, message: str, details: list[dict[str, Any]] | None = None) -> Reply:
        """An error in Google's shape: ``{"error": {"code", "message", "status", "details"}}``."""
        err: dict[str, Any] = {"code": status, "message": message, "status": rpc}
        if details:
            err["details"] = details
        return Reply.json(status, {"error": err}, content_type=_CONTENT_TYPE)

    def route(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
        match = _GENERATE_RE.match(path)
        if method == "POST" and match:
            return Route(self.provider, "generate", generation=True, model=match.group(1))
        if method != "GET":
            return None
        if path.rstrip("/") == "/v1beta/models":
            return Route(self.provider, "list_models")
        match = _MODEL_RE.match(path)
        if match:
            return Route(self.provider, "get_model", model=match.group(1))
        return None

    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        return path.startswith("/v1beta/")

    def route_not_found(self, method: str, path: str) -> Reply:
        return self.error(404, "NOT_FOUND", f"Requested entity was not found: {path}")

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> Reply | None:
        if key is None:
            return None
        given = header(headers, "x-goog-api-key")
        if not given:
            return self.error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if given != key:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        return None

    def bad_json(self, raw: bytes) -> Reply:
        return self.error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token.")

    def model_not_found(self, route: Route, model: str) -> Reply:
        return self.error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version v1beta, or is not supported for generateContent. "
            "Call ListModels to see the list of available models and their supported methods.",
        )

    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return self.error(
                400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified"
            )
        texts: list[str] = []
        for content in contents:
            if isinstance(content, dict) and content.get("role", "user") == "user":
                for part in content.get("parts") or []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
        if not texts:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.",
            )
        system: str | None = None
        instruction = body.get("systemInstruction")
        if isinstance(instruction, dict):
            parts = instruction.get("parts") or []
            system = "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) or None
        config = body.get("generationConfig") or {}
        if not isinstance(config, dict):
            return self.error(
                400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "generationConfig"'
            )
        mime = config.get("responseMimeType")
        json_schema, open_schema = config.get("responseJsonSchema"), config.get("responseSchema")
        if json_schema is not None and open_schema is not None:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "responseJsonSchema and responseSchema cannot both be set. "
                "Only one of them may be specified.",
            )
        schema = json_schema if json_schema is not None else open_schema
        if schema is not None and mime != "application/json":
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "* GenerateContentRequest.generation_config.response_mime_type: response_mime_type must be "
                "application/json when response_schema is set.",
            )
        if schema is not None and not isinstance(schema, dict):
            return self.error(
                400, "INVALID_ARGUMENT", "* GenerateContentRequest.generation_config.response_schema"
            )
        max_tokens = config.get("maxOutputTokens")
        return Parsed(
            "\n".join(texts),
            system,
            schema,
            mime == "application/json" and schema is None,
            max_tokens if isinstance(max_tokens, int) else None,
        )

    def limited(self, refusal: Refusal, model: str) -> Reply:
        return self.error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": (
                                "generativelanguage.googleapis.com/generate_content_free_tier_requests"
                            ),
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "10",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": proto_duration(refusal.retry_after_s),
                },
            ],
        )

    def server_error(self, status: int) -> Reply:
        if status == 503:
            return self.error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        return self.error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        )

    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        prompt_tokens = completion.prompt_tokens
        if completion.blocked:
            return Reply.json(
                200,
                {
                    "promptFeedback": {"blockReason": "SAFETY"},
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "modelVersion": completion.model,
                },
            )
        tokens = completion.completion_tokens
        body = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": completion.text}]},
                    "finishReason": "MAX_TOKENS" if completion.finish == "length" else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": tokens,
                "totalTokenCount": prompt_tokens + tokens,
            },
            "modelVersion": completion.model,
            "responseId": uuid.uuid4().hex[:22],
        }
        return Reply.json(200, body, content_type=_CONTENT_TYPE)

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        """The models.get body of ``model``."""
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "description": "Emulated by llm_executor.testing",
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
            "temperature": 1.0,
            "maxTemperature": 2.0,
            "topP": 0.95,
            "topK": 64,
            "thinking": False,
        }

    def info(self, route: Route, body: Any, models: Sequence[str]) -> Reply:
        if route.action == "get_model":
            return Reply.json(200, self.model_info(route.model))
        return Reply.json(200, {"models": [self.model_info(m) for m in models]})
