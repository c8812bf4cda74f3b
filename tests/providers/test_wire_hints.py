"""Every wait hint the ecosystem sends, clamped; 404 on a route vs on a model; no doubled codes (issue 15)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import responses

from llm_executor.config import ProviderConfig
from llm_executor.errors import ProviderError, RateLimitedError
from llm_executor.providers.base import (
    MAX_RETRY_AFTER_S,
    parse_duration_s,
    parse_go_duration_s,
    parse_rate_limit_reset,
    parse_retry_after,
)
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.testing import Emulator, ProviderSim
from llm_executor.types import LLMRequest

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
URL = "http://litellm:4000/v1/chat/completions"


def openai(base_url: str = "http://litellm:4000") -> OpenAIProvider:
    return OpenAIProvider("openai", ProviderConfig(base_url=base_url, api_key="sk-test"))


def req(model: str = "gpt-4o-mini") -> LLMRequest:
    return LLMRequest(provider="openai", model=model, prompt="hi")


def failure(provider: Any, request: LLMRequest) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        provider.complete(request)
    return info.value


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "expected"), [
    ({"llm_provider-retry-after": "60"}, 60.0),                      # LiteLLM forwards the upstream's
    ({"llm_provider-retry-after-ms": "250"}, 0.25),
    ({"retry-after": "2", "llm_provider-retry-after": "60"}, 2.0),    # the proxy's own hint first
    ({"retry-after": "1e300"}, MAX_RETRY_AFTER_S),
    ({"retry-after": "1e400"}, MAX_RETRY_AFTER_S),                    # overflows to inf: still clamped
    ({"retry-after-ms": "1e300"}, MAX_RETRY_AFTER_S),
    ({"retry-after": "inf"}, MAX_RETRY_AFTER_S),
    ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_RETRY_AFTER_S),
])
def test_retry_after_reads_forwarded_hints_and_clamps(headers: dict[str, str], expected: float) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("20ms", 0.02), ("1s", 1.0), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("17", 17.0), ("0.5", 0.5),
    ("1e300", MAX_RETRY_AFTER_S), ("99999999h", MAX_RETRY_AFTER_S), ("soon", None), ("5x", None),
    ("-1", None), ("", None), (None, None),
])
def test_go_durations(text: object, expected: float | None) -> None:
    assert parse_go_duration_s(text) == expected


def test_protobuf_durations_are_clamped() -> None:
    assert parse_duration_s("99999999999999999999999s") == MAX_RETRY_AFTER_S
    assert parse_duration_s("17.295601376s") == pytest.approx(17.295601376)


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-reset-requests": "20s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "45ms", "x-ratelimit-remaining-tokens": "39970"}, 20.0),
    ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0",
      "x-ratelimit-reset-tokens": "6s", "x-ratelimit-remaining-tokens": "0"}, 6.0),   # needs both
    ({"x-ratelimit-reset-tokens": "1.5s"}, 1.5),                                      # no remaining header
    ({"llm_provider-x-ratelimit-reset-requests": "3s"}, 3.0),
    ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "10"}, None),
    ({}, None),
])
def test_rate_limit_reset_counts_exhausted_windows(headers: dict[str, str], expected: float | None) -> None:
    assert parse_rate_limit_reset(headers) == expected


# --- adapters --------------------------------------------------------------------------------------


@responses.activate
def test_litellm_429_wait_is_honoured() -> None:
    responses.add(responses.POST, URL, status=429, headers={"llm_provider-retry-after": "60"},
                  json={"error": {"message": "Rate limited", "type": "None", "param": None, "code": "429"}})
    err = failure(openai(), req())
    assert isinstance(err, RateLimitedError) and err.retryable and err.retry_after_s == 60.0
    # issue 15: "HTTP 429 (429)" repeated the status as the code.
    assert "(429)" not in str(err) and "HTTP 429: Rate limited" in str(err)


@responses.activate
def test_gateway_429_with_only_reset_headers_waits_for_the_reset() -> None:
    responses.add(responses.POST, URL, status=429, json={"error": {"message": "slow down"}},
                  headers={"x-ratelimit-reset-tokens": "1.5s", "x-ratelimit-remaining-tokens": "0"})
    assert failure(openai(), req()).retry_after_s == 1.5


@responses.activate
def test_reset_headers_are_not_a_hint_on_a_500() -> None:
    responses.add(responses.POST, URL, status=500, json={"error": {"message": "boom"}},
                  headers={"x-ratelimit-reset-requests": "30s", "x-ratelimit-remaining-requests": "0"})
    assert failure(openai(), req()).retry_after_s is None


@responses.activate
def test_huge_retry_after_is_clamped_on_the_error() -> None:
    responses.add(responses.POST, URL, status=429, headers={"retry-after": "1e300"}, json={"error": {}})
    assert failure(openai(), req()).retry_after_s == MAX_RETRY_AFTER_S


def test_404_on_a_route_and_on_a_model_are_told_apart_on_every_adapter() -> None:
    sims = {p: ProviderSim(models=("known",)) for p in ("openai", "gemini", "ollama")}
    with Emulator(sims) as emu:
        adapters: list[tuple[Any, str]] = [
            (OpenAIProvider("openai", ProviderConfig(base_url=emu.url("openai"))), "openai"),
            (GeminiProvider("gemini", ProviderConfig(base_url=emu.base_url)), "gemini"),
            (OllamaProvider("ollama", ProviderConfig(base_url=emu.base_url)), "ollama"),
        ]
        for adapter, name in adapters:
            model_error = failure(adapter, LLMRequest(provider=name, model="missing", prompt="hi"))
            assert model_error.status == 404 and "model 'missing'" in str(model_error)
            assert "no such endpoint" not in str(model_error)
        wrong = [
            OpenAIProvider("openai", ProviderConfig(base_url=emu.base_url + "/v2")),
            GeminiProvider("gemini", ProviderConfig(base_url=emu.base_url + "/v2")),
            OllamaProvider("ollama", ProviderConfig(base_url=emu.base_url + "/nope")),
        ]
        for adapter, (_, name) in zip(wrong, adapters, strict=True):
            route_error = failure(adapter, LLMRequest(provider=name, model="known", prompt="hi"))
            text = str(route_error)
            assert route_error.status == 404 and "no such endpoint" in text and "model 'known'" not in text
            assert f"LLM_EXECUTOR_{name.upper()}_BASE_URL" in text


def test_gemini_adapter_works_with_a_v1_base_url() -> None:
    # issue 15: a base ending in /v1 (python-genai 3.x's default version) was answered as OpenAI's 404.
    with Emulator() as emu:
        adapter = GeminiProvider("gemini", ProviderConfig(base_url=emu.base_url + "/v1"))
        reply = adapter.complete(LLMRequest(provider="gemini", model="gemini-2.5-flash", prompt="Hi Ada"))
        assert reply.text and emu.requests("gemini")[0].path == "/v1/models/gemini-2.5-flash:generateContent"


def test_gpt5_behind_a_compatible_server_is_not_rejected() -> None:
    with Emulator() as emu:
        adapter = OpenAIProvider("openai", ProviderConfig(base_url=emu.url("openai")))
        reply = adapter.complete(LLMRequest(provider="openai", model="gpt-5-mini", prompt="Hi Ada",
                                            max_output_tokens=200, temperature=0.3))
        assert reply.finish_reason == "stop"
