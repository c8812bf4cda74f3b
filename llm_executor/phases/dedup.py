"""Merge: deduplicate the mentions of finished fan-outs into entities, keeping provenance.

``normalize_name`` is the dedup key (also used by Phase2 and Phase3); ``dedup_merge`` takes only
finished ``FanOutResult`` values, never futures, and keeps every chunk an entity was seen in.
Imports: the sibling ``fanout`` module (the Phase2/3 value types for annotations only).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .fanout import FanOutResult

if TYPE_CHECKING:  # extraction and matching import normalize_name from here
    from .extraction import ExtractTask, Mention
    from .matching import Match, MatchTask

__all__ = ["Entity", "dedup_merge", "normalize_name"]

_STOPWORDS = frozenset({
    "a", "an", "and", "the", "of", "in", "on", "at", "to", "for", "by", "with", "from", "after", "before",
    "when", "while", "this", "that", "these", "those", "it", "its", "he", "she", "they", "we", "i", "but", "or",
    "if", "then", "there", "here", "as", "since", "during", "last", "next", "every", "each", "some", "many",
    "her", "his", "our", "their", "not", "no", "so", "yet",
})
# Titles say who someone is, not which entity: "Professor Anika Sel" and "Anika Sel" are one person.
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "professor", "sir", "dame", "councillor", "mayor"})
_PUNCT = re.compile(r"[^\w\s]+")


def normalize_name(name: str) -> str:
    """The dedup key of a name: casefolded, punctuation and whitespace collapsed, a leading
    article and titles dropped ("The Acme Corp." → "acme corp", "Professor Anika Sel" → "anika sel").
    "" when nothing but function words is left (such a "name" is a sentence start, not an entity)."""
    words = _PUNCT.sub(" ", name.casefold().replace("'s ", " ").replace("’s ", " ")).split()
    while words and words[0] in ("the", "a", "an"):
        words.pop(0)
    while len(words) > 1 and words[0] in _TITLES:
        words.pop(0)
    if not words or all(w in _STOPWORDS for w in words):
        return ""
    return " ".join(words)


@dataclass(frozen=True)
class Entity:
    """One deduplicated entity.

    Attributes:
        key: the normalised key it was merged under.
        name: the canonical name (Phase3), else the most frequent surface form.
        type: the most frequent type among its mentions.
        category: Phase3's category, when matched.
        aliases: every distinct surface form seen, sorted.
        attributes: merged attributes; a key with conflicting values keeps the list of the
            distinct values in first-seen order.
        chunk_ids: every chunk it was found in, in first-seen order (provenance).
        doc_ids: every document it was found in, in first-seen order.
        mentions: how many extractions merged into it.
    """

    key: str
    name: str
    type: str
    category: str | None
    aliases: tuple[str, ...]
    attributes: Mapping[str, Any]
    chunk_ids: tuple[str, ...]
    doc_ids: tuple[str, ...]
    mentions: int

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {"key": self.key, "name": self.name, "type": self.type, "category": self.category,
                "aliases": list(self.aliases), "attributes": dict(self.attributes),
                "chunk_ids": list(self.chunk_ids), "doc_ids": list(self.doc_ids), "mentions": self.mentions}


def _shares_a_word(a: str, b: str) -> bool:
    return bool(set(a.split()) & set(b.split()))


def dedup_merge(
    extraction: FanOutResult[ExtractTask, list[Mention]] | Sequence[FanOutResult[ExtractTask, list[Mention]]],
    matching: FanOutResult[MatchTask, Match] | None = None,
    *,
    allow_partial: bool = False,
) -> list[Entity]:
    """Merge every mention of the finished extraction fan-out(s) into deduplicated entities.

    Runs only on finished work: it takes ``FanOutResult`` values (which ``fan_out`` returns
    after every task has an outcome), never futures, and refuses an interrupted fan-out unless
    ``allow_partial``. Mentions merge when their ``normalize_name`` keys are equal, or when
    Phase3 gave them canonical names with equal keys. A canonical name that shares no word with
    the name it replaces is ignored, so a confused model cannot merge unrelated entities.

    Args:
        extraction: Phase2's result (or several, e.g. one per batch of documents).
        matching: Phase3's result, optional.
        allow_partial: accept an interrupted fan-out (its finished tasks only).

    Returns:
        Entities sorted by key.

    Raises:
        TypeError: a value is not a FanOutResult (a Future, a list of futures...).
        ValueError: a fan-out did not finish (interrupted) and ``allow_partial`` is False.
    """
    results = [extraction] if isinstance(extraction, FanOutResult) else list(extraction)
    for r in [*results, *([matching] if matching is not None else [])]:
        if not isinstance(r, FanOutResult):
            raise TypeError(f"dedup_merge takes finished FanOutResult values, got {type(r).__name__}; "
                            "run the phase with fan_out (or extract_entities) first")
        if not r.complete and not allow_partial:
            raise ValueError(f"dedup_merge needs finished fan-outs; this one was interrupted after "
                             f"{r.succeeded} of {r.submitted} tasks (pass allow_partial=True to merge them)")
    canonical: dict[str, Match] = {}
    if matching is not None:
        for _, answer in matching.successes():
            target = normalize_name(answer.canonical_name)
            if target and _shares_a_word(target, answer.key):
                canonical[answer.key] = answer

    merged: dict[str, _Merging] = {}
    for result in results:
        for _, mentions in result.successes():
            for m in mentions:
                key = normalize_name(m.name)
                if not key:
                    continue
                match = canonical.get(key)
                final_key = normalize_name(match.canonical_name) if match else key
                merged.setdefault(final_key, _Merging()).add(m, match)
    return [merged[key].entity(key) for key in sorted(merged)]


class _Merging:
    """Accumulates the mentions of one entity."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()
        self.types: Counter[str] = Counter()
        self.canonical: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.attributes: dict[str, list[Any]] = {}
        self.chunk_ids: dict[str, None] = {}  # an ordered set
        self.count = 0

    def add(self, mention: Mention, match: Match | None) -> None:
        self.count += 1
        self.names[mention.name] += 1
        self.types[mention.type] += 1
        self.chunk_ids[mention.chunk_id] = None
        if match is not None:
            self.canonical[match.canonical_name] += 1
            if match.category:
                self.categories[match.category] += 1
        for k, v in mention.attributes.items():
            values = self.attributes.setdefault(str(k), [])
            if v not in values:
                values.append(v)

    def entity(self, key: str) -> Entity:
        name = (self.canonical or self.names).most_common(1)[0][0]
        category = self.categories.most_common(1)[0][0] if self.categories else None
        attributes = {k: vs[0] if len(vs) == 1 else vs for k, vs in self.attributes.items()}
        doc_ids = dict.fromkeys(cid.rsplit("#", 1)[0] for cid in self.chunk_ids)
        return Entity(key, name, self.types.most_common(1)[0][0], category, tuple(sorted(self.names)),
                      attributes, tuple(self.chunk_ids), tuple(doc_ids), self.count)
