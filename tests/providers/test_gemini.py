"""Gemini adapter: header-only key, request shape, thought parts, blocked prompts, error details."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import responses

from llm_executor.config import ProviderConfig
from llm_executor.errors import (
    ContentBlockedError,
    InvalidRequestError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.types import LLMRequest
from tests.providers.provider_fixtures import (
    GEMINI_400_BADKEY,
    GEMINI_429,
    GEMINI_429_DAILY,
    GEMINI_429_HEADERS,
    GEMINI_BLOCKED_200,
    GEMINI_KEY,
    GEMINI_OK,
    GEMINI_URL,
    sent_json,
)


def req(**kw: Any) -> LLMRequest:
    fields: dict[str, Any] = {"provider": "gemini", "model": "gemini-2.5-flash", "prompt": "Hi"}
    fields.update(kw)
    return LLMRequest(**fields)


def provider(**kw: Any) -> GeminiProvider:
    cfg: dict[str, Any] = {"api_key": GEMINI_KEY}
    cfg.update(kw)
    return GeminiProvider("gemini", ProviderConfig(**cfg))


def candidate(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(GEMINI_OK)
    body["candidates"][0].update(changes)
    return body


# --- request shape ---------------------------------------------------------------------------------

def test_key_travels_in_the_header_only(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    provider().complete(req())
    call = wire.calls[0]
    assert call.request.url == GEMINI_URL
    assert "key=" not in call.request.url and GEMINI_KEY not in call.request.url
    assert call.request.headers["x-goog-api-key"] == GEMINI_KEY
    assert "Authorization" not in call.request.headers
    assert sent_json(wire) == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


def test_models_prefix_is_stripped(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    provider().complete(req(model="models/gemini-2.5-flash"))
    assert wire.calls[0].request.url == GEMINI_URL


def test_default_model_from_config(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    provider(model="models/gemini-2.5-flash").complete(req(model=""))
    assert wire.calls[0].request.url == GEMINI_URL


def test_system_generation_config_and_schema(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    provider().complete(req(system="Be brief", max_output_tokens=512, temperature=0.2, json_schema=schema))
    body = sent_json(wire)
    assert body["systemInstruction"] == {"role": "user", "parts": [{"text": "Be brief"}]}
    assert body["generationConfig"] == {"maxOutputTokens": 512, "temperature": 0.2,
                                        "responseMimeType": "application/json", "responseJsonSchema": schema}


def test_json_mode_option_sends_only_the_mime_type(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    provider(options={"json_mode": "json"}).complete(req(json_schema={"type": "object"}))
    assert sent_json(wire)["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize("base", ["https://proxy.example.com", "https://proxy.example.com/",
                                  "https://proxy.example.com/v1beta"])
def test_custom_base_url_gets_v1beta_once(wire: responses.RequestsMock, base: str) -> None:
    url = "https://proxy.example.com/v1beta/models/gemini-2.5-flash:generateContent"
    wire.add(responses.POST, url, json=GEMINI_OK)
    provider(base_url=base).complete(req())
    assert wire.calls[0].request.url == url


def test_missing_key_names_both_variables(wire: responses.RequestsMock) -> None:
    with pytest.raises(ProviderError, match="GEMINI_API_KEY or GOOGLE_API_KEY") as info:
        GeminiProvider("gemini", ProviderConfig()).complete(req())
    assert info.value.retryable is False and len(wire.calls) == 0


def test_missing_model_names_the_variable() -> None:
    with pytest.raises(InvalidRequestError, match="LLM_EXECUTOR_GEMINI_MODEL"):
        provider().complete(req(model=""))


# --- response parsing ---------------------------------------------------------------------------

def test_thought_parts_are_skipped_and_thoughts_count_as_output(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_OK)
    resp = provider().complete(req())
    assert resp.text == '{"answer": 4}' and resp.model == "gemini-2.5-flash" and resp.provider == "gemini"
    assert (resp.finish_reason, resp.raw_finish_reason) == ("stop", "STOP")
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (10, 26, 36)


@pytest.mark.parametrize(("raw", "normalised"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
    ("RECITATION", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("MALFORMED_FUNCTION_CALL", "other"), ("OTHER", "other"), ("FINISH_REASON_UNSPECIFIED", "other"),
    ("SOMETHING_NEW", "other"), (None, "other"),
])
def test_finish_reasons_are_normalised(wire: responses.RequestsMock, raw: str | None,
                                       normalised: str) -> None:
    wire.add(responses.POST, GEMINI_URL, json=candidate(finishReason=raw))
    resp = provider().complete(req())
    assert resp.finish_reason == normalised and resp.raw_finish_reason == raw


def test_function_call_parts_mean_tool_calls(wire: responses.RequestsMock) -> None:
    parts = [{"functionCall": {"name": "f", "args": {}}}]
    wire.add(responses.POST, GEMINI_URL, json=candidate(content={"role": "model", "parts": parts}))
    resp = provider().complete(req())
    assert resp.finish_reason == "tool_calls" and resp.text == ""


def test_max_tokens_with_no_content_gives_empty_text(wire: responses.RequestsMock) -> None:
    body = {"candidates": [{"finishReason": "MAX_TOKENS", "index": 0}],
            "usageMetadata": {"promptTokenCount": 4, "thoughtsTokenCount": 100, "totalTokenCount": 104}}
    wire.add(responses.POST, GEMINI_URL, json=body)
    resp = provider().complete(req())
    assert (resp.text, resp.finish_reason, resp.completion_tokens) == ("", "length", 100)


def test_missing_usage_gives_none(wire: responses.RequestsMock) -> None:
    body = candidate()
    del body["usageMetadata"]
    wire.add(responses.POST, GEMINI_URL, json=body)
    resp = provider().complete(req())
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (None, None, None)


def test_blocked_prompt_is_content_blocked_and_not_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_BLOCKED_200)
    with pytest.raises(ContentBlockedError, match="PROHIBITED_CONTENT") as info:
        provider().complete(req(request_id="r9"))
    assert info.value.retryable is False and info.value.status == 200 and info.value.request_id == "r9"


@pytest.mark.parametrize("body", [
    {}, {"candidates": "x"}, {"candidates": [None]}, {"candidates": [{"content": {"parts": "x"}}]},
    {"candidates": [{"content": {"parts": [7]}}]},
])
def test_malformed_2xx_bodies_fail_cleanly(wire: responses.RequestsMock, body: dict[str, Any]) -> None:
    wire.add(responses.POST, GEMINI_URL, json=body)
    with pytest.raises(ProviderError, match="malformed response") as info:
        provider().complete(req())
    assert type(info.value) is ProviderError and info.value.retryable is False


# --- errors ---------------------------------------------------------------------------------------

def test_per_minute_429_is_retryable_with_retry_info_delay(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_429, status=429, headers=GEMINI_429_HEADERS)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is True and info.value.retry_after_s == 17.0


def test_per_day_quota_429_is_not_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_429_DAILY, status=429, headers=GEMINI_429_HEADERS)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is False


def test_429_without_details_is_retryable_without_a_hint(wire: responses.RequestsMock) -> None:
    body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                      "message": "Resource has been exhausted (e.g. check quota)."}}
    wire.add(responses.POST, GEMINI_URL, json=body, status=429)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is True and info.value.retry_after_s is None


def test_list_wrapped_error_body_is_read(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=[GEMINI_429], status=429)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retry_after_s == 17.0


def test_invalid_key_400_says_so_without_the_key(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, GEMINI_URL, json=GEMINI_400_BADKEY, status=400)
    with pytest.raises(ProviderError, match="API key is invalid") as info:
        provider().complete(req())
    assert type(info.value) is ProviderError and info.value.retryable is False and info.value.status == 400
    assert GEMINI_KEY not in str(info.value)


def test_unknown_model_404_names_the_model(wire: responses.RequestsMock) -> None:
    url = GEMINI_URL.replace("gemini-2.5-flash", "gemini-9")
    wire.add(responses.POST, url, status=404,
             json={"error": {"code": 404, "status": "NOT_FOUND", "message": "models/gemini-9 is not found"}})
    with pytest.raises(ProviderError, match="'gemini-9' not found") as info:
        provider().complete(req(model="gemini-9"))
    assert info.value.retryable is False


@pytest.mark.parametrize("status", [500, 503, 504])
def test_server_errors_are_retryable(wire: responses.RequestsMock, status: int) -> None:
    wire.add(responses.POST, GEMINI_URL, status=status,
             json={"error": {"code": status, "status": "UNAVAILABLE", "message": "The model is overloaded."}})
    with pytest.raises(ProviderUnavailableError, match="overloaded") as info:
        provider().complete(req())
    assert info.value.retryable is True


# --- capabilities and health ------------------------------------------------------------------------

def test_capabilities() -> None:
    caps = provider().capabilities()
    assert caps.supports_json_schema and caps.supports_json_mode and caps.supports_system_prompt
    assert caps.max_output_tokens_for("gemini-2.5-flash") == 65536
    assert caps.max_output_tokens_for("gemini-2.0-flash") == 8192


def test_health_check_lists_one_model_with_the_key_in_the_header(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, "https://generativelanguage.googleapis.com/v1beta/models",
             json={"models": [{"name": "models/gemini-2.5-flash"}]})
    assert "models/gemini-2.5-flash" in provider().health_check()
    call = wire.calls[0]
    assert call.request.url.endswith("/v1beta/models?pageSize=1")
    assert call.request.headers["x-goog-api-key"] == GEMINI_KEY


def test_health_check_raises_on_invalid_key(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, "https://generativelanguage.googleapis.com/v1beta/models",
             json=GEMINI_400_BADKEY, status=400)
    with pytest.raises(ProviderError, match="API key is invalid"):
        provider().health_check()


# Found by tests/test_fuzz_replies.py: odd shapes inside error details escaped as TypeError.
@pytest.mark.parametrize("status", [400, 429])
@pytest.mark.parametrize("detail", [
    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": 5},
    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": {"quotaId": "PerDay"}},
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": ["API_KEY_INVALID"]},
    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": {"why": 1}},
])
def test_error_details_of_unexpected_shape_still_give_typed_errors(
        wire: responses.RequestsMock, status: int, detail: dict[str, Any]) -> None:
    wire.add(responses.POST, GEMINI_URL, status=status, json={"error": {"code": status, "message": "nope",
                                                                       "details": [detail]}})
    with pytest.raises(ProviderError) as info:
        provider().complete(req())
    assert info.value.status == status
    assert isinstance(info.value, RateLimitedError) == (status == 429)
    assert "nope" in str(info.value)
