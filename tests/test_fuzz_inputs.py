"""Fuzzing (hypothesis): request fields and configuration values give only typed errors with clear messages."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidRequestError,
    LLMExecutorError,
    SchemaValidationError,
)
from tests.fakes import FakeProvider

anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)

FIELDS = ["prompt", "system", "max_output_tokens", "temperature", "json_schema", "request_id", "priority",
          "timeout", "metadata", "model"]

@pytest.fixture(scope="module")
def shared_executor() -> Any:
    ex = Executor(ExecutorConfig(providers={"fake": ProviderConfig()}, queue_size=0), {"fake": FakeProvider()})
    yield ex
    ex.shutdown()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=anything)
def test_any_request_field_value_is_accepted_or_rejected_with_invalid_request_error(
        shared_executor: Executor, field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"provider": "fake", "model": "m", "prompt": "hello"}
    kwargs[field] = value
    ex = shared_executor
    try:
        future = ex.submit(LLMRequest(**kwargs))
    except InvalidRequestError as exc:
        assert exc.field is not None and exc.field in str(exc)
        return
    try:
        response = future.result(5)
    except (DeadlineExceededError, SchemaValidationError):
        return  # a tiny timeout or a schema the echo cannot satisfy: typed failures of that one request
    assert response.text.startswith("echo:")


VARIABLES = ["LLM_EXECUTOR_QUEUE_SIZE", "LLM_EXECUTOR_BACKPRESSURE", "LLM_EXECUTOR_BLOCK_TIMEOUT",
             "LLM_EXECUTOR_OPENAI_QPS", "LLM_EXECUTOR_OPENAI_RPM", "LLM_EXECUTOR_OPENAI_TPM",
             "LLM_EXECUTOR_OPENAI_MAX_PARALLEL", "LLM_EXECUTOR_OPENAI_TIMEOUT", "LLM_EXECUTOR_OPENAI_MAX_RETRIES",
             "LLM_EXECUTOR_PROVIDERS", "LLM_EXECUTOR_RATE_BACKEND", "LLM_EXECUTOR_NAMESPACE",
             "LLM_EXECUTOR_FALLBACKS", "LLM_EXECUTOR_OPENAI_FALLBACK", "LLM_EXECUTOR_PRIORITY_AGING",
             "LLM_EXECUTOR_OPENAI_BASE_URL"]


@settings(max_examples=400, deadline=None)
@given(var=st.sampled_from(VARIABLES), value=st.text(max_size=30))
def test_any_configuration_value_parses_or_names_the_variable(var: str, value: str) -> None:
    try:
        ExecutorConfig.from_env({var: value})
    except ConfigError as exc:
        assert var in str(exc)
    except LLMExecutorError as exc:  # pragma: no cover - would be a wrong error class
        raise AssertionError(f"{var}={value!r} raised {type(exc).__name__}, expected ConfigError") from exc
