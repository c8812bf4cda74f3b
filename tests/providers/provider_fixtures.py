"""Wire bodies of PROVIDERS.md section 5 (fake keys), shared by the adapter tests."""

from __future__ import annotations

import json
from typing import Any

import responses

OPENAI_URL = "https://api.openai.com/v1/chat/completions"
GEMINI_URL = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
OLLAMA_URL = "http://127.0.0.1:11434/api/chat"

OPENAI_KEY = "sk-SENTINEL-openai"
GEMINI_KEY = "AIzaSENTINEL-gemini"
OLLAMA_KEY = "SENTINEL-ollama-key"

OPENAI_OK = {"id": "chatcmpl-t1", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",
    "message": {"role": "assistant", "content": "{\"answer\": 4}", "refusal": None}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}}
OPENAI_429 = {"error": {"message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, "
    "Used 3, Requested 1. Please try again in 20s.",
    "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
OPENAI_429_HEADERS = {"retry-after": "20", "retry-after-ms": "20000", "x-request-id": "req_test_1",
    "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "20s", "x-ratelimit-limit-tokens": "40000",
    "x-ratelimit-remaining-tokens": "39970", "x-ratelimit-reset-tokens": "45ms"}
OPENAI_QUOTA_429 = {"error": {
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
OPENAI_400 = {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
    "Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}

GEMINI_OK = {"candidates": [{"index": 0, "finishReason": "STOP", "content": {"role": "model",
    "parts": [{"text": "thinking...", "thought": True}, {"text": "{\"answer\": 4}"}]}}],
    "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 6,
    "thoughtsTokenCount": 20, "totalTokenCount": 36}, "modelVersion": "gemini-2.5-flash"}
GEMINI_BLOCKED_200 = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
    "usageMetadata": {"promptTokenCount": 10, "totalTokenCount": 10}}
GEMINI_429 = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "10"}]},
      {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]}}
GEMINI_429_DAILY = json.loads(json.dumps(GEMINI_429).replace("PerMinute", "PerDay"))
GEMINI_429_HEADERS = {"content-type": "application/json; charset=UTF-8"}
GEMINI_400_BADKEY = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
    "message": "API key not valid. Please pass a valid API key.",
    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}

OLLAMA_OK = {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
    "message": {"role": "assistant", "content": "{\"answer\": 4}"}, "total_duration": 900000000,
    "load_duration": 600000000, "prompt_eval_count": 26, "eval_count": 7, "eval_duration": 250000000}
OLLAMA_OK_OLD = {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z",
    "message": {"role": "assistant", "content": "hi"}, "done": True}
OLLAMA_503 = {"error": "server busy, please try again.  maximum pending requests exceeded"}
OLLAMA_429 = {"error": "too many requests"}
OLLAMA_404 = {"error": "model \"llama9\" not found, try pulling it first"}


def sent_json(mock: responses.RequestsMock, index: int = -1) -> Any:
    """The JSON body of a recorded call."""
    body = mock.calls[index].request.body
    assert body is not None
    return json.loads(body)
