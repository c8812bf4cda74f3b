"""Ollama adapter: OLLAMA_HOST forms, stream false, format and options, old servers, errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import responses

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.errors import ConfigError, ProviderError, ProviderUnavailableError, RateLimitedError
from llm_executor.providers.ollama import OllamaProvider, parse_ollama_host
from llm_executor.types import LLMRequest
from tests.providers.provider_fixtures import (
    OLLAMA_404,
    OLLAMA_429,
    OLLAMA_503,
    OLLAMA_OK,
    OLLAMA_OK_OLD,
    OLLAMA_URL,
    sent_json,
)


def req(**kw: Any) -> LLMRequest:
    fields: dict[str, Any] = {"provider": "ollama", "model": "llama3.2", "prompt": "Hi"}
    fields.update(kw)
    return LLMRequest(**fields)


def provider(**kw: Any) -> OllamaProvider:
    return OllamaProvider("ollama", ProviderConfig(**kw))


@pytest.mark.parametrize(("raw", "base"), [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
    ("example.com", "http://example.com:11434"),
    (":56789", "http://127.0.0.1:56789"),
    ("example.com:56789", "http://example.com:56789"),
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:8443", "https://example.com:8443"),
    ("example.com:56789/path", "http://example.com:56789/path"),
    ("http://example.com/path/", "http://example.com:80/path"),
    ("[::1]:56789", "http://[::1]:56789"),
    ("[::1]", "http://[::1]:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("0.0.0.0:8080", "http://127.0.0.1:8080"),
    ("http://0.0.0.0:11434", "http://127.0.0.1:11434"),
    ("  example.com  ", "http://example.com:11434"),
])
def test_ollama_host_forms(raw: str | None, base: str) -> None:
    assert parse_ollama_host(raw) == base


@pytest.mark.parametrize("raw", ["example.com:port", "ftp://example.com"])
def test_bad_ollama_host_is_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="OLLAMA_HOST"):
        provider(base_url=raw)


def test_ollama_host_from_env_reaches_the_url(wire: responses.RequestsMock) -> None:
    cfg = ExecutorConfig.from_env({"OLLAMA_HOST": "0.0.0.0:5000", "LLM_EXECUTOR_PROVIDERS": "ollama"})
    wire.add(responses.POST, "http://127.0.0.1:5000/api/chat", json=OLLAMA_OK)
    OllamaProvider("ollama", cfg.provider("ollama")).complete(req())
    assert len(wire.calls) == 1


def test_request_shape_streams_off_and_has_no_auth_by_default(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK)
    provider().complete(req())
    assert sent_json(wire) == {"model": "llama3.2", "stream": False,
                               "messages": [{"role": "user", "content": "Hi"}]}
    assert "Authorization" not in wire.calls[0].request.headers


def test_request_shape_with_every_option(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK)
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    provider(api_key="ollama-key", options={"keep_alive": "5m"}).complete(
        req(system="Be brief", max_output_tokens=256, temperature=0.2, json_schema=schema))
    body = sent_json(wire)
    assert body["messages"][0] == {"role": "system", "content": "Be brief"}
    assert body["format"] == schema and body["stream"] is False
    assert body["options"] == {"num_predict": 256, "temperature": 0.2}
    assert body["keep_alive"] == "5m"
    assert wire.calls[0].request.headers["Authorization"] == "Bearer ollama-key"


def test_json_mode_option_sends_format_json(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK)
    provider(options={"json_mode": "json"}).complete(req(json_schema={"type": "object"}))
    assert sent_json(wire)["format"] == "json"


def test_ok_response_is_parsed(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK)
    resp = provider().complete(req())
    assert resp.text == '{"answer": 4}' and resp.model == "llama3.2" and resp.provider == "ollama"
    assert (resp.finish_reason, resp.raw_finish_reason) == ("stop", "stop")
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (26, 7, 33)


def test_old_server_without_done_reason_or_counts(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK_OLD)
    resp = provider().complete(req())
    assert resp.text == "hi" and resp.finish_reason == "other" and resp.raw_finish_reason is None
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (None, None, None)


@pytest.mark.parametrize(("raw", "normalised"), [("stop", "stop"), ("length", "length"), ("load", "other"),
                                                 ("unload", "other"), ("new", "other")])
def test_done_reasons_are_normalised(wire: responses.RequestsMock, raw: str, normalised: str) -> None:
    body = copy.deepcopy(OLLAMA_OK)
    body["done_reason"] = raw
    wire.add(responses.POST, OLLAMA_URL, json=body)
    assert provider().complete(req()).finish_reason == normalised


def test_tool_calls_on_stop(wire: responses.RequestsMock) -> None:
    body = copy.deepcopy(OLLAMA_OK)
    body["message"]["tool_calls"] = [{"function": {"name": "f", "arguments": {}}}]
    wire.add(responses.POST, OLLAMA_URL, json=body)
    assert provider().complete(req()).finish_reason == "tool_calls"


def test_cached_prompt_without_prompt_count(wire: responses.RequestsMock) -> None:
    body = copy.deepcopy(OLLAMA_OK)
    del body["prompt_eval_count"]
    wire.add(responses.POST, OLLAMA_URL, json=body)
    resp = provider().complete(req())
    assert (resp.prompt_tokens, resp.completion_tokens, resp.usage_tokens) == (None, 7, 7)


@pytest.mark.parametrize("body", [{}, {"message": "hi"}, {"message": None}])
def test_malformed_2xx_bodies_fail_cleanly(wire: responses.RequestsMock, body: dict[str, Any]) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=body)
    with pytest.raises(ProviderError, match="malformed response") as info:
        provider().complete(req())
    assert info.value.retryable is False


def test_model_not_pulled_suggests_ollama_pull(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_404, status=404)
    with pytest.raises(ProviderError, match="`ollama pull llama9`") as info:
        provider().complete(req(model="llama9"))
    assert type(info.value) is ProviderError and info.value.retryable is False and info.value.status == 404


def test_busy_503_is_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_503, status=503)
    with pytest.raises(ProviderUnavailableError, match="server busy") as info:
        provider().complete(req())
    assert info.value.retryable is True and info.value.retry_after_s is None


def test_429_is_retryable_without_a_hint(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_429, status=429)
    with pytest.raises(RateLimitedError) as info:
        provider().complete(req())
    assert info.value.retryable is True and info.value.retry_after_s is None


def test_server_down_is_retryable_unavailable(wire: responses.RequestsMock) -> None:
    with pytest.raises(ProviderUnavailableError, match=r"http://127.0.0.1:11434"):
        provider().complete(req())


def test_capabilities_have_no_output_cap() -> None:
    caps = provider(model="llama3.2").capabilities()
    assert caps.max_output_tokens is None and caps.models == ("llama3.2",)
    assert caps.supports_json_schema and caps.supports_system_prompt


def test_health_check_reports_the_version(wire: responses.RequestsMock) -> None:
    wire.add(responses.GET, "http://127.0.0.1:11434/api/version", json={"version": "0.6.2"})
    assert "0.6.2" in provider().health_check()
