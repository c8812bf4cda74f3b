"""Value types exchanged with the executor: LLMRequest, LLMResponse, Capabilities.

All are frozen dataclasses; use ``dataclasses.replace`` for "same but" copies. Field-level
validation that needs no provider knowledge happens here (``LLMRequest.validate``); checks
against a provider's capabilities happen in ``llm_executor.validation``.
This module imports only the stdlib and ``errors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequestError

__all__ = ["FINISH_REASONS", "MAX_SECONDS", "Capabilities", "FinishReason", "LLMRequest", "LLMResponse",
           "RateLimitInfo"]

FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "other"]
FINISH_REASONS: frozenset[str] = frozenset({"stop", "length", "content_filter", "tool_calls", "other"})

# The longest duration any setting or request may ask for: a week. Longer ones are typos, and a
# wait past threading.TIMEOUT_MAX raises OverflowError deep in a worker (issue 11 item 8).
MAX_SECONDS = 7 * 24 * 3600.0
# Providers parse token counts as 32-bit integers.
MAX_OUTPUT_TOKENS = 2**31 - 1
# Identifiers are logged and sent in URLs: bounded, printable.
_MAX_NAME_CHARS = {"provider": 128, "model": 256, "request_id": 128}
_MAX_PROVIDER_CHARS = _MAX_NAME_CHARS["provider"]
_MAX_MODEL_CHARS = _MAX_NAME_CHARS["model"]
_MAX_REQUEST_ID_CHARS = _MAX_NAME_CHARS["request_id"]


def _text_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as UTF-8 JSON text (a lone surrogate), or None."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate at index {exc.start} (not valid Unicode text)"
    return None


def _name_problem(value: str, field: str) -> str | None:
    """Why identifier ``value`` is unusable (too long, control or unpaired characters), or None."""
    limit = _MAX_NAME_CHARS[field]
    if len(value) > limit:
        return f"at most {limit} characters, got {len(value)}"
    if not value.isprintable():
        index = next(i for i, c in enumerate(value) if not c.isprintable())
        return f"printable text, got a control or unpaired character at index {index}"
    return None

# The per-attempt copies below set frozen slots directly (what the generated __init__ does, minus
# its per-field global lookups), each through its slot's own setter: bound once, after each class.
_new = object.__new__


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The ``__set__`` of each named slot of ``cls``, in order.

    A frozen slot set through its descriptor skips ``object.__setattr__``'s attribute lookup: a
    third cheaper per field on the per-request path.
    """
    return tuple(cls.__dict__[name].__set__ for name in names)


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One call to a language model.

    Args:
        provider: "openai", "gemini", "ollama", "auto" or a registered custom name.
        model: model name; "" means the provider's default (LLM_EXECUTOR_<NAME>_MODEL).
        prompt: the user message; must not be empty.
        system: optional system instruction.
        max_output_tokens: cap on generated tokens (> 0), checked against the provider's capabilities.
        temperature: sampling temperature in [0, 2].
        json_schema: a JSON Schema (dict or JSON string); the output is validated and parsed into
            ``LLMResponse.data``.
        request_id: given a uuid4 at submit when empty.
        priority: higher starts first within a provider's lane (with aging: no starvation).
        timeout: seconds for the whole request, queue wait and every attempt included.
        metadata: free-form caller data, never sent to the provider nor logged.
    """

    provider: str
    model: str
    prompt: str
    system: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    json_schema: Mapping[str, Any] | str | None = field(default=None, hash=False)
    request_id: str = ""
    priority: int = 0
    timeout: float | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def validate(self) -> None:
        """Check every field that needs no provider knowledge.

        Raises:
            InvalidRequestError: naming the field and the value expected.
        """
        if not isinstance(self.provider, str) or not self.provider.strip():
            shown = repr(self.provider) if isinstance(self.provider, str) else type(self.provider).__name__
            raise InvalidRequestError(
                f"LLMRequest.provider must be a non-empty string, got {shown}", field="provider"
            )
        if not isinstance(self.model, str):
            raise InvalidRequestError(
                f"LLMRequest.model must be a string ('' for the provider's default), got {type(self.model).__name__}",
                field="model",
            )
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            shown = "an empty string" if isinstance(self.prompt, str) else type(self.prompt).__name__
            raise InvalidRequestError(
                f"LLMRequest.prompt must be a non-empty string, got {shown}", field="prompt"
            )
        if self.system is not None and not isinstance(self.system, str):
            raise InvalidRequestError(
                f"LLMRequest.system must be a string or None, got {type(self.system).__name__}", field="system"
            )
        if not isinstance(self.request_id, str):
            raise InvalidRequestError(
                f"LLMRequest.request_id must be a string, got {type(self.request_id).__name__}", field="request_id"
            )
        provider, model, request_id, system = self.provider, self.model, self.request_id, self.system
        # The usual request passes each check below at once; the loops find and name a problem.
        if not (len(provider) <= _MAX_PROVIDER_CHARS and len(model) <= _MAX_MODEL_CHARS
                and len(request_id) <= _MAX_REQUEST_ID_CHARS and provider.isprintable() and model.isprintable()
                and request_id.isprintable()):
            for name in ("provider", "model", "request_id"):
                problem = _name_problem(getattr(self, name), name)
                if problem is not None:
                    raise InvalidRequestError(f"LLMRequest.{name} must be {problem}", field=name)
        if not (self.prompt.isascii() and (system is None or system.isascii())):
            for name in ("prompt", "system"):
                text = getattr(self, name)
                problem = None if text is None else _text_problem(text)
                if problem is not None:
                    raise InvalidRequestError(f"LLMRequest.{name} has {problem}", field=name)
        mot = self.max_output_tokens
        if mot is not None and (isinstance(mot, bool) or not isinstance(mot, int) or not 0 < mot <= MAX_OUTPUT_TOKENS):
            raise InvalidRequestError(
                f"LLMRequest.max_output_tokens must be an integer in [1, {MAX_OUTPUT_TOKENS}] or None, "
                f"got {_short(mot)}",
                field="max_output_tokens",
            )
        temp = self.temperature
        if temp is not None and (
            isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0.0 <= temp <= 2.0
        ):
            raise InvalidRequestError(
                f"LLMRequest.temperature must be a number in [0, 2] or None, got {_short(temp)}", field="temperature"
            )
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or abs(self.priority) > 10**6:
            raise InvalidRequestError(
                f"LLMRequest.priority must be an integer in [-1000000, 1000000], got {_short(self.priority)}",
                field="priority",
            )
        tmo = self.timeout
        if tmo is not None and (
            isinstance(tmo, bool) or not isinstance(tmo, (int, float)) or not 0 < tmo <= MAX_SECONDS
        ):
            raise InvalidRequestError(
                f"LLMRequest.timeout must be a positive number of seconds <= {MAX_SECONDS:g} (a week) or None, "
                f"got {_short(tmo)}",
                field="timeout",
            )
        if type(self.metadata) is not dict and not isinstance(self.metadata, Mapping):
            raise InvalidRequestError(
                f"LLMRequest.metadata must be a mapping, got {type(self.metadata).__name__}", field="metadata"
            )
        schema = self.json_schema
        if schema is not None and not isinstance(schema, Mapping | str):
            raise InvalidRequestError(
                f"LLMRequest.json_schema must be a dict, a JSON string or None, got {type(schema).__name__}",
                field="json_schema",
            )

    def for_attempt(self, *, provider: str, model: str, request_id: str, prompt: str,
                    max_output_tokens: int | None, json_schema: Mapping[str, Any] | None,
                    timeout: float | None) -> LLMRequest:
        """The copy one provider attempt receives: resolved names, the time left as ``timeout``.

        Every field is named here (a test checks none is missed); the copy is made field by field
        without ``__init__``, 40% cheaper on the per-attempt path than the frozen ``__init__``.
        """
        new = _new(LLMRequest)
        _rq_provider(new, provider)
        _rq_model(new, model)
        _rq_prompt(new, prompt)
        _rq_system(new, self.system)
        _rq_max_output_tokens(new, max_output_tokens)
        _rq_temperature(new, self.temperature)
        _rq_json_schema(new, json_schema)
        _rq_request_id(new, request_id)
        _rq_priority(new, self.priority)
        _rq_timeout(new, timeout)
        _rq_metadata(new, self.metadata)
        return new


(_rq_provider, _rq_model, _rq_prompt, _rq_system, _rq_max_output_tokens, _rq_temperature, _rq_json_schema,
 _rq_request_id, _rq_priority, _rq_timeout, _rq_metadata) = _slot_setters(
    LLMRequest, ("provider", "model", "prompt", "system", "max_output_tokens", "temperature", "json_schema",
                 "request_id", "priority", "timeout", "metadata"))


def _short(value: object) -> str:
    # A 4300-digit int or a huge list must not make the error message itself huge.
    try:
        text = repr(value) if isinstance(value, int | float | str | bool | type(None)) else type(value).__name__
    except ValueError:  # an int past sys.get_int_max_str_digits()
        text = f"an integer of about {value.bit_length() * 0.30103:.0f} digits" if isinstance(value, int) else "?"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class LLMResponse:
    """The result of one request.

    Only the first five fields are required, so a custom provider may return just those;
    the executor fills ``request_id``, ``latency_ms``, ``queue_ms``, ``attempts`` and ``data``.

    Attributes:
        text: the generated text ("" when the provider returned none).
        provider: the provider (lane) that served the request.
        model: the model the provider reports.
        finish_reason: "stop", "length", "content_filter", "tool_calls" or "other".
        usage_tokens: total tokens billed for the successful attempt, None when not reported.
        raw_finish_reason: the provider's own value.
        prompt_tokens / completion_tokens: None when not reported.
        request_id: our request id.
        latency_ms: provider time of the successful attempt.
        queue_ms: time from submit to the first attempt's start.
        attempts: provider calls made (retries and repairs included).
        data: the parsed JSON when ``json_schema`` was given, else None.
        rate_limit: the limits the provider reported on this reply (``RateLimitInfo``), None
            when it reported none; ``auto`` limits learn from it.
    """

    text: str
    provider: str
    model: str
    finish_reason: str
    usage_tokens: int | None
    raw_finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_id: str = ""
    latency_ms: float = 0.0
    queue_ms: float = 0.0
    attempts: int = 0
    data: Any = field(default=None, hash=False, compare=False)
    rate_limit: RateLimitInfo | None = field(default=None, hash=False, compare=False)

    def completed(self, *, provider: str, request_id: str, latency_ms: float, queue_ms: float, attempts: int,
                  data: Any) -> LLMResponse:
        """The copy the caller receives: the provider's fields plus what the executor measured.

        Field by field without ``__init__``, as ``LLMRequest.for_attempt`` (a test checks every field).
        """
        new = _new(LLMResponse)
        _rs_text(new, self.text)
        _rs_provider(new, provider)
        _rs_model(new, self.model)
        _rs_finish_reason(new, self.finish_reason)
        _rs_usage_tokens(new, self.usage_tokens)
        _rs_raw_finish_reason(new, self.raw_finish_reason)
        _rs_prompt_tokens(new, self.prompt_tokens)
        _rs_completion_tokens(new, self.completion_tokens)
        _rs_request_id(new, request_id)
        _rs_latency_ms(new, latency_ms)
        _rs_queue_ms(new, queue_ms)
        _rs_attempts(new, attempts)
        _rs_data(new, data)
        _rs_rate_limit(new, self.rate_limit)
        return new


(_rs_text, _rs_provider, _rs_model, _rs_finish_reason, _rs_usage_tokens, _rs_raw_finish_reason, _rs_prompt_tokens,
 _rs_completion_tokens, _rs_request_id, _rs_latency_ms, _rs_queue_ms, _rs_attempts, _rs_data,
 _rs_rate_limit) = _slot_setters(
    LLMResponse, ("text", "provider", "model", "finish_reason", "usage_tokens", "raw_finish_reason", "prompt_tokens",
                  "completion_tokens", "request_id", "latency_ms", "queue_ms", "attempts", "data", "rate_limit"))


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """The limits a provider reported on one reply (OpenAI-style ``x-ratelimit-*`` headers).

    Carried on ``LLMResponse.rate_limit`` and on a 429's ``RateLimitedError.rate_limit``; a lane
    whose QPS, RPM or TPM is ``auto`` adopts them. Every field is None when not reported.

    Attributes:
        limit_requests / remaining_requests: the request limit (per minute, as OpenAI's RPM)
            and what is left of it.
        reset_requests_s: seconds until the request window is full again.
        limit_tokens / remaining_tokens / reset_tokens_s: the same for tokens (TPM).
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @property
    def is_empty(self) -> bool:
        """True when no limit was reported."""
        return self.limit_requests is None and self.limit_tokens is None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a provider can do; every field has a default meaning "unknown / no".

    Attributes:
        max_output_tokens: the largest max_output_tokens accepted; None when unknown.
        supports_json_mode: the provider can be told to answer with JSON.
        supports_json_schema: the provider can constrain its output to a JSON schema.
        supports_system_prompt: a system instruction is sent separately from the prompt.
        models: known model names (may be empty).
        model_max_output_tokens: per-model caps, where they differ from ``max_output_tokens``.
    """

    max_output_tokens: int | None = None
    supports_json_mode: bool = False
    supports_json_schema: bool = False
    supports_system_prompt: bool = False
    models: tuple[str, ...] = ()
    model_max_output_tokens: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)

    def max_output_tokens_for(self, model: str) -> int | None:
        """The output-token cap for ``model`` (per-model value first, then the provider's)."""
        return self.model_max_output_tokens.get(model, self.max_output_tokens)
