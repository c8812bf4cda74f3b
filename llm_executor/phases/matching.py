"""Phase3: one request per distinct entity asking for its canonical name and category.

``match_tasks`` groups Phase2's mentions by ``normalize_name`` key; ``match_entities`` asks for
each group's canonical name through ``fan_out``. ``dedup_merge`` uses the answers.
Imports: the public API of ``llm_executor`` and the sibling phase modules.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import Executor, LLMRequest, LLMResponse
from .chunking import Chunk
from .dedup import normalize_name
from .extraction import Mention
from .fanout import FanOutResult, fan_out, provider_for

__all__ = ["MATCH_SCHEMA", "Match", "MatchTask", "match_entities", "match_tasks"]

MATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "canonical_name": {"type": "string"},
        "category": {"type": "string"},
    },
    "required": ["canonical_name"],
}

_MATCH_SYSTEM = (
    "You normalise entity names. Given a name as written in a text, its type and where it was seen, "
    'answer with JSON only: {"canonical_name": the full, usual name of the entity, "category": a '
    "one-word category}. Keep the name when it is already canonical."
)


@dataclass(frozen=True)
class MatchTask:
    """Phase3 task: one distinct entity (by normalised key) to name canonically.

    Attributes:
        key: ``normalize_name(name)``.
        name: the most frequent surface form.
        type: the most frequent type.
        context: a chunk text where it was seen (the first), cut to a few hundred characters.
    """

    key: str
    name: str
    type: str
    context: str


@dataclass(frozen=True)
class Match:
    """Phase3 answer for one entity."""

    key: str
    canonical_name: str
    category: str | None


def _match_request(task: MatchTask, provider: str, model: str) -> LLMRequest:
    # The name leads the prompt: it is what the answer is about.
    prompt = f"{task.name}\n\n---\nentity type: {task.type}\nseen in: {task.context}"
    return LLMRequest(provider=provider, model=model, prompt=prompt, system=_MATCH_SYSTEM,
                      json_schema=MATCH_SCHEMA, temperature=0.0, metadata={"phase": "match", "key": task.key})


def _parse_match(task: MatchTask, response: LLMResponse) -> Match:
    data = response.data if isinstance(response.data, Mapping) else {}
    canonical = " ".join(str(data.get("canonical_name", "")).split())
    category = data.get("category")
    return Match(task.key, canonical or task.name, str(category) if category else None)


def match_tasks(mentions: Iterable[Mention], chunks: Sequence[Chunk] = (), context_chars: int = 300
                ) -> list[MatchTask]:
    """One MatchTask per distinct normalised name, in order of first appearance."""
    texts = {c.chunk_id: c.text for c in chunks}
    names: dict[str, Counter[str]] = {}
    types: dict[str, Counter[str]] = {}
    context: dict[str, str] = {}
    for m in mentions:
        key = normalize_name(m.name)
        if not key:
            continue
        names.setdefault(key, Counter())[m.name] += 1
        types.setdefault(key, Counter())[m.type] += 1
        context.setdefault(key, texts.get(m.chunk_id, "")[:context_chars])
    return [MatchTask(key, names[key].most_common(1)[0][0], types[key].most_common(1)[0][0], context[key])
            for key in names]


def match_entities(
    executor: Executor,
    tasks: Sequence[MatchTask],
    *,
    provider: str | Sequence[str] = "auto",
    model: str = "",
    progress: str | bool | None = None,
    timeout: float | None = None,
) -> FanOutResult[MatchTask, Match]:
    """Phase3: one request per distinct entity asking for its canonical name and category.

    Args:
        executor: the executor.
        tasks: from ``match_tasks(mentions, chunks)``.
        provider: a name, or a list used round-robin by task index.
        model: model name; "" for each provider's default.
        progress: tqdm description, or None for no bar.
        timeout: seconds for the whole phase.

    Returns:
        ``results[i]`` is the ``Match`` of task i.
    """
    order = itertools.count()  # fan_out calls make_request once per task, in input order
    return fan_out(
        executor, tasks,
        lambda task: _match_request(task, provider_for(provider, next(order)), model),
        parse=_parse_match, progress=progress, timeout=timeout,
    )
