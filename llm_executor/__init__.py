"""llm_executor: one entry point for every LLM call an application makes.

``Executor.submit(LLMRequest)`` returns a ``concurrent.futures.Future`` at once; each provider
has its own lane (a bounded queue, MAX_PARALLEL workers and a rate limiter).
``default_executor()`` is one shared Executor per process, built from the environment.
"""

from __future__ import annotations

import logging

from .config import ExecutorConfig, ProviderConfig
from .default import default_executor
from .executor import Executor, ExecutorStats, ProviderStats
from .providers.protocol import Provider
from .types import Capabilities, LLMRequest, LLMResponse

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "Executor",
    "ExecutorConfig",
    "ExecutorStats",
    "LLMRequest",
    "LLMResponse",
    "Provider",
    "ProviderConfig",
    "ProviderStats",
    "__version__",
    "default_executor",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
