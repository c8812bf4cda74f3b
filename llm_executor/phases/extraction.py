"""Phase2: find entities, one JSON-schema request per (chunk, entity type), through ``fan_out``.

``extract_entities`` builds the tasks and requests and parses each reply into ``Mention`` values;
a name that does not occur in its chunk is dropped (``grounded``), so nothing gets a provenance it
does not have.
Imports: the public API of ``llm_executor`` and the sibling phase modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import Executor, LLMRequest, LLMResponse
from .chunking import Chunk
from .dedup import normalize_name
from .fanout import FanOutResult, fan_out, provider_for

__all__ = ["ENTITY_SCHEMA", "ExtractTask", "Mention", "extract_entities"]

ENTITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "type": {"type": "string"},
                    "attributes": {"type": "object"},
                },
                "required": ["name"],
            },
        },
    },
    "required": ["entities"],
}

_EXTRACT_SYSTEM = (
    "You extract named entities from a text. Answer with JSON only, valid against the given JSON schema: "
    '{"entities": [{"name": ..., "type": ..., "attributes": {...}}]}. Use each name exactly as it is '
    "written in the text. Include only entities of the requested type; an empty list is a valid answer."
)


@dataclass(frozen=True)
class ExtractTask:
    """Phase2 task: find entities of ``entity_type`` in ``chunk``."""

    chunk: Chunk
    entity_type: str


@dataclass(frozen=True)
class Mention:
    """One entity as extracted from one chunk.

    Attributes:
        name: the surface form, as the model wrote it.
        type: the entity type that was asked for.
        attributes: what the model said about it (may be empty).
        chunk_id: where it was found.
    """

    name: str
    type: str
    attributes: Mapping[str, Any]
    chunk_id: str


def _extract_request(task: ExtractTask, provider: str, model: str) -> LLMRequest:
    # Instruction first, then the text after a "Text:" line: models follow it well, and the
    # emulator's responder reads the requested type from the instruction part only.
    prompt = (f"Entity type to extract: {task.entity_type}\n"
              f"Answer with JSON valid against the schema.\n\nText:\n{task.chunk.text}")
    return LLMRequest(provider=provider, model=model, prompt=prompt, system=_EXTRACT_SYSTEM,
                      json_schema=ENTITY_SCHEMA, temperature=0.0,
                      metadata={"phase": "extract", "chunk_id": task.chunk.chunk_id})


def _parse_mentions(task: ExtractTask, response: LLMResponse, grounded: bool) -> list[Mention]:
    data = response.data if response.data is not None else {}
    items = data.get("entities", []) if isinstance(data, Mapping) else []
    haystack = task.chunk.text.casefold()
    mentions = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        name = " ".join(str(item.get("name", "")).split())
        if not name or not normalize_name(name):
            continue
        # A name that is not in the chunk was invented (by a model or an emulator): keeping it
        # would give it provenance it does not have.
        if grounded and name.casefold() not in haystack:
            continue
        attributes = item.get("attributes")
        mentions.append(Mention(name, task.entity_type, dict(attributes) if isinstance(attributes, Mapping) else {},
                                task.chunk.chunk_id))
    return mentions


def extract_entities(
    executor: Executor,
    chunks: Sequence[Chunk],
    entity_types: Sequence[str],
    *,
    provider: str | Sequence[str] = "auto",
    model: str = "",
    progress: str | bool | None = None,
    timeout: float | None = None,
    grounded: bool = True,
) -> FanOutResult[ExtractTask, list[Mention]]:
    """Phase2: one JSON-schema request per (chunk, entity type), through ``fan_out``.

    Args:
        executor: the executor.
        chunks: Phase1's chunks.
        entity_types: e.g. ("person", "organization", "place").
        provider: a provider name ("auto" lets the executor choose), or a list used round-robin
            by task index, to spread the phase over several providers.
        model: model name; "" for each provider's default.
        progress: tqdm description, or None for no bar.
        timeout: seconds for the whole phase.
        grounded: drop names that do not occur in the chunk (case-insensitive).

    Returns:
        ``results[i]`` is the list of ``Mention`` of task i (chunk-major order).
    """
    tasks = [ExtractTask(chunk, etype) for chunk in chunks for etype in entity_types]
    order = itertools.count()  # fan_out calls make_request once per task, in input order
    return fan_out(
        executor, tasks,
        lambda task: _extract_request(task, provider_for(provider, next(order)), model),
        parse=lambda task, response: _parse_mentions(task, response, grounded),
        progress=progress, timeout=timeout,
    )
