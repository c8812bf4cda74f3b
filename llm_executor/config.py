"""Configuration: ExecutorConfig, ProviderConfig and ``ExecutorConfig.from_env``.

Values are frozen dataclasses validated at construction (``ConfigError`` names the field);
``from_env`` reads the ``LLM_EXECUTOR_*`` variables plus the providers' own (OPENAI_API_KEY,
GEMINI_API_KEY / GOOGLE_API_KEY, OLLAMA_HOST...) and names the *variable* in its errors.
A ``.env`` file is read with python-dotenv and never written into ``os.environ``; real
variables win. Keys are never shown in a repr or an error message.
Imports: stdlib, ``errors``, python-dotenv.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeGuard, TypeVar
from urllib.parse import parse_qsl

from .errors import ConfigError, ConfigWarning
from .types import MAX_SECONDS

__all__ = [
    "BUILTIN_PROVIDER_NAMES",
    "DEFAULT_PROVIDERS",
    "ENV_VARIABLES",
    "PROVIDER_ENV_VARIABLES",
    "ConfigWarning",
    "ExecutorConfig",
    "PROVIDER_KEY_VARIABLES",
    "ProviderConfig",
    "api_key_from_env",
    "key_variables",
    "known_env_names",
    "mask_url",
    "validate_provider_names",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "LLM_EXECUTOR_"

# Every LLM_EXECUTOR_* variable the library reads is listed in one of these two tables, and a new
# variable is added here in the same change that reads it: ``_EnvReader`` refuses to look up a name
# missing from them (a RuntimeError in any test that reads it), and ``from_env`` warns about every
# LLM_EXECUTOR_* name in the environment or ``.env`` that they do not list, suggesting the closest
# one. So a variable added later stays "known" without anyone remembering a second list.
ENV_VARIABLES: Mapping[str, str] = MappingProxyType({
    "LLM_EXECUTOR_PROVIDERS": "comma list of enabled providers",
    "LLM_EXECUTOR_QUEUE_SIZE": "requests accepted but not started, per provider lane (0 = unbounded)",
    "LLM_EXECUTOR_BACKPRESSURE": "fail_fast or block",
    "LLM_EXECUTOR_BLOCK_TIMEOUT": "seconds a blocked submit waits",
    "LLM_EXECUTOR_RATE_BACKEND": "memory, sqlite:///path or redis://host:port/db",
    "LLM_EXECUTOR_NAMESPACE": "prefix of shared-backend keys",
    "LLM_EXECUTOR_FALLBACKS": "ordered providers to fall back to after retryable failures",
    "LLM_EXECUTOR_PRIORITY_AGING": "seconds of waiting worth one priority step",
    "LLM_EXECUTOR_BACKEND_FAILURE": "fail_closed or local, when a shared backend is lost",
    "LLM_EXECUTOR_LEASE_TTL": "seconds a global in-flight slot lease lives",
    "LLM_EXECUTOR_STRICT": "1: an unknown LLM_EXECUTOR_* variable is an error, not a warning",
    # Read by this repository's test suite, not by the library; listed so CI's setting is not "unknown".
    "LLM_EXECUTOR_REQUIRE_REDIS": "tests: fail instead of skipping when Redis is missing",
    "LLM_EXECUTOR_TEST_REDIS_URL": "tests: the Redis the shared-limit tests use",
})
# LLM_EXECUTOR_<NAME>_<SUFFIX>, known only for the providers in LLM_EXECUTOR_PROVIDERS.
PROVIDER_ENV_VARIABLES: Mapping[str, str] = MappingProxyType({
    "MAX_PARALLEL": "in-flight cap per process, or auto (learned from latency)",
    "MAX_PARALLEL_CEILING": "the highest MAX_PARALLEL=auto may learn",
    "QPS": "requests started per second",
    "BURST": "requests that may start at one instant under QPS",
    "RPM": "requests started per minute",
    "TPM": "tokens per minute",
    "TIMEOUT": "per-attempt HTTP read timeout, seconds",
    "CONNECT_TIMEOUT": "per-attempt HTTP connect timeout, seconds",
    "MAX_RETRIES": "retries of retryable errors",
    "MAX_RETRY_WAIT": "a longer server-requested wait fails fast",
    "BACKOFF_MAX": "cap of the exponential backoff, seconds",
    "GLOBAL_MAX_PARALLEL": "in-flight cap across processes sharing the backend",
    "REPAIR_ATTEMPTS": "re-asks when structured output is invalid",
    "FALLBACK": "explicit requests may fall back along LLM_EXECUTOR_FALLBACKS",
    "MODEL": "the model of requests with model ''",
    "REASONING_MODELS": "model-name prefixes sent max_completion_tokens (OpenAI)",
    "BASE_URL": "endpoint override",
    "API_KEY": "the credential",
    "MAX_RESPONSE_BYTES": "the largest reply body (after decompression) an adapter reads",
    "WINDOW_MARGIN_MS": "rate windows are this much longer than 1 s / 60 s (token-to-provider jitter)",
})
# Longest first, so LLM_EXECUTOR_X_GLOBAL_MAX_PARALLEL splits as X + GLOBAL_MAX_PARALLEL.
_SUFFIXES_LONGEST_FIRST = sorted(PROVIDER_ENV_VARIABLES, key=len, reverse=True)

BUILTIN_PROVIDER_NAMES: tuple[str, ...] = ("gemini", "openai", "ollama")
DEFAULT_PROVIDERS: tuple[str, ...] = ("gemini", "openai", "ollama")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
Backpressure = Literal["fail_fast", "block"]
BackendFailure = Literal["fail_closed", "local"]


# Bounds of numeric settings. Past them a setting is surely a typo, and it breaks something
# further down: qps=1e-12 overflowed the limiter's clock, waits past threading.TIMEOUT_MAX raise
# OverflowError (issue 11 item 8). Each ConfigError quotes the bound.
MIN_QPS = 0.001  # one request per 1000 s; slower rates belong in rpm
DEFAULT_WINDOW_MARGIN_MS = 20  # see limits/_backend.py WINDOW_MARGIN_MS
# QPS / RPM / TPM set to this are learned from the provider (limits/learn.py).
AUTO: Final = "auto"
AUTO_RATE_FIELDS: tuple[str, ...] = ("qps", "rpm", "tpm")
MAX_QPS = 1_000_000.0
MAX_PARALLEL_LIMIT = 10_000  # threads per lane
# MAX_PARALLEL=auto learns within [1, max_parallel_ceiling]; the pool is sized to the ceiling.
DEFAULT_PARALLEL_CEILING = 32
MAX_GLOBAL_PARALLEL = 1_000_000
MAX_RPM = 60_000_000
MAX_TPM = 10**12
MAX_RETRIES_LIMIT = 1_000
MAX_QUEUE_SIZE = 100_000_000
MIN_RESPONSE_BYTES = 1024
MAX_RESPONSE_BYTES = 1 << 30
DEFAULT_MAX_RESPONSE_BYTES = 32 << 20


_N = TypeVar("_N", int, float)


def known(value: _N | str | None) -> _N | None:
    """A limit's number; None when it is unset or "auto" (the lane feeds its limiter the learned
    number through a concrete ProviderConfig, see ``limits.learn``)."""
    return None if value is None or isinstance(value, str) else value


def _check(cond: bool, what: str, expected: str, value: object) -> None:
    if not cond:
        raise ConfigError(f"{what}={_shown(value)}: expected {expected}", field=what)


def _shown(value: object) -> str:
    # A huge or self-referencing value must not turn the error message itself into a problem.
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ of a user's object
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _count(value: object, low: int, high: int) -> bool:
    return _is_int(value) and low <= value <= high


def _seconds(value: object, *, positive: bool) -> bool:
    return _is_num(value) and (value > 0 if positive else value >= 0) and value <= MAX_SECONDS


def header_safe_problem(value: str) -> str | None:
    """Why ``value`` cannot be an HTTP header value (never quoting it), or None when it can.

    HTTP header values must be latin-1 text without control characters: ``http.client`` encodes
    them as latin-1 and a CR or LF would start a new header.
    """
    for index, char in enumerate(value):
        code = ord(char)
        if code > 0xFF:
            return f"the character at position {index} is not latin-1 (HTTP header values must be latin-1 text)"
        if code < 0x20 or code == 0x7F:
            return f"the character at position {index} is a control character (not allowed in an HTTP header)"
    return None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> TypeGuard[int | float]:
    # An int is finite (and math.isfinite(10**400) raises OverflowError).
    return not isinstance(value, bool) and (isinstance(value, int)
                                            or (isinstance(value, float) and math.isfinite(value)))


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """Limits and endpoint of one provider lane.

    Attributes:
        max_parallel: requests in flight at once from this executor (per process), or "auto":
            learned from latency within ``[1, max_parallel_ceiling]`` (``limits.concurrency``).
        max_parallel_ceiling: the highest limit ``max_parallel="auto"`` may learn (ignored
            otherwise).
        qps: requests started per second (any sliding 1 s window); None = no limit; "auto" =
            learned from the provider (rpm and tpm too; see ``limits.learn``).
        burst: requests that may start at the same instant under ``qps``; None = about QPS/20
            (paced); ``burst >= qps`` allows the whole second's budget at once.
        rpm: requests started per minute; None = no limit.
        tpm: tokens per minute (estimated before the call, reconciled after); None = no limit.
        timeout: per-attempt HTTP read timeout, seconds.
        connect_timeout: per-attempt HTTP connect timeout, seconds.
        max_retries: retries of retryable errors (attempts = max_retries + 1).
        max_retry_wait_s: a server-requested wait above this fails fast with RateLimitedError.
        backoff_max_s: cap of our own exponential backoff between attempts.
        base_url: endpoint override; None = the provider's default.
        model: default model for requests with model "" and for provider "auto".
        api_key: the credential (never shown in a repr).
        global_max_parallel: in-flight cap across every process sharing the rate backend.
        repair_attempts: re-asks with the validation error when structured output is invalid.
        fallback: explicit requests to this provider may fall back to LLM_EXECUTOR_FALLBACKS.
        reasoning_models: model-name prefixes that take max_completion_tokens and no temperature
            (OpenAI); None = the adapter's default for its base URL.
        options: adapter-specific settings (strings), e.g. {"organization": "org-..."}.
        max_response_bytes: the largest reply body read (counted after decompression); a larger
            one fails with a non-retryable ProviderError (built-in adapters).
        window_margin_ms: each QPS/RPM window is this much longer than its 1 s / 60 s, so that
            the time between our token and the provider counting the request (threads, network
            jitter) cannot put QPS + 1 requests into one of the provider's windows. Raise it for a
            far-away provider or a loaded host (costs ~margin/1000 of the rate).

    Numbers are bounded (a ConfigError quotes the bound): qps in [0.001, 1e6], seconds at most a
    week, max_parallel at most 10,000; api_key must be latin-1 text without control characters.
    """

    max_parallel: int | Literal["auto"] = 4
    max_parallel_ceiling: int = DEFAULT_PARALLEL_CEILING
    qps: float | Literal["auto"] | None = None
    burst: int | None = None
    rpm: int | Literal["auto"] | None = None
    tpm: int | Literal["auto"] | None = None
    timeout: float = 60.0
    connect_timeout: float = 10.0
    max_retries: int = 3
    max_retry_wait_s: float = 60.0
    backoff_max_s: float = 30.0
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    global_max_parallel: int | None = None
    repair_attempts: int = 0
    fallback: bool = False
    reasoning_models: tuple[str, ...] | None = None
    options: Mapping[str, str] = field(default_factory=dict, hash=False)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    window_margin_ms: int = DEFAULT_WINDOW_MARGIN_MS

    def __post_init__(self) -> None:
        week = f"<= {MAX_SECONDS:g} (a week)"
        _check(self.max_parallel == "auto" or _count(self.max_parallel, 1, MAX_PARALLEL_LIMIT), "max_parallel",
               f"an integer in [1, {MAX_PARALLEL_LIMIT}] or 'auto'", self.max_parallel)
        _check(_count(self.max_parallel_ceiling, 1, MAX_PARALLEL_LIMIT), "max_parallel_ceiling",
               f"an integer in [1, {MAX_PARALLEL_LIMIT}]", self.max_parallel_ceiling)
        _check(self.qps is None or self.qps == AUTO or (_is_num(self.qps) and MIN_QPS <= self.qps <= MAX_QPS),
               "qps", f"a number of requests per second in [{MIN_QPS:g}, {MAX_QPS:g}], \"auto\" or None "
               "(slower rates: rpm)", self.qps)
        _check(self.burst is None or _count(self.burst, 1, int(MAX_QPS)), "burst",
               f"an integer in [1, {int(MAX_QPS)}] or None", self.burst)
        _check(self.rpm is None or self.rpm == AUTO or _count(self.rpm, 1, MAX_RPM), "rpm",
               f"an integer in [1, {MAX_RPM}], \"auto\" or None", self.rpm)
        _check(self.tpm is None or self.tpm == AUTO or _count(self.tpm, 1, MAX_TPM), "tpm",
               f"an integer in [1, {MAX_TPM}], \"auto\" or None", self.tpm)
        _check(_seconds(self.timeout, positive=True), "timeout", f"a positive number of seconds {week}",
               self.timeout)
        _check(_seconds(self.connect_timeout, positive=True), "connect_timeout",
               f"a positive number of seconds {week}", self.connect_timeout)
        _check(_count(self.max_retries, 0, MAX_RETRIES_LIMIT), "max_retries",
               f"an integer in [0, {MAX_RETRIES_LIMIT}]", self.max_retries)
        _check(_seconds(self.max_retry_wait_s, positive=False), "max_retry_wait_s",
               f"a number of seconds >= 0 and {week}", self.max_retry_wait_s)
        _check(_seconds(self.backoff_max_s, positive=False), "backoff_max_s",
               f"a number of seconds >= 0 and {week}", self.backoff_max_s)
        _check(self.base_url is None or (isinstance(self.base_url, str) and self.base_url.strip() != ""),
               "base_url", "a URL or None",
               mask_url(self.base_url) if isinstance(self.base_url, str) else self.base_url)
        _check(self.model is None or isinstance(self.model, str), "model", "a model name or None", self.model)
        if self.api_key is not None:
            if not isinstance(self.api_key, str):
                raise ConfigError(f"api_key: expected a string or None, got {type(self.api_key).__name__}",
                                  field="api_key")
            problem = header_safe_problem(self.api_key.strip())
            if problem is not None:
                # The key travels in a header (Authorization, x-goog-api-key); never quote it.
                raise ConfigError(f"api_key: {problem}; check the key for a stray character", field="api_key")
        _check(self.global_max_parallel is None or _count(self.global_max_parallel, 1, MAX_GLOBAL_PARALLEL),
               "global_max_parallel", f"an integer in [1, {MAX_GLOBAL_PARALLEL}] or None", self.global_max_parallel)
        _check(_count(self.repair_attempts, 0, MAX_RETRIES_LIMIT), "repair_attempts",
               f"an integer in [0, {MAX_RETRIES_LIMIT}]", self.repair_attempts)
        _check(isinstance(self.fallback, bool), "fallback", "a bool", self.fallback)
        _check(self.reasoning_models is None or (isinstance(self.reasoning_models, tuple)
                                                 and all(isinstance(m, str) for m in self.reasoning_models)),
               "reasoning_models", "a tuple of model-name prefixes or None", self.reasoning_models)
        _check(isinstance(self.options, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.options.items()),
               "options", "a mapping of strings to strings", self.options)
        _check(_count(self.max_response_bytes, MIN_RESPONSE_BYTES, MAX_RESPONSE_BYTES), "max_response_bytes",
               f"an integer number of bytes in [{MIN_RESPONSE_BYTES}, {MAX_RESPONSE_BYTES}]", self.max_response_bytes)
        _check(_count(self.window_margin_ms, 0, 1000), "window_margin_ms", "an integer number of ms in [0, 1000]",
               self.window_margin_ms)

    @property
    def parallel_cap(self) -> int:
        """The most calls this lane may ever have in flight: ``max_parallel``, or the ceiling when "auto"."""
        return self.max_parallel_ceiling if self.max_parallel == "auto" else self.max_parallel

    @property
    def auto_rates(self) -> tuple[str, ...]:
        """The rate limits set to "auto" (of "qps", "rpm", "tpm"), in that order."""
        return tuple(name for name in AUTO_RATE_FIELDS if getattr(self, name) == AUTO)

    def __repr__(self) -> str:
        # base_url may carry a password or a query string (?key=...); api_key is never shown.
        parts = [f"{f.name}={mask_url(v) if f.name == 'base_url' and isinstance(v, str) else v!r}"
                 for f in fields(self) if f.repr for v in (getattr(self, f.name),)]
        return f"ProviderConfig({', '.join(parts)})"

    def describe(self) -> dict[str, Any]:
        """A plain dict of the settings with the key masked, for ``llm-executor config``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key":
                value = None if value is None else "***"
            elif f.name == "base_url" and value is not None:
                value = mask_url(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Settings of one Executor.

    Attributes:
        providers: enabled provider lanes by name. A custom provider passed to ``Executor`` without an
            entry here runs with ``ProviderConfig()`` defaults.
        queue_size: requests accepted but not yet started, per provider lane; 0 = unbounded.
        backpressure: "fail_fast" (QueueFullError at once) or "block" (submit waits for a slot).
        block_timeout: seconds a blocked submit waits before QueueFullError; None = forever.
        rate_backend: "memory", "sqlite:///path", "redis://host:port/db" (``rediss://`` for TLS with
            ``?ssl_ca_certs=/path/ca.pem``) or "redis+cluster://host:port[,host:port]" (Redis Cluster).
        namespace: prefix of shared-backend keys.
        fallbacks: ordered providers to fall back to after retryable failures.
        priority_aging_s: a request waiting this long counts as one priority step higher.
        backend_failure: when a shared backend is lost mid-run: "fail_closed" or "local".
        lease_ttl_s: lifetime of a global in-flight slot lease (renewed while the call runs), so
            the slots of a killed process come back within it.
    """

    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    queue_size: int = 100
    backpressure: Backpressure = "fail_fast"
    block_timeout: float | None = None
    rate_backend: str = "memory"
    namespace: str = "llm_executor"
    fallbacks: tuple[str, ...] = ()
    priority_aging_s: float = 5.0
    backend_failure: BackendFailure = "fail_closed"
    lease_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        _check(isinstance(self.providers, Mapping), "providers", "a mapping of name to ProviderConfig",
               self.providers)
        for name, pcfg in self.providers.items():
            _check(isinstance(name, str) and bool(_NAME_RE.match(name)), "providers",
                   "names of lowercase letters, digits and '_' starting with a letter", name)
            if not isinstance(pcfg, ProviderConfig):
                raise ConfigError(f"providers[{name!r}]: expected a ProviderConfig, got {type(pcfg).__name__}",
                                  field="providers")
        _check(_count(self.queue_size, 0, MAX_QUEUE_SIZE), "queue_size", f"an integer in [0, {MAX_QUEUE_SIZE}]",
               self.queue_size)
        _check(isinstance(self.backpressure, str) and self.backpressure in ("fail_fast", "block"), "backpressure",
               "'fail_fast' or 'block'", self.backpressure)
        _check(self.block_timeout is None or _seconds(self.block_timeout, positive=False),
               "block_timeout", f"a number of seconds >= 0 and <= {MAX_SECONDS:g} (a week), or None",
               self.block_timeout)
        _check(isinstance(self.rate_backend, str) and _valid_backend(self.rate_backend), "rate_backend",
               _BACKENDS_EXPECTED,
               mask_url(self.rate_backend) if isinstance(self.rate_backend, str) else self.rate_backend)
        _check(isinstance(self.namespace, str) and bool(re.match(r"^[A-Za-z0-9_.:-]{1,64}$", self.namespace)),
               "namespace", "1-64 characters of letters, digits, '_', '.', ':' or '-'", self.namespace)
        _check(isinstance(self.fallbacks, tuple) and all(isinstance(n, str) for n in self.fallbacks),
               "fallbacks", "a tuple of provider names", self.fallbacks)
        _check(_seconds(self.priority_aging_s, positive=True), "priority_aging_s",
               f"a positive number of seconds <= {MAX_SECONDS:g} (a week)", self.priority_aging_s)
        _check(isinstance(self.backend_failure, str) and self.backend_failure in ("fail_closed", "local"),
               "backend_failure", "'fail_closed' or 'local'", self.backend_failure)
        _check(_seconds(self.lease_ttl_s, positive=True) and self.lease_ttl_s >= 0.5, "lease_ttl_s",
               f"a number of seconds in [0.5, {MAX_SECONDS:g}]", self.lease_ttl_s)

    def __repr__(self) -> str:
        # rate_backend may be redis://user:password@host: the password is masked, as in describe().
        parts = [f"{f.name}={mask_url(v) if f.name == 'rate_backend' and isinstance(v, str) else v!r}"
                 for f in fields(self) for v in (getattr(self, f.name),)]
        return f"ExecutorConfig({', '.join(parts)})"

    def provider(self, name: str) -> ProviderConfig:
        """The config of lane ``name`` (defaults when the provider has none)."""
        return self.providers.get(name) or ProviderConfig()

    def describe(self) -> dict[str, Any]:
        """The resolved configuration as plain data, keys and URL passwords masked."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "providers":
                value = {name: pcfg.describe() for name, pcfg in value.items()}
            elif f.name == "rate_backend":
                value = mask_url(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv_path: str | os.PathLike[str] | None = None,
        adapters: Iterable[str] | None = None,
    ) -> ExecutorConfig:
        """Build a config from ``LLM_EXECUTOR_*`` variables (see the README's table).

        An ``LLM_EXECUTOR_*`` name that is not in ``ENV_VARIABLES`` / ``PROVIDER_ENV_VARIABLES`` (a
        misspelling, or a provider's variable while that provider is not in ``LLM_EXECUTOR_PROVIDERS``)
        is ignored with a ``ConfigWarning`` and one log line that suggest the closest known name;
        with ``LLM_EXECUTOR_STRICT=1`` it is a ``ConfigError`` instead.

        Args:
            environ: the variables to read; None = ``os.environ`` merged over a ``.env`` file found
                from the current directory (real variables win).
            dotenv_path: a ``.env`` file to read beneath ``environ`` (also when ``environ`` is given).
            adapters: when given, also run ``validate_provider_names`` with these custom provider names
                (``()`` = built-in adapters only, as the ``llm-executor`` command runs).

        Raises:
            ConfigError: naming the variable, where it was set (the ``.env`` path or "environment"),
                the value and what is expected.
        """
        env: dict[str, str] = {}
        sources: dict[str, str] = {}
        if dotenv_path is not None or environ is None:
            found, values = _read_dotenv(dotenv_path)
            env.update(values)
            sources.update(dict.fromkeys(values, found))
        real = os.environ if environ is None else environ
        env.update(real)
        sources.update(dict.fromkeys(real, "environment"))
        reader = _EnvReader(env, sources)
        config = reader.config()
        reader.check_unknown(config)
        if adapters is not None:
            validate_provider_names(config, adapters, sources=sources)
        return config


# The providers' own key variables, after LLM_EXECUTOR_<NAME>_API_KEY, in the order they are read.
PROVIDER_KEY_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "ollama": ("OLLAMA_API_KEY",),
}


def key_variables(name: str) -> tuple[str, ...]:
    """The variables a key for provider ``name`` is read from, first match wins."""
    return (f"LLM_EXECUTOR_{name.upper()}_API_KEY", *PROVIDER_KEY_VARIABLES.get(name, ()))


def api_key_from_env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The key ``from_env`` would give provider ``name``: the environment, then a ``.env`` file.

    A ``ProviderConfig(api_key=None)`` built in code gets its key here (issue 10, item 8), so the
    README quick start works with ``OPENAI_API_KEY`` set.
    """
    env: dict[str, str] = dict(_read_dotenv(None)[1]) if environ is None else {}
    env.update(os.environ if environ is None else environ)
    for var in key_variables(name):
        if env.get(var):
            return env[var]
    return None


# Query options a Redis backend URL may carry (TLS files and socket timeouts; limits/_redis.py reads them).
REDIS_URL_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname",
                                "socket_timeout", "socket_connect_timeout"})
_BACKENDS_EXPECTED = ("'memory', 'sqlite:///path', 'redis://host:port/db' (rediss:// for TLS, "
                      "?ssl_ca_certs=/path/ca.pem) or 'redis+cluster://host:port[,host:port]' (rediss+cluster://)")


def _valid_backend(url: str) -> bool:
    if url == "memory" or url.startswith("sqlite:///"):
        return True
    if not url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")):
        return False
    query = url.split("?", 1)[1] if "?" in url else ""
    return {k for k, _ in parse_qsl(query, keep_blank_values=True)} <= REDIS_URL_OPTIONS


def mask_url(url: str) -> str:
    """``url`` with any password (``user:secret@``) and query string hidden."""
    masked = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    masked = re.sub(r"(://)([^:/@]+)@", r"\1***@", masked)
    return masked.split("?", 1)[0] + ("?***" if "?" in masked else "")


def known_env_names(providers: Iterable[str]) -> frozenset[str]:
    """Every ``LLM_EXECUTOR_*`` name ``from_env`` reads when ``providers`` are enabled."""
    return frozenset(ENV_VARIABLES) | {f"{ENV_PREFIX}{name.upper()}_{suffix}"
                                       for name in providers for suffix in PROVIDER_ENV_VARIABLES}


def _is_listed(var: str) -> bool:
    return var in ENV_VARIABLES or any(var.endswith("_" + s) for s in PROVIDER_ENV_VARIABLES)


def _split_provider_var(var: str) -> tuple[str, str] | None:
    """``LLM_EXECUTOR_<NAME>_<SUFFIX>`` → (name, suffix) for a known suffix, else None."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        middle = var[len(ENV_PREFIX):-len(suffix) - 1]
        if var.endswith("_" + suffix) and middle and _NAME_RE.match(middle.lower()):
            return middle.lower(), suffix
    return None


def _unknown_hint(var: str, enabled: tuple[str, ...]) -> str:
    """Why ``var`` is ignored and what was probably meant."""
    split = _split_provider_var(var)
    if split is not None and split[0] not in enabled and not difflib.get_close_matches(split[0], enabled, 1, 0.75):
        name, _ = split
        return (f"provider {name!r} is not enabled: add it to LLM_EXECUTOR_PROVIDERS "
                f"(now {','.join(enabled) or 'empty'}) to use this variable")
    # Compare what follows the common prefix: the prefix alone would make every name look alike.
    known = {n[len(ENV_PREFIX):]: n for n in known_env_names(enabled)}
    close = difflib.get_close_matches(var[len(ENV_PREFIX):], list(known), 1, 0.6)
    if close:
        return f"did you mean {known[close[0]]}?"
    return "no known variable is close (see the README's configuration table)"


def validate_provider_names(
    config: ExecutorConfig, adapters: Iterable[str] = (), *, sources: Mapping[str, str] | None = None
) -> None:
    """Check that every enabled provider has an adapter and every fallback is enabled.

    This is the check ``Executor(config, providers=...)`` makes before it builds its lanes, without
    building them, so ``llm-executor config`` rejects exactly what ``check`` and ``run`` reject.

    Args:
        config: the configuration.
        adapters: names of custom providers that will be passed to ``Executor``; every other enabled
            name must be a built-in adapter.
        sources: where each variable came from (a ``.env`` path or "environment"), for the messages.

    Raises:
        ConfigError: naming LLM_EXECUTOR_PROVIDERS or LLM_EXECUTOR_FALLBACKS, the value and the names expected.
    """
    custom = set(adapters)

    def where(var: str) -> str:
        return f" (from {sources.get(var, 'environment')})" if sources and var in sources else ""

    for name in config.providers:
        if name == "auto":
            raise ConfigError(f"LLM_EXECUTOR_PROVIDERS={','.join(config.providers)!r}{where('LLM_EXECUTOR_PROVIDERS')}"
                              f": 'auto' is not a provider (it asks the executor to choose one); expected names "
                              f"of providers, built-in: {', '.join(BUILTIN_PROVIDER_NAMES)}")
        if name not in custom and name not in BUILTIN_PROVIDER_NAMES:
            raise ConfigError(
                f"LLM_EXECUTOR_PROVIDERS={','.join(config.providers)!r}{where('LLM_EXECUTOR_PROVIDERS')}: provider "
                f"{name!r} is configured but has no adapter (built-in: {', '.join(BUILTIN_PROVIDER_NAMES)}): "
                f"pass one with Executor(cfg, providers={{{name!r}: obj}}) or remove it from LLM_EXECUTOR_PROVIDERS")
    enabled = [*config.providers, *(n for n in custom if n not in config.providers)]
    unknown = [n for n in config.fallbacks if n not in enabled]
    if unknown:
        raise ConfigError(
            f"LLM_EXECUTOR_FALLBACKS={','.join(config.fallbacks)!r}{where('LLM_EXECUTOR_FALLBACKS')}: unknown "
            f"provider {unknown[0]!r}; expected names of enabled providers: {', '.join(enabled)}")


def _read_dotenv(path: str | os.PathLike[str] | None) -> tuple[str, dict[str, str]]:
    """(the file's path, its variables); ("", {}) when no ``.env`` is found."""
    from dotenv import dotenv_values, find_dotenv

    if path is None:
        found = find_dotenv(usecwd=True)
        if not found:
            return "", {}
        path = found
    if not Path(path).is_file():
        raise ConfigError(f"dotenv_path={str(path)!r}: expected an existing .env file")
    return str(path), {k: v for k, v in dotenv_values(path).items() if v is not None}


# Config fields whose variable is not LLM_EXECUTOR_<NAME>_<FIELD in upper case>.
_ENV_SUFFIX = {"max_retry_wait_s": "MAX_RETRY_WAIT", "backoff_max_s": "BACKOFF_MAX"}
_EXECUTOR_ENV = {"queue_size": "LLM_EXECUTOR_QUEUE_SIZE", "block_timeout": "LLM_EXECUTOR_BLOCK_TIMEOUT",
                 "priority_aging_s": "LLM_EXECUTOR_PRIORITY_AGING", "lease_ttl_s": "LLM_EXECUTOR_LEASE_TTL",
                 "rate_backend": "LLM_EXECUTOR_RATE_BACKEND", "namespace": "LLM_EXECUTOR_NAMESPACE",
                 "fallbacks": "LLM_EXECUTOR_FALLBACKS"}


class _EnvReader:
    """One parser per type; each names the variable and never echoes a secret."""

    def __init__(self, env: Mapping[str, str], sources: Mapping[str, str] | None = None) -> None:
        self.env = env
        self.sources = sources or {}

    def _raw(self, var: str) -> str | None:
        if var.startswith(ENV_PREFIX) and not _is_listed(var):
            # A programming error, caught by any test that reads the variable: see ENV_VARIABLES.
            raise RuntimeError(f"{var} is read but not listed in config.ENV_VARIABLES or PROVIDER_ENV_VARIABLES")
        value = self.env.get(var)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _fail(self, var: str, raw: str, expected: str) -> ConfigError:
        return ConfigError(f"{var}={raw!r} (from {self.sources.get(var, 'environment')}): expected {expected}")

    def int_(self, var: str, minimum: int, alternative: str = "") -> int | None:
        raw = self._raw(var)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(var, raw, f"an integer >= {minimum}{alternative}") from None
        if value < minimum:
            raise self._fail(var, raw, f"an integer >= {minimum}{alternative}")
        return value

    def auto_or(self, var: str) -> str | None:
        """``AUTO`` when ``var`` says auto (any case), else None (the caller parses a number)."""
        raw = self._raw(var)
        return AUTO if raw is not None and raw.lower() == AUTO else None

    def float_(self, var: str, expected: str, *, allow_zero: bool = False) -> float | None:
        raw = self._raw(var)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(var, raw, expected) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise self._fail(var, raw, expected)
        return value

    def bool_(self, var: str) -> bool | None:
        raw = self._raw(var)
        if raw is None:
            return None
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise self._fail(var, raw, "true or false (1/0, yes/no, on/off)")

    def choice(self, var: str, choices: tuple[str, ...]) -> str | None:
        raw = self._raw(var)
        if raw is None:
            return None
        if raw.lower() not in choices:
            raise self._fail(var, raw, " or ".join(repr(c) for c in choices))
        return raw.lower()

    def names(self, var: str) -> tuple[str, ...] | None:
        raw = self._raw(var)
        if raw is None:
            return None
        names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
        for n in names:
            if not _NAME_RE.match(n):
                raise self._fail(var, raw, "a comma list of provider names (letters, digits, '_')")
        return names

    def secret(self, *variables: str) -> str | None:
        for var in variables:
            raw = self._raw(var)
            if raw is not None:
                return raw
        return None

    def provider(self, name: str) -> ProviderConfig:
        p = f"LLM_EXECUTOR_{name.upper()}_"
        kw: dict[str, Any] = {}
        pairs: list[tuple[str, Any]] = [
            ("max_parallel", self.auto_or(p + "MAX_PARALLEL") or self.int_(p + "MAX_PARALLEL", 1, " or auto")),
            ("max_parallel_ceiling", self.int_(p + "MAX_PARALLEL_CEILING", 1)),
            ("qps", self.auto_or(p + "QPS") or self.float_(p + "QPS", "a positive number (requests per second) "
                                                           "or auto")),
            ("burst", self.int_(p + "BURST", 1)),
            ("rpm", self.auto_or(p + "RPM") or self.int_(p + "RPM", 1, " or auto")),
            ("tpm", self.auto_or(p + "TPM") or self.int_(p + "TPM", 1, " or auto")),
            ("timeout", self.float_(p + "TIMEOUT", "a positive number of seconds")),
            ("connect_timeout", self.float_(p + "CONNECT_TIMEOUT", "a positive number of seconds")),
            ("max_retries", self.int_(p + "MAX_RETRIES", 0)),
            ("max_retry_wait_s", self.float_(p + "MAX_RETRY_WAIT", "a number of seconds >= 0",
                                             allow_zero=True)),
            ("backoff_max_s", self.float_(p + "BACKOFF_MAX", "a number of seconds >= 0", allow_zero=True)),
            ("global_max_parallel", self.int_(p + "GLOBAL_MAX_PARALLEL", 1)),
            ("repair_attempts", self.int_(p + "REPAIR_ATTEMPTS", 0)),
            ("max_response_bytes", self.int_(p + "MAX_RESPONSE_BYTES", MIN_RESPONSE_BYTES)),
            ("window_margin_ms", self.int_(p + "WINDOW_MARGIN_MS", 0)),
            ("fallback", self.bool_(p + "FALLBACK")),
            ("model", self._raw(p + "MODEL")),
        ]
        reasoning = self._raw(p + "REASONING_MODELS")
        if reasoning is not None:
            pairs.append(("reasoning_models", tuple(m.strip() for m in reasoning.split(",") if m.strip())))
        base_url = self._raw(p + "BASE_URL")
        base_var = p + "BASE_URL"
        key = self.secret(*key_variables(name))
        options: dict[str, str] = {}
        if name == "openai":
            if base_url is None and self._raw("OPENAI_BASE_URL") is not None:
                base_url, base_var = self._raw("OPENAI_BASE_URL"), "OPENAI_BASE_URL"
            for opt, var in (("organization", "OPENAI_ORG_ID"), ("project", "OPENAI_PROJECT_ID")):
                if self._raw(var):
                    options[opt] = self._raw(var) or ""
        elif name == "gemini":
            if base_url is None and self._raw("GOOGLE_GEMINI_BASE_URL") is not None:
                base_url, base_var = self._raw("GOOGLE_GEMINI_BASE_URL"), "GOOGLE_GEMINI_BASE_URL"
        elif name == "ollama":
            host = self._raw("OLLAMA_HOST")
            if base_url is None and host is not None:
                base_url, base_var = host, "OLLAMA_HOST"
        if base_url is not None:
            if not re.match(r"^(https?://)?[^\s]+$", base_url):
                raise self._fail(base_var, base_url, "a URL such as https://host/v1")
            pairs.append(("base_url", base_url))
        pairs.append(("api_key", key))
        if options:
            pairs.append(("options", options))
        kw = {k: v for k, v in pairs if v is not None}
        try:
            return ProviderConfig(**kw)
        except ConfigError as exc:  # a bound the parsers above do not know: name the variable
            raise ConfigError(f"{self._variable_of(p, exc.field, key)}: {exc}", field=exc.field) from None

    def _variable_of(self, prefix: str, field_name: str | None, key: str | None) -> str:
        if field_name == "api_key":
            for var in (prefix + "API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "OLLAMA_API_KEY"):
                if key is not None and self._raw(var) == key:
                    return var
        suffix = _ENV_SUFFIX.get(field_name or "", (field_name or "*").upper())
        return prefix + suffix

    def check_unknown(self, config: ExecutorConfig) -> None:
        """Warn about (or, under LLM_EXECUTOR_STRICT, refuse) every LLM_EXECUTOR_* name nothing reads."""
        enabled = tuple(config.providers)
        known = known_env_names(enabled)
        found = sorted(v for v in self.env if v.startswith(ENV_PREFIX) and v not in known)
        if not found:
            return
        notes = [f"{v} (from {self.sources.get(v, 'environment')}) is not a known variable and is ignored; "
                 f"{_unknown_hint(v, enabled)}" for v in found]
        if self.bool_("LLM_EXECUTOR_STRICT"):
            raise ConfigError("LLM_EXECUTOR_STRICT=1: " + "; ".join(notes))
        for note in notes:
            log.warning("%s", note)
            # stacklevel 3: the line that called from_env (check_unknown <- from_env <- caller).
            warnings.warn(note, ConfigWarning, stacklevel=3)

    def config(self) -> ExecutorConfig:
        names = self.names("LLM_EXECUTOR_PROVIDERS")
        if names is None:
            names = DEFAULT_PROVIDERS
        providers = {name: self.provider(name) for name in names}
        kw: dict[str, Any] = {"providers": providers}
        queue_size = self.int_("LLM_EXECUTOR_QUEUE_SIZE", 0)
        if queue_size is not None:
            kw["queue_size"] = queue_size
        backpressure = self.choice("LLM_EXECUTOR_BACKPRESSURE", ("fail_fast", "block"))
        if backpressure is not None:
            kw["backpressure"] = backpressure
        block_timeout = self.float_("LLM_EXECUTOR_BLOCK_TIMEOUT", "a number of seconds >= 0", allow_zero=True)
        if block_timeout is not None:
            kw["block_timeout"] = block_timeout
        backend = self._raw("LLM_EXECUTOR_RATE_BACKEND")
        if backend is not None:
            if not _valid_backend(backend):
                raise self._fail("LLM_EXECUTOR_RATE_BACKEND", mask_url(backend), _BACKENDS_EXPECTED)
            kw["rate_backend"] = backend
        namespace = self._raw("LLM_EXECUTOR_NAMESPACE")
        if namespace is not None:
            if not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", namespace):
                raise self._fail("LLM_EXECUTOR_NAMESPACE", namespace,
                                 "1-64 characters of letters, digits, '_', '.', ':' or '-'")
            kw["namespace"] = namespace
        fallbacks = self.names("LLM_EXECUTOR_FALLBACKS")
        if fallbacks is not None:
            kw["fallbacks"] = fallbacks
        aging = self.float_("LLM_EXECUTOR_PRIORITY_AGING", "a positive number of seconds")
        if aging is not None:
            kw["priority_aging_s"] = aging
        failure = self.choice("LLM_EXECUTOR_BACKEND_FAILURE", ("fail_closed", "local"))
        if failure is not None:
            kw["backend_failure"] = failure
        lease = self.float_("LLM_EXECUTOR_LEASE_TTL", "a number of seconds >= 0.5")
        if lease is not None:
            if lease < 0.5:
                raise self._fail("LLM_EXECUTOR_LEASE_TTL", str(lease), "a number of seconds >= 0.5")
            kw["lease_ttl_s"] = lease
        try:
            return ExecutorConfig(**kw)
        except ConfigError as exc:  # a bound the parsers above do not know: name the variable
            var = _EXECUTOR_ENV.get(exc.field or "", "LLM_EXECUTOR_*")
            raise ConfigError(f"{var}: {exc}", field=exc.field) from None
