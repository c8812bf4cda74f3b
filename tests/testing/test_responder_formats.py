"""The responder satisfies ``pattern`` and ``format`` (date, date-time, email, uuid): issue 14 item 5."""

from __future__ import annotations

from typing import Any

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_executor.testing import value_for_schema

PROMPT = "Extract every person.\nText:\nAda Lovelace met Charles Babbage in London on 1843-07-01."
ATOMS = [r"[A-Z]", r"[a-z]", r"\d", r"\w", r"[0-9a-f]", r"[^\s]", "x", "-", r"\.", "@", "(ab|cd)", r"[A-Z0-9_]"]
QUANTIFIERS = ["", "+", "*", "?", "{2}", "{1,3}", "{3,}"]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.tuples(st.sampled_from(ATOMS), st.sampled_from(QUANTIFIERS)), min_size=1, max_size=6))
    body = "".join(a + q for a, q in pieces)
    anchored = draw(st.booleans())
    return f"^{body}$" if anchored else body


@st.composite
def schemas(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(["code", "name", "when", "stamp", "mail", "id", "note", "ref"]),
                          min_size=1, max_size=5, unique=True))
    properties: dict[str, Any] = {}
    for name in names:
        kind = draw(st.sampled_from(["pattern", "format"]))
        if kind == "pattern":
            properties[name] = {"type": "string", "pattern": draw(patterns())}
        else:
            properties[name] = {"type": "string",
                                "format": draw(st.sampled_from(["date", "date-time", "email", "uuid"]))}
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": names,
                              "additionalProperties": False}
    if draw(st.booleans()):
        schema = {"type": "object", "properties": {"items": {"type": "array", "items": schema, "minItems": 1}},
                  "required": ["items"]}
    return schema


@settings(max_examples=200, deadline=None)
@given(schemas())
def test_values_satisfy_pattern_and_format(schema: dict[str, Any]) -> None:
    value = value_for_schema(schema, PROMPT)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [e.message for e in validator.iter_errors(value)]
    assert not errors, (schema, value)


def test_a_value_that_already_matches_is_kept() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+ [A-Z]"}},
              "required": ["name"]}
    assert value_for_schema(schema, PROMPT)["name"] == "Ada Lovelace"


def test_pattern_with_length_bounds() -> None:
    schema = {"type": "string", "pattern": r"^[A-Z]{2}\d+$", "minLength": 6, "maxLength": 8}
    value = value_for_schema(schema, PROMPT)
    assert 6 <= len(value) <= 8 and jsonschema.validate(value, schema) is None
