"""The deterministic responder: schema-valid, prompt-driven, repeatable output."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from llm_executor.testing import extract_entities, names_match, reply_text, value_for_schema
from llm_executor.testing.responder import count_tokens, requested_entity_type

TEXT = (
    "Marie Curie worked with Pierre Curie at the University of Paris. In 1903 she travelled to "
    "Stockholm with Acme Corp. staff. The committee met Dr. Albert Einstein near Lake Geneva."
)
PROMPT = f"Extract every person mentioned in the text.\nText:\n{TEXT}"

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 3}},
        "required": ["answer"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "names": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": 2,
                "uniqueItems": True,
            }
        },
        "required": ["names"],
    },
    {
        "type": "object",
        "required": ["entities"],
        "properties": {
            "entities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "type", "attributes", "mentions"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "type": {"enum": ["person", "organization", "location"]},
                        "confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "attributes": {
                            "type": "object",
                            "properties": {
                                "role": {"type": ["string", "null"]},
                                "born": {"type": "string", "format": "date"},
                            },
                            "required": ["role"],
                        },
                        "mentions": {
                            "type": "array",
                            "minItems": 2,
                            "items": {"type": "integer", "minimum": 1},
                        },
                    },
                    "additionalProperties": False,
                },
            }
        },
    },
    {
        "$defs": {
            "Entity": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "aliases": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["name", "aliases"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Entity"}},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]},
            "flag": {"type": "boolean"},
            "score": {"type": "number", "minimum": 2.5},
        },
        "required": ["items", "note", "flag", "score"],
    },
    {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}, "maxItems": 0},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_driven_reply_is_valid_json_for_the_schema(schema: dict[str, Any]) -> None:
    text = reply_text("m", PROMPT, schema=schema)
    jsonschema.validate(json.loads(text), schema)


def test_nested_entity_objects_come_from_the_prompt() -> None:
    data = value_for_schema(SCHEMAS[2], PROMPT)
    assert [e["name"] for e in data["entities"]] == ["Marie Curie", "Pierre Curie", "Albert Einstein"]
    assert {e["type"] for e in data["entities"]} == {"person"}


def test_requested_type_filters_entities() -> None:
    source = TEXT
    assert extract_entities(source) == [
        "Marie Curie",
        "Pierre Curie",
        "University of Paris",
        "Stockholm",
        "Acme Corp",
        "Albert Einstein",
        "Lake Geneva",
    ]
    assert extract_entities(source, "organization") == ["University of Paris", "Acme Corp"]
    assert extract_entities(source, "location") == ["Stockholm", "Lake Geneva"]
    assert requested_entity_type("List the organizations.\nText:\nBob met Alice.") == "organization"
    assert requested_entity_type("Summarise.\nText:\nA person walked.") is None


def test_reply_depends_only_on_the_request() -> None:
    assert reply_text("m", PROMPT, schema=SCHEMAS[2]) == reply_text("m", PROMPT, schema=SCHEMAS[2])
    assert reply_text("a", PROMPT) != reply_text("b", PROMPT)
    assert json.loads(reply_text("m", PROMPT, json_mode=True))["entities"][0] == "Marie Curie"


def test_match_booleans_follow_quoted_names() -> None:
    schema = {"type": "object", "properties": {"same": {"type": "boolean"}}, "required": ["same"]}
    assert value_for_schema(schema, 'Same entity?\nText:\n"Marie Curie" and "M. Curie"') == {"same": True}
    assert value_for_schema(schema, 'Same entity?\nText:\n"Marie Curie" and "Albert Einstein"') == {
        "same": False
    }
    assert names_match("IBM", "International Business Machines")


def test_token_count_is_words() -> None:
    assert count_tokens("Hello, big world!") == 3
