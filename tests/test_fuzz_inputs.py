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

# --- issue 11 item 8: odd values everywhere give a typed error naming the field ------------------

def _recursive_dict() -> dict[str, Any]:
    node: dict[str, Any] = {"type": "object"}
    node["properties"] = {"self": node}
    return node


def _deep(levels: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels):
        node["items"] = {}
        node = node["items"]
    return root


odd_text = st.one_of(
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.text(alphabet=st.sampled_from("\x00\r\n\t\x1b\x7f\u200b\u202e"), min_size=1, max_size=5),
    st.builds(lambda n: "x" * n, st.sampled_from([129, 257, 100_000, 2_000_000])),
)
odd_numbers = st.one_of(
    st.sampled_from([10**30, -(10**30), 10**5000, 2**63, float("nan"), float("inf"), -float("inf"), 1e308,
                     1e-308, -0.0, 0, -1])
)
odd_values = st.one_of(
    anything, odd_text, odd_numbers,
    st.recursive(st.none() | st.integers() | st.text(max_size=3),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=20),
    st.builds(_recursive_dict), st.builds(_deep, st.sampled_from([150, 5000])),
    st.just({1: "int key"}), st.just({("a",): "tuple key"}), st.just(b"bytes"), st.just({"a", "b"}),
)
REQUEST_FIELDS = [*FIELDS, "provider"]


@pytest.fixture(scope="module")
def shared_executor() -> Any:
    ex = Executor(ExecutorConfig(providers={"fake": ProviderConfig()}, queue_size=0), {"fake": FakeProvider()})
    yield ex
    ex.shutdown()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(REQUEST_FIELDS), value=odd_values)
def test_any_request_field_value_is_accepted_or_rejected_with_invalid_request_error(
        shared_executor: Executor, field: str, value: Any) -> None:
    # Huge ints, NaN/inf, wrong types, surrogates/NUL/control characters, huge strings, recursive and
    # deep containers (issue 11 item 8): each works or names its own field, briefly.
    kwargs: dict[str, Any] = {"provider": "fake", "model": "m", "prompt": "hello"}
    kwargs[field] = value
    try:
        future = shared_executor.submit(LLMRequest(**kwargs))
    except InvalidRequestError as exc:
        assert exc.field is not None and exc.field in str(exc)
        assert field == "provider" or exc.field == field, (field, exc.field, str(exc)[:200])
        assert len(str(exc)) < 1000, "the message must not quote a huge value"
        return
    except ConfigError as exc:  # an unknown provider name
        assert field == "provider", exc
        return
    try:
        response = future.result(10)
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




PROVIDER_CONFIG_FIELDS = ["max_parallel", "qps", "burst", "rpm", "tpm", "timeout", "connect_timeout", "max_retries",
                          "max_retry_wait_s", "backoff_max_s", "base_url", "model", "api_key", "global_max_parallel",
                          "repair_attempts", "fallback", "reasoning_models", "options", "max_response_bytes"]
EXECUTOR_CONFIG_FIELDS = ["queue_size", "backpressure", "block_timeout", "rate_backend", "namespace", "fallbacks",
                          "priority_aging_s", "backend_failure", "lease_ttl_s", "providers"]


@settings(max_examples=600, deadline=None)
@given(field=st.sampled_from(PROVIDER_CONFIG_FIELDS + EXECUTOR_CONFIG_FIELDS), value=odd_values)
def test_odd_config_values_are_accepted_or_raise_config_error_naming_the_field(field: str, value: Any) -> None:
    try:
        if field in EXECUTOR_CONFIG_FIELDS:
            cfg: object = ExecutorConfig(**{field: value})
        else:
            cfg = ProviderConfig(**{field: value})
    except ConfigError as exc:
        assert exc.field == field and str(exc).startswith(field), (field, str(exc)[:200])
        assert len(str(exc)) < 1000, "the message must not quote a huge value"
        return
    repr(cfg)  # whatever was accepted can be shown


@settings(max_examples=300, deadline=None)
@given(var=st.sampled_from([
    "LLM_EXECUTOR_OPENAI_QPS", "LLM_EXECUTOR_OPENAI_TIMEOUT", "LLM_EXECUTOR_OPENAI_CONNECT_TIMEOUT",
    "LLM_EXECUTOR_OPENAI_MAX_RETRY_WAIT", "LLM_EXECUTOR_OPENAI_BACKOFF_MAX", "LLM_EXECUTOR_OPENAI_MAX_PARALLEL",
    "LLM_EXECUTOR_OPENAI_MAX_RETRIES", "LLM_EXECUTOR_OPENAI_RPM", "LLM_EXECUTOR_OPENAI_TPM",
    "LLM_EXECUTOR_OPENAI_BURST", "LLM_EXECUTOR_OPENAI_GLOBAL_MAX_PARALLEL", "LLM_EXECUTOR_OPENAI_MAX_RESPONSE_BYTES",
    "LLM_EXECUTOR_OPENAI_REPAIR_ATTEMPTS", "LLM_EXECUTOR_QUEUE_SIZE", "LLM_EXECUTOR_BLOCK_TIMEOUT",
    "LLM_EXECUTOR_PRIORITY_AGING", "LLM_EXECUTOR_LEASE_TTL", "OPENAI_API_KEY"]),
    value=st.one_of(st.sampled_from(["1e-12", "1e308", "1e300", "nan", "inf", "-1", "0", "1" + "0" * 30,
                                     "9" * 5000, "0.0001", "sk-\u20ac", "sk-\u5bc6\u94a5"]),
                    st.floats().map(repr), st.integers().map(str)))
def test_odd_numeric_variables_parse_or_name_the_variable(var: str, value: str) -> None:
    try:
        ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai", var: value})
    except ConfigError as exc:
        assert str(exc).startswith(var), (var, str(exc)[:200])
        if var.endswith("API_KEY"):
            assert value not in str(exc)


BAD_SCHEMAS: dict[str, Any] = {
    "recursive": _recursive_dict(),
    "non-string key": {"type": "object", 1: "x"},
    "tuple key": {("a", "b"): {"type": "string"}},
    "5000 deep": _deep(5000),
    "5000 deep as a string": "[" * 5000 + "]" * 5000,
    "unresolvable $ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    "remote $ref": {"$ref": "https://example.com/schema.json"},
    "NaN": {"type": "number", "maximum": float("nan")},
    "NaN in a string": '{"type": "number", "maximum": NaN}',
    "Infinity": {"type": "number", "minimum": float("-inf")},
    "a set": {"enum": {1, 2}},
    "huge int": {"maximum": 10**5000},
}


@pytest.mark.parametrize("label", list(BAD_SCHEMAS))
def test_a_bad_json_schema_is_rejected_at_submit_and_never_reaches_the_provider(label: str) -> None:
    provider = FakeProvider()
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": provider}) as ex:
        with pytest.raises(InvalidRequestError) as info:
            ex.submit(LLMRequest("fake", "m", "hello", json_schema=BAD_SCHEMAS[label]))
    assert info.value.field == "json_schema" and "json_schema" in str(info.value)
    assert not provider.seen


def test_a_schema_with_local_refs_and_a_meta_schema_ref_is_accepted() -> None:
    schema = {"$defs": {"name": {"type": "string"}}, "type": "object",
              "properties": {"a": {"$ref": "#/$defs/name"}, "b": {"enum": [{"$ref": "#/not/a/ref"}]}},
              "required": ["a"]}
    provider = FakeProvider(reply=lambda r: '{"a": "x"}')
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": provider}) as ex:
        assert ex.run(LLMRequest("fake", "m", "hello", json_schema=schema), timeout=10).data == {"a": "x"}


def test_a_reply_nested_too_deeply_fails_its_request_with_schema_validation_error() -> None:
    provider = FakeProvider(reply=lambda r: "[" * 100_000 + "]" * 100_000 if r.json_schema else "plain")
    with Executor(ExecutorConfig(providers={"fake": ProviderConfig()}), {"fake": provider}) as ex:
        with pytest.raises(SchemaValidationError) as info:
            ex.run(LLMRequest("fake", "m", "hello", json_schema={"type": "array"}), timeout=10)
        assert "nested too deeply" in str(info.value)
        assert ex.run(LLMRequest("fake", "m", "hello"), timeout=10).text == "plain"


@pytest.mark.parametrize(("field", "value", "bound"), [
    ("qps", 1e-12, "0.001"), ("qps", 1e9, "1e+06"), ("max_retry_wait_s", 1e308, "604800"),
    ("timeout", 1e300, "604800"), ("max_parallel", 10**9, "10000"), ("tpm", 10**30, "1000000000000"),
])
def test_absurd_config_values_fail_naming_the_bound(field: str, value: Any, bound: str) -> None:
    # qps=1e-12 overflowed the limiter's clock on the second request ("timestamp out of range");
    # max_retry_wait_s=1e308 with a 1e300 s Retry-After raised OverflowError and broke the lane.
    with pytest.raises(ConfigError) as info:
        ProviderConfig(**{field: value})
    assert info.value.field == field and bound in str(info.value)


def test_the_largest_retry_wait_allowed_still_works_with_an_absurd_retry_after() -> None:
    from llm_executor.config import MAX_SECONDS
    from llm_executor.errors import RateLimitedError
    from llm_executor.testing import ScriptedProvider

    provider = ScriptedProvider([RateLimitedError("slow down", status=429, retry_after_s=1e300), "fine"], name="s")
    cfg = ExecutorConfig(providers={"s": ProviderConfig(max_retry_wait_s=MAX_SECONDS)})
    with Executor(cfg, {"s": provider}) as ex:
        with pytest.raises(RateLimitedError):
            ex.run(LLMRequest("s", "m", "one"), timeout=10)
        assert ex.run(LLMRequest("s", "m", "two"), timeout=10).text == "fine"
        assert set(ex.stats()["s"].failed_by_error) == {"RateLimitedError"}


def test_the_slowest_qps_allowed_serves_its_first_request() -> None:
    from llm_executor.config import MIN_QPS

    with Executor(ExecutorConfig(providers={"fake": ProviderConfig(qps=MIN_QPS)}), {"fake": FakeProvider()}) as ex:
        assert ex.run(LLMRequest("fake", "m", "hello"), timeout=10).text == "echo:hello"
        # The second would start ~1000 s later: it fails by its deadline, typed, without overflow.
        with pytest.raises(DeadlineExceededError):
            ex.run(LLMRequest("fake", "m", "again", timeout=0.2), timeout=10)
        ex.shutdown(wait=False, cancel_futures=True)
