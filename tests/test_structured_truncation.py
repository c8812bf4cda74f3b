"""A structured reply cut at max_output_tokens says so, so a repair can raise the limit."""

from __future__ import annotations

import pickle

import pytest

from llm_executor.errors import SchemaValidationError
from llm_executor.validation import parse_structured

SCHEMA = {"type": "object", "required": ["name", "tags"],
          "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}


def test_a_cut_reply_that_is_not_json_says_it_was_truncated() -> None:
    with pytest.raises(SchemaValidationError) as info:
        parse_structured('{"name": "Ada", "tags": ["ma', SCHEMA, provider="openai", request_id="r1",
                         finish_reason="length")
    exc = info.value
    assert exc.truncated is True
    assert str(exc).startswith("output was truncated at max_output_tokens (finish_reason 'length') and is not "
                               "valid JSON (")
    assert (exc.path, exc.provider, exc.request_id) == ("$", "openai", "r1")


def test_a_cut_reply_that_parses_but_breaks_the_schema_is_truncated_too() -> None:
    with pytest.raises(SchemaValidationError) as info:
        parse_structured('{"name": "Ada"}', SCHEMA, finish_reason="length")
    assert info.value.truncated is True
    assert "truncated at max_output_tokens" in str(info.value) and "breaks the JSON schema" in str(info.value)


def test_a_complete_reply_that_fails_is_not_called_truncated() -> None:
    for finish_reason in ("stop", None):
        with pytest.raises(SchemaValidationError) as info:
            parse_structured('{"name": "Ada", "tags": ["ma', SCHEMA, finish_reason=finish_reason)
        assert info.value.truncated is False
        assert str(info.value).startswith("output is not valid JSON (")


def test_a_cut_reply_that_is_still_valid_is_accepted() -> None:
    assert parse_structured('{"name": "Ada", "tags": []}', SCHEMA, finish_reason="length") == {
        "name": "Ada", "tags": []}


def test_the_flag_survives_pickling() -> None:
    exc = SchemaValidationError("cut", path="$", truncated=True, provider="gemini")
    back = pickle.loads(pickle.dumps(exc))
    assert back.truncated is True and back.provider == "gemini"
