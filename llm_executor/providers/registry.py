"""Registry of built-in adapters by name.

``create_builtin(name, config)`` builds the adapter for a configured built-in provider.
Imports: ``config``, ``errors``, the adapter modules (lazily).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import BUILTIN_PROVIDER_NAMES, ProviderConfig
from ..errors import ConfigError
from .protocol import Provider

__all__ = ["builtin_names", "create_builtin"]

Factory = Callable[[str, ProviderConfig], Provider]


def _factories() -> dict[str, Factory]:
    # Imported lazily: importing the registry must not pull in requests for users of custom providers only.
    from .gemini import GeminiProvider
    from .ollama import OllamaProvider
    from .openai import OpenAIProvider

    return {"gemini": GeminiProvider, "ollama": OllamaProvider, "openai": OpenAIProvider}


def builtin_names() -> tuple[str, ...]:
    """The names of the built-in adapters."""
    return BUILTIN_PROVIDER_NAMES


def create_builtin(name: str, config: ProviderConfig) -> Provider:
    """Build the built-in adapter ``name`` for ``config``.

    Raises:
        ConfigError: ``name`` is not a built-in provider.
    """
    factory = _factories().get(name)
    if factory is None:
        raise ConfigError(
            f"provider {name!r} is configured but has no adapter (built-in: {', '.join(BUILTIN_PROVIDER_NAMES)}): "
            f"pass one with Executor(cfg, providers={{{name!r}: obj}}) or remove it from LLM_EXECUTOR_PROVIDERS"
        )
    return factory(name, config)
