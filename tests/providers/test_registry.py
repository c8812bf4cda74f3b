"""The registry builds each built-in adapter by name, and each satisfies the Provider protocol."""

from __future__ import annotations

import pytest

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.errors import ConfigError
from llm_executor.providers.base import HTTPProvider, Provider
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.providers.registry import builtin_names, create_builtin


@pytest.mark.parametrize(("name", "cls"), [("openai", OpenAIProvider), ("gemini", GeminiProvider),
                                           ("ollama", OllamaProvider)])
def test_create_builtin_builds_each_adapter(name: str, cls: type[HTTPProvider]) -> None:
    provider = create_builtin(name, ProviderConfig(max_parallel=3))
    assert type(provider) is cls and provider.name == name
    assert isinstance(provider, Provider)


def test_every_builtin_name_has_an_adapter() -> None:
    for name in builtin_names():
        create_builtin(name, ProviderConfig())


def test_adapters_build_from_an_empty_environment_without_keys() -> None:
    # The default provider list enables all three: construction must not demand keys.
    cfg = ExecutorConfig.from_env({})
    for name in cfg.providers:
        create_builtin(name, cfg.provider(name))


def test_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no adapter"):
        create_builtin("mistral", ProviderConfig())
