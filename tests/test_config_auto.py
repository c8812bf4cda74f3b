"""QPS/RPM/TPM=auto in ProviderConfig and the environment (issue 12): accepted, shown, and refused
with the field or variable named when neither a number nor "auto"."""

from __future__ import annotations

from pathlib import Path

import pytest
import responses

from llm_executor import ExecutorConfig, ProviderConfig
from llm_executor.config import known
from llm_executor.errors import ConfigError, RateLimitedError
from llm_executor.providers.base import parse_rate_limit_info
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.types import LLMRequest
from tests.providers.provider_fixtures import OPENAI_OK, OPENAI_URL


def test_provider_config_accepts_auto_and_says_which_limits_are_learned() -> None:
    cfg = ProviderConfig(qps="auto", rpm=100, tpm="auto")
    assert cfg.auto_rates == ("qps", "tpm")
    assert cfg.describe()["qps"] == "auto" and cfg.describe()["tpm"] == "auto"
    assert known(cfg.qps) is None and known(cfg.rpm) == 100


@pytest.mark.parametrize("name", ["qps", "rpm", "tpm"])
def test_provider_config_refuses_other_words_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError, match=rf'^{name}=.*"auto"') as info:
        ProviderConfig(**{name: "fast"})  # type: ignore[arg-type]
    assert info.value.field == name


@pytest.mark.parametrize("suffix", ["QPS", "RPM", "TPM"])
def test_environment_auto_in_any_case(suffix: str) -> None:
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai", f"LLM_EXECUTOR_OPENAI_{suffix}": " Auto "})
    assert getattr(cfg.provider("openai"), suffix.lower()) == "auto"


@pytest.mark.parametrize("suffix", ["QPS", "RPM", "TPM"])
def test_environment_refuses_a_word_naming_the_variable_and_auto(suffix: str) -> None:
    var = f"LLM_EXECUTOR_OPENAI_{suffix}"
    with pytest.raises(ConfigError, match=rf"^{var}='automatic'.*or auto"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai", var: "automatic"})


def test_rate_limit_headers_are_parsed_and_partial_ones_kept() -> None:
    info = parse_rate_limit_info({"x-ratelimit-limit-requests": "2220", "x-ratelimit-remaining-requests": "7",
                                  "x-ratelimit-reset-requests": "1m2.5s", "x-ratelimit-limit-tokens": "40000",
                                  "x-ratelimit-remaining-tokens": "junk"})
    assert info is not None
    assert (info.limit_requests, info.remaining_requests, info.reset_requests_s) == (2220, 7, 62.5)
    assert (info.limit_tokens, info.remaining_tokens) == (40000, None)
    assert parse_rate_limit_info({"retry-after": "1"}) is None
    forwarded = parse_rate_limit_info({"llm_provider-x-ratelimit-limit-requests": "60"})
    assert forwarded is not None and forwarded.limit_requests == 60


HEADERS = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
           "x-ratelimit-limit-tokens": "30000", "x-ratelimit-reset-requests": "120ms"}


@responses.activate
def test_openai_replies_and_429s_carry_the_reported_limits() -> None:
    responses.add(responses.POST, OPENAI_URL, json=OPENAI_OK, headers=HEADERS)
    responses.add(responses.POST, OPENAI_URL, status=429, headers={**HEADERS, "x-ratelimit-remaining-requests": "0"},
                  json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}})
    adapter = OpenAIProvider("openai", ProviderConfig(api_key="sk-test"))
    request = LLMRequest("openai", "gpt-4o-mini", "Hi")
    response = adapter.complete(request)
    assert response.rate_limit is not None and response.rate_limit.limit_requests == 500
    assert response.completed(provider="openai", request_id="r", latency_ms=1.0, queue_ms=0.0, attempts=1,
                              data=None).rate_limit == response.rate_limit
    with pytest.raises(RateLimitedError) as info:
        adapter.complete(request)
    assert info.value.rate_limit.remaining_requests == 0 and info.value.rate_limit.limit_tokens == 30000


def test_llm_executor_config_shows_auto(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    import json

    from llm_executor.cli import main

    monkeypatch.chdir(tmp_path)  # no .env of the working directory
    monkeypatch.setenv("LLM_EXECUTOR_PROVIDERS", "openai")
    monkeypatch.setenv("LLM_EXECUTOR_OPENAI_QPS", "auto")
    monkeypatch.setenv("LLM_EXECUTOR_OPENAI_TPM", "AUTO")
    assert main(["config", "--json"]) == 0
    openai = json.loads(capsys.readouterr().out)["providers"]["openai"]
    assert openai["qps"] == "auto" and openai["tpm"] == "auto"
