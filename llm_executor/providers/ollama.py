"""The Ollama adapter (native ``/api/chat``).

Owns OLLAMA_HOST parsing, the request body and the response parsing of ``POST /api/chat`` with
``stream: false`` (Ollama streams NDJSON otherwise); see PROVIDERS.md section 3. The HTTP call
and error translation live in ``base``.
Imports: ``types``, ``errors``, ``config``, ``providers.base``; never the executor.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests

from ..config import ProviderConfig, mask_url
from ..errors import ConfigError
from ..types import Capabilities, LLMRequest, LLMResponse
from .base import (
    ErrorInfo,
    HTTPProvider,
    expect_dict,
    optional_count,
    optional_dict,
    optional_str,
    request_schema,
    sum_counts,
)

__all__ = ["DEFAULT_HOST", "OllamaProvider", "parse_ollama_host"]

DEFAULT_HOST = "http://127.0.0.1:11434"
_DEFAULT_PORT = 11434


def parse_ollama_host(raw: str | None) -> str:
    """The base URL for an ``OLLAMA_HOST`` value, the way ollama-python's ``_parse_host`` reads it.

    ``""``/None → ``http://127.0.0.1:11434``; ``host`` → port 11434; ``:port`` → 127.0.0.1;
    an explicit ``http://``/``https://`` without a port means 80/443; a path is kept; IPv6 in
    brackets is accepted. ``0.0.0.0`` (``::``) is a server bind address, so as a client target
    it means loopback, as in the Go CLI's ``ConnectableHost``.

    Raises:
        ConfigError: the value has no usable host or port (the value is shown with any password
            or query masked).
    """
    text = (raw or "").strip()
    port = _DEFAULT_PORT
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    else:
        raise ConfigError(f"OLLAMA_HOST={mask_url(text)!r}: expected http:// or https:// (or no scheme)")
    parts = urlsplit(f"{scheme}://{hostport}")
    try:
        explicit_port = parts.port
    except ValueError:
        raise ConfigError(
            f"OLLAMA_HOST={mask_url(text)!r}: expected host[:port] with a numeric port"
        ) from None
    host = parts.hostname or "127.0.0.1"
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass
    base = f"{scheme}://{host}:{explicit_port or port}"
    path = parts.path.strip("/")
    return f"{base}/{path}" if path else base


class OllamaProvider(HTTPProvider):
    """Ollama ``/api/chat`` over ``requests``.

    Config used: ``base_url`` (OLLAMA_HOST's raw value or LLM_EXECUTOR_OLLAMA_BASE_URL, parsed
    by ``parse_ollama_host``), ``api_key`` (OLLAMA_API_KEY; sent as Bearer only when set, for
    ollama.com or an authenticating proxy), ``model``, ``options["json_mode"]`` ("schema", the
    default, sends the schema as ``format``; "json" sends ``format: "json"``),
    ``options["keep_alive"]`` (passed through, e.g. "5m").
    """

    default_base_url: ClassVar[str] = DEFAULT_HOST

    def __init__(self, name: str, config: ProviderConfig, session: requests.Session | None = None) -> None:
        """Create the adapter; the host is parsed now, so a bad OLLAMA_HOST fails at startup.

        Raises:
            ConfigError: OLLAMA_HOST / base_url cannot be parsed.
        """
        super().__init__(name, config, session)
        self._host = parse_ollama_host(config.base_url)

    @property
    def base_url(self) -> str:
        """The parsed host URL (scheme, host, port and any path)."""
        return self._host

    def capabilities(self) -> Capabilities:
        """JSON mode and schemas, system prompts; no output cap (bounded by num_ctx only)."""
        return Capabilities(
            max_output_tokens=None,
            supports_json_mode=True,
            supports_json_schema=True,
            supports_system_prompt=True,
            models=(self.config.model,) if self.config.model else (),
        )

    def _headers(self) -> dict[str, str]:
        key = (self.config.api_key or "").strip()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def build_body(self, request: LLMRequest, model: str) -> dict[str, Any]:
        """The JSON body of ``POST /api/chat`` for ``request`` (always ``stream: false``)."""
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        body: dict[str, Any] = {"model": model, "stream": False, "messages": messages}
        schema = request_schema(request)
        if schema is not None:
            body["format"] = "json" if self.config.options.get("json_mode") == "json" else schema
        options: dict[str, Any] = {}
        if request.max_output_tokens is not None:
            options["num_predict"] = request.max_output_tokens
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if options:
            body["options"] = options
        keep_alive = self.config.options.get("keep_alive")
        if keep_alive:
            body["keep_alive"] = keep_alive
        return body

    def complete(self, request: LLMRequest) -> LLMResponse:
        """Run one chat call.

        Raises:
            InvalidRequestError: no model (names LLM_EXECUTOR_<NAME>_MODEL) or a bad json_schema.
            ProviderError: model not pulled (404, suggests ``ollama pull MODEL``), another 4xx,
                a redirect or a malformed body; none retryable.
            RateLimitedError: 429 (retryable; Ollama sends no Retry-After).
            ProviderUnavailableError: connection errors, timeouts, 5xx (503 = server busy).
        """
        model = self.resolve_model(request)
        payload = self.request_json("POST", f"{self._host}/api/chat", body=self.build_body(request, model),
                                    request=request, model=model)
        return self.parse_guarded(lambda data: self._parse(data, model), payload, request)

    def _parse(self, data: dict[str, Any], model: str) -> LLMResponse:
        message = expect_dict(data.get("message"), "message")
        content = message.get("content")
        text = content if isinstance(content, str) else ""
        raw_finish = optional_str(data.get("done_reason"))
        if raw_finish == "stop":
            finish = "tool_calls" if message.get("tool_calls") else "stop"
        elif raw_finish == "length":
            finish = "length"
        else:
            # Missing (old servers, a closed runner connection), load or unload.
            finish = "other"
        # omitempty: a 0 count is missing from the JSON, so missing means "not reported".
        prompt_tokens = optional_count(data.get("prompt_eval_count"))
        completion_tokens = optional_count(data.get("eval_count"))
        return LLMResponse(
            text=text,
            provider=self.name,
            model=optional_str(data.get("model")) or model,
            finish_reason=finish,
            usage_tokens=sum_counts(prompt_tokens, completion_tokens),
            raw_finish_reason=raw_finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _describe_error(self, status: int, info: ErrorInfo, model: str | None) -> str | None:
        # 'model "x" not found, try pulling it first'; a wrong route is Go's "404 page not found".
        if status == 404 and model and info.message.startswith("model ") and "not found" in info.message:
            return f"HTTP 404: model {model!r} is not pulled on {self._where()}; run `ollama pull {model}`"
        return None

    def health_check(self) -> str:
        """Ask the server's version (``GET /api/version``).

        Returns:
            e.g. "ollama: http://127.0.0.1 reachable, version 0.6.2".

        Raises:
            ProviderError: the call failed (ProviderUnavailableError when nothing listens).
        """
        payload = self.request_json("GET", f"{self._host}/api/version")
        version = optional_str(optional_dict(payload).get("version")) or "unknown"
        return f"{self.name}: {self._where()} reachable, version {version}"
