"""The OpenAI wire format: routes under ``/v1``, Chat Completions and Responses bodies, SSE, errors.

Routes: ``POST /v1/chat/completions`` (``stream: true`` answers ``chat.completion.chunk`` server-sent
events, with a final usage chunk when ``stream_options.include_usage``), ``POST /v1/responses``
(streamed as ``response.*`` events when asked), ``GET /v1/models`` and ``GET /v1/models/{id}``.
Reasoning models are told apart by name (o1, o3, o4..., gpt-5...), as the real API does: they
reject ``max_tokens`` and a temperature other than 1, and report ``reasoning_tokens``.
Imports: the stdlib and ``.wire`` only.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .wire import (
    Completion,
    Parsed,
    Refusal,
    Reply,
    Route,
    WireFormat,
    bearer,
    digest,
    go_duration,
    split_messages,
    sse,
    text_content,
)

__all__ = ["OpenAIWire", "is_reasoning_model"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODEL_RE = re.compile(r"^/v1/models/([^/]+)$")
_REASONING_RE = re.compile(r"^(?:o\d+(?:$|[-_.])|gpt-5)")
_REFUSAL = "I'm sorry, I can't help with that."
_CREATED = 1700000000
# What the response says it was served with, for each requested service_tier.
_SERVICE_TIERS = {None: "default", "auto": "default", "default": "default", "flex": "flex",
                  "scale": "scale", "priority": "priority", "fast": "priority"}


def is_reasoning_model(model: str) -> bool:
    """Whether OpenAI treats ``model`` as a reasoning model (o-series, gpt-5 family)."""
    return _REASONING_RE.match(model.rsplit("/", 1)[-1]) is not None


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def _fingerprint(model: str) -> str:
    return f"fp_{digest(model)[:10]}"


class OpenAIWire(WireFormat):
    """OpenAI's API as the official SDK sees it."""

    provider = "openai"

    @staticmethod
    def error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Reply:
        """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return Reply.json(status, body, {"x-request-id": _request_id()})

    # -- routes ------------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: str, headers: Mapping[str, str]) -> Route | None:
        if method == "POST" and path == "/v1/chat/completions":
            return Route(self.provider, "chat", generation=True)
        if method == "POST" and path == "/v1/responses":
            return Route(self.provider, "responses", generation=True)
        if method == "GET" and path.rstrip("/") == "/v1/models":
            return Route(self.provider, "list_models")
        match = _MODEL_RE.match(path)
        if method == "GET" and match:
            return Route(self.provider, "get_model", model=match.group(1))
        return None

    def owns(self, path: str, headers: Mapping[str, str]) -> bool:
        return path == "/v1" or path.startswith("/v1/")

    def route_not_found(self, method: str, path: str) -> Reply:
        return self.error(404, f"Invalid URL ({method} {path})", "invalid_request_error", None)

    # -- errors ------------------------------------------------------------------------------------

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
        if route.action == "get_model":
            return self.error(404, f"The model '{model}' does not exist", "invalid_request_error",
                              "model_not_found", "model")
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )

    def limited(self, refusal: Refusal, model: str) -> Reply:
        wait = go_duration(refusal.retry_after_s)
        if refusal.limit is None:
            message = f"Rate limit reached for {model} on requests per min (RPM). Please try again in {wait}."
        else:
            unit = {1.0: "requests per second (RPS)", 60.0: "requests per min (RPM)",
                    86400.0: "requests per day (RPD)"}.get(refusal.period_s, "requests per min (RPM)")
            if refusal.dimension == "tokens":
                unit = "tokens per min (TPM)"
            message = (f"Rate limit reached for {model} in organization org-emulator on {unit}: "
                       f"Limit {refusal.limit}, Used {refusal.used}, Requested {refusal.requested}. "
                       f"Please try again in {wait}. Visit https://platform.openai.com/account/rate-limits "
                       "to learn more.")
        reply = self.error(429, message, refusal.dimension if refusal.dimension == "tokens" else "requests",
                           "rate_limit_exceeded")
        reply.headers.update({
            "retry-after": str(max(1, math.ceil(refusal.retry_after_s))),
            "retry-after-ms": str(max(1, round(refusal.retry_after_s * 1000))),
        })
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

    # -- requests ------------------------------------------------------------------------------------

    def parse(self, route: Route, body: dict[str, Any]) -> Parsed | Reply:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "you must provide a model parameter", "invalid_request_error", None)
        reasoning = is_reasoning_model(model)
        if reasoning:
            rejected = self._reject_sampling(body)
            if rejected is not None:
                return rejected
        if route.action == "responses":
            return self._parse_responses(body, reasoning)
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
        fmt = body.get("response_format")
        schema = self._response_format(fmt, prompt, system, "response_format")
        if isinstance(schema, Reply):
            return schema
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        return Parsed(
            prompt,
            system,
            schema if isinstance(schema, Mapping) else None,
            isinstance(fmt, dict) and fmt.get("type") == "json_object",
            max_tokens if isinstance(max_tokens, int) else None,
            stream=body.get("stream") is True,
            thinking=reasoning,
            options={"include_usage": include_usage, "service_tier": body.get("service_tier")},
        )

    def _reject_sampling(self, body: Mapping[str, Any]) -> Reply | None:
        # Reasoning models answer these 400s whatever the client; the adapters must not send them.
        if "max_tokens" in body:
            return self.error(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "invalid_request_error",
                "unsupported_parameter",
                "max_tokens",
            )
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1:
            return self.error(
                400,
                f"Unsupported value: 'temperature' does not support {temperature} with this model. "
                "Only the default (1) value is supported.",
                "invalid_request_error",
                "unsupported_value",
                "temperature",
            )
        return None

    def _response_format(
        self, fmt: Any, prompt: str, system: str | None, where: str
    ) -> Mapping[str, Any] | Reply | None:
        """The schema asked for (None for text or JSON mode), or the 400 a bad format gets."""
        if not isinstance(fmt, dict):
            return None
        if fmt.get("type") == "json_object":
            if "json" not in f"{prompt}\n{system or ''}".lower():
                return self.error(
                    400,
                    f"'messages' must contain the word 'json' in some form, to use '{where}' of "
                    "type 'json_object'.",
                    "invalid_request_error",
                    None,
                    "messages",
                )
            return None
        if fmt.get("type") != "json_schema":
            return None
        # Chat Completions nests the schema under json_schema; the Responses API puts it flat.
        spec = fmt.get("json_schema") if where == "response_format" else fmt
        prefix = f"{where}.json_schema" if where == "response_format" else where
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return self.error(
                400,
                f"Missing required parameter: '{prefix}.name'.",
                "invalid_request_error",
                "missing_required_parameter",
                f"{prefix}.name",
            )
        if not _NAME_RE.match(spec["name"]):
            return self.error(
                400,
                f"Invalid '{prefix}.name': string does not match pattern. "
                "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                "invalid_request_error",
                "invalid_value",
                f"{prefix}.name",
            )
        raw_schema = spec.get("schema", {"type": "object"})
        if not isinstance(raw_schema, dict):
            return self.error(
                400,
                f"Invalid type for '{prefix}.schema': expected an object.",
                "invalid_request_error",
                "invalid_type",
                f"{prefix}.schema",
            )
        return raw_schema

    def _parse_responses(self, body: dict[str, Any], reasoning: bool) -> Parsed | Reply:
        given = body.get("input")
        if isinstance(given, str):
            prompt, system = given, None
        elif isinstance(given, list) and all(isinstance(m, dict) for m in given):
            messages = [{"role": m.get("role", "user"), "content": _input_text(m.get("content"))} for m in given]
            prompt, system = split_messages(messages)
        else:
            return self.error(400, "Missing required parameter: 'input'.", "invalid_request_error",
                              "missing_required_parameter", "input")
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            system = f"{instructions}\n{system}" if system else instructions
        text_config = body.get("text")
        fmt = text_config.get("format") if isinstance(text_config, dict) else None
        schema = self._response_format(fmt, prompt, system, "text.format")
        if isinstance(schema, Reply):
            return schema
        max_tokens = body.get("max_output_tokens")
        echoed = {key: body.get(key) for key in ("instructions", "max_output_tokens", "temperature", "top_p",
                                                  "previous_response_id", "user", "metadata")}
        return Parsed(
            prompt,
            system,
            schema if isinstance(schema, Mapping) else None,
            isinstance(fmt, dict) and fmt.get("type") == "json_object",
            max_tokens if isinstance(max_tokens, int) else None,
            stream=body.get("stream") is True,
            thinking=reasoning,
            options={"service_tier": body.get("service_tier"), "format": fmt, "echo": echoed},
        )

    # -- replies ---------------------------------------------------------------------------------

    def success(self, route: Route, parsed: Parsed, completion: Completion) -> Reply:
        if route.action == "responses":
            return self._responses_reply(parsed, completion)
        created = int(time.time())
        ident = f"chatcmpl-emu{uuid.uuid4().hex[:20]}"
        finish = "stop" if completion.blocked else completion.finish
        head: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": completion.model,
            "service_tier": _SERVICE_TIERS.get(parsed.options.get("service_tier"), "default"),
            "system_fingerprint": _fingerprint(completion.model),
        }
        usage = self._usage(completion)
        headers = {"x-request-id": _request_id(), "openai-processing-ms": "1", "openai-version": "2020-10-01"}
        if parsed.stream:
            return Reply(200, headers=headers, content_type="text/event-stream; charset=utf-8",
                         chunks=sse(self._chunks(head, parsed, completion, finish, usage), done=True))
        message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None,
                                   "annotations": []}
        if completion.blocked:
            message = {"role": "assistant", "content": None, "refusal": _REFUSAL, "annotations": []}
        body = {**head, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}
        return Reply.json(200, body, headers)

    @staticmethod
    def _usage(completion: Completion) -> dict[str, Any]:
        output = 0 if completion.blocked else completion.completion_tokens + completion.thought_tokens
        return {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": output,
            "total_tokens": completion.prompt_tokens + output,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": completion.thought_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    @staticmethod
    def _chunks(head: Mapping[str, Any], parsed: Parsed, completion: Completion, finish: str,
                usage: Mapping[str, Any]) -> list[dict[str, Any]]:
        include_usage = bool(parsed.options.get("include_usage"))
        base = {**head, "object": "chat.completion.chunk"}
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if completion.blocked:
            events.append(chunk({"refusal": _REFUSAL}))
        else:
            events.extend(chunk({"content": piece}) for piece in completion.pieces() if piece)
        events.append(chunk({}, finish))
        if include_usage:
            events.append({**base, "choices": [], "usage": dict(usage)})
        return events

    def _responses_reply(self, parsed: Parsed, completion: Completion) -> Reply:
        ident = f"resp_{uuid.uuid4().hex}"
        message_id = f"msg_{uuid.uuid4().hex}"
        incomplete = completion.finish == "length"
        content: dict[str, Any] = (
            {"type": "refusal", "refusal": _REFUSAL} if completion.blocked
            else {"type": "output_text", "text": completion.text, "annotations": [], "logprobs": []}
        )
        message = {"id": message_id, "type": "message", "status": "incomplete" if incomplete else "completed",
                   "role": "assistant", "content": [content]}
        output: list[dict[str, Any]] = [message]
        if parsed.thinking:
            output.insert(0, {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": []})
        echo = dict(parsed.options.get("echo") or {})
        fmt = parsed.options.get("format")
        output_tokens = 0 if completion.blocked else completion.completion_tokens + completion.thought_tokens
        response: dict[str, Any] = {
            "id": ident,
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if incomplete else "completed",
            "background": False,
            "completed_at": None if incomplete else int(time.time()),
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": echo.get("instructions"),
            "max_output_tokens": echo.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": completion.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": echo.get("previous_response_id"),
            "reasoning": {"effort": "medium" if parsed.thinking else None, "summary": None},
            "service_tier": _SERVICE_TIERS.get(parsed.options.get("service_tier"), "default"),
            "store": True,
            "temperature": echo.get("temperature") if echo.get("temperature") is not None else 1.0,
            "text": {"format": fmt if isinstance(fmt, dict) else {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": 0,
            "top_p": echo.get("top_p") if echo.get("top_p") is not None else 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": completion.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": completion.thought_tokens},
                "total_tokens": completion.prompt_tokens + output_tokens,
            },
            "user": echo.get("user"),
            "metadata": echo.get("metadata") or {},
        }
        headers = {"x-request-id": _request_id()}
        if not parsed.stream:
            return Reply.json(200, response, headers)
        return Reply(200, headers=headers, content_type="text/event-stream; charset=utf-8",
                     chunks=sse(self._response_events(response, message, content, completion)))

    @staticmethod
    def _response_events(response: dict[str, Any], message: dict[str, Any], content: dict[str, Any],
                         completion: Completion) -> list[dict[str, Any]]:
        """The Responses API's event sequence for one message with one content part."""
        pending = {**response, "status": "in_progress", "output": [], "usage": None, "completed_at": None,
                   "incomplete_details": None}
        index = len(response["output"]) - 1
        item_id = message["id"]
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
            {"type": "response.output_item.added", "output_index": index,
             "item": {**message, "status": "in_progress", "content": []}},
        ]
        part_start = {**content, "text": ""} if content["type"] == "output_text" else {**content, "refusal": ""}
        events.append({"type": "response.content_part.added", "item_id": item_id, "output_index": index,
                       "content_index": 0, "part": part_start})
        if content["type"] == "output_text":
            for piece in completion.pieces():
                if piece:
                    events.append({"type": "response.output_text.delta", "item_id": item_id,
                                   "output_index": index, "content_index": 0, "delta": piece, "logprobs": []})
            events.append({"type": "response.output_text.done", "item_id": item_id, "output_index": index,
                           "content_index": 0, "text": content["text"], "logprobs": []})
        events += [
            {"type": "response.content_part.done", "item_id": item_id, "output_index": index,
             "content_index": 0, "part": content},
            {"type": "response.output_item.done", "output_index": index, "item": message},
            {"type": "response.incomplete" if response["status"] == "incomplete" else "response.completed",
             "response": response},
        ]
        for number, event in enumerate(events):
            event["sequence_number"] = number
        return events

    def info(self, route: Route, body: Any, models: Sequence[str], recent: Mapping[str, float]) -> Reply:
        if route.action == "get_model":
            return Reply.json(200, self._model(route.model), {"x-request-id": _request_id()})
        return Reply.json(200, {"object": "list", "data": [self._model(m) for m in models]},
                          {"x-request-id": _request_id()})

    @staticmethod
    def _model(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": _CREATED, "owned_by": "system"}


def _input_text(content: Any) -> str:
    """A Responses API input item's content: a string, or ``input_text`` parts."""
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") in ("input_text", "text", "output_text"))
    return text_content(content)
