"""Provider "auto" and fallbacks: which lanes can serve a request, and which is best now.

Routing reads only what the lanes know in memory (queue length, in flight, mean latency, pause,
the token waits workers observed): it never asks a shared limits store, so ``submit()`` returns
at once even when Redis is frozen (issue 11, item 3).
Imports: ``errors``, ``types``, ``.lane``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InvalidRequestError
from ..types import LLMRequest
from .lane import Lane

__all__ = ["choose_auto", "model_for", "why_not"]


def model_for(lane: Lane, request: LLMRequest) -> str:
    """The model ``lane`` serves ``request`` with: the request's when the lane lists it, else its default."""
    return request.model if request.model in lane.caps.models else (lane.pcfg.model or "")


def why_not(lane: Lane, request: LLMRequest, schema: Mapping[str, Any] | None) -> str | None:
    """Why ``lane`` cannot serve ``request`` as "auto" or as a fallback; None when it can."""
    is_configured = getattr(lane.provider, "is_configured", None)
    if callable(is_configured) and not is_configured():
        return f"{lane.name}: not configured (no API key)"
    model = model_for(lane, request)
    if not model:
        return f"{lane.name}: no default model (LLM_EXECUTOR_{lane.name.upper()}_MODEL)"
    cap = lane.caps.max_output_tokens_for(model)
    if request.max_output_tokens and cap is not None and request.max_output_tokens > cap:
        return f"{lane.name}: max_output_tokens above {cap}"
    if schema is not None and not (lane.caps.supports_json_schema or lane.caps.supports_json_mode):
        return f"{lane.name}: no JSON output"
    return None


def choose_auto(lanes: Iterable[Lane], request: LLMRequest, schema: Mapping[str, Any] | None) -> Lane:
    """The capable lane where ``request`` would start soonest (ties: configuration order).

    Raises:
        InvalidRequestError: no lane can serve it; the message gives each lane's reason.
    """
    best: tuple[float, int, Lane] | None = None
    reasons = []
    for idx, lane in enumerate(lanes):
        why = why_not(lane, request, schema)
        if why is not None:
            reasons.append(why)
            continue
        score = lane.expected_start_s()
        if best is None or (score, idx) < best[:2]:
            best = (score, idx, lane)
    if best is None:
        raise InvalidRequestError(
            "provider 'auto': no enabled provider can serve this request ("
            + ("; ".join(reasons) or "no providers enabled") + ")", field="provider")
    return best[2]
