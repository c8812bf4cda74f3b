"""Configuration from the environment and from code: every invalid value names its variable."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

from llm_executor import ExecutorConfig, ProviderConfig
from llm_executor.config import (
    ENV_VARIABLES,
    PROVIDER_ENV_VARIABLES,
    _EnvReader,
    known_env_names,
    validate_provider_names,
)
from llm_executor.errors import ConfigError, ConfigWarning

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
    with pytest.raises(ConfigError,
                       match=r"^LLM_EXECUTOR_QUEUE_SIZE='abc' \(from environment\): expected an integer >= 0$"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_QUEUE_SIZE": "abc"})


def test_an_error_from_a_dotenv_value_names_the_file(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LLM_EXECUTOR_OPENAI_QPS=fast\nLLM_EXECUTOR_QUEUE_SIZE=abc\n")
    with pytest.raises(ConfigError, match=rf"^LLM_EXECUTOR_OPENAI_QPS='fast' \(from {re.escape(str(dotenv))}\)"):
        ExecutorConfig.from_env({}, dotenv_path=dotenv)
    # The same name set in the real environment wins, and the error says where that value came from.
    with pytest.raises(ConfigError, match=r"^LLM_EXECUTOR_QUEUE_SIZE='-2' \(from environment\)"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_OPENAI_QPS": "2", "LLM_EXECUTOR_QUEUE_SIZE": "-2"}, dotenv_path=dotenv)


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


# -- unknown LLM_EXECUTOR_* names ---------------------------------------------------------------------


def config_warnings(env: dict[str, str], **kw: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ExecutorConfig.from_env(env, **kw)  # type: ignore[arg-type]
    assert all(issubclass(w.category, ConfigWarning) for w in caught)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("LLM_EXECUTOR_OPENAI_MAX_PARALEL", "LLM_EXECUTOR_OPENAI_MAX_PARALLEL"),
     ("LLM_EXECUTOR_OPENIA_QPS", "LLM_EXECUTOR_OPENAI_QPS"),
     ("LLM_EXECUTOR_QUEUE_SIZ", "LLM_EXECUTOR_QUEUE_SIZE"),
     ("LLM_EXECUTOR_PROVIDER", "LLM_EXECUTOR_PROVIDERS"),
     ("LLM_EXECUTOR_BACKPRESURE", "LLM_EXECUTOR_BACKPRESSURE"),
     ("LLM_EXECUTOR_GEMINI_GLOBAL_MAX_PARALLELL", "LLM_EXECUTOR_GEMINI_GLOBAL_MAX_PARALLEL")],
)
def test_a_misspelt_variable_warns_with_the_closest_known_name(typo: str, meant: str) -> None:
    assert config_warnings({typo: "2"}) == [
        f"{typo} (from environment) is not a known variable and is ignored; did you mean {meant}?"]


def test_a_variable_of_a_provider_that_is_not_enabled_says_how_to_enable_it() -> None:
    notes = config_warnings({"LLM_EXECUTOR_PROVIDERS": "openai", "LLM_EXECUTOR_OLLAMA_QPS": "2",
                             "LLM_EXECUTOR_MINE_MODEL": "m"})
    assert notes == [
        "LLM_EXECUTOR_MINE_MODEL (from environment) is not a known variable and is ignored; provider 'mine' is "
        "not enabled: add it to LLM_EXECUTOR_PROVIDERS (now openai) to use this variable",
        "LLM_EXECUTOR_OLLAMA_QPS (from environment) is not a known variable and is ignored; provider 'ollama' "
        "is not enabled: add it to LLM_EXECUTOR_PROVIDERS (now openai) to use this variable",
    ]
    # Enabled, the same names are known and read.
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai,ollama,mine", "LLM_EXECUTOR_OLLAMA_QPS": "2",
                                   "LLM_EXECUTOR_MINE_MODEL": "m"})
    assert cfg.providers["ollama"].qps == 2.0 and cfg.providers["mine"].model == "m"


def test_an_unknown_name_with_nothing_close_still_warns() -> None:
    assert config_warnings({"LLM_EXECUTOR_XYZZY": "1"}) == [
        "LLM_EXECUTOR_XYZZY (from environment) is not a known variable and is ignored; no known variable is "
        "close (see the README's configuration table)"]


def test_an_unknown_name_in_dotenv_names_the_file(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LLM_EXECUTOR_QUEUE_SIZ=5\n")
    assert config_warnings({}, dotenv_path=dotenv) == [
        f"LLM_EXECUTOR_QUEUE_SIZ (from {dotenv}) is not a known variable and is ignored; "
        "did you mean LLM_EXECUTOR_QUEUE_SIZE?"]


def test_the_warning_points_at_the_caller_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llm_executor"):
        with pytest.warns(ConfigWarning, match="QUEUE_SIZ") as record:
            ExecutorConfig.from_env({"LLM_EXECUTOR_QUEUE_SIZ": "5"})
    assert record[0].filename == __file__
    lines = [r for r in caplog.records if "LLM_EXECUTOR_QUEUE_SIZ" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].name == "llm_executor.config"


def test_strict_turns_unknown_names_into_one_config_error(tmp_path: Path) -> None:
    env = {"LLM_EXECUTOR_STRICT": "1", "LLM_EXECUTOR_QUEUE_SIZ": "5", "LLM_EXECUTOR_OPENIA_QPS": "3"}
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.from_env(env)
    message = str(info.value)
    assert message.startswith("LLM_EXECUTOR_STRICT=1: ")
    assert "LLM_EXECUTOR_OPENIA_QPS (from environment)" in message
    assert "did you mean LLM_EXECUTOR_OPENAI_QPS?" in message
    assert "did you mean LLM_EXECUTOR_QUEUE_SIZE?" in message
    dotenv = tmp_path / ".env"
    dotenv.write_text("LLM_EXECUTOR_STRICT=true\n")
    with pytest.raises(ConfigError, match="LLM_EXECUTOR_QUEUE_SIZ"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_QUEUE_SIZ": "5"}, dotenv_path=dotenv)
    with pytest.raises(ConfigError, match=r"LLM_EXECUTOR_STRICT='sure' \(from environment\): expected true or false"):
        ExecutorConfig.from_env({"LLM_EXECUTOR_STRICT": "sure", "LLM_EXECUTOR_QUEUE_SIZ": "5"})
    assert ExecutorConfig.from_env({"LLM_EXECUTOR_STRICT": "1"}).queue_size == 100  # nothing unknown: fine


def test_every_variable_the_reader_reads_is_known_and_raises_no_warning() -> None:
    env = {name: "1" for name in known_env_names(["openai", "gemini", "ollama"])}
    env.update({"LLM_EXECUTOR_PROVIDERS": "openai,gemini,ollama", "LLM_EXECUTOR_BACKPRESSURE": "block",
                "LLM_EXECUTOR_RATE_BACKEND": "memory", "LLM_EXECUTOR_FALLBACKS": "openai",
                "LLM_EXECUTOR_BACKEND_FAILURE": "local", "LLM_EXECUTOR_LEASE_TTL": "2",
                "LLM_EXECUTOR_TEST_REDIS_URL": "redis://127.0.0.1:6379/0"})
    for name in ("OPENAI", "GEMINI", "OLLAMA"):
        env[f"LLM_EXECUTOR_{name}_BASE_URL"] = "http://127.0.0.1:1/v1"
        env[f"LLM_EXECUTOR_{name}_MODEL"] = "m"
        env[f"LLM_EXECUTOR_{name}_FALLBACK"] = "true"
        env[f"LLM_EXECUTOR_{name}_MAX_RESPONSE_BYTES"] = "65536"
    assert config_warnings(env) == []
    assert set(PROVIDER_ENV_VARIABLES) >= {"MAX_PARALLEL", "QPS", "RPM", "TPM", "TIMEOUT", "MAX_RETRIES",
                                           "BASE_URL", "MODEL", "GLOBAL_MAX_PARALLEL"}
    assert "LLM_EXECUTOR_QUEUE_SIZE" in ENV_VARIABLES


def test_the_readme_table_lists_every_variable() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, meaning in ENV_VARIABLES.items():
        assert meaning.startswith("tests:") or f"| {name} |" in readme, name
    for suffix in PROVIDER_ENV_VARIABLES:
        assert f"LLM_EXECUTOR_<NAME>_{suffix}" in readme or f"_{suffix} " in readme, suffix


def test_the_reader_refuses_to_read_a_variable_missing_from_the_table() -> None:
    """A variable added to the reader but not to ENV_VARIABLES fails every test that reads it."""
    with pytest.raises(RuntimeError, match="LLM_EXECUTOR_NEW_THING is read but not listed"):
        _EnvReader({}).int_("LLM_EXECUTOR_NEW_THING", 0)


# -- provider names: the check Executor() makes, without building anything ----------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"LLM_EXECUTOR_PROVIDERS": "openai,anthropic"},
      r"^LLM_EXECUTOR_PROVIDERS='openai,anthropic' \(from environment\): provider 'anthropic' is configured "
      r"but has no adapter \(built-in: gemini, openai, ollama\)"),
     ({"LLM_EXECUTOR_PROVIDERS": "openai", "LLM_EXECUTOR_FALLBACKS": "claude"},
      r"^LLM_EXECUTOR_FALLBACKS='claude' \(from environment\): unknown provider 'claude'; expected names of "
      r"enabled providers: openai$"),
     ({"LLM_EXECUTOR_PROVIDERS": "auto"}, r"'auto' is not a provider")],
)
def test_provider_names_are_validated_when_adapters_are_named(env: dict[str, str], expected: str) -> None:
    ExecutorConfig.from_env(env)  # without ``adapters`` the names are left to Executor()
    with pytest.raises(ConfigError, match=expected):
        ExecutorConfig.from_env(env, adapters=())


def test_custom_adapters_count_as_providers_for_names_and_fallbacks() -> None:
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai,mine", "LLM_EXECUTOR_FALLBACKS": "mine"},
                                  adapters=["mine"])
    assert list(cfg.providers) == ["openai", "mine"]
    validate_provider_names(ExecutorConfig(fallbacks=("extra",)), ["extra"])
    with pytest.raises(ConfigError, match="unknown provider 'extra'"):
        validate_provider_names(ExecutorConfig(fallbacks=("extra",)))
