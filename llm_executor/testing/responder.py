"""The emulator's deterministic responder: a reply that is a pure function of the request.

The same (model, prompt, system, schema, json mode) always gives the same text, whatever the
provider, the time or the order of requests, so a pipeline run against the emulator has a
checkable result. Tests can call the helpers below to compute the expected output themselves.

Rules (the contract; pipeline tests rely on them):

* **Source text.** If the prompt contains a line marker ``Text:`` (any case), the text after
  the *last* marker is the source and what comes before it (plus the system prompt) is the
  instruction; otherwise the whole prompt is both.
* **Entities** (:func:`extract_entities`): maximal runs of capitalised words in the source
  (``Marie Curie``, ``Acme Corp``); leading stop words are dropped (``The``, ``In``, ``Extract``...,
  see ``STOP_WORDS``) and a run made only of stop words is skipped. Duplicates are removed, first
  appearance wins. Each phrase gets a type (:func:`classify_entity`): ``organization`` when a
  word is in ``ORG_WORDS`` (Inc, Corp, University, Bank...); ``location`` when a word is in
  ``LOCATION_WORDS`` (City, River, Lake...) or the word before the phrase is one of ``in``,
  ``near``, ``from``, ``to``, ``across``, ``into``; ``person`` otherwise.
* **Requested type** (:func:`requested_entity_type`): the first of "person"/"people",
  "organization"/"organisation"/"company", "location"/"place" mentioned in the instruction.
  When one is found only the entities of that type are used; when none, all of them.
* **Plain text** (no JSON asked): ``"Echo from {model}: "`` followed by the first 24 words of the
  source (``...`` when cut).
* **JSON mode without a schema**: ``{"summary": <first 12 words>, "entities": [...], "words": n}``.
* **JSON with a schema** (:func:`value_for_schema`), valid against the schema:

  - an array whose items are objects or strings has one item per entity (item *i* is built
    around entity *i*), cut to ``maxItems`` and padded to ``minItems`` with source words;
    any other array has ``max(minItems, 1)`` items (capped by ``maxItems``); ``prefixItems`` are honoured;
  - an object has every declared property (required ones always), in ``propertyOrdering`` order
    when given; ``$ref`` to ``#/$defs/..`` or ``#/definitions/..``, ``allOf`` (merged),
    ``anyOf``/``oneOf`` (first branch), type lists (first non-null type), Gemini's upper-case
    OpenAPI types and ``nullable`` are understood;
  - a string named ``name``/``entity``/``title``/``canonical*`` (or any string array item) is the
    current entity; ``type``/``kind``/``category``/``entity_type`` is the requested type (or the
    entity's own); ``description``/``summary``/``context``/``evidence``/``text``/``reason`` is the
    first source sentence containing the entity; any other string is three source words picked by a
    stable hash of its JSON path; ``format`` date, date-time, time, email, uri/url and uuid give
    fixed valid values (other formats are ignored); ``minLength``/``maxLength`` are respected;
    ``pattern``: the value above when it already matches, else the shortest string the regular
    expression accepts (first alternative, fewest repetitions, first character of each class).
    Not supported: lookarounds and backreferences that this construction cannot satisfy, and a
    ``pattern`` together with ``format`` or length bounds it contradicts (the value may then fail
    the schema);
  - an ``enum`` takes the first value that appears in the prompt as a word, else its first value;
    ``const`` is used as is;
  - an integer or number is the source's word count clamped to ``minimum``/``maximum``
    (exclusive bounds move it by one, or 0.5 for numbers); a number named ``confidence``/``score``
    is 1.0 clamped the same way;
  - a boolean is :func:`names_match` of the first two quoted phrases of the source (``"..."`` or
    ``'...'``); with fewer than two quoted phrases it is ``True`` when the source has entities.
* **Tokens** (:func:`count_tokens`): the number of ``\\w+`` runs. A reply longer than the
  request's max output tokens is cut to that many tokens and ends with finish reason "length".

Imports: stdlib only (the emulator server must need nothing else).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LOCATION_WORDS",
    "ORG_WORDS",
    "STOP_WORDS",
    "classify_entity",
    "count_tokens",
    "extract_entities",
    "names_match",
    "reply_text",
    "requested_entity_type",
    "source_text",
    "truncate_tokens",
    "value_for_schema",
]


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


STOP_WORDS: frozenset[str] = _word_set(
    """a an and as at but by dr extract find for from given her his i if in into it its json list
    mr mrs ms no not of on or our output prof return she so text that the their then there these
    they this those to we what when where which who with you your yes"""
)
ORG_WORDS: frozenset[str] = _word_set(
    """inc corp corporation ltd llc gmbh co company university institute bank foundation group
    agency council ministry society labs laboratory association committee museum hospital school
    college bureau department press times airlines systems technologies partners robotics shipping
    industries holdings motors energy logistics works"""
)
LOCATION_WORDS: frozenset[str] = _word_set(
    """city river lake mountain mountains street avenue valley county island islands bay park ocean
    sea desert province state republic kingdom port harbour harbor"""
)
_CONNECTORS = frozenset({"of", "de", "du", "da", "di", "del", "van", "von", "der", "la", "le"})
_TITLES = frozenset({"Dr", "Mr", "Mrs", "Ms", "St", "Prof"})
_LOCATION_PREPOSITIONS = frozenset({"in", "near", "from", "to", "across", "into"})
_TYPE_WORDS: tuple[tuple[str, str], ...] = (
    ("persons", "person"),
    ("person", "person"),
    ("people", "person"),
    ("organizations", "organization"),
    ("organization", "organization"),
    ("organisations", "organization"),
    ("organisation", "organization"),
    ("companies", "organization"),
    ("company", "organization"),
    ("locations", "location"),
    ("location", "location"),
    ("places", "location"),
    ("place", "location"),
)
_TYPE_OF_WORD: dict[str, str] = dict(_TYPE_WORDS)
_TYPE_RE = re.compile(r"\b(" + "|".join(w for w, _ in _TYPE_WORDS) + r")\b", re.IGNORECASE)
_MARKER_RE = re.compile(r"^\s*text\s*:", re.IGNORECASE | re.MULTILINE)
_WORD_RE = re.compile(r"\w+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9][\w'.&-]*")
_QUOTED_RE = re.compile(r"\"([^\"\n]+)\"|'([^'\n]+)'")
_SENTENCE_RE = re.compile(r"[^.!?\n]+[.!?]?")
_MAX_DEPTH = 12
_PLAIN_WORDS = 24


def count_tokens(text: str) -> int:
    """The emulator's token count: the number of ``\\w+`` runs in ``text``."""
    return len(_WORD_RE.findall(text))


def truncate_tokens(text: str, max_tokens: int) -> str:
    """``text`` cut just after its ``max_tokens``-th token (unchanged when it is shorter)."""
    if max_tokens <= 0:
        return ""
    for i, match in enumerate(_WORD_RE.finditer(text)):
        if i + 1 == max_tokens:
            return text[: match.end()]
    return text


def source_text(prompt: str) -> str:
    """The part of ``prompt`` entities come from: after the last ``Text:`` line marker, else all."""
    markers = list(_MARKER_RE.finditer(prompt))
    return prompt[markers[-1].end() :].strip() if markers else prompt


def _instruction(prompt: str, system: str | None) -> str:
    markers = list(_MARKER_RE.finditer(prompt))
    head = prompt[: markers[-1].start()] if markers else prompt
    return f"{system}\n{head}" if system else head


def requested_entity_type(prompt: str, system: str | None = None) -> str | None:
    """The entity type the instruction asks for ("person", "organization", "location") or None."""
    match = _TYPE_RE.search(_instruction(prompt, system))
    if match is None:
        return None
    return _TYPE_OF_WORD[match.group(1).lower()]


def classify_entity(phrase: str, previous_word: str | None = None) -> str:
    """The type of a capitalised phrase: "organization", "location" or "person" (rules above)."""
    words = {w.lower().rstrip(".") for w in phrase.split()}
    if words & ORG_WORDS:
        return "organization"
    if words & LOCATION_WORDS:
        return "location"
    if previous_word is not None and previous_word.lower() in _LOCATION_PREPOSITIONS:
        return "location"
    return "person"


def _phrases(text: str) -> list[tuple[str, str | None]]:
    """Capitalised phrases of ``text`` with the word before each (None at the start)."""
    found: list[tuple[str, str | None]] = []
    run: list[str] = []
    pending: list[str] = []  # lower-case connectors ("of", "de") kept only if a capital follows
    previous: str | None = None
    before_run: str | None = None

    def close() -> None:
        words = list(run)
        lead = before_run
        while words and words[0].lower() in STOP_WORDS:
            lead = words.pop(0)
        if words:
            found.append((" ".join(words), lead))
        run.clear()
        pending.clear()

    for match in _TOKEN_RE.finditer(text):
        raw = match.group(0)
        word = raw.rstrip(".")
        # Punctuation in the gap closes the run: "Paris, France" and '"A" and "B"' are two phrases.
        gap = text[match.start() - 1] if match.start() > 0 else " "
        if run and gap not in " \t":
            close()
        if word[:1].isupper():
            if not run:
                before_run = previous
            run.extend(pending)
            pending.clear()
            # Initials keep their dot ("M. Curie"); other trailing dots end a sentence.
            run.append(raw if len(word) == 1 and raw.endswith(".") else word)
        elif run and word in _CONNECTORS and not pending:
            pending.append(word)
        elif run:
            close()
        previous = word
        # A full stop ends the phrase, except after an initial or a title ("M. Curie", "Dr. Who").
        if run and raw.endswith(".") and len(word) > 1 and word not in _TITLES:
            close()
    if run:
        close()
    return found


def extract_entities(text: str, entity_type: str | None = None) -> list[str]:
    """Capitalised phrases of ``text`` (deduplicated, in order), only of ``entity_type`` if given."""
    seen: dict[str, None] = {}
    for phrase, previous in _phrases(text):
        if entity_type is not None and classify_entity(phrase, previous) != entity_type:
            continue
        seen.setdefault(phrase, None)
    return list(seen)


def _normalise_name(name: str) -> str:
    return " ".join(_WORD_RE.findall(name.lower()))


def names_match(a: str, b: str) -> bool:
    """Whether two names denote the same entity: same normalised text, same last word, or acronym."""
    na, nb = _normalise_name(a), _normalise_name(b)
    if not na or not nb:
        return False
    if na == nb or na.split()[-1] == nb.split()[-1]:
        return True
    wa, wb = na.split(), nb.split()
    return (len(wa) == 1 and len(wb) > 1 and wa[0] == "".join(w[0] for w in wb)) or (
        len(wb) == 1 and len(wa) > 1 and wb[0] == "".join(w[0] for w in wa)
    )


class _Context:
    """What a schema walk draws values from; built once per request."""

    def __init__(self, prompt: str, system: str | None) -> None:
        self.prompt = prompt
        self.source = source_text(prompt)
        self.entity_type = requested_entity_type(prompt, system)
        self.entities = extract_entities(self.source, self.entity_type)
        self.types = {p: classify_entity(p, prev) for p, prev in _phrases(self.source)}
        self.words = _WORD_RE.findall(self.source) or ["emulated"]
        self.prompt_words = {w.lower() for w in _WORD_RE.findall(prompt)}
        quoted = [m.group(1) or m.group(2) for m in _QUOTED_RE.finditer(self.source)]
        self.quoted = [q for q in quoted if q.strip()]

    def sentence_with(self, entity: str | None) -> str:
        sentences: list[str] = [s.strip() for s in _SENTENCE_RE.findall(self.source) if s.strip()]
        for sentence in sentences:
            if entity is None or entity in sentence:
                return sentence
        return " ".join(self.words[:12])

    def words_for(self, path: str, n: int = 3) -> str:
        start = zlib.crc32(path.encode()) % len(self.words)
        return " ".join((self.words * 2)[start : start + n])

    def boolean(self) -> bool:
        if len(self.quoted) >= 2:
            return names_match(self.quoted[0], self.quoted[1])
        return bool(self.entities)


def reply_text(
    model: str,
    prompt: str,
    system: str | None = None,
    schema: Mapping[str, Any] | None = None,
    json_mode: bool = False,
) -> str:
    """The emulator's reply to a request (see the module docstring for the rules).

    Args:
        model: the model named in the request.
        prompt: the user prompt (all user messages joined by newlines).
        system: the system instruction, if any.
        schema: the JSON Schema the reply must satisfy (OpenAI json_schema, Gemini
            responseJsonSchema/responseSchema, Ollama format object).
        json_mode: JSON was asked for without a schema.

    Returns:
        The reply text: compact JSON when a schema or JSON mode was asked for.
    """
    ctx = _Context(prompt, system)
    if schema is not None:
        value = value_for_schema(schema, prompt, system, _ctx=ctx)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if json_mode:
        obj = {"summary": " ".join(ctx.words[:12]), "entities": ctx.entities, "words": len(ctx.words)}
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    words = ctx.source.split()
    head = " ".join(words[:_PLAIN_WORDS]) + (" ..." if len(words) > _PLAIN_WORDS else "")
    return f"Echo from {model}: {head}"


def value_for_schema(
    schema: Mapping[str, Any],
    prompt: str,
    system: str | None = None,
    *,
    _ctx: _Context | None = None,
) -> Any:
    """A JSON value valid against ``schema``, built from the prompt's text (rules above).

    Raises:
        ValueError: the schema has a ``$ref`` the responder cannot resolve.
    """
    ctx = _ctx if _ctx is not None else _Context(prompt, system)
    return _Walker(schema, ctx).value(schema, "$", None, 0)


class _Walker:
    def __init__(self, root: Mapping[str, Any], ctx: _Context) -> None:
        self.root = root
        self.ctx = ctx

    def resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < _MAX_DEPTH:
            ref: str = schema["$ref"]
            if not ref.startswith("#"):
                raise ValueError(f"cannot resolve non-local $ref {ref!r}")
            target: Any = self.root
            for part in [p for p in ref[1:].split("/") if p]:
                target = target[part.replace("~1", "/").replace("~0", "~")]
            schema = target
            seen += 1
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, Sequence) and branches:
                non_null = [b for b in branches if self._type_of(self.resolve(b)) != "null"]
                merged = {k: v for k, v in schema.items() if k != key}
                merged.update(self.resolve(non_null[0] if non_null else branches[0]))
                return self.resolve(merged)
        parts = schema.get("allOf")
        if isinstance(parts, Sequence) and parts:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            props: dict[str, Any] = dict(merged.get("properties", {}))
            required: list[str] = list(merged.get("required", []))
            for part in parts:
                sub = self.resolve(part)
                props.update(sub.get("properties", {}))
                required += [r for r in sub.get("required", []) if r not in required]
                merged.update({k: v for k, v in sub.items() if k not in ("properties", "required")})
            if props:
                merged["properties"] = props
            if required:
                merged["required"] = required
            return merged
        return schema

    @staticmethod
    def _type_of(schema: Mapping[str, Any]) -> str | None:
        declared = schema.get("type")
        if isinstance(declared, list):
            non_null = [t for t in declared if str(t).lower() != "null"]
            declared = non_null[0] if non_null else "null"
        if isinstance(declared, str):
            return declared.lower()
        if "properties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return None

    def value(self, schema: Mapping[str, Any], path: str, entity: str | None, depth: int) -> Any:
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, Sequence) and not isinstance(enum, str) and enum:
            return self.pick_enum(enum, entity)
        kind = self._type_of(schema)
        if depth > _MAX_DEPTH:
            # A cyclic $ref: stop with the smallest value the schema still accepts.
            return None if kind in (None, "null") or schema.get("nullable") else self.minimal(kind)
        if kind == "object":
            return self.object(schema, path, entity, depth)
        if kind == "array":
            return self.array(schema, path, entity, depth)
        if kind == "string":
            return self.string(schema, path, entity)
        if kind in ("integer", "number"):
            return self.number(schema, path, kind)
        if kind == "boolean":
            return self.ctx.boolean()
        if kind == "null":
            return None
        # No type at all: any value is valid; a string keeps it readable.
        return self.ctx.words_for(path)

    @staticmethod
    def minimal(kind: str) -> Any:
        return {"object": {}, "array": [], "string": "", "integer": 0, "number": 0, "boolean": False}[kind]

    def pick_enum(self, enum: Sequence[Any], entity: str | None) -> Any:
        own_type = self.ctx.types.get(entity) if entity is not None else None
        if own_type in enum:
            return own_type
        for option in enum:
            if isinstance(option, str) and option.lower() in self.ctx.prompt_words:
                return option
        if self.ctx.entity_type is not None and self.ctx.entity_type in enum:
            return self.ctx.entity_type
        return enum[0]

    def object(self, schema: Mapping[str, Any], path: str, entity: str | None, depth: int) -> dict[str, Any]:
        props: Mapping[str, Any] = schema.get("properties") or {}
        order = [p for p in schema.get("propertyOrdering", []) if p in props]
        order += [p for p in props if p not in order]
        out: dict[str, Any] = {}
        for name in order:
            out[name] = self.value(props[name], f"{path}.{name}", entity, depth + 1)
        for name in schema.get("required", []):
            # Required but undeclared: any value is valid for it.
            if name not in out:
                out[name] = self.ctx.words_for(f"{path}.{name}")
        return out

    def array(self, schema: Mapping[str, Any], path: str, entity: str | None, depth: int) -> list[Any]:
        min_items = int(schema.get("minItems", 0))
        max_items = schema.get("maxItems")
        prefix = list(schema.get("prefixItems", []))
        items = schema.get("items")
        item_schema: Mapping[str, Any] = items if isinstance(items, Mapping) else {}
        out: list[Any] = [self.value(s, f"{path}[{i}]", entity, depth + 1) for i, s in enumerate(prefix)]
        item_kind = self._type_of(self.resolve(item_schema)) if item_schema else None
        per_entity = item_kind in ("object", "string") and "enum" not in item_schema
        if per_entity:
            names: list[str] = list(self.ctx.entities)
            pad = (w for w in dict.fromkeys(self.ctx.words) if w not in names)
            while len(names) + len(out) < min_items:
                names.append(next(pad, f"item{len(names)}"))
        else:
            names = [entity or ""] * max(min_items - len(out), 0 if prefix else 1)
        if max_items is not None:
            names = names[: max(int(max_items) - len(out), 0)]
        for i, name in enumerate(names, start=len(out)):
            sub_entity = name if per_entity else entity
            out.append(self.value(item_schema, f"{path}[{i}]", sub_entity, depth + 1))
        return out

    def string(self, schema: Mapping[str, Any], path: str, entity: str | None) -> str:
        key = path.rsplit(".", 1)[-1].lower()
        key = re.sub(r"\[\d+\]$", "", key)
        fmt = schema.get("format")
        fixed = {
            "date": "2024-01-01",
            "date-time": "2024-01-01T00:00:00Z",
            "time": "00:00:00Z",
            "email": "user@example.com",
            "uri": "https://example.com/",
            "url": "https://example.com/",
            "uuid": "00000000-0000-4000-8000-000000000000",
        }
        if isinstance(fmt, str) and fmt in fixed:
            text = fixed[fmt]
        elif path.endswith("]") and entity is not None:
            text = entity
        elif key in ("type", "kind", "category", "entity_type", "label"):
            own = self.ctx.types.get(entity) if entity is not None else None
            text = own or self.ctx.entity_type or "person"
        elif entity is not None and (key in ("name", "entity", "title") or key.startswith("canonical")):
            text = entity
        elif key in ("description", "summary", "context", "evidence", "text", "reason", "explanation"):
            text = self.ctx.sentence_with(entity)
        elif key in ("name", "entity", "title") or key.startswith("canonical"):
            choices = self.ctx.quoted + self.ctx.entities
            text = choices[0] if choices else self.ctx.words_for(path)
        else:
            text = self.ctx.words_for(path)
        pattern = schema.get("pattern")
        if isinstance(fmt, str) and fmt in fixed:
            return text  # padding or cutting would break the format
        min_len = int(schema.get("minLength", 0))
        if len(text) < min_len:
            text = text + "x" * (min_len - len(text))
        max_len = schema.get("maxLength")
        if max_len is not None:
            text = text[: int(max_len)]
        if isinstance(pattern, str) and not _matches(pattern, text):
            text = _string_for_pattern(pattern, min_len, max_len, text)
        return text

    def number(self, schema: Mapping[str, Any], path: str, kind: str) -> int | float:
        key = path.rsplit(".", 1)[-1].lower()
        step: float = 1 if kind == "integer" else 0.5
        value: float = 1.0 if key in ("confidence", "score", "probability") else float(len(self.ctx.words))
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        # draft-4 spells exclusive bounds as booleans beside minimum/maximum.
        if xlo is True and lo is not None:
            xlo, lo = lo, None
        if xhi is True and hi is not None:
            xhi, hi = hi, None
        if isinstance(hi, int | float) and value > hi:
            value = float(hi)
        if isinstance(xhi, int | float) and not isinstance(xhi, bool) and value >= xhi:
            value = float(xhi) - step
        if isinstance(lo, int | float) and value < lo:
            value = float(lo)
        if isinstance(xlo, int | float) and not isinstance(xlo, bool) and value <= xlo:
            value = float(xlo) + step
        if kind == "integer":
            # Round towards the inside of the range so a fractional bound stays respected.
            return math.ceil(value) if isinstance(lo, float) and value == lo else math.floor(value)
        return value


def _matches(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return True  # not a regex Python knows: nothing to satisfy


def _string_for_pattern(pattern: str, min_len: int, max_len: Any, fallback: str) -> str:
    """The shortest string ``pattern`` accepts, padded towards ``minLength`` when repetition allows."""
    # The stdlib's own regex parser (untyped, private but stable since 3.11): Python's grammar exactly.
    sre_parse: Any = importlib.import_module("re._parser")
    try:
        parsed = sre_parse.parse(pattern)
    except re.error:
        return fallback
    for extra in range(0, 64):
        text = _build(list(parsed), extra, {})
        if len(text) >= min_len or extra == 63:
            break
    if max_len is not None and len(text) > int(max_len):
        text = _build(list(parsed), 0, {})
    return text if _matches(pattern, text) else fallback


def _build(items: list[Any], extra: int, groups: dict[int, str]) -> str:
    """A string for a parsed regex: ``extra`` more repetitions of the first open-ended repeat."""
    c: Any = importlib.import_module("re._constants")

    out: list[str] = []
    for op, arg in items:
        if op is c.LITERAL:
            out.append(chr(arg))
        elif op is c.NOT_LITERAL:
            out.append("a" if chr(arg) != "a" else "b")
        elif op is c.ANY:
            out.append("a")
        elif op is c.IN:
            out.append(_class_char(arg))
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            count = low
            if extra and (high is c.MAXREPEAT or high > low):
                count = min(low + extra, high) if high is not c.MAXREPEAT else low + extra
                extra = 0
            out.append("".join(_build(list(sub), 0, groups) for _ in range(count)))
        elif op is c.SUBPATTERN:
            group, _add, _del, sub = arg
            text = _build(list(sub), extra, groups)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif op is c.BRANCH:
            out.append(_build(list(arg[1][0]), extra, groups))
        elif op is c.GROUPREF:
            out.append(groups.get(arg, ""))
        elif op is c.ATOMIC_GROUP:
            out.append(_build(list(arg), extra, groups))
        # AT (anchors), ASSERT / ASSERT_NOT (lookarounds) add no characters.
    return "".join(out)


def _class_char(items: list[Any]) -> str:
    """A character the class ``[...]`` accepts (for a negated class, one it does not exclude)."""
    c: Any = importlib.import_module("re._constants")

    negate = any(op is c.NEGATE for op, _ in items)
    categories = {c.CATEGORY_DIGIT: "0", c.CATEGORY_WORD: "a", c.CATEGORY_SPACE: " ",
                  c.CATEGORY_NOT_DIGIT: "a", c.CATEGORY_NOT_WORD: "-", c.CATEGORY_NOT_SPACE: "a"}
    if not negate:
        for op, arg in items:
            if op is c.LITERAL:
                return chr(arg)
            if op is c.RANGE:
                return chr(arg[0])
            if op is c.CATEGORY:
                return categories.get(arg, "a")
        return "a"
    for candidate in "aZ0_- x":
        if re.fullmatch(f"[{_unparse_class(items)}]", candidate):
            return candidate
    return "a"


def _unparse_class(items: list[Any]) -> str:
    c: Any = importlib.import_module("re._constants")

    parts = []
    for op, arg in items:
        if op is c.NEGATE:
            parts.append("^")
        elif op is c.LITERAL:
            parts.append(re.escape(chr(arg)))
        elif op is c.RANGE:
            parts.append(f"{re.escape(chr(arg[0]))}-{re.escape(chr(arg[1]))}")
        elif op is c.CATEGORY:
            parts.append({c.CATEGORY_DIGIT: r"\d", c.CATEGORY_WORD: r"\w", c.CATEGORY_SPACE: r"\s",
                          c.CATEGORY_NOT_DIGIT: r"\D", c.CATEGORY_NOT_WORD: r"\W",
                          c.CATEGORY_NOT_SPACE: r"\S"}.get(arg, ""))
    return "".join(parts)
