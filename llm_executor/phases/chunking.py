"""Phase1: split documents into overlapping chunks on paragraph and sentence boundaries.

``chunk_text`` cuts one text; ``chunk_documents`` cuts a mapping of documents into ``Chunk`` values
whose ``chunk_id`` ("<doc_id>#<index>") is the provenance handle later phases carry.
Pure functions: no executor, no I/O.
Imports: the stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Chunk", "chunk_documents", "chunk_text"]

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def chunk_text(text: str, max_chars: int = 1200, overlap: int = 150) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars`` on paragraph and sentence boundaries.

    Paragraphs (blank-line separated) stay together when they fit; otherwise they are split
    between sentences; a single sentence longer than ``max_chars`` is split between words (or,
    for a word longer than that, hard). Consecutive chunks share up to ``overlap`` characters of
    whole sentences, so an entity on a boundary is seen whole by at least one chunk.

    Args:
        text: the document.
        max_chars: the largest chunk, in characters (> 0).
        overlap: characters of trailing sentences repeated at the start of the next chunk
            (0 <= overlap < max_chars).

    Returns:
        The chunks, in order; [] for a blank text. Whitespace inside a paragraph is collapsed.

    Raises:
        ValueError: ``max_chars`` or ``overlap`` out of range.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an integer >= 1, got {max_chars!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_chars:
        raise ValueError(f"overlap must be an integer in [0, max_chars), got {overlap!r}")
    units = list(_units(text, max_chars))
    chunks: list[str] = []
    current: list[tuple[str, bool]] = []
    for unit in units:
        if current and len(_join([*current, unit])) > max_chars:
            chunks.append(_join(current))
            tail: list[tuple[str, bool]] = []
            for prev in reversed(current):
                if len(_join([prev, *tail])) > overlap:
                    break
                tail.insert(0, prev)
            current = tail
            while current and len(_join([*current, unit])) > max_chars:
                current.pop(0)
        current.append(unit)
    if current:
        chunks.append(_join(current))
    return chunks


def _units(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(sentence, starts a paragraph) pairs, every sentence at most ``max_chars`` long."""
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        first = True
        for sentence in _SENTENCE_END.split(flat):
            for piece in _split_long(sentence, max_chars):
                yield piece, first
                first = False


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    if len(sentence) <= max_chars:
        yield sentence
        return
    current = ""
    for word in sentence.split(" "):
        while len(word) > max_chars:  # no boundary at all: cut hard rather than exceed the cap
            if current:
                yield current
                current = ""
            yield word[:max_chars]
            word = word[max_chars:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > max_chars:
            yield current
            current = word
        else:
            current = candidate
    if current:
        yield current


def _join(units: Sequence[tuple[str, bool]]) -> str:
    out = ""
    for i, (unit, starts_paragraph) in enumerate(units):
        out += unit if i == 0 else ("\n\n" if starts_paragraph else " ") + unit
    return out


@dataclass(frozen=True)
class Chunk:
    """One piece of a document.

    Attributes:
        doc_id: the document's name.
        index: position of the chunk in its document.
        text: the chunk's text.
    """

    doc_id: str
    index: int
    text: str

    @property
    def chunk_id(self) -> str:
        """``"<doc_id>#<index>"``, the provenance handle of entities found in it."""
        return f"{self.doc_id}#{self.index}"


def chunk_documents(documents: Mapping[str, str], max_chars: int = 1200, overlap: int = 150) -> list[Chunk]:
    """Phase1: ``chunk_text`` over every document, in the mapping's order.

    Raises:
        ValueError: ``max_chars`` or ``overlap`` out of range.
    """
    return [Chunk(doc_id, i, text)
            for doc_id, body in documents.items()
            for i, text in enumerate(chunk_text(body, max_chars, overlap))]
