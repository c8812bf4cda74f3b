"""The OpenAI Chat Completions adapter (also for OpenAI-compatible servers).

Owns the request body and the response parsing of ``POST {base}/chat/completions`` (see
PROVIDERS.md section 1 and 4); the HTTP call and error translation live in ``base``.
Works against api.openai.com and any compatible base URL (vLLM, LiteLLM, Ollama's /v1,
LM Studio). Imports: ``types``, ``errors``, ``config``, ``providers.base``; never the executor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

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
    request_schema,
)

__all__ = ["DEFAULT_REASONING_PREFIXES", "OpenAIProvider", "is_strict_schema", "join_url"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
# o-series and gpt-5 reject max_tokens and any temperature but 1, wherever they are served: behind
# a proxy (LiteLLM, Azure-style gateways) the model name is all that tells (issue 15).
DEFAULT_REASONING_PREFIXES: tuple[str, ...] = ("o1", "o3", "o4", "gpt-5")
# o1, o3-mini, o4-mini-2025-04-16, gpt-5, gpt-5.1, gpt-5-mini... but not "omni" or "o1lama".
_REASONING_NAME_RE = re.compile(r"^(?:o\d+(?:$|[-_.:@])|gpt-5)", re.IGNORECASE)

# Output-token caps of models OpenAI documents; others are unknown (None), never guessed.
_MODEL_MAX_OUTPUT_TOKENS: dict[str, int] = {
    "gpt-4o": 16384,
    "gpt-4o-mini": 16384,
    "gpt-4.1": 32768,
    "gpt-4.1-mini": 32768,
    "gpt-4.1-nano": 32768,
    "o1": 100000,
    "o3": 100000,
    "o3-mini": 100000,
    "o4-mini": 100000,
    "gpt-5": 128000,
    "gpt-5-mini": 128000,
    "gpt-5-nano": 128000,
}

_FINISH_REASONS: dict[str, str] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # deprecated spelling of the same thing
}

# Keywords OpenAI's strict structured outputs reject; a schema using any of them is sent strict=false.
_NON_STRICT_KEYWORDS = frozenset({
    "allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties",
    "unevaluatedProperties", "unevaluatedItems", "propertyNames", "minProperties", "maxProperties",
    "oneOf",
})


def join_url(base: str, path: str) -> str:
    """``base`` + ``path`` without doubling or dropping ``/v1``.

    A base with no path gets ``/v1`` (``https://api.openai.com`` and ``http://host:4000`` both
    serve ``/v1/chat/completions``); a base already ending in the endpoint is not extended again;
    a query string (Azure-style ``?api-version=``) is kept. A base without a scheme gets https.

    Args:
        base: the configured base URL.
        path: "/chat/completions" or "/models".
    """
    base = base.strip()
    if "://" not in base:
        base = "https://" + base
    parts = urlsplit(base)
    root = parts.path.rstrip("/")
    for endpoint in ("/chat/completions", "/models"):
        if root.endswith(endpoint):
            root = root[: -len(endpoint)]
    if not root:
        root = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, root + path, parts.query, ""))


def is_strict_schema(schema: Mapping[str, Any]) -> bool:
    """Whether ``schema`` fits OpenAI's strict structured-output subset.

    The root must be an object; every object (recursively, through properties, items, anyOf,
    $defs) must set ``additionalProperties: false`` and list every property in ``required``;
    no keyword outside the subset may appear.
    """
    return _root_is_object(schema) and _strict_node(schema)


def _root_is_object(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (kind is None and "properties" in schema)


def _strict_node(node: object) -> bool:
    if isinstance(node, bool):
        return False
    if not isinstance(node, Mapping):
        return False
    if _NON_STRICT_KEYWORDS & node.keys():
        return False
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "object" in kinds or "properties" in node:
        properties = node.get("properties", {})
        if not isinstance(properties, Mapping) or node.get("additionalProperties") is not False:
            return False
        required = node.get("required", [])
        if not isinstance(required, list) or set(required) != set(properties):
            return False
        if not all(_strict_node(sub) for sub in properties.values()):
            return False
    children: list[object] = []
    if "items" in node:
        children.append(node["items"])
    for key in ("anyOf", "prefixItems"):
        value = node.get(key)
        if isinstance(value, list):
            children.extend(value)
    for key in ("$defs", "definitions"):
        value = node.get(key)
        if isinstance(value, Mapping):
            children.extend(value.values())
    return all(_strict_node(child) for child in children)


class OpenAIProvider(HTTPProvider):
    """OpenAI Chat Completions over ``requests``.

    Config used: ``base_url`` (default https://api.openai.com/v1), ``api_key`` (required for
    api.openai.com, optional elsewhere), ``model`` (default model), ``reasoning_models`` (name
    prefixes sent ``max_completion_tokens`` and no temperature; None = the o-series and gpt-5
    family by name, whatever the base URL), ``options["organization"]``, ``options["project"]``,
    ``options["json_mode"]`` ("schema", the default, or "json" for ``json_object``, for servers
    without json_schema support; a prompt must then mention JSON).
    """

    default_base_url: ClassVar[str] = DEFAULT_BASE_URL
    retryable_statuses: ClassVar[frozenset[int]] = frozenset({408, 409, 429, 500, 502, 503, 504})
    # (base_url, chat completions URL, is_official): three URL parses per call otherwise (issue 7 profile).
    _endpoint_cache: tuple[str, str, bool] | None = None

    def _endpoint(self) -> tuple[str, str, bool]:
        base = self.base_url
        cached = self._endpoint_cache
        if cached is None or cached[0] != base:
            official = urlsplit(join_url(base, "")).hostname == OPENAI_HOST
            cached = self._endpoint_cache = (base, join_url(base, "/chat/completions"), official)
        return cached

    @property
    def is_official(self) -> bool:
        """Whether the base URL is OpenAI's own API (keys and reasoning defaults depend on it)."""
        return self._endpoint()[2]

    def is_reasoning_model(self, model: str) -> bool:
        """Whether ``model`` takes ``max_completion_tokens`` and no temperature.

        ``ProviderConfig.reasoning_models`` (name prefixes; ``()`` for none) decides when set;
        otherwise the name does, whatever the base URL: the o-series (``o1``, ``o3-mini``,
        ``o4-mini``...) and the gpt-5 family. A provider prefix such as ``openai/`` or
        ``azure/`` (LiteLLM's model names) is ignored.
        """
        name = model.strip().rsplit("/", 1)[-1]
        if self.config.reasoning_models is not None:
            return any(name.startswith(prefix) or model.startswith(prefix)
                       for prefix in self.config.reasoning_models)
        return _REASONING_NAME_RE.match(name) is not None

    def capabilities(self) -> Capabilities:
        """JSON mode and JSON schema, system prompts, and OpenAI's documented output caps.

        Known models and their caps are given for api.openai.com only; a compatible server's
        models are unknown (the configured default model is listed).
        """
        caps = dict(_MODEL_MAX_OUTPUT_TOKENS) if self.is_official else {}
        models = tuple(caps)
        if self.config.model and self.config.model not in caps:
            models += (self.config.model,)
        return Capabilities(
            max_output_tokens=None,
            supports_json_mode=True,
            supports_json_schema=True,
            supports_system_prompt=True,
            models=models,
            model_max_output_tokens=caps,
        )

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        key = (self.config.api_key or "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        organization = self.config.options.get("organization")
        if organization:
            headers["OpenAI-Organization"] = organization
        project = self.config.options.get("project")
        if project:
            headers["OpenAI-Project"] = project
        return headers

    def _check_key(self) -> None:
        # Compatible servers (vLLM, Ollama /v1, LM Studio) usually need no key; OpenAI always does.
        if self.is_official and not (self.config.api_key or "").strip():
            raise self.missing_key_error("OPENAI_API_KEY")

    def build_body(self, request: LLMRequest, model: str) -> dict[str, Any]:
        """The JSON body of ``POST /chat/completions`` for ``request``."""
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {"model": model, "messages": messages}
        reasoning = self.is_reasoning_model(model)
        if request.max_output_tokens is not None:
            body["max_completion_tokens" if reasoning else "max_tokens"] = request.max_output_tokens
        if request.temperature is not None and not reasoning:
            body["temperature"] = request.temperature
        schema = request_schema(request)
        if schema is not None:
            if self.config.options.get("json_mode") == "json":
                body["response_format"] = {"type": "json_object"}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "result", "schema": schema, "strict": is_strict_schema(schema)},
                }
        return body

    def complete(self, request: LLMRequest) -> LLMResponse:
        """Run one chat completion.

        Raises:
            InvalidRequestError: no model (names LLM_EXECUTOR_<NAME>_MODEL) or a bad json_schema.
            ProviderError: no key for api.openai.com, a 4xx, a redirect or a malformed body.
            RateLimitedError: 429 (``insufficient_quota`` is not retryable).
            ProviderUnavailableError: connection errors, timeouts, 408/409/5xx.
        """
        model = self.resolve_model(request)
        self._check_key()
        body = self.build_body(request, model)
        payload, limits = self.request_json_info("POST", self._endpoint()[1], body=body,
                                                 request=request, model=model)
        return self.parse_guarded(lambda data: self._parse(data, model), payload, request, limits)

    def _parse(self, data: dict[str, Any], model: str) -> LLMResponse:
        choices = expect_list(data.get("choices"), "choices")
        if not choices:
            raise MalformedResponseError("choices is empty")
        choice = expect_dict(choices[0], "choices[0]")
        message = expect_dict(choice.get("message"), "choices[0].message")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise MalformedResponseError("choices[0].message.content is not a string")
        raw_finish = optional_str(choice.get("finish_reason"))
        finish = _FINISH_REASONS.get(raw_finish or "", "other")
        if message.get("refusal"):
            # Structured outputs put a refusal beside a null content: the model declined.
            finish = "content_filter"
        usage = optional_dict(data.get("usage"))
        return LLMResponse(
            text=content or "",
            provider=self.name,
            model=optional_str(data.get("model")) or model,
            finish_reason=finish,
            usage_tokens=optional_count(usage.get("total_tokens")),
            raw_finish_reason=raw_finish,
            prompt_tokens=optional_count(usage.get("prompt_tokens")),
            completion_tokens=optional_count(usage.get("completion_tokens")),
        )

    def _is_quota_exhausted(self, info: ErrorInfo) -> bool:
        # The SDK retries every 429; a billing quota does not refill by waiting, so we fail fast.
        return "insufficient_quota" in (info.code, info.type)

    def _describe_error(self, status: int, info: ErrorInfo, model: str | None) -> str | None:
        if status == 404 and (info.code == "model_not_found" or (model and model in info.message)):
            return (f"HTTP 404: model {model!r} not found (unknown, or this key has no access to it): "
                    f"{self.redact(info.message)}")
        return None

    def health_check(self) -> str:
        """List the models (``GET {base}/models``) and describe the endpoint.

        Returns:
            e.g. "openai: https://api.openai.com reachable, 57 models".

        Raises:
            ProviderError: no key for api.openai.com, or the call failed (subclasses as for complete).
        """
        self._check_key()
        payload = self.request_json("GET", join_url(self.base_url, "/models"))
        models = payload.get("data")
        count = f"{len(models)} models" if isinstance(models, list) else "models listed"
        return f"{self.name}: {self._where()} reachable, {count}"
