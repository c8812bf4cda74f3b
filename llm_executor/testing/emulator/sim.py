"""``ProviderSim``: how the emulator behaves for one provider (limits, latency, faults, keys, models).

A frozen value: the emulator reads it per request, and ``Emulator.set_limits`` swaps in a new one
at run time. Imports: the stdlib only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULT_MODELS", "FAULT_KINDS", "MAX_HANG_S", "PROVIDERS", "ProviderSim", "sends_rate_limit_headers"]

PROVIDERS: tuple[str, ...] = ("openai", "gemini", "ollama")
FAULT_KINDS: tuple[str, ...] = (
    "rate_limit",
    "server_error",
    "unavailable",
    "slow",
    "hang",
    "malformed",
    "truncated",
    "blocked",
)
_DEFAULT_FAULTS: Mapping[str, float] = {
    "rate_limit": 1.0,
    "server_error": 1.0,
    "unavailable": 1.0,
    "slow": 1.0,
    "malformed": 1.0,
    "truncated": 1.0,
}
DEFAULT_MODELS: Mapping[str, tuple[str, ...]] = {
    "openai": ("gpt-4o-mini", "gpt-4o"),
    "gemini": ("gemini-2.5-flash", "gemini-2.5-pro"),
    "ollama": ("llama3.2", "qwen2.5"),
}
MAX_HANG_S = 300.0


@dataclass(frozen=True)
class ProviderSim:
    """How the emulator behaves for one provider.

    Args:
        max_concurrency: generation requests served at once; one more is refused like the real
            service refuses a burst (None: no cap).
        rps: at most ``max(1, floor(rps))`` generation requests accepted in any sliding 1 s
            window (None: no limit); refused ones get the provider's 429 (Ollama: 503).
        latency_s: time each accepted request takes before its reply (the concurrency slot is
            held meanwhile).
        fault_rate: probability in [0, 1] that an accepted request gets a fault.
        faults: fault kind → relative weight (kinds in ``FAULT_KINDS``).
        slow_s: extra delay of a "slow" fault.
        hang_s: how long a "hang" fault holds the connection (at most ``MAX_HANG_S``).
        retry_after_s: the wait an injected "rate_limit" fault asks for.
        require_key: when set, requests must carry this key (OpenAI/Ollama ``Authorization:
            Bearer``, Gemini ``x-goog-api-key``) or get the service's auth error.
        models: model names listed by the models endpoints; when non-empty, other models get
            the service's 404. Empty: a default list is shown and every model is accepted.
        rpm: at most this many generation requests accepted in any sliding 60 s window.
        tpm: at most this many tokens in any sliding 60 s window; a request is charged its
            prompt tokens plus ``max_tokens`` when given, else its reply's tokens (as OpenAI
            charges at admission).
        rpd: at most this many generation requests in any sliding 24 h window (Gemini's
            per-day quota: its 429 names a ``PerDay`` quota).
        capacity: with a latency, requests served at full speed at once; past it the service
            time is shared, so each request's latency grows linearly with the number in service
            (an Ollama-like GPU batch). None: the latency is constant whatever the load.
        rate_limit_headers: send OpenAI-style ``x-ratelimit-limit/remaining/reset-requests|tokens``
            headers (from ``rpm`` or else ``rps``, and ``tpm``) on every admitted or refused
            generation reply. None: on for openai (as the real API does), off for the others.
        thinking_tokens: tokens each reply "thinks" before answering, on models that think
            (Gemini 2.5+ unless ``thinkingBudget`` is 0; OpenAI o-series and gpt-5): reported as
            ``thoughtsTokenCount`` / ``reasoning_tokens`` and counted against the output cap.

    Raises:
        ValueError: a value out of range or an unknown fault kind.
    """

    max_concurrency: int | None = None
    rps: float | None = None
    latency_s: float = 0.0
    fault_rate: float = 0.0
    faults: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_FAULTS))
    slow_s: float = 0.5
    hang_s: float = 10.0
    retry_after_s: float = 1.0
    require_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    capacity: int | None = None
    rate_limit_headers: bool | None = None
    thinking_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "rpd", "capacity"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ProviderSim.{name} must be an integer >= 1 or None, got {value!r}")
        if isinstance(self.thinking_tokens, bool) or not isinstance(self.thinking_tokens, int) \
                or self.thinking_tokens < 0:
            raise ValueError(f"ProviderSim.thinking_tokens must be an integer >= 0, got {self.thinking_tokens!r}")
        if not isinstance(self.models, tuple):
            raise ValueError(f"ProviderSim.models must be a tuple of model names, got {self.models!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(
                f"ProviderSim.max_concurrency must be >= 1 or None, got {self.max_concurrency!r}"
            )
        if self.rps is not None and not self.rps > 0:
            raise ValueError(f"ProviderSim.rps must be > 0 or None, got {self.rps!r}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"ProviderSim.fault_rate must be in [0, 1], got {self.fault_rate!r}")
        for name in ("latency_s", "slow_s", "hang_s", "retry_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ValueError(f"ProviderSim.{name} must be a finite number >= 0, got {value!r}")
        if self.hang_s > MAX_HANG_S:
            raise ValueError(f"ProviderSim.hang_s must be <= {MAX_HANG_S}, got {self.hang_s!r}")
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(
                f"ProviderSim.faults has unknown kinds {unknown}; known: {', '.join(FAULT_KINDS)}"
            )
        if any(w < 0 for w in self.faults.values()):
            raise ValueError(f"ProviderSim.faults weights must be >= 0, got {dict(self.faults)!r}")
        if self.fault_rate > 0 and not any(w > 0 for w in self.faults.values()):
            raise ValueError("ProviderSim.fault_rate > 0 needs at least one fault with a positive weight")


def sends_rate_limit_headers(provider: str, sim: ProviderSim) -> bool:
    """Whether ``provider`` answers with x-ratelimit-* headers (default: openai only, like the real APIs)."""
    return sim.rate_limit_headers if sim.rate_limit_headers is not None else provider == "openai"
