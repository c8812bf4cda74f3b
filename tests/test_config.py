"""Configuration from the environment and from code: every invalid value names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_executor import ExecutorConfig, ProviderConfig
from llm_executor.errors import ConfigError

SECRET = "sk-SENTINEL-config-0123456789"


def test_defaults_match_the_design_table() -> None:
    cfg = ExecutorConfig.from_env({})
    assert list(cfg.providers) == ["gemini", "openai", "ollama"]
    p = cfg.providers["openai"]
    assert (p.max_parallel, p.qps, p.rpm, p.tpm, p.timeout, p.max_retries) == (4, None, None, None, 60.0, 3)
    assert (cfg.queue_size, cfg.backpressure, cfg.block_timeout) == (100, "fail_fast", None)
    assert (cfg.rate_backend, cfg.namespace, cfg.fallbacks) == ("memory", "llm_executor", ())


def test_every_variable_of_the_table_is_read() -> None:
    env = {
        "LLM_EXECUTOR_PROVIDERS": "openai, ollama",
        "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": "2",
        "LLM_EXECUTOR_OPENAI_QPS": "5.5",
        "LLM_EXECUTOR_OPENAI_RPM": "300",
        "LLM_EXECUTOR_OPENAI_TPM": "90000",
        "LLM_EXECUTOR_OPENAI_TIMEOUT": "12.5",
        "LLM_EXECUTOR_OPENAI_MAX_RETRIES": "0",
        "LLM_EXECUTOR_OPENAI_BASE_URL": "http://127.0.0.1:8000/v1",
        "LLM_EXECUTOR_OPENAI_MODEL": "gpt-4o-mini",
        "LLM_EXECUTOR_OPENAI_GLOBAL_MAX_PARALLEL": "8",
        "LLM_EXECUTOR_QUEUE_SIZE": "7",
        "LLM_EXECUTOR_BACKPRESSURE": "block",
        "LLM_EXECUTOR_BLOCK_TIMEOUT": "2.5",
        "LLM_EXECUTOR_RATE_BACKEND": "redis://127.0.0.1:6379/0",
        "LLM_EXECUTOR_NAMESPACE": "team-a",
        "LLM_EXECUTOR_FALLBACKS": "openai,ollama",
        "OPENAI_API_KEY": SECRET,
        "OLLAMA_HOST": "0.0.0.0:11434",
    }
    cfg = ExecutorConfig.from_env(env)
    assert list(cfg.providers) == ["openai", "ollama"]
    p = cfg.providers["openai"]
    assert (p.max_parallel, p.qps, p.rpm, p.tpm, p.timeout, p.max_retries) == (2, 5.5, 300, 90000, 12.5, 0)
    assert (p.base_url, p.model, p.global_max_parallel, p.api_key) == (
        "http://127.0.0.1:8000/v1", "gpt-4o-mini", 8, SECRET)
    assert cfg.providers["ollama"].base_url == "0.0.0.0:11434"
    assert (cfg.queue_size, cfg.backpressure, cfg.block_timeout) == (7, "block", 2.5)
    assert (cfg.rate_backend, cfg.namespace, cfg.fallbacks) == ("redis://127.0.0.1:6379/0", "team-a",
                                                                ("openai", "ollama"))


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("LLM_EXECUTOR_QUEUE_SIZE", "abc", "expected an integer >= 0"),
        ("LLM_EXECUTOR_QUEUE_SIZE", "-1", "expected an integer >= 0"),
        ("LLM_EXECUTOR_OPENAI_QPS", "fast", "positive number"),
        ("LLM_EXECUTOR_OPENAI_QPS", "0", "positive number"),
        ("LLM_EXECUTOR_OPENAI_QPS", "nan", "positive number"),
        ("LLM_EXECUTOR_OPENAI_MAX_PARALLEL", "0", "integer >= 1"),
        ("LLM_EXECUTOR_OPENAI_RPM", "1.5", "integer >= 1"),
        ("LLM_EXECUTOR_OPENAI_TPM", "-3", "integer >= 1"),
        ("LLM_EXECUTOR_OPENAI_TIMEOUT", "-1", "positive number of seconds"),
        ("LLM_EXECUTOR_OPENAI_MAX_RETRIES", "x", "integer >= 0"),
        ("LLM_EXECUTOR_BACKPRESSURE", "drop", "'fail_fast' or 'block'"),
        ("LLM_EXECUTOR_BLOCK_TIMEOUT", "soon", "seconds"),
        ("LLM_EXECUTOR_RATE_BACKEND", "mongodb://x", "'memory'"),
        ("LLM_EXECUTOR_PROVIDERS", "open ai", "provider names"),
        ("LLM_EXECUTOR_NAMESPACE", "a b", "characters"),
        ("LLM_EXECUTOR_OPENAI_FALLBACK", "maybe", "true or false"),
    ],
)
def test_invalid_value_names_variable_value_and_expectation(var: str, value: str, expected: str) -> None:
    env = {"LLM_EXECUTOR_PROVIDERS": "openai", var: value}
    if var == "LLM_EXECUTOR_PROVIDERS":
        env = {var: value}
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.from_env(env)
    message = str(info.value)
    assert var in message and repr(value) in message and expected in message
    assert isinstance(info.value, ValueError)


def test_exact_message_for_queue_size() -> None:
    with pytest.raises(ConfigError, match=r"^LLM_EXECUTOR_QUEUE_SIZE='abc': expected an integer >= 0$"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_QUEUE_SIZE": "abc"})


def test_dotenv_file_is_read_and_real_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LLM_EXECUTOR_QUEUE_SIZE=11\nLLM_EXECUTOR_BACKPRESSURE=block\nOPENAI_API_KEY=from-file\n")
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_QUEUE_SIZE": "22"}, dotenv_path=dotenv)
    assert cfg.queue_size == 22 and cfg.backpressure == "block"
    assert cfg.providers["openai"].api_key == "from-file"


def test_dotenv_found_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("LLM_EXECUTOR_QUEUE_SIZE=13\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLM_EXECUTOR_QUEUE_SIZE", raising=False)
    assert ExecutorConfig.from_env().queue_size == 13


def test_gemini_key_from_either_variable() -> None:
    assert ExecutorConfig.from_env({"GOOGLE_API_KEY": "g"}).providers["gemini"].api_key == "g"
    both = ExecutorConfig.from_env({"GOOGLE_API_KEY": "g", "GEMINI_API_KEY": "m"})
    assert both.providers["gemini"].api_key == "m"


def test_keys_never_in_repr_or_describe() -> None:
    cfg = ExecutorConfig.from_env({"OPENAI_API_KEY": SECRET, "GEMINI_API_KEY": SECRET,
                                   "LLM_EXECUTOR_RATE_BACKEND": "redis://:hunter2@127.0.0.1:6379/0"})
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.describe())
    assert "hunter2" not in str(cfg.describe())
    assert cfg.describe()["providers"]["openai"]["api_key"] == "***"


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"max_parallel": 0}, "max_parallel"), ({"qps": -1.0}, "qps"), ({"timeout": 0}, "timeout"),
     ({"max_retries": -1}, "max_retries"), ({"rpm": 0}, "rpm")],
)
def test_provider_config_validates_fields(kw: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ProviderConfig(**kw)  # type: ignore[arg-type]


def test_executor_config_validates_fields() -> None:
    with pytest.raises(ConfigError, match="backpressure"):
        ExecutorConfig(backpressure="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="queue_size"):
        ExecutorConfig(queue_size=-1)
    with pytest.raises(ConfigError, match="providers"):
        ExecutorConfig(providers={"Bad Name": ProviderConfig()})


@pytest.mark.parametrize(("var", "value"), [("OPENAI_BASE_URL", "http://a b"), ("OLLAMA_HOST", "a b"),
                                            ("LLM_EXECUTOR_OPENAI_BASE_URL", "x y")])
def test_bad_base_url_names_the_variable_it_came_from(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}="):
        ExecutorConfig.from_env({var: value})
