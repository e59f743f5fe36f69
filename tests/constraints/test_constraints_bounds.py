"""The optional JSON bounds (`ConstraintLimits.json_max_string_length`, `json_max_items`,
`json_max_properties`, `json_max_integer_digits`): `tighten_schema` only ever narrows a schema, so whatever a bounded
matcher admits validates against the client's schema, and the bounds hold.

Soundness rests on where bounds go: monotone positions only (properties, items, allOf,
anyOf...), never under `not`, `if`, `oneOf`, `contains`, and nothing at all when such a keyword
meets `$ref`. Random walks through bounded matchers (the real tokenizer) check the result
against `jsonschema` with the original schema.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import jsonschema
import pytest

from radixserve.runtime.constraints import ConstraintCompiler, ConstraintLimits, ConstraintSpec, check_constraint
from radixserve.runtime.constraints.compiler import FREE_VALUE_DEPTH, tighten_schema

from .conftest import VOCAB_SIZE, Walker

BOUNDS = ConstraintLimits(json_max_string_length=12, json_max_items=3, json_max_properties=3, json_max_integer_digits=3)


def test_off_by_default_and_validated():
    schema = {"type": "array", "items": {"type": "string"}}
    assert not ConstraintLimits().bounds_json
    assert tighten_schema(schema, ConstraintLimits()) is schema
    assert BOUNDS.bounds_json and not BOUNDS.without_json_bounds().bounds_json
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            ConstraintLimits(json_max_items=bad)


def test_caps_respect_the_schema():
    t = tighten_schema({"type": "string"}, BOUNDS)
    assert t == {"type": "string", "maxLength": 12}
    assert tighten_schema({"type": "string", "maxLength": 5}, BOUNDS)["maxLength"] == 5  # already tighter
    assert tighten_schema({"type": "string", "maxLength": 50}, BOUNDS)["maxLength"] == 12
    assert "maxLength" not in tighten_schema({"type": "string", "minLength": 20}, BOUNDS)  # would contradict
    assert tighten_schema({"type": "array", "items": {"type": "integer"}, "minItems": 2}, BOUNDS)["maxItems"] == 3
    assert "maxItems" not in tighten_schema({"type": "array", "minItems": 4}, BOUNDS)
    assert tighten_schema({"enum": ["a" * 40, 1]}, BOUNDS) == {"enum": ["a" * 40, 1]}  # finite already
    assert tighten_schema({"const": "x" * 40}, BOUNDS) == {"const": "x" * 40}
    # numbers within +/- 999 (3 digits), only ever tightened; booleans are left alone
    assert tighten_schema({"type": "integer"}, BOUNDS) == {"type": "integer", "maximum": 999, "minimum": -999}
    assert tighten_schema({"type": "number", "minimum": 0, "maximum": 5000}, BOUNDS) == {
        "type": "number", "minimum": 0, "maximum": 999}
    assert tighten_schema({"type": "integer", "minimum": 5000}, BOUNDS) == {"type": "integer", "minimum": 5000}
    assert tighten_schema({"type": "number", "exclusiveMaximum": -2000}, BOUNDS) == {"type": "number", "exclusiveMaximum": -2000}
    assert tighten_schema({"type": "boolean"}, BOUNDS) == {"type": "boolean"}


def test_free_values_are_bounded_recursively():
    free = tighten_schema({}, BOUNDS)
    depth = 0
    node = free
    while "items" in node:
        assert node["maxItems"] == 3 and node["maxProperties"] == 3 and node["maxLength"] == 12
        assert node["items"] == node["additionalProperties"]
        node, depth = node["items"], depth + 1
    assert depth == FREE_VALUE_DEPTH
    assert node == {"maxLength": 12, "maximum": 999, "minimum": -999, "type": ["null", "boolean", "number", "string"]}
    assert tighten_schema(True, BOUNDS) == free
    assert tighten_schema({"title": "anything"}, BOUNDS) == {"title": "anything", **free}
    untyped_items = tighten_schema({"type": "array"}, BOUNDS)
    assert untyped_items["items"] == free and untyped_items["maxItems"] == 3


def test_objects_close_only_in_structural_positions():
    listed = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    t = tighten_schema({"type": "object", "properties": {"inner": listed}}, BOUNDS)
    assert t["additionalProperties"] is False  # the root holds the instance itself
    assert t["properties"]["inner"]["additionalProperties"] is False and t["properties"]["inner"]["maxProperties"] == 3
    # a branch of a combination is not closed: other branches may add properties
    t = tighten_schema({"type": "object", "allOf": [listed, {"properties": {"b": {}}}]}, BOUNDS)
    assert isinstance(t["allOf"][0]["additionalProperties"], dict)
    # required names that are not listed: closing would make it unsatisfiable
    t = tighten_schema({"type": "object", "properties": {"a": {}}, "required": ["z"]}, BOUNDS)
    assert isinstance(t["additionalProperties"], dict)
    # a free-form map: maxProperties (llguidance counts properties when none is optional)
    t = tighten_schema({"type": "object", "additionalProperties": {"type": "integer"}}, BOUNDS)
    assert t == {"type": "object", "additionalProperties": {"type": "integer", "maximum": 999, "minimum": -999},
                 "maxProperties": 3}
    # explicit openness beside optional properties: values bounded, count not (documented gap)
    t = tighten_schema({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, BOUNDS)
    assert isinstance(t["additionalProperties"], dict) and "maxProperties" not in t


@pytest.mark.parametrize("schema", [
    {"not": {"type": "string"}},
    {"oneOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "properties": {"b": {}}}]},
    {"if": {"type": "string"}, "then": {"type": "string", "minLength": 1}, "else": {"type": "integer"}},
    {"type": "array", "contains": {"type": "string"}, "maxContains": 1},
])
def test_non_monotone_subschemas_are_untouched(schema):
    t = tighten_schema(schema, BOUNDS)
    for key in ("not", "oneOf", "if", "contains"):
        if key in schema:
            assert t[key] == schema[key]
    if "then" in schema:
        assert t["then"]["maxLength"] == 12  # then/else are monotone given the condition


def test_definitions_a_non_monotone_keyword_reaches_are_left_alone():
    schema = {"$defs": {"s": {"type": "object", "properties": {"a": {}}}}, "oneOf": [{"$ref": "#/$defs/s"}, {"type": "string"}]}
    assert tighten_schema(schema, BOUNDS) == schema
    # transitively: oneOf -> u -> v; w is reached only from a monotone position and is tightened
    schema = {
        "$defs": {"u": {"type": "array", "items": {"$ref": "#/$defs/v"}}, "v": {"type": "string"}, "w": {"type": "string"}},
        "type": "object",
        "properties": {"x": {"oneOf": [{"$ref": "#/$defs/u"}, {"type": "integer"}]}, "y": {"$ref": "#/$defs/w"}},
    }
    t = tighten_schema(schema, BOUNDS)
    assert t["$defs"]["u"] == schema["$defs"]["u"] and t["$defs"]["v"] == schema["$defs"]["v"]
    assert t["properties"]["x"] == schema["properties"]["x"]
    assert t["$defs"]["w"]["maxLength"] == 12
    # a reference from under `not` that is not a plain root-definition pointer: nothing is tightened
    for ref in ("#", "#/$defs/u/items", "other.json#/$defs/u"):
        odd = {**schema, "not": {"$ref": ref}}
        assert tighten_schema(odd, BOUNDS) == odd
    without_one_of = {"$defs": {"s": {"type": "string"}}, "anyOf": [{"$ref": "#/$defs/s"}, {"type": "integer"}]}
    assert tighten_schema(without_one_of, BOUNDS)["$defs"]["s"]["maxLength"] == 12


def test_unevaluated_properties_keep_implicit_values():
    # An explicit additionalProperties in the branch would mark "b" evaluated and so admit it.
    schema = {"allOf": [{"properties": {"a": {"type": "string"}}}], "unevaluatedProperties": False}
    t = tighten_schema(schema, BOUNDS)
    assert "additionalProperties" not in t["allOf"][0]
    assert t["allOf"][0]["properties"]["a"]["maxLength"] == 12


def test_schema_that_fails_with_bounds_compiles_without(tokenizer):
    compiler = ConstraintCompiler(tokenizer, VOCAB_SIZE, BOUNDS)
    spec = ConstraintSpec.json_schema({"type": "string", "pattern": "^a{20}$"})  # 20 > the cap of 12
    matcher = compiler.compile(spec)
    assert matcher.consume_tokens(tokenizer.encode('"' + "a" * 20 + '"', add_special_tokens=False))
    assert matcher.accepts_eos()
    check_constraint(spec, BOUNDS)


def test_property_cap_is_dropped_before_the_other_bounds(tokenizer):
    """llguidance counts properties only where every listed one is required, which an `allOf`
    merged into the object breaks: the schema compiles without the property cap, keeping the
    other bounds (not without all of them)."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "allOf": [{"properties": {"b": {"type": "integer"}}}]}
    assert BOUNDS.json_bound_fallbacks() == [BOUNDS, replace(BOUNDS, json_max_properties=None), BOUNDS.without_json_bounds()]
    walker = Walker(ConstraintCompiler(tokenizer, VOCAB_SIZE, BOUNDS))
    matcher = walker.compiler.compile(ConstraintSpec.json_schema(schema))
    for seed in range(6):
        ids, _ = walker.walk(matcher.copy(), random.Random(seed), budget=60, p_stop=0.05)
        value = json.loads(walker.text(ids))
        jsonschema.validate(value, schema)
        assert _sizes_within(value, BOUNDS), value
    check_constraint(ConstraintSpec.json_schema(schema), BOUNDS)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
                                      "meta": {}}, "required": ["name", "tags"]},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}}}},
    {"type": "object", "additionalProperties": {"type": "array"}},
    {"anyOf": [{"type": "string", "minLength": 2}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[a-z]+$"}, "b": True}, "required": ["a"]},
    {},
]


def _sizes_within(value, bounds: ConstraintLimits) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return abs(value) < 10**bounds.json_max_integer_digits
    if isinstance(value, str):
        return len(value) <= bounds.json_max_string_length
    if isinstance(value, list):
        return len(value) <= bounds.json_max_items and all(_sizes_within(v, bounds) for v in value)
    if isinstance(value, dict):
        return all(_sizes_within(v, bounds) for v in value.values())
    return True


@pytest.fixture(scope="module")
def bounded_walker(tokenizer) -> Walker:
    return Walker(ConstraintCompiler(tokenizer, VOCAB_SIZE, BOUNDS))


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_bounded_walks_validate_and_stay_within_bounds(bounded_walker, index):
    schema = SCHEMAS[index]
    matcher = bounded_walker.compiler.compile(ConstraintSpec.json_schema(schema))
    for seed in range(6):
        ids, _ = bounded_walker.walk(matcher.copy(), random.Random(seed), budget=60, p_stop=0.05)
        value = json.loads(bounded_walker.text(ids))
        jsonschema.validate(value, schema)  # the original schema
        assert _sizes_within(value, BOUNDS), value


def test_walks_validate_with_refs_under_one_of(bounded_walker):
    """Definitions reached from a `oneOf` stay as written; the others are bounded; every walk
    validates against the original schema."""
    schema = {
        "$defs": {"item": {"type": "object", "properties": {"n": {"type": "string"}}, "required": ["n"]},
                  "tag": {"type": "string", "minLength": 1}},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                       "kind": {"oneOf": [{"type": "string", "allOf": [{"$ref": "#/$defs/tag"}]}, {"type": "integer"}]}},
        "required": ["items", "kind"],
    }
    tightened = tighten_schema(schema, BOUNDS)
    assert tightened["$defs"]["tag"] == schema["$defs"]["tag"] and tightened["$defs"]["item"]["properties"]["n"]["maxLength"] == 12
    matcher = bounded_walker.compiler.compile(ConstraintSpec.json_schema(schema))
    for seed in range(8):
        ids, _ = bounded_walker.walk(matcher.copy(), random.Random(seed), budget=80, p_stop=0.05)
        value = json.loads(bounded_walker.text(ids))
        jsonschema.validate(value, schema)
        assert len(value["items"]) <= 3 and all(len(item["n"]) <= 12 for item in value["items"]), value


def test_tool_call_constraint_carries_the_bounds(bounded_walker):
    from radixserve.server.tool_calls import parse_tool_calls, tool_call_constraint

    parameters = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "string"}}}, "required": ["xs"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    plain = tool_call_constraint(tools, "required", limits=ConstraintLimits())
    bounded = tool_call_constraint(tools, "required", limits=BOUNDS)
    assert '"maxItems"' not in plain.value and '"maxItems": 3' in bounded.value
    matcher = bounded_walker.compiler.compile(bounded)
    for seed in range(4):
        ids, _ = bounded_walker.walk(matcher.copy(), random.Random(seed), budget=60, p_stop=0.05)
        calls = parse_tool_calls(bounded_walker.text(ids), tool_names=["f"]).tool_calls
        assert 1 <= len(calls) <= 3
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, parameters)
            assert len(arguments["xs"]) <= 3 and all(len(x) <= 12 for x in arguments["xs"])
