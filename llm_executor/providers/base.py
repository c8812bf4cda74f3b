"""The Provider protocol and the shared HTTP base of the built-in adapters.

``Provider`` is the executor's only view of a provider: any object with ``name``,
``capabilities()`` and ``complete(request)``. The executor hands ``complete`` a request whose
``timeout`` is the time left before the request's deadline (or None), whose ``model`` may be
"" (the adapter's configured default) and whose ``json_schema`` is a dict.

``HTTPProvider`` owns the HTTP call of every built-in adapter: one ``requests.Session`` per
adapter, ``allow_redirects=False``, a total time bound per attempt (``min(config.timeout,
request.timeout)``, enforced from outside by ``transport``'s watchdog even against a server that
trickles bytes), a cap on the decompressed reply (``config.max_response_bytes``), and the *one*
place where ``requests`` exceptions and HTTP error statuses become ``llm_executor.errors``. No
``requests`` exception, no URL query string and no API key ever leaves this module in an error
message, an exception chain or a log record. Adapters only build bodies and parse payloads.

Imports: ``types``, ``errors``, ``config`` and ``requests``; never the executor.
"""

from __future__ import annotations

import abc
import dataclasses
import http.client
import json
import logging
import math

# requests imports netrc lazily inside each call's get_netrc_auth: a fork while another thread holds
# that module's import lock leaves the child's first call stuck on it, so import it up front.
import netrc  # noqa: F401
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

import requests

from ..config import ProviderConfig, mask_url
from ..errors import (
    DeadlineExceededError,
    InvalidRequestError,
    LLMExecutorError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from ..types import Capabilities, LLMRequest, LLMResponse, RateLimitInfo
from .protocol import Provider
from .transport import AttemptGuard, AttemptWatch, GuardedHTTPAdapter, register_secret

__all__ = [
    "ErrorInfo",
    "HTTPProvider",
    "MalformedResponseError",
    "Provider",
    "build_session",
    "freeze_environment",
    "MAX_RETRY_AFTER_S",
    "parse_duration_s",
    "parse_error_body",
    "parse_go_duration_s",
    "parse_rate_limit_info",
    "parse_rate_limit_reset",
    "parse_retry_after",
]

log = logging.getLogger(__name__)

# Longest provider error text we copy into our own messages: enough to act on, short enough for a log line.
_MAX_MESSAGE_CHARS = 300
# Body bytes read per step: the time bound and the size cap are checked between steps.
_CHUNK_BYTES = 64 * 1024
# An error body is read up to this much (then cut, not failed): its message is all we keep.
_MAX_ERROR_BODY_BYTES = 64 * 1024
# Timeouts that fire within this of the attempt's bound count as the bound being reached.
_BOUND_SLACK_S = 0.05


class MalformedResponseError(Exception):
    """A 2xx payload that does not have the expected shape (internal; becomes a ProviderError)."""


# --- header and body parsing -------------------------------------------------------------------


# The longest wait a hint may ask for: a quota window is at most a day. Anything longer (a 1e300 s
# Retry-After, a date in year 9999) is a broken or hostile header, clamped so no sleep overflows.
MAX_RETRY_AFTER_S = 86_400.0
# LiteLLM's proxy forwards the upstream's headers under this prefix (llm_provider-retry-after: 60).
_FORWARDED_PREFIX = "llm_provider-"


def _hint(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value if value is not None else headers.get(_FORWARDED_PREFIX + name)


def _clamp_s(value: float) -> float:
    return min(max(0.0, value), MAX_RETRY_AFTER_S)


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """The wait, in seconds, a response asks for; None when it names none.

    Reads ``retry-after-ms`` (float milliseconds, OpenAI) first, then ``retry-after`` as
    delta-seconds or as an HTTP date (the delay from ``now``, never negative); each also under
    LiteLLM's ``llm_provider-`` prefix (the upstream's header forwarded by the proxy). Garbage is
    ignored rather than raised: a bad hint must not turn a retryable error into a crash. The
    result is clamped to ``[0, MAX_RETRY_AFTER_S]``.

    Args:
        headers: response headers (case-insensitive mapping from ``requests``, or a dict with
            lowercase names).
        now: the current time for HTTP dates; defaults to ``datetime.now(UTC)``.

    Returns:
        Seconds to wait (>= 0), or None.
    """
    raw_ms = _hint(headers, "retry-after-ms")
    if raw_ms is not None:
        value = _number(raw_ms)
        if value is not None and value >= 0:
            return _clamp_s(value / 1000.0)
    raw = _hint(headers, "retry-after")
    if raw is None:
        return None
    value = _number(raw)
    if value is not None:
        return _clamp_s(value) if value >= 0 else None
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate gives naive for "-0000"
        when = when.replace(tzinfo=UTC)
    try:
        delay_s = (when - (now or datetime.now(UTC))).total_seconds()
    except OverflowError:
        return MAX_RETRY_AFTER_S
    return _clamp_s(delay_s)


_GO_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration_s(text: object) -> float | None:
    """Seconds in a Go duration such as OpenAI's ``x-ratelimit-reset-*`` values (``"20ms"``,
    ``"6m0s"``, ``"1h2m3.5s"``) or in plain seconds (``"20"``, as some gateways send); None otherwise.
    The result is clamped to ``[0, MAX_RETRY_AFTER_S]``.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    plain = _finite_float(text)
    if plain is not None:
        return _clamp_s(plain) if plain >= 0 else None
    parts = _GO_DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    total = sum(float(number) * _GO_UNIT_S[unit] for number, unit in parts)
    return _clamp_s(total) if math.isfinite(total) else MAX_RETRY_AFTER_S


def parse_rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    """The wait a 429's ``x-ratelimit-reset-requests`` / ``-tokens`` headers imply; None without them.

    Only the windows the ``x-ratelimit-remaining-*`` headers show as exhausted count (or, when a
    remaining header is missing, its reset); with several, the longest wait, since the request needs
    all of them. OpenAI and gateways such as LiteLLM send these; prefer ``parse_retry_after`` when it
    answers, as a reset is when the window is full again, not the first free slot.
    """
    waits: list[float] = []
    for dimension in ("requests", "tokens"):
        reset = parse_go_duration_s(_hint(headers, f"x-ratelimit-reset-{dimension}"))
        if reset is None:
            continue
        remaining = _finite_float(_hint(headers, f"x-ratelimit-remaining-{dimension}") or "")
        if remaining is None or remaining <= 0:
            waits.append(reset)
    return max(waits) if waits else None


def _count_header(headers: Mapping[str, str], name: str) -> int | None:
    value = _finite_float(_hint(headers, name) or "")
    return int(value) if value is not None and value >= 0 else None


def parse_rate_limit_info(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """The limits OpenAI-style ``x-ratelimit-limit|remaining|reset-requests|tokens`` headers
    report (also under LiteLLM's ``llm_provider-`` prefix); None when no limit is reported.

    A value that does not parse is left out (None), never guessed.
    """
    info = RateLimitInfo(
        limit_requests=_count_header(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_count_header(headers, "x-ratelimit-remaining-requests"),
        reset_requests_s=parse_go_duration_s(_hint(headers, "x-ratelimit-reset-requests")),
        limit_tokens=_count_header(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_count_header(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens_s=parse_go_duration_s(_hint(headers, "x-ratelimit-reset-tokens")),
    )
    return None if info.is_empty else info


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def parse_duration_s(text: object) -> float | None:
    """Seconds in a protobuf Duration string such as Gemini's ``"17s"`` or ``"0.5s"``; None otherwise.

    Clamped to ``[0, MAX_RETRY_AFTER_S]``: a huge delay must not overflow a sleep.
    """
    if not isinstance(text, str):
        return None
    match = _DURATION_RE.match(text)
    if not match:
        return None
    value = float(match.group(1))
    return _clamp_s(value) if math.isfinite(value) else MAX_RETRY_AFTER_S


def _number(raw: str) -> float | None:
    """A float, where an overflow ("1e400") is infinity (a huge wait, clamped later) and NaN is None."""
    try:
        value = float(raw.strip())
    except (AttributeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _finite_float(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except (AttributeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What an error body says, whatever its shape.

    Attributes:
        message: the provider's message ("" when there is none).
        code: ``error.code`` as a string (OpenAI strings, Gemini and vLLM integers).
        status: Gemini's RPC status (``RESOURCE_EXHAUSTED``...) when given.
        type: OpenAI's ``error.type`` when given.
        details: Gemini's ``error.details`` entries that are objects.
    """

    message: str = ""
    code: str | None = None
    status: str | None = None
    type: str | None = None
    details: tuple[Mapping[str, Any], ...] = ()


def parse_error_body(content: bytes | str) -> ErrorInfo:
    """Read an error body in any shape providers and proxies send.

    Accepts ``{"error": {...}}`` (OpenAI, Gemini, new vLLM), ``{"error": "text"}`` (Ollama,
    LM Studio), ``[{"error": {...}}]`` (Gemini, some paths), a top-level ``message`` (old
    vLLM), and non-JSON text or HTML from a proxy. Never raises.
    """
    try:
        data: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        # Proxies answer with HTML pages: keep the words, drop the markup.
        return ErrorInfo(message=" ".join(re.sub(r"<[^>]*>", " ", text).split()))
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return ErrorInfo(message=_as_text(data))
    err = data.get("error")
    if isinstance(err, list) and err:
        err = err[0]
    if isinstance(err, dict):
        details = err.get("details")
        return ErrorInfo(
            message=_as_text(err.get("message")),
            code=_optional_text(err.get("code")),
            status=_optional_text(err.get("status")),
            type=_optional_text(err.get("type")),
            details=tuple(d for d in details if isinstance(d, dict)) if isinstance(details, list) else (),
        )
    if isinstance(err, str):
        return ErrorInfo(message=err)
    return ErrorInfo(
        message=_as_text(data.get("message") or data.get("detail")),
        code=_optional_text(data.get("code")),
        type=_optional_text(data.get("type")),
    )


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)[:_MAX_MESSAGE_CHARS]


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    return str(value) if isinstance(value, str | int) else None


# --- defensive payload access (a KeyError or TypeError must never escape an adapter) ------------


def expect_dict(value: object, where: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, else MalformedResponseError naming ``where``."""
    if not isinstance(value, dict):
        raise MalformedResponseError(f"{where} is not an object")
    return value


def expect_list(value: object, where: str) -> list[Any]:
    """``value`` when it is a JSON array, else MalformedResponseError naming ``where``."""
    if not isinstance(value, list):
        raise MalformedResponseError(f"{where} is not an array")
    return value


def optional_dict(value: object) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty dict (for optional sections)."""
    return value if isinstance(value, dict) else {}


def optional_count(value: object) -> int | None:
    """A token count, or None when missing or not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def optional_str(value: object) -> str | None:
    """``value`` when it is a string, else None."""
    return value if isinstance(value, str) else None


def sum_counts(*counts: int | None) -> int | None:
    """The sum of the counts present; None when none is."""
    present = [c for c in counts if c is not None]
    return sum(present) if present else None


def request_schema(request: LLMRequest) -> dict[str, Any] | None:
    """``request.json_schema`` as a dict (the executor normally passes one already).

    Raises:
        InvalidRequestError: a string that is not a JSON object.
    """
    schema = request.json_schema
    if schema is None:
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequestError("LLMRequest.json_schema is not valid JSON",
                                      field="json_schema") from None
    if not isinstance(schema, Mapping):
        raise InvalidRequestError("LLMRequest.json_schema must be a JSON object", field="json_schema")
    return dict(schema)


# --- the HTTP base -------------------------------------------------------------------------------


def build_session(config: ProviderConfig) -> requests.Session:
    """A Session whose pool holds ``config.parallel_cap`` connections and never retries.

    urllib3 discards connections past ``pool_maxsize`` ("Connection pool is full"), so the pool
    is sized to the lane's in-flight cap (the ceiling under ``max_parallel="auto"``).
    ``max_retries=0``: retries belong to the executor, which honours Retry-After and takes a fresh
    rate token per attempt. Its connections obey the attempt's total time bound (``transport.GuardedHTTPAdapter``).
    """
    session = requests.Session()
    # One adapter talks to one host, so a couple of per-host pools is plenty.
    adapter = GuardedHTTPAdapter(pool_connections=2, pool_maxsize=config.parallel_cap, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def freeze_environment(session: requests.Session, url: str) -> None:
    """Resolve what ``trust_env`` would read for ``url`` once, then stop reading it per call.

    With ``trust_env`` on, every ``Session.request`` scans the whole environment twice for
    proxy variables (``getproxies_environment``) and looks up ``~/.netrc``: about a third of
    requests' CPU per call on a fast endpoint (issue 7 profile). One adapter talks to one host,
    so the answer is the same every time: proxies (``NO_PROXY`` applied), a CA bundle from
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` and netrc credentials are copied onto the session
    as it is built. Environment changes after the adapter is built are not seen.
    """
    if not session.trust_env:
        return
    if "://" not in url:
        url = "https://" + url
    for scheme, proxy in requests.utils.get_environ_proxies(url).items():
        session.proxies.setdefault(scheme, proxy)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle and session.verify is True:
        session.verify = bundle
    if session.auth is None:
        session.auth = requests.utils.get_netrc_auth(url)
    session.trust_env = False


class HTTPProvider(abc.ABC):
    """Base of the built-in adapters: owns the HTTP call and the error translation.

    Subclasses set ``default_base_url`` and ``retryable_statuses``, and implement ``_headers``,
    ``complete``, ``capabilities`` and ``health_check``; they may refine ``_is_quota_exhausted``,
    ``_body_retry_after_s`` and ``_describe_error`` for their error bodies.

    Attributes:
        name: the provider (lane) name, copied onto every response and error.
        config: the lane's ProviderConfig.
        session: the ``requests.Session`` every call goes through (injected or built).
    """

    default_base_url: ClassVar[str] = ""
    # 408/429/5xx are transient everywhere; 409 is added by OpenAI (a lock timeout there).
    retryable_statuses: ClassVar[frozenset[int]] = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(self, name: str, config: ProviderConfig, session: requests.Session | None = None) -> None:
        """Create the adapter.

        Args:
            name: the lane name (usually "openai", "gemini" or "ollama").
            config: the lane's settings (base_url, model, api_key, timeouts, max_parallel...).
            session: a Session to send through (tests inject one); None builds one sized to
                ``config.max_parallel``. An injected Session keeps its own adapters: mount a
                ``transport.GuardedHTTPAdapter`` on it for the attempt bound to reach a blocked
                socket (without one, only the socket timeouts and the checks between body
                chunks apply).
        """
        self.name = name
        self.config = config
        # A Session we build reads the environment once, at the first call (subclasses finish
        # setting up base_url after this); an injected one is left exactly as given.
        self._freeze_pending = session is None
        self.session = session if session is not None else build_session(config)
        # urllib3 quotes unparsable response headers in its log, so a server echoing the key would
        # put it there: its loggers (and ours) scrub this key from every record.
        register_secret(config.api_key)

    def __repr__(self) -> str:
        # Never the key; the base URL masked in case it carries a password or a query.
        return f"{type(self).__name__}(name={self.name!r}, base_url={mask_url(self.base_url)!r})"

    @property
    def base_url(self) -> str:
        """The endpoint root in use (``config.base_url`` or the provider's default)."""
        return (self.config.base_url or self.default_base_url).strip()

    def close(self) -> None:
        """Close the session's pooled connections."""
        self.session.close()

    # -- the adapter's part ------------------------------------------------------------------------

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What the provider can do (output-token caps, JSON modes, known models)."""

    @abc.abstractmethod
    def complete(self, request: LLMRequest) -> LLMResponse:
        """Run one attempt of ``request``; failures raise ProviderError subclasses."""

    @abc.abstractmethod
    def health_check(self) -> str:
        """A cheap call proving the endpoint and key work; a short description, or ProviderError."""

    # -- hooks ----------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        """Headers of every call, auth included."""
        return {}

    def _is_quota_exhausted(self, info: ErrorInfo) -> bool:
        """Whether a 429 means a quota that will not refill soon (then not retryable)."""
        return False

    def _body_retry_after_s(self, info: ErrorInfo) -> float | None:
        """A wait the error body asks for (Gemini's RetryInfo); None by default."""
        return None

    def _describe_error(self, status: int, info: ErrorInfo, model: str | None) -> str | None:
        """A clearer message for a known error, or None to use the provider's own."""
        return None

    # -- shared helpers --------------------------------------------------------------------------

    def resolve_model(self, request: LLMRequest) -> str:
        """``request.model``, else ``config.model``.

        Raises:
            InvalidRequestError: neither is set; names LLM_EXECUTOR_<NAME>_MODEL.
        """
        model = (request.model or self.config.model or "").strip()
        if not model:
            raise InvalidRequestError(
                f"no model for provider {self.name!r}: set LLMRequest.model or "
                f"LLM_EXECUTOR_{self.name.upper()}_MODEL",
                field="model",
            )
        return model

    def read_timeout_s(self, request: LLMRequest | None) -> float:
        """The attempt's total time bound: ``config.timeout``, cut to the time left before the deadline."""
        if request is not None and request.timeout is not None:
            return max(0.001, min(self.config.timeout, request.timeout))
        return self.config.timeout

    def redact(self, text: str) -> str:
        """``text`` with the key, key-like tokens and URL query strings hidden, truncated."""
        key = self.config.api_key
        if key and key.strip():
            text = text.replace(key.strip(), "***")
        # Providers echo (partly masked) keys back ("Incorrect API key provided: sk-abc***xyz").
        text = re.sub(r"\b(sk-|AIza)[A-Za-z0-9_\-*.]{4,}", r"\1***", text)
        text = re.sub(r"(https?://[^\s?#\"']*)\?[^\s\"']*", r"\1?***", text)
        text = re.sub(r"(?i)\b(key|api_key|apikey|token)=[^&\s\"']+", r"\1=***", text)
        if len(text) > _MAX_MESSAGE_CHARS:
            text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
        return text

    def _where(self) -> str:
        # Scheme and host only: a base URL may carry a password or a query string.
        parts = urlsplit(self.base_url if "://" in self.base_url else "https://" + self.base_url)
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ""
        return f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else "(no host)"

    # -- the HTTP call -----------------------------------------------------------------------------

    def request_json(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        request: LLMRequest | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """``request_json_info`` without the reported limits."""
        return self.request_json_info(method, url, body=body, request=request, model=model)[0]

    def request_json_info(
        self,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        request: LLMRequest | None = None,
        model: str | None = None,
    ) -> tuple[dict[str, Any], RateLimitInfo | None]:
        """Send one HTTP call and return its JSON object; the only place errors are translated.

        Args:
            method: "GET" or "POST".
            url: the full URL (never with a key in it).
            body: the JSON body for POST.
            request: the LLMRequest being served (its timeout and request_id), if any.
            model: the model, for error messages.

        Returns:
            The decoded JSON object of a 2xx response, and the limits its headers reported (a
            ``ProviderError`` carries them too, as ``.rate_limit``).

        Raises:
            ProviderUnavailableError: connection error, or no complete response within
                ``config.timeout`` (retryable), or a 5xx.
            DeadlineExceededError: the request's deadline (``request.timeout``, shorter than
                ``config.timeout``) passed during the attempt.
            RateLimitedError: 429; not retryable when the quota is exhausted.
            ProviderError: any other status (a 3xx is never followed), a 2xx body that is not a
                JSON object or is larger than ``config.max_response_bytes``, a reply head that
                breaks HTTP, or a header value HTTP cannot carry (not retryable).
            InvalidRequestError: ``body`` cannot be encoded as JSON (NaN in a schema).
        """
        if self._freeze_pending:
            # A race here is harmless: a second thread just reads the environment once more.
            self._freeze_pending = False
            freeze_environment(self.session, self.base_url)
        request_id = (request.request_id or None) if request is not None else None
        data = self._encode_body(body)
        budget_s = self.read_timeout_s(request)
        # Which bound ends the attempt decides the error: the request's deadline, or our own timeout.
        by_deadline = request is not None and request.timeout is not None and request.timeout <= self.config.timeout
        headers = self._headers()
        if data is not None:
            headers = {"Content-Type": "application/json", **headers}
        response: requests.Response | None = None
        failure: LLMExecutorError | None = None
        content = b""
        with AttemptGuard(time.monotonic() + budget_s) as watch:
            try:
                response = self.session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    # Each socket wait is bounded too; the watchdog bounds their sum.
                    timeout=(min(self.config.connect_timeout, budget_s), budget_s),
                    # requests re-sends custom headers (x-goog-api-key) to a redirect's new host.
                    allow_redirects=False,
                    stream=True,
                )
            except requests.RequestException as exc:
                failure = self._transport_error(exc, watch, budget_s, by_deadline, request_id)
            except (UnicodeError, ValueError) as exc:
                # http.client encodes header values as latin-1: a key with '€' raised a bare
                # UnicodeEncodeError quoting "Bearer <key>" (issue 11 item 1a). Never chained.
                failure = self._unsendable(type(exc).__name__, request_id)
            if failure is None and response is not None:
                try:
                    content, failure = self._read_body(response, watch, budget_s, by_deadline, request_id)
                finally:
                    # From here on a late expiry must not touch the connection (closed below, or
                    # already back in the pool, where the next attempt claims it).
                    watch.finish()
                    if failure is not None or not 200 <= response.status_code < 300:
                        response.close()
        # Raised outside the except blocks on purpose: requests exceptions carry the URL and the
        # PreparedRequest (its headers hold the key), so they must not ride along as __context__.
        if failure is not None or response is None:
            raise failure or ProviderError(f"{self.name}: no response", provider=self.name)
        try:
            info = parse_rate_limit_info(response.headers)
            return self._checked_json(response, content, request_id, model, info), info
        finally:
            response.close()

    def _encode_body(self, body: Mapping[str, Any] | None) -> bytes | None:
        """The JSON body as bytes; NaN/Infinity or non-string keys are the request's fault, not the network's."""
        if body is None:
            return None
        try:
            return json.dumps(body, allow_nan=False).encode("utf-8")
        except (ValueError, TypeError, RecursionError) as exc:
            reason = type(exc).__name__
        # Everything else in a body is validated at submit; a schema is the one free-form part.
        raise InvalidRequestError(
            f"{self.name}: the request body cannot be encoded as JSON ({reason}: NaN/Infinity, a non-string key "
            "or nesting too deep); check LLMRequest.json_schema", field="json_schema")

    def _unsendable(self, kind: str, request_id: str | None) -> ProviderError:
        return ProviderError(
            f"{self.name}: the request could not be sent ({kind}): a header value or the URL has a character "
            f"HTTP cannot carry (header values must be latin-1 text); check LLM_EXECUTOR_{self.name.upper()}"
            "_API_KEY, the adapter's options and the base URL",
            provider=self.name, request_id=request_id, retryable=False)

    def _read_body(self, response: requests.Response, watch: AttemptWatch, budget_s: float, by_deadline: bool,
                   request_id: str | None) -> tuple[bytes, LLMExecutorError | None]:
        """Read the body within the attempt's bound and the size cap; (bytes, None) or (b"", the error)."""
        status = response.status_code
        if 300 <= status < 400:
            return b"", None  # never followed, never read
        ok = 200 <= status < 300
        # A 2xx body is the answer: past the cap it fails. An error body only feeds a message: cut.
        limit = self.config.max_response_bytes if ok else _MAX_ERROR_BODY_BYTES
        if ok and _declared_length(response) > limit:
            return b"", self._too_large(status, request_id)
        chunks: list[bytes] = []
        total = 0
        failure: LLMExecutorError | None = None
        try:
            # iter_content decompresses step by step (urllib3 >= 2.6 bounds each step's output),
            # so a gzip bomb is stopped at the cap, not after inflating (issue 11 item 7).
            for chunk in response.iter_content(_CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    if ok:
                        failure = self._too_large(status, request_id)
                    else:
                        chunks.append(chunk[: len(chunk) - (total - limit)])
                    break
                chunks.append(chunk)
                if watch.is_over():
                    break
        except requests.RequestException as exc:
            failure = self._transport_error(exc, watch, budget_s, by_deadline, request_id)
        if watch.is_over():
            # Also when the body "ended": a socket shut by the watchdog reads as EOF.
            failure = self._attempt_timeout(budget_s, by_deadline, request_id)
        if failure is not None:
            return b"", failure
        return b"".join(chunks), None

    def _too_large(self, status: int, request_id: str | None) -> ProviderError:
        return ProviderError(
            f"{self.name}: reply from {self._where()} (HTTP {status}) is larger than max_response_bytes="
            f"{self.config.max_response_bytes} after decompression; raise LLM_EXECUTOR_{self.name.upper()}"
            "_MAX_RESPONSE_BYTES if it is genuine",
            provider=self.name, status=status, request_id=request_id, retryable=False)

    def _attempt_timeout(self, budget_s: float, by_deadline: bool, request_id: str | None) -> LLMExecutorError:
        where = self._where()
        if by_deadline:
            return DeadlineExceededError(
                f"{self.name}: request {request_id or ''} reached its deadline during an attempt to {where} "
                f"({budget_s:.3g}s were left when it started); the connection was closed",
                request_id=request_id, provider=self.name)
        # The provider may have started (and billed) the generation: a retry can cost twice.
        return ProviderUnavailableError(
            f"{self.name}: no complete response from {where} within {self.config.timeout:g}s "
            f"(LLM_EXECUTOR_{self.name.upper()}_TIMEOUT bounds the whole attempt); the connection was closed",
            provider=self.name, request_id=request_id, retryable=True)

    def _transport_error(self, exc: requests.RequestException, watch: AttemptWatch, budget_s: float,
                         by_deadline: bool, request_id: str | None) -> LLMExecutorError:
        if watch.expired or (isinstance(exc, requests.Timeout) and watch.remaining_s() <= _BOUND_SLACK_S):
            # The watchdog shut the socket, or a socket wait hit the attempt's bound: one error for both.
            return self._attempt_timeout(budget_s, by_deadline, request_id)
        where = self._where()
        kind = type(exc).__name__
        if isinstance(exc, requests.ConnectTimeout):
            message = f"{self.name}: could not connect to {where} within {self.config.connect_timeout:g}s"
        elif isinstance(exc, requests.ReadTimeout):
            message = f"{self.name}: no response from {where} within {budget_s:g}s (read timeout)"
        elif isinstance(exc, requests.exceptions.SSLError):
            return ProviderError(f"{self.name}: TLS error talking to {where} ({kind})", provider=self.name,
                                 request_id=request_id, retryable=False)
        elif isinstance(exc, requests.exceptions.ContentDecodingError):
            return ProviderError(
                f"{self.name}: malformed response from {where}: the body does not match its Content-Encoding",
                provider=self.name, request_id=request_id, retryable=False)
        elif (violation := _protocol_violation(exc)) is not None:
            # A header flood, a 100 KB header line, a garbage status line: the same again on a retry.
            return ProviderError(f"{self.name}: malformed response from {where}: the reply breaks HTTP ({violation})",
                                 provider=self.name, request_id=request_id, retryable=False)
        elif isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
            message = f"{self.name}: connection to {where} failed ({kind})"
        else:
            # InvalidURL, InvalidHeader (a key with a newline: requests' message quotes it)...
            return ProviderError(
                f"{self.name}: the request to {where} could not be sent ({kind}); check the base URL "
                f"and LLM_EXECUTOR_{self.name.upper()}_API_KEY for stray characters",
                provider=self.name, request_id=request_id, retryable=False,
            )
        return ProviderUnavailableError(message, provider=self.name, request_id=request_id, retryable=True)

    def _checked_json(self, response: requests.Response, content: bytes, request_id: str | None,
                      model: str | None, info: RateLimitInfo | None = None) -> dict[str, Any]:
        status = response.status_code
        if not 200 <= status < 300:
            try:
                error = self._status_error(response, content, request_id, model)
            except (KeyError, IndexError, TypeError, AttributeError, ValueError, RecursionError) as exc:
                # An adapter hook tripped over an odd error body: still a typed error for this status.
                error = self._plain_status_error(status, type(exc).__name__, request_id)
            if info is not None:
                error.rate_limit = info  # a 429 says the limits too: "auto" limits learn from it
            raise error
        try:
            data = json.loads(content)
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise ProviderError(
                f"{self.name}: malformed response (HTTP {status}): the body is not a JSON object",
                provider=self.name, status=status, request_id=request_id, retryable=False,
            )
        return data

    def _status_error(self, response: requests.Response, content: bytes, request_id: str | None,
                      model: str | None) -> ProviderError:
        status = response.status_code
        kw: dict[str, Any] = {"provider": self.name, "status": status, "request_id": request_id}
        if 300 <= status < 400:
            # Location is left out: it may carry a query string.
            return ProviderError(
                f"{self.name}: HTTP {status} redirect from {self._where()} not followed; "
                "check LLM_EXECUTOR_" + self.name.upper() + "_BASE_URL",
                retryable=False, **kw,
            )
        info = parse_error_body(content)
        provider_request_id = response.headers.get("x-request-id")
        suffix = f" [x-request-id {self.redact(provider_request_id)}]" if provider_request_id else ""
        detail = self._describe_error(status, info, model)
        if detail is None:
            # A proxy may repeat the status as the code ("HTTP 429 (429)" says nothing twice).
            code = f" ({self.redact(info.code)})" if info.code and info.code != str(status) else ""
            said = self.redact(info.message) or response.reason or "no message"
            detail = f"HTTP {status}{code}: {said}"
            if status == 404:
                # Not a model the adapter recognised (it says so itself): the URL names no endpoint.
                path = urlsplit(response.url or "").path or "the path"
                detail = (f"HTTP 404: no such endpoint {path} at {self._where()}; check "
                          f"LLM_EXECUTOR_{self.name.upper()}_BASE_URL ({said})")
        message = f"{self.name}: {detail}{suffix}"
        retry_after_s = parse_retry_after(response.headers)
        if retry_after_s is None and status == 429:
            retry_after_s = parse_rate_limit_reset(response.headers)
        if retry_after_s is None:
            retry_after_s = self._body_retry_after_s(info)
        # Redacted: a hostile server may echo the key in any header (issue 11 item 1b).
        log.debug("%s error status=%s x-request-id=%s", self.name, status,
                  self.redact(provider_request_id) if provider_request_id else None)
        if status == 429 and self._is_quota_exhausted(info):
            # Quota exhaustion is final whatever x-should-retry says: waiting does not refill it.
            return RateLimitedError(message, retryable=False, retry_after_s=retry_after_s, **kw)
        # OpenAI's x-should-retry takes precedence over the status (as in openai-python).
        should_retry = (response.headers.get("x-should-retry") or "").strip().lower()
        retryable = status in self.retryable_statuses
        if should_retry in ("true", "false"):
            retryable = should_retry == "true"
        if status == 429:
            return RateLimitedError(message, retryable=retryable, retry_after_s=retry_after_s, **kw)
        if status >= 500 or status in self.retryable_statuses:  # 408, and 409 for OpenAI
            return ProviderUnavailableError(message, retryable=retryable, retry_after_s=retry_after_s, **kw)
        return ProviderError(message, retryable=retryable, **kw)

    def _plain_status_error(self, status: int, why: str, request_id: str | None) -> ProviderError:
        message = f"{self.name}: HTTP {status} with an error body of unexpected shape ({why})"
        kw: dict[str, Any] = {"provider": self.name, "status": status, "request_id": request_id,
                              "retryable": status in self.retryable_statuses}
        if status == 429:
            return RateLimitedError(message, **kw)
        if status >= 500 or status in self.retryable_statuses:
            return ProviderUnavailableError(message, **kw)
        return ProviderError(message, **kw)

    def parse_guarded(self, parse: Callable[[dict[str, Any]], LLMResponse], payload: dict[str, Any],
                      request: LLMRequest, rate_limit: RateLimitInfo | None = None) -> LLMResponse:
        """Run ``parse(payload)``; a shape surprise becomes a non-retryable "malformed response" error.

        ``rate_limit`` (what ``request_json_info`` read from the headers) rides on the response.
        """
        request_id = request.request_id or None
        try:
            response = parse(payload)
            if rate_limit is not None and response.rate_limit is None:
                response = dataclasses.replace(response, rate_limit=rate_limit)
            return response
        except LLMExecutorError:
            raise
        except MalformedResponseError as exc:
            reason = str(exc)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            reason = f"unexpected JSON shape ({type(exc).__name__})"
        self._raise_malformed(reason, request_id)

    def _raise_malformed(self, reason: str, request_id: str | None) -> NoReturn:
        raise ProviderError(f"{self.name}: malformed response: {reason}", provider=self.name,
                            status=200, request_id=request_id, retryable=False)

    def _check_key(self) -> None:  # noqa: B027 - a hook: adapters whose host needs a key override it
        """Raise ``missing_key_error`` when a call would need a key that is not configured."""

    def is_configured(self) -> bool:
        """Whether a call could be sent (the key is there where one is needed); no network."""
        try:
            self._check_key()
        except ProviderError:
            return False
        return True

    def missing_key_error(self, *variables: str) -> ProviderError:
        """The error for a call that needs a key nobody configured (names the variables)."""
        names = " or ".join((*variables, f"LLM_EXECUTOR_{self.name.upper()}_API_KEY"))
        return ProviderError(f"{self.name}: no API key: set {names}", provider=self.name, retryable=False)


def _declared_length(response: requests.Response) -> int:
    """The Content-Length of an unencoded body, or -1 (unknown, or counted after decompression)."""
    if response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return -1
    try:
        return int(response.headers.get("content-length", "-1"))
    except ValueError:
        return -1


def _protocol_violation(exc: BaseException) -> str | None:
    """The http.client parse error under a requests exception (its class name), or None.

    A reset or a truncated body (RemoteDisconnected, IncompleteRead) is the connection's fault
    and worth a retry; a head http.client refuses to parse is the server's and is not.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # requests -> urllib3 -> http.client: a short chain
        if seen is None:
            return None
        for candidate in (seen, *(a for a in seen.args if isinstance(a, BaseException))):
            if isinstance(candidate, http.client.HTTPException) and not isinstance(
                    candidate, http.client.RemoteDisconnected | http.client.IncompleteRead):
                return type(candidate).__name__
        seen = seen.__cause__ or seen.__context__
    return None
