"""OpenAI adapter: request shape per option, parsing, errors, base URLs, reasoning models, strict schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import responses

from llm_executor.config import ProviderConfig
from llm_executor.errors import ProviderError, ProviderUnavailableError, RateLimitedError
from llm_executor.providers.openai import OpenAIProvider, is_strict_schema, join_url
from llm_executor.types import LLMRequest
from tests.providers.provider_fixtures import (
    OPENAI_400,
    OPENAI_429,
    OPENAI_429_HEADERS,
    OPENAI_OK,
    OPENAI_QUOTA_429,
    OPENAI_URL,
    sent_json,
)

STRICT = {"type": "object", "additionalProperties": False, "required": ["answer", "tags"],
          "properties": {"answer": {"type": "integer"},
                         "tags": {"type": "array", "items": {
                             "type": "object", "additionalProperties": False, "required": ["t"],
                             "properties": {"t": {"type": ["string", "null"]}}}}}}


def req(**kw: Any) -> LLMRequest:
    fields: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini", "prompt": "Hi"}
    fields.update(kw)
    return LLMRequest(**fields)


def provider(**kw: Any) -> OpenAIProvider:
    cfg: dict[str, Any] = {"api_key": "sk-test"}
    cfg.update(kw)
    return OpenAIProvider("openai", ProviderConfig(**cfg))


def ok_with(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(OPENAI_OK)
    choice = body["choices"][0]
    for key, value in changes.items():
        if key in ("content", "refusal"):
            choice["message"][key] = value
        elif key == "usage":
            if value is None:
                del body["usage"]
            else:
                body["usage"] = value
        else:
            choice[key] = value
    return body


# --- request shape ---------------------------------------------------------------------------------

def test_minimal_request_shape(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider().complete(req())
    call = wire.calls[0]
    assert call.request.url == OPENAI_URL
    assert call.request.headers["Authorization"] == "Bearer sk-test"
    assert "OpenAI-Organization" not in call.request.headers
    assert sent_json(wire) == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


def test_system_tokens_temperature_and_org_headers(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider(options={"organization": "org-1", "project": "proj-1"}).complete(
        req(system="Be brief", max_output_tokens=64, temperature=0.2))
    body = sent_json(wire)
    assert body["messages"] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    assert body["temperature"] == 0.2
    headers = wire.calls[0].request.headers
    assert headers["OpenAI-Organization"] == "org-1" and headers["OpenAI-Project"] == "proj-1"


@pytest.mark.parametrize("model", ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini"])
def test_reasoning_models_get_max_completion_tokens_and_no_temperature(wire: responses.RequestsMock,
                                                                       model: str) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider().complete(req(model=model, max_output_tokens=64, temperature=0.2))
    body = sent_json(wire)
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body and "temperature" not in body


@pytest.mark.parametrize("model", ["gpt-5", "openai/gpt-5-mini", "azure/o3-mini", "o4-mini-2025-04-16", "o1"])
def test_reasoning_models_are_told_by_name_behind_a_proxy(wire: responses.RequestsMock, model: str) -> None:
    # issue 15: behind LiteLLM a gpt-5 got max_tokens + temperature and was rejected with 400.
    wire.add(responses.POST, "http://litellm:4000/v1/chat/completions", json=OPENAI_OK)
    provider(base_url="http://litellm:4000").complete(req(model=model, max_output_tokens=8, temperature=0.5))
    body = sent_json(wire)
    assert body["max_completion_tokens"] == 8 and "max_tokens" not in body and "temperature" not in body


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4.1-mini", "llama3.2", "omni-moderation", "o1lama"])
def test_other_models_keep_max_tokens_and_temperature(wire: responses.RequestsMock, model: str) -> None:
    wire.add(responses.POST, "http://localhost:11434/v1/chat/completions", json=OPENAI_OK)
    provider(base_url="http://localhost:11434/v1").complete(req(model=model, max_output_tokens=8,
                                                                temperature=0.5))
    body = sent_json(wire)
    assert body["max_tokens"] == 8 and body["temperature"] == 0.5


def test_configured_reasoning_prefixes_win(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, "http://vllm:8000/v1/chat/completions", json=OPENAI_OK)
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider(base_url="http://vllm:8000/v1", reasoning_models=("deepseek-r",)).complete(
        req(model="deepseek-r1", max_output_tokens=8, temperature=0.5))
    assert sent_json(wire)["max_completion_tokens"] == 8 and "temperature" not in sent_json(wire)
    provider(reasoning_models=()).complete(req(model="o3", max_output_tokens=8))
    assert sent_json(wire)["max_tokens"] == 8


def test_strict_schema_is_sent_strict(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider().complete(req(json_schema=STRICT))
    assert sent_json(wire)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "result", "schema": STRICT, "strict": True}}


def test_loose_schema_is_sent_not_strict(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    provider().complete(req(json_schema=schema))
    assert sent_json(wire)["response_format"]["json_schema"]["strict"] is False


def test_json_mode_option_sends_json_object(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider(options={"json_mode": "json"}).complete(req(prompt="Answer in JSON", json_schema=STRICT))
    assert sent_json(wire)["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(("schema", "strict"), [
    (STRICT, True),
    ({"type": "object", "additionalProperties": False, "properties": {}, "required": []}, True),
    ({"type": "object"}, False),                                                   # no additionalProperties
    ({"type": "array", "items": {"type": "string"}}, False),                       # root not an object
    ({"type": "object", "additionalProperties": False, "required": ["a"],
      "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}, False),    # b not required
    ({"type": "object", "additionalProperties": False, "required": ["a"],
      "properties": {"a": {"type": "object", "properties": {"x": {"type": "string"}},
                           "required": ["x"]}}}, False),                            # nested lacks aP:false
    ({"type": "object", "additionalProperties": False, "required": ["a"],
      "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {}}]}}}, False),
    ({"type": "object", "additionalProperties": False, "required": ["a"],
      "properties": {"a": {"$ref": "#/$defs/A"}},
      "$defs": {"A": {"type": "object", "additionalProperties": False, "required": [],
                      "properties": {}}}}, True),
    ({"type": "object", "additionalProperties": False, "required": [], "properties": {},
      "allOf": [{"type": "object"}]}, False),                                       # keyword outside subset
])
def test_strict_schema_detection(schema: dict[str, Any], strict: bool) -> None:
    assert is_strict_schema(schema) is strict


@pytest.mark.parametrize(("base", "url"), [
    ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com/v1/", "https://api.openai.com/v1/chat/completions"),
    ("https://api.openai.com", "https://api.openai.com/v1/chat/completions"),
    ("http://localhost:11434/v1", "http://localhost:11434/v1/chat/completions"),
    ("http://litellm:4000", "http://litellm:4000/v1/chat/completions"),
    ("http://vllm:8000/v1/chat/completions", "http://vllm:8000/v1/chat/completions"),
    ("https://proxy.example.com/openai/v1", "https://proxy.example.com/openai/v1/chat/completions"),
    ("https://x.example.com/v1?api-version=2", "https://x.example.com/v1/chat/completions?api-version=2"),
])
def test_join_url_neither_doubles_nor_drops_v1(base: str, url: str) -> None:
    assert join_url(base, "/chat/completions") == url


# --- keys -----------------------------------------------------------------------------------------

def test_missing_key_for_api_openai_com_names_the_variable(wire: responses.RequestsMock) -> None:
    with pytest.raises(ProviderError, match="OPENAI_API_KEY") as info:
        OpenAIProvider("openai", ProviderConfig()).complete(req())
    assert info.value.retryable is False and len(wire.calls) == 0


def test_custom_base_url_needs_no_key(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, "http://vllm:8000/v1/chat/completions", json=OPENAI_OK)
    OpenAIProvider("openai", ProviderConfig(base_url="http://vllm:8000/v1")).complete(req())
    assert "Authorization" not in wire.calls[0].request.headers


# --- response parsing ---------------------------------------------------------------------------

def test_ok_response_is_parsed(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    resp = provider().complete(req())
    assert resp.text == '{"answer": 4}' and resp.provider == "openai" and resp.model == "gpt-4o-mini"
    assert (resp.finish_reason, resp.raw_finish_reason) == ("stop", "stop")
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (12, 6, 18)


@pytest.mark.parametrize(("raw", "normalised"), [
    ("stop", "stop"), ("length", "length"), ("content_filter", "content_filter"),
    ("tool_calls", "tool_calls"), ("function_call", "tool_calls"), (None, "other"), ("brand_new", "other"),
])
def test_finish_reasons_are_normalised(wire: responses.RequestsMock, raw: str | None,
                                      normalised: str) -> None:
    wire.add(responses.POST, OPENAI_URL, json=ok_with(finish_reason=raw))
    resp = provider().complete(req())
    assert resp.finish_reason == normalised and resp.raw_finish_reason == raw


def test_refusal_is_content_filter(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=ok_with(content=None, refusal="I can't help with that."))
    resp = provider().complete(req())
    assert resp.finish_reason == "content_filter" and resp.text == ""


def test_reasoning_budget_spent_gives_empty_text_and_length(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=ok_with(content="", finish_reason="length"))
    resp = provider().complete(req(model="o3"))
    assert resp.text == "" and resp.finish_reason == "length"


@pytest.mark.parametrize("usage", [None, {}, {"prompt_tokens": 3}, {"total_tokens": "many"}])
def test_missing_or_partial_usage_gives_none(wire: responses.RequestsMock, usage: Any) -> None:
    wire.add(responses.POST, OPENAI_URL, json=ok_with(usage=usage))
    resp = provider().complete(req())
    assert resp.usage_tokens is None and resp.completion_tokens is None


def test_model_falls_back_to_the_requested_one(wire: responses.RequestsMock) -> None:
    body = copy.deepcopy(OPENAI_OK)
    del body["model"]
    wire.add(responses.POST, OPENAI_URL, json=body)
    assert provider().complete(req(model="gpt-4.1")).model == "gpt-4.1"


@pytest.mark.parametrize("body", [
    {}, {"choices": []}, {"choices": "x"}, {"choices": [None]}, {"choices": [{"message": "hi"}]},
    {"choices": [{"message": {"content": 5}}]},
])
def test_malformed_2xx_bodies_fail_cleanly(wire: responses.RequestsMock, body: dict[str, Any]) -> None:
    wire.add(responses.POST, OPENAI_URL, json=body)
    with pytest.raises(ProviderError, match="malformed response") as info:
        provider().complete(req())
    assert info.value.retryable is False and info.value.__context__ is None


# --- errors ---------------------------------------------------------------------------------------

def test_429_is_retryable_and_honours_retry_after_ms(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_429, status=429, headers=OPENAI_429_HEADERS)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req(request_id="r1"))
    err = info.value
    assert err.retryable is True and err.retry_after_s == 20.0 and err.status == 429
    assert err.request_id == "r1" and err.provider == "openai"
    assert "rate_limit_exceeded" in str(err) and "req_test_1" in str(err)


def test_insufficient_quota_429_is_not_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_QUOTA_429, status=429)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is False and "insufficient_quota" in str(info.value)


def test_unsupported_parameter_400_is_clear_and_not_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_400, status=400)
    with pytest.raises(ProviderError) as info:
        provider().complete(req())
    assert type(info.value) is ProviderError and info.value.retryable is False
    assert "unsupported_parameter" in str(info.value) and "max_completion_tokens" in str(info.value)


def test_409_is_retryable_for_openai(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json={"error": {"message": "lock timeout"}}, status=409)
    with pytest.raises(ProviderUnavailableError) as info:
        provider().complete(req())
    assert info.value.retryable is True


def test_lm_studio_string_error_is_shown(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, "http://localhost:1234/v1/chat/completions", status=400,
             json={"error": "'response_format.type' must be 'json_schema' or 'text'"})
    with pytest.raises(ProviderError, match="must be 'json_schema' or 'text'"):
        provider(base_url="http://localhost:1234/v1").complete(req())


# --- capabilities and health ------------------------------------------------------------------------

def test_capabilities_know_openai_models() -> None:
    caps = provider().capabilities()
    assert caps.supports_json_schema and caps.supports_json_mode and caps.supports_system_prompt
    assert caps.max_output_tokens_for("gpt-4o-mini") == 16384
    assert caps.max_output_tokens_for("unknown-model") is None
    assert "gpt-4o-mini" in caps.models


def test_capabilities_of_a_compatible_server_list_only_the_default_model() -> None:
    caps = provider(base_url="http://vllm:8000/v1", model="qwen").capabilities()
    assert caps.models == ("qwen",) and caps.max_output_tokens_for("gpt-4o") is None


def test_health_check_lists_models(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, "https://api.openai.com/v1/models",
             json={"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})
    assert "1 models" in provider().health_check()
    assert wire.calls[0].request.headers["Authorization"] == "Bearer sk-test"


def test_health_check_raises_on_bad_key(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, "https://api.openai.com/v1/models", status=401,
             json={"error": {"message": "Incorrect API key provided: sk-test.", "code": "invalid_api_key"}})
    with pytest.raises(ProviderError, match="invalid_api_key") as info:
        provider().health_check()
    assert info.value.retryable is False and "sk-test" not in str(info.value)


@pytest.mark.parametrize(("status", "header", "retryable"), [
    (500, "false", False), (400, "true", True), (429, "false", False), (503, "TRUE", True),
])
def test_x_should_retry_takes_precedence_over_the_status(wire: responses.RequestsMock, status: int,
                                                         header: str, retryable: bool) -> None:
    wire.add(responses.POST, OPENAI_URL, json={"error": {"message": "m"}}, status=status,
             headers={"x-should-retry": header})
    with pytest.raises(ProviderError) as info:
        provider().complete(req())
    assert info.value.retryable is retryable


def test_x_should_retry_true_does_not_revive_an_exhausted_quota(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_QUOTA_429, status=429,
             headers={"x-should-retry": "true"})
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is False
