"""The Gemini wire format: ``models/{model}:generateContent`` under ``/v1`` and ``/v1beta``, and Google's errors.

Routes (``{v}`` is ``v1`` or ``v1beta``: python-genai 3.x defaults to ``v1``, earlier ones and the
REST docs to ``v1beta``)::

    POST {v}/models/{model}:generateContent
    POST {v}/models/{model}:streamGenerateContent   (?alt=sse: server-sent events; else a JSON array)
    POST {v}/models/{model}:countTokens
    GET  {v}/models, GET {v}/models/{model}

``GET /v1/models[/{id}]`` is also OpenAI's; it is Gemini's when the request carries Google's headers
(``x-goog-api-key`` or ``x-goog-api-client``) or query (``key``, ``pageSize``, ``pageToken``).
A 429 carries ``QuotaFailure`` (the quota id names the window: per minute or per day) and
``RetryInfo``, never a Retry-After header. Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs

from ..responder import count_tokens
from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, header, proto_duration, sse

__all__ = ["GeminiWire"]

_ACTION_RE = re.compile(r"^/(v1|v1beta)/models/([^/:]+):(generateContent|streamGenerateContent|countTokens)$")
_MODELS_RE = re.compile(r"^/(v1|v1beta)/models/?$")
_MODEL_RE = re.compile(r"^/(v1|v1beta)/models/([^/:]+)$")
_ACTIONS = {"generateContent": "generate", "streamGenerateContent": "stream_generate", "countTokens": "count_tokens"}
_CONTENT_TYPE = "application/json; charset=UTF-8"
_THINKING_RE = re.compile(r"^gemini-(?:2\.5|[3-9])")
_QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


def _is_google(headers: Mapping[str, str], query: str) -> bool:
    if header(headers, "x-goog-api-key") is not None or header(headers, "x-goog-api-client") is not None:
        return True
    return bool({"key", "pageSize", "pageToken"} & set(parse_qs(query)))


def _prompt_details(tokens: int) -> list[dict[str, Any]]:
    return [{"modality": "TEXT", "tokenCount": tokens}]


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

    # -- routes ------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Route | None:
        match = _ACTION_RE.match(path)
        if match and method == "POST":
            action = _ACTIONS[match.group(3)]
            return Route(self.provider, action, generation=action != "count_tokens", model=match.group(2),
                         version=match.group(1), query=query)
        if method != "GET":
            return None
        listing, one = _MODELS_RE.match(path), _MODEL_RE.match(path)
        found = listing or one
        if found is None or (found.group(1) == "v1" and not _is_google(headers, query)):
            return None
        if one is not None:
            return Route(self.provider, "get_model", model=one.group(2), version=one.group(1))
        return Route(self.provider, "list_models", version=found.group(1), query=query)

    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        if path.startswith("/v1beta/"):
            return True
        return path.startswith("/v1/") and (":" in path or _is_google(headers, ""))

    def route_not_found(self, method: str, path: str) -> Reply:
        return self.error(404, "NOT_FOUND", f"Method not found: {method} {path}")

    # -- errors ------------------------------------------------------------------------------------

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
        method = {"get_model": "get", "count_tokens": "countTokens"}.get(route.action, "generateContent")
        return self.error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version {route.version or 'v1beta'}, or is not supported "
            f"for {method}. Call ListModels to see the list of available models and their supported methods.",
        )

    def limited(self, refusal: Refusal, model: str) -> Reply:
        tokens = refusal.dimension == "tokens"
        per_day = refusal.period_s >= 86400
        if tokens:
            metric = "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count"
            quota_id = "GenerateContentInputTokensPerModelPerMinute-FreeTier"
        else:
            metric = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
            quota_id = ("GenerateRequestsPerDayPerProjectPerModel-FreeTier" if per_day
                        else "GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
        # Gemini's quotas are per minute or per day; a per-second limit is shown per minute.
        limit = refusal.limit if refusal.limit is not None else 10
        value = limit * 60 if refusal.period_s < 60 else limit
        delay = proto_duration(refusal.retry_after_s)
        message = (f"{_QUOTA_MESSAGE} For more information on this error, head to: "
                   f"https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for metric: {metric}, "
                   f"limit: {value}, model: {model}\nPlease retry in {delay}.")
        return self.error(
            429,
            "RESOURCE_EXHAUSTED",
            message,
            [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": metric,
                            "quotaId": quota_id,
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": str(value),
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{"description": "Learn more about Gemini API quotas",
                               "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
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

    # -- requests ------------------------------------------------------------------------------------

    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return self.error(
                400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified"
            )
        texts = _user_texts(contents)
        if not texts:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.",
            )
        system: str | None = None
        instruction = body.get("systemInstruction", body.get("system_instruction"))
        if isinstance(instruction, dict):
            parts = instruction.get("parts") or []
            system = "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) or None
        config = body.get("generationConfig", body.get("generation_config")) or {}
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
        thinking_config = config.get("thinkingConfig")
        budget = thinking_config.get("thinkingBudget") if isinstance(thinking_config, dict) else None
        max_tokens = config.get("maxOutputTokens")
        return Parsed(
            "\n".join(texts),
            system,
            schema,
            mime == "application/json" and schema is None,
            max_tokens if isinstance(max_tokens, int) else None,
            stream=route.action == "stream_generate",
            thinking=_THINKING_RE.match(route.model) is not None and budget != 0,
        )

    # -- replies ---------------------------------------------------------------------------------

    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        response_id = uuid.uuid4().hex[:22]
        prompt = completion.prompt_tokens
        if completion.blocked:
            events = [{
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt,
                                  "promptTokensDetails": _prompt_details(prompt)},
                "modelVersion": completion.model,
                "responseId": response_id,
            }]
        elif parsed.stream:
            pieces = completion.pieces()
            events = [self._body(completion, response_id, piece, last=i == len(pieces) - 1)
                      for i, piece in enumerate(pieces)]
        else:
            events = [self._body(completion, response_id, completion.text, last=True)]
        if not parsed.stream:
            return Reply.json(200, events[0], content_type=_CONTENT_TYPE)
        if "sse" in parse_qs(route.query).get("alt", []):
            return Reply(200, content_type="text/event-stream", chunks=sse(events))
        # Without alt=sse the stream is one JSON array, written element by element.
        parts = [json.dumps(e).encode() for e in events]
        chunks = [b"[" + parts[0]] + [b",\r\n" + p for p in parts[1:]] + [b"]"]
        return Reply(200, content_type=_CONTENT_TYPE, chunks=chunks)

    @staticmethod
    def _body(completion: Completion, response_id: str, text: str, *, last: bool) -> dict[str, Any]:
        prompt = completion.prompt_tokens
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
        if not text and last and completion.finish == "length":
            # Thoughts used the whole budget: no parts at all, as the real API answers.
            candidate["content"] = {"role": "model"}
        usage: dict[str, Any] = {"promptTokenCount": prompt, "totalTokenCount": prompt,
                                 "promptTokensDetails": _prompt_details(prompt)}
        if last:
            candidate["finishReason"] = "MAX_TOKENS" if completion.finish == "length" else "STOP"
            usage["candidatesTokenCount"] = completion.completion_tokens
            usage["totalTokenCount"] = prompt + completion.completion_tokens + completion.thought_tokens
            if completion.thought_tokens:
                usage["thoughtsTokenCount"] = completion.thought_tokens
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": completion.model,
                "responseId": response_id}

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
            "supportedGenerationMethods": ["generateContent", "countTokens", "createCachedContent",
                                           "batchGenerateContent"],
            "temperature": 1.0,
            "maxTemperature": 2.0,
            "topP": 0.95,
            "topK": 64,
            "thinking": _THINKING_RE.match(model) is not None,
        }

    def info(self, route: Route, body: Any, models: Sequence[str], recent: Mapping[str, float]) -> Reply:
        if route.action == "get_model":
            return Reply.json(200, self.model_info(route.model), content_type=_CONTENT_TYPE)
        if route.action == "count_tokens":
            request = body.get("generateContentRequest", body) if isinstance(body, dict) else {}
            contents = request.get("contents") if isinstance(request, dict) else None
            tokens = sum(count_tokens(t) for t in _user_texts(contents if isinstance(contents, list) else []))
            return Reply.json(200, {"totalTokens": tokens, "promptTokensDetails": _prompt_details(tokens)},
                              content_type=_CONTENT_TYPE)
        return self._listing(route, models)

    def _listing(self, route: Route, models: Sequence[str]) -> Reply:
        query = parse_qs(route.query)
        try:
            size = max(1, int(query.get("pageSize", ["50"])[0]))
            start = int(query.get("pageToken", ["0"])[0] or 0)
        except ValueError:
            return self.error(400, "INVALID_ARGUMENT", "Invalid value for pageSize or pageToken.")
        page = list(models)[start : start + size]
        body: dict[str, Any] = {"models": [self.model_info(m) for m in page]}
        if start + size < len(models):
            body["nextPageToken"] = str(start + size)
        return Reply.json(200, body, content_type=_CONTENT_TYPE)


def _user_texts(contents: list[Any]) -> list[str]:
    texts: list[str] = []
    for content in contents:
        if isinstance(content, dict) and content.get("role", "user") == "user":
            for part in content.get("parts") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return texts
