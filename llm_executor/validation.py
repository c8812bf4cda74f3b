"""JSON Schema handling: check a request's schema at submit, validate a provider's output.

``normalize_schema`` turns ``LLMRequest.json_schema`` (a dict or a JSON string) into a dict
that is plain JSON (string keys, finite numbers, no cycles, at most ``MAX_SCHEMA_DEPTH`` levels),
valid against its meta-schema, and whose every ``$ref`` resolves inside it; anything else is an
``InvalidRequestError`` naming ``json_schema`` and the path. ``parse_structured`` parses and
validates an output text. Validators are cached per schema so a batch of 10k requests compiles
one validator. Imports: ``types``, ``errors`` and jsonschema (with its ``referencing``).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError, SchemaValidationError
from .types import Capabilities, LLMRequest

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

# jsonschema is imported on first use: it doubles ``import llm_executor``'s time, and most
# requests carry no schema.

__all__ = ["MAX_SCHEMA_DEPTH", "check_capabilities", "normalize_schema", "parse_structured", "strip_code_fence"]

_TEXT_HEAD = 200
_cache_lock = threading.Lock()
_validators: dict[str, Validator] = {}
_CACHE_MAX = 256
# Nesting levels of a schema (each object property is two: "properties", then the name). Deeper
# ones are not real schemas, and 5,000 levels raised RecursionError from json and jsonschema.
MAX_SCHEMA_DEPTH = 100
# Integers in a schema beyond 64 bits are typos (and past 4300 digits str() refuses them).
_MAX_SCHEMA_INT = 2**63


class _NotJSON(Exception):
    """Internal: why a schema is not plain JSON, and where."""

    def __init__(self, what: str, path: str) -> None:
        super().__init__(what)
        self.what, self.path = what, path


def _schema_error(message: str) -> InvalidRequestError:
    return InvalidRequestError(f"LLMRequest.json_schema {message}", field="json_schema")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def normalize_schema(value: Mapping[str, Any] | str) -> dict[str, Any]:
    """Return ``value`` as a dict that is a valid JSON Schema.

    Raises:
        InvalidRequestError: (field ``json_schema``) not a dict nor a JSON string, or not a valid schema.
    """
    if isinstance(value, str):
        reason = None
        try:
            parsed = json.loads(value, parse_constant=_reject_constant)
        except ValueError as exc:
            reason = str(exc)[:200]
        except RecursionError:
            reason = "nested too deeply"
        if reason is not None:
            raise _schema_error(f"must be a dict or a JSON string, got a string that is not JSON ({reason})")
        value = parsed
    if not isinstance(value, Mapping):
        raise _schema_error(f"must be a dict or a JSON string holding an object, got {type(value).__name__}")
    key = _strict_key(value)
    if key is not None:
        with _cache_lock:
            if key in _validators:
                return dict(value)  # seen and checked before: the common case of a batch
    try:
        plain: dict[str, Any] = _plain_json(value, "$", 0, set())
    except _NotJSON as exc:
        where = exc.path if len(exc.path) <= 120 else exc.path[:117] + "..."
        raise _schema_error(f"is not plain JSON: {exc.what} at {where}") from None
    _validator_for(plain)
    return plain


def _strict_key(schema: Mapping[str, Any]) -> str | None:
    # Raises on cycles, NaN, non-string keys, odd types and deep nesting: those take the slow path.
    try:
        return json.dumps(schema, sort_keys=True, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None


def _plain_json(node: object, path: str, depth: int, ancestors: set[int]) -> Any:
    """A copy of ``node`` made of dicts, lists, strings, finite numbers, bools and None, or _NotJSON."""
    if node is None or isinstance(node, str | bool):
        return node
    if isinstance(node, int):
        if abs(node) >= _MAX_SCHEMA_INT:
            raise _NotJSON("an integer beyond 64 bits", path)
        return node
    if isinstance(node, float):
        if not math.isfinite(node):
            raise _NotJSON(f"{node!r} (JSON has no NaN or Infinity)", path)
        return node
    if depth >= MAX_SCHEMA_DEPTH:
        raise _NotJSON(f"nesting deeper than {MAX_SCHEMA_DEPTH} levels", path)
    if isinstance(node, Mapping | list | tuple):
        if id(node) in ancestors:
            raise _NotJSON("a circular reference (the object contains itself)", path)
        ancestors.add(id(node))
        try:
            if isinstance(node, Mapping):
                out: dict[str, Any] = {}
                for key, child in node.items():
                    if not isinstance(key, str):
                        raise _NotJSON(f"a key of type {type(key).__name__} (JSON keys are strings)", path)
                    out[key] = _plain_json(child, f"{path}.{key}", depth + 1, ancestors)
                return out
            return [_plain_json(child, f"{path}[{i}]", depth + 1, ancestors) for i, child in enumerate(node)]
        finally:
            ancestors.discard(id(node))
    raise _NotJSON(f"a value of type {type(node).__name__}", path)


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

    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(dict(schema))
        _check_refs(schema)
        validator = cls(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise _schema_error(f"is not a valid JSON Schema at {where}: {exc.message[:300]}") from None
    except InvalidRequestError:
        raise
    except Exception as exc:  # jsonschema tripping over something odd: still the caller's schema
        raise _schema_error(f"could not be checked ({type(exc).__name__}); is it a valid JSON Schema?") from None
    with _cache_lock:
        if len(_validators) >= _CACHE_MAX:
            _validators.clear()
        _validators[key] = validator
    return validator


def _check_refs(schema: Mapping[str, Any]) -> None:
    """Every ``$ref`` resolves inside ``schema`` (or to a meta-schema); never fetched from the network.

    An unresolvable ``$ref`` used to pass submit, reach the provider, and fail afterwards inside
    jsonschema (issue 11 item 8); a remote one would make the validator fetch a URL.
    """
    from jsonschema_specifications import REGISTRY
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    dialect = schema.get("$schema")
    spec = specification_with(dialect if isinstance(dialect, str) else "", default=DRAFT202012)
    root = spec.create_resource(schema)
    pending = [(root, REGISTRY.resolver_with_root(root))]
    while pending:
        resource, resolver = pending.pop()
        contents = resource.contents
        ref = contents.get("$ref") if isinstance(contents, Mapping) else None
        if isinstance(ref, str):
            try:
                resolver.lookup(ref)
            except Unresolvable:
                raise _schema_error(
                    f"has a $ref that does not resolve inside the schema: {ref[:200]!r} "
                    "(expected a local reference such as '#/$defs/name'; remote ones are not fetched)"
                ) from None
        # referencing knows which keywords hold subschemas in this dialect (not enum/const data).
        pending.extend((sub, resolver.in_subresource(sub)) for sub in resource.subresources())


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


_TOO_DEEP = object()


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
    except RecursionError:
        data = _TOO_DEEP
    from jsonschema.exceptions import best_match

    validator = _validator_for(schema)
    if data is not _TOO_DEEP:
        try:
            error = best_match(validator.iter_errors(data))
        except RecursionError:
            data = _TOO_DEEP
    if data is _TOO_DEEP:
        # A hostile reply of 100k nested arrays must fail this request, not raise RecursionError.
        raise SchemaValidationError(f"output is nested too deeply to validate; text begins {head!r}",
                                    path="$", text_head=head, provider=provider, request_id=request_id)
    if error is not None:
        path = _json_path(error.absolute_path)
        raise SchemaValidationError(
            f"{cut}breaks the JSON schema at {path}: {error.message[:300]}; text begins {head!r}",
            path=path, text_head=head, truncated=truncated, provider=provider, request_id=request_id,
        )
    return data
