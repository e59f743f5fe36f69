"""OpenAI `response_format` and the extension fields map to one ConstraintSpec, with errors that
name the field; two constraints at once are a conflict."""

from __future__ import annotations

import json

import pytest

from radixserve.runtime.constraints import ConstraintError, ConstraintSpec
from radixserve.server.structured_outputs import constraint_from_request, response_format_constraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_mapping():
    assert response_format_constraint(None) is None
    assert response_format_constraint({"type": "text"}) is None
    assert response_format_constraint({"type": "json_object"}) == ConstraintSpec("json_object")
    spec = response_format_constraint({"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    assert spec.kind == "json_schema" and json.loads(spec.value) == SCHEMA
    # key order is kept (llguidance fixes property order from it)
    ordered = {"type": "object", "properties": {"z": {}, "a": {}}}
    assert list(json.loads(response_format_constraint({"type": "json_schema", "json_schema": {"name": "o", "schema": ordered}}).value)["properties"]) == ["z", "a"]


def test_response_format_pydantic_like_object():
    class Model:
        def model_dump(self, **kwargs):
            return {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": False}}

    assert response_format_constraint(Model()).kind == "json_schema"


@pytest.mark.parametrize(
    "rf,param",
    [
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": SCHEMA}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": "yes"}}, "response_format.json_schema.strict"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
        ("json", "response_format"),
    ],
)
def test_response_format_errors(rf, param):
    with pytest.raises(ConstraintError) as info:
        constraint_from_request(response_format=rf)
    assert info.value.param == param


def test_extension_fields():
    assert constraint_from_request() is None
    assert constraint_from_request(regex="[0-9]+") == ConstraintSpec("regex", "[0-9]+")
    assert constraint_from_request(choice=["a", "b"]) == ConstraintSpec("choice", ("a", "b"))
    assert constraint_from_request(grammar='start: "x"').kind == "grammar"
    assert json.loads(constraint_from_request(json_schema=SCHEMA).value) == SCHEMA
    assert json.loads(constraint_from_request(json_schema=json.dumps(SCHEMA)).value) == SCHEMA
    assert constraint_from_request(json_object=True) == ConstraintSpec("json_object")
    assert constraint_from_request(response_format={"type": "text"}, regex="a") == ConstraintSpec("regex", "a")


def test_conflicts_name_the_second_field():
    with pytest.raises(ConstraintError) as info:
        constraint_from_request(response_format={"type": "json_object"}, regex="a+")
    assert info.value.param == "regex" and "response_format" in str(info.value)
    with pytest.raises(ConstraintError) as info:
        constraint_from_request(choice=["a"], grammar='start: "a"')
    assert info.value.param == "grammar"


def test_validation_errors_name_the_field():
    cases = [
        (dict(regex="[a-"), "regex", "unclosed"),
        (dict(grammar="start: foo"), "grammar", "line 1, column 8"),
        (dict(json_schema={"type": "array", "uniqueItems": True}), "json_schema", "uniqueItems"),
        (dict(json_schema="{not json"), "json_schema", "not valid JSON"),
        (dict(choice=[]), "choice", "non-empty"),
        (dict(choice="ab"), "choice", "list"),
        (dict(regex=""), "regex", "non-empty"),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "color"}}}),
            "response_format.json_schema.schema",
            "'color'",
        ),
    ]
    for kwargs, param, needle in cases:
        with pytest.raises(ConstraintError) as info:
            constraint_from_request(**kwargs)
        assert info.value.param == param, (kwargs, info.value.param)
        assert needle in str(info.value), str(info.value)
    # validation can be left to the engine
    assert constraint_from_request(regex="[a-", validate=False) == ConstraintSpec("regex", "[a-")
