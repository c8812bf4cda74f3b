"""The Google Gemini adapter (Generative Language API, native REST).

Owns the request body and the response parsing of ``POST {base}/v1beta/models/{model}:generateContent``
and Gemini's error details (API_KEY_INVALID, RetryInfo, QuotaFailure); see PROVIDERS.md section 2.
The key travels in the ``x-goog-api-key`` header only: a ``?key=`` URL ends up in exception text.
Imports: ``types``, ``errors``, ``config``, ``providers.base``; never the executor.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from ..errors import ContentBlockedError
from ..types import Capabilities, LLMRequest, LLMResponse
from .base import (
    ErrorInfo,
    HTTPProvider,
    MalformedResponseError,
    expect_dict,
    expect_list,
    optional_count,
    optional_dict,
    optional_str,
    parse_duration_s,
    request_schema,
    sum_counts,
)

__all__ = ["GeminiProvider"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
GEMINI_HOST = "generativelanguage.googleapis.com"

# outputTokenLimit of models.get for the models we know; thinking tokens count against it.
_MODEL_MAX_OUTPUT_TOKENS: dict[str, int] = {
    "gemini-2.5-pro": 65536,
    "gemini-2.5-flash": 65536,
    "gemini-2.5-flash-lite": 65536,
    "gemini-2.0-flash": 8192,
    "gemini-2.0-flash-lite": 8192,
}

_CONTENT_FILTER_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
})

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


def normalise_finish_reason(raw: str | None, has_function_call: bool) -> str:
    """Gemini's ``finishReason`` as one of stop/length/content_filter/tool_calls/other."""
    if raw == "STOP":
        return "tool_calls" if has_function_call else "stop"
    if raw == "MAX_TOKENS":
        return "length"
    if raw in _CONTENT_FILTER_REASONS:
        return "content_filter"
    return "other"


class GeminiProvider(HTTPProvider):
    """Gemini ``generateContent`` over ``requests``.

    Config used: ``base_url`` (default https://generativelanguage.googleapis.com; a base ending
    in ``/v1beta`` or ``/v1`` is used as is), ``api_key`` (GEMINI_API_KEY or GOOGLE_API_KEY;
    required for Google's host), ``model``, ``options["json_mode"]`` ("schema", the default,
    sends ``responseJsonSchema``; "json" sends only ``responseMimeType``).
    """

    default_base_url: ClassVar[str] = DEFAULT_BASE_URL

    def capabilities(self) -> Capabilities:
        """JSON mode and JSON schema, system instructions, and the known models' output caps."""
        caps = dict(_MODEL_MAX_OUTPUT_TOKENS)
        models = tuple(caps)
        default = _strip_models_prefix(self.config.model or "")
        if default and default not in caps:
            models += (default,)
        return Capabilities(
            max_output_tokens=None,
            supports_json_mode=True,
            supports_json_schema=True,
            supports_system_prompt=True,
            models=models,
            model_max_output_tokens=caps,
        )

    def _api_root(self) -> str:
        base = self.base_url.rstrip("/")
        if "://" not in base:
            base = "https://" + base
        path = urlsplit(base).path.rstrip("/")
        return base if path.endswith(("/v1beta", "/v1")) else base + "/v1beta"

    def url_for(self, model: str) -> str:
        """The generateContent URL of ``model`` (a leading ``models/`` is stripped)."""
        return f"{self._api_root()}/models/{quote(_strip_models_prefix(model), safe='')}:generateContent"

    def _headers(self) -> dict[str, str]:
        key = (self.config.api_key or "").strip()
        return {"x-goog-api-key": key} if key else {}

    def _check_key(self) -> None:
        if urlsplit(self._api_root()).hostname == GEMINI_HOST and not (self.config.api_key or "").strip():
            raise self.missing_key_error("GEMINI_API_KEY", "GOOGLE_API_KEY")

    def build_body(self, request: LLMRequest) -> dict[str, Any]:
        """The JSON body of ``generateContent`` for ``request`` (camelCase fields only)."""
        body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": request.prompt}]}]}
        if request.system:
            # python-genai sends the role too (recorded in tests/conformance); the API defaults it.
            body["systemInstruction"] = {"role": "user", "parts": [{"text": request.system}]}
        generation: dict[str, Any] = {}
        if request.max_output_tokens is not None:
            # Thinking tokens count against this cap too (a MAX_TOKENS finish with no text).
            generation["maxOutputTokens"] = request.max_output_tokens
        if request.temperature is not None:
            generation["temperature"] = request.temperature
        schema = request_schema(request)
        if schema is not None:
            generation["responseMimeType"] = "application/json"
            if self.config.options.get("json_mode") != "json":
                # responseJsonSchema takes real JSON Schema; responseSchema is an OpenAPI subset.
                generation["responseJsonSchema"] = schema
        if generation:
            body["generationConfig"] = generation
        return body

    def complete(self, request: LLMRequest) -> LLMResponse:
        """Run one generateContent call.

        Raises:
            InvalidRequestError: no model (names LLM_EXECUTOR_<NAME>_MODEL) or a bad json_schema.
            ContentBlockedError: the prompt was blocked (HTTP 200 with promptFeedback.blockReason).
            ProviderError: no key, an invalid key (400 API_KEY_INVALID), another 4xx, a redirect,
                or a malformed body; none retryable.
            RateLimitedError: 429 with RetryInfo's delay; a per-day quota is not retryable.
            ProviderUnavailableError: connection errors, timeouts, 408/5xx.
        """
        model = _strip_models_prefix(self.resolve_model(request))
        self._check_key()
        payload, limits = self.request_json_info("POST", self.url_for(model), body=self.build_body(request),
                                                 request=request, model=model)
        return self.parse_guarded(lambda data: self._parse(data, model, request), payload, request, limits)

    def _parse(self, data: dict[str, Any], model: str, request: LLMRequest) -> LLMResponse:
        candidates = data.get("candidates")
        if not candidates:
            block_reason = optional_str(optional_dict(data.get("promptFeedback")).get("blockReason"))
            if block_reason:
                # A retry gets the same verdict: not retryable.
                raise ContentBlockedError(
                    f"{self.name}: the prompt was blocked (blockReason={block_reason})",
                    provider=self.name, status=200, request_id=request.request_id or None, retryable=False,
                )
            raise MalformedResponseError("no candidates and no promptFeedback.blockReason")
        candidate = expect_dict(expect_list(candidates, "candidates")[0], "candidates[0]")
        # content and parts are missing on MAX_TOKENS and on blocked output.
        parts = optional_dict(candidate.get("content")).get("parts") or []
        texts: list[str] = []
        has_function_call = False
        for part in expect_list(parts, "candidates[0].content.parts"):
            part = expect_dict(part, "candidates[0].content.parts[]")
            if "functionCall" in part:
                has_function_call = True
            if part.get("thought") is True:
                continue  # thinking text is not the answer (python-genai's .text skips it too)
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
        raw_finish = optional_str(candidate.get("finishReason"))
        usage = optional_dict(data.get("usageMetadata"))
        return LLMResponse(
            text="".join(texts),
            provider=self.name,
            model=optional_str(data.get("modelVersion")) or model,
            finish_reason=normalise_finish_reason(raw_finish, has_function_call),
            usage_tokens=optional_count(usage.get("totalTokenCount")),
            raw_finish_reason=raw_finish,
            prompt_tokens=optional_count(usage.get("promptTokenCount")),
            # Thoughts are billed as output and count against maxOutputTokens.
            completion_tokens=sum_counts(optional_count(usage.get("candidatesTokenCount")),
                                         optional_count(usage.get("thoughtsTokenCount"))),
        )

    def _is_quota_exhausted(self, info: ErrorInfo) -> bool:
        # A per-day quota does not refill until the day's window ends: retrying only burns time.
        for detail in info.details:
            if detail.get("@type") == _QUOTA_FAILURE:
                violations = detail.get("violations")
                # Anything but a list (a number, an object) would make the loop raise TypeError.
                for violation in violations if isinstance(violations, list) else ():
                    quota_id = violation.get("quotaId") if isinstance(violation, dict) else None
                    if isinstance(quota_id, str) and "PerDay" in quota_id:
                        return True
        return False

    def _body_retry_after_s(self, info: ErrorInfo) -> float | None:
        # Gemini puts the wait in the body (RetryInfo.retryDelay), never in a Retry-After header.
        for detail in info.details:
            if detail.get("@type") == _RETRY_INFO:
                return parse_duration_s(detail.get("retryDelay"))
        return None

    def _describe_error(self, status: int, info: ErrorInfo, model: str | None) -> str | None:
        # Only string reasons: a list or object here is unhashable and would escape as TypeError.
        reasons = {d.get("reason") for d in info.details
                   if d.get("@type") == _ERROR_INFO and isinstance(d.get("reason"), str)}
        if "API_KEY_INVALID" in reasons:
            # An invalid key is a 400, not a 401: say so plainly (without the key).
            return (f"HTTP {status}: the API key is invalid; check GEMINI_API_KEY / GOOGLE_API_KEY "
                    f"or LLM_EXECUTOR_{self.name.upper()}_API_KEY")
        # Gemini names the model it did not find ("models/x is not found for API version v1beta");
        # any other 404 is a wrong route (a base URL with a bad path), described by the base class.
        if status == 404 and model and f"models/{model}" in info.message:
            return f"HTTP 404: model {model!r} not found (unknown or retired): {self.redact(info.message)}"
        return None

    def health_check(self) -> str:
        """List one model (``GET {base}/v1beta/models?pageSize=1``) and describe the endpoint.

        Returns:
            e.g. "gemini: https://generativelanguage.googleapis.com reachable (models/gemini-2.5-flash)".

        Raises:
            ProviderError: no key or an invalid key, or the call failed.
        """
        self._check_key()
        payload = self.request_json("GET", f"{self._api_root()}/models?pageSize=1")
        models = payload.get("models")
        first = models[0] if isinstance(models, list) and models else None
        name = optional_str(first.get("name")) if isinstance(first, dict) else None
        return f"{self.name}: {self._where()} reachable" + (f" ({name})" if name else "")


def _strip_models_prefix(model: str) -> str:
    return model.strip().removeprefix("models/")
