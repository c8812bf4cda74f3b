"""JSON Schema handling: check a request's schema at submit, validate a provider's output.

``normalize_schema`` turns ``LLMRequest.json_schema`` (a dict or a JSON string) into a dict
checked against its meta-schema; ``parse_structured`` parses and validates an output text.
Validators are cached per schema so a batch of 10k requests compiles one validator.
Imports: ``types``, ``errors`` and jsonschema.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError, SchemaValidationError
from .types import Capabilities, LLMRequest

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

# jsonschema is imported on first use: it doubles ``import llm_executor``'s time, and most
# requests carry no schema.

__all__ = ["check_capabilities", "normalize_schema", "parse_structured", "strip_code_fence"]

_TEXT_HEAD = 200
_cache_lock = threading.Lock()
_validators: dict[str, Validator] = {}
_CACHE_MAX = 256


def normalize_schema(value: Mapping[str, Any] | str) -> dict[str, Any]:
    """Return ``value`` as a dict that is a valid JSON Schema.

    Raises:
        InvalidRequestError: (field ``json_schema``) not a dict nor a JSON string, or not a valid schema.
    """
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(
                f"LLMRequest.json_schema must be a dict or a JSON string, got a string that is not JSON ({exc})",
                field="json_schema",
            ) from None
        value = parsed
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"LLMRequest.json_schema must be a dict or a JSON string holding an object, got {type(value).__name__}",
            field="json_schema",
        )
    schema = dict(value)
    _validator_for(schema)
    return schema


def _key(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, default=str)


def _validator_for(schema: Mapping[str, Any]) -> Validator:
    key = _key(schema)
    with _cache_lock:
        cached = _validators.get(key)
    if cached is not None:
        return cached
    import jsonschema
    from jsonschema.exceptions import SchemaError

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(dict(schema))
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise InvalidRequestError(
            f"LLMRequest.json_schema is not a valid JSON Schema at {where}: {exc.message}", field="json_schema"
        ) from None
    validator = cls(schema)
    with _cache_lock:
        if len(_validators) >= _CACHE_MAX:
            _validators.clear()
        _validators[key] = validator
    return validator


def check_capabilities(request: LLMRequest, caps: Capabilities, provider: str, model: str | None = None) -> None:
    """Reject a request the provider cannot serve (today: too many output tokens).

    Args:
        model: the model the request will be served with (default ``request.model``).

    Raises:
        InvalidRequestError: naming ``max_output_tokens`` and the provider's cap.
    """
    model = request.model if model is None else model
    cap = caps.max_output_tokens_for(model)
    if request.max_output_tokens is not None and cap is not None and request.max_output_tokens > cap:
        raise InvalidRequestError(
            f"LLMRequest.max_output_tokens={request.max_output_tokens} exceeds {provider}'s "
            f"limit for model {model or '(default)'!r}: expected at most {cap}",
            field="max_output_tokens",
        )


def strip_code_fence(text: str) -> str:
    """Remove a Markdown code fence (```json ... ```) some models wrap JSON in."""
    stripped = text.strip()
    if stripped.startswith("```"):
        first_nl = stripped.find("\n")
        if first_nl != -1 and stripped.endswith("```"):
            return stripped[first_nl + 1 : -3].strip()
    return stripped


def _json_path(path: Any) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_structured(text: str, schema: Mapping[str, Any], *, provider: str | None = None,
                     request_id: str | None = None, finish_reason: str | None = None) -> Any:
    """Parse ``text`` as JSON and validate it against ``schema``.

    Args:
        text: the provider's output.
        schema: a schema checked by ``normalize_schema``.
        provider: lane name, for the error.
        request_id: for the error.
        finish_reason: the response's normalised finish reason; "length" (cut at
            ``max_output_tokens``) makes a failure say so and set ``.truncated``.

    Returns:
        The parsed value.

    Raises:
        SchemaValidationError: with ``.path`` of the first error, the head of the text, and
            ``.truncated=True`` when the output was cut at ``max_output_tokens``, whose message then
            says so first: a repair should raise the limit rather than ask the same again.
    """
    head = text[:_TEXT_HEAD]
    truncated = finish_reason == "length"
    cut = "output was truncated at max_output_tokens (finish_reason 'length') and " if truncated else "output "
    try:
        data = json.loads(strip_code_fence(text))
    except json.JSONDecodeError as exc:
        raise SchemaValidationError(
            f"{cut}is not valid JSON ({exc.msg} at char {exc.pos}); text begins {head!r}",
            path="$", text_head=head, truncated=truncated, provider=provider, request_id=request_id,
        ) from None
    from jsonschema.exceptions import best_match

    validator = _validator_for(schema)
    error = best_match(validator.iter_errors(data))
    if error is not None:
        path = _json_path(error.absolute_path)
        raise SchemaValidationError(
            f"{cut}breaks the JSON schema at {path}: {error.message[:300]}; text begins {head!r}",
            path=path, text_head=head, truncated=truncated, provider=provider, request_id=request_id,
        )
    return data
