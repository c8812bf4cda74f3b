"""The Provider protocol: the executor's only view of a provider.

Any object with ``name``, ``capabilities()`` and ``complete(request)`` is a provider. The
executor hands ``complete`` a request whose ``timeout`` is the time left before the request's
deadline (or None), whose ``model`` may be "" (the adapter's configured default) and whose
``json_schema`` is a dict. Kept apart from ``base`` (the HTTP adapters) so that importing
llm_executor does not import ``requests`` until a built-in adapter is built.
Imports: ``types`` only.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..types import Capabilities, LLMRequest, LLMResponse

__all__ = ["Provider"]


@runtime_checkable
class Provider(Protocol):
    """A language-model backend.

    ``complete`` raises ``llm_executor.errors.ProviderError`` subclasses for failures; their
    ``retryable`` and ``retry_after_s`` drive the executor's retries. Any other exception
    fails the request without a retry.
    """

    name: str

    def capabilities(self) -> Capabilities:
        """What the provider can do (output-token cap, JSON modes, known models)."""
        ...

    def complete(self, request: LLMRequest) -> LLMResponse:
        """Run one attempt of ``request`` and return the response."""
        ...
