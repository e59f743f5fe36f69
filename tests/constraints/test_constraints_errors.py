"""Compile errors are clear and name what is wrong: the unsupported JSON-Schema keyword or format
and where it is, the grammar line and column, the regex problem; nothing unsupported is silently
ignored. Also the Lark check's policy (llguidance decides; lark supplies positions) and limits."""

from __future__ import annotations

import json

import pytest

from radixserve.runtime.constraints import (
    ConstraintCompiler,
    ConstraintError,
    ConstraintLimits,
    ConstraintSpec,
    check_constraint,
    check_lark_grammar,
)

VOCAB = 49152


def _error(compiler, spec) -> ConstraintError:
    with pytest.raises(ConstraintError) as info:
        compiler.compile(spec)
    exc = info.value
    assert isinstance(exc, ValueError)
    # the tokenizer-free check agrees with the compiler
    with pytest.raises(ConstraintError) as again:
        check_constraint(spec)
    assert again.value.param == exc.param
    return exc


@pytest.mark.parametrize(
    "schema,keyword,where",
    [
        ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "uniqueItems", "/properties/tags"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "the schema root"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not", "/properties/a"),
        ({"$defs": {"x": {"if": {"type": "string"}, "then": {"minLength": 2}}}, "$ref": "#/$defs/x"}, "if", "/$defs/x"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains", "the schema root"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames", "the schema root"),
        ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties", "the schema root"),
        ({"type": "object", "dependencies": {"a": ["b"]}}, "dependencies", "the schema root"),
    ],
)
def test_unsupported_keyword_is_named_with_location(compiler, schema, keyword, where):
    exc = _error(compiler, ConstraintSpec.json_schema(schema))
    assert exc.param == "json_schema"
    assert f"'{keyword}'" in str(exc) and "unsupported" in str(exc)
    assert where in str(exc)


def test_unknown_format_is_an_error(compiler):
    exc = _error(compiler, ConstraintSpec.json_schema({"type": "object", "properties": {"c": {"type": "string", "format": "color"}}}))
    assert "'color'" in str(exc) and "/properties/c" in str(exc)


def test_overlapping_one_of_is_an_error_not_any_of(compiler):
    exc = _error(compiler, ConstraintSpec.json_schema({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}))
    assert "oneOf" in str(exc)


def test_unsupported_pattern_names_the_regex_problem(compiler):
    exc = _error(compiler, ConstraintSpec.json_schema({"type": "string", "pattern": "(?<=a)b"}))
    assert "look-around" in str(exc)


def test_invalid_schema_fails_meta_schema_with_path(compiler):
    exc = _error(compiler, ConstraintSpec.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}))
    assert "/properties/a/type" in str(exc)
    exc = _error(compiler, ConstraintSpec.json_schema({"type": "object", "required": "a"}))
    assert "/required" in str(exc)


def test_schema_not_json_or_false(compiler):
    assert "not valid JSON" in str(_error(compiler, ConstraintSpec("json_schema", '{"type": ')))
    assert "false" in str(_error(compiler, ConstraintSpec("json_schema", "false")))
    assert "JSON object" in str(_error(compiler, ConstraintSpec("json_schema", "[1]")))


def test_keywords_that_are_enforced_compile(compiler):
    """Every assertion keyword either compiles (and is enforced: see the mask tests and
    MaskBench) or is an error; these compile."""
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string", "minLength": 1, "maxLength": 5, "pattern": "^[a-z]+$"},
            "n": {"type": "number", "minimum": 0, "exclusiveMaximum": 10, "multipleOf": 0.5},
            "i": {"type": "integer", "enum": [1, 2, 3]},
            "a": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
            "t": {"type": "array", "prefixItems": [{"const": "x"}], "items": False},
            "d": {"type": "string", "format": "date"},
            "o": {"anyOf": [{"type": "null"}, {"allOf": [{"type": "object"}, {"required": ["k"]}]}]},
            "m": {"type": "object", "additionalProperties": {"type": "integer"}, "patternProperties": {"^x": {"type": "string"}}},
        },
        "required": ["s"],
        "additionalProperties": False,
    }
    compiler.compile(ConstraintSpec.json_schema(schema))


def test_uniqueitems_false_is_a_no_op(compiler):
    compiler.compile(ConstraintSpec.json_schema({"type": "array", "uniqueItems": False}))


def test_finite_enum_with_unsupported_keywords_compiles_exactly(compiler):
    schema = {"allOf": [{"enum": ["red", "green", "blue", 3]}, {"not": {"enum": ["green"]}}, {"type": "string"}]}
    matcher = compiler.compile(ConstraintSpec.json_schema(schema))
    lltok = compiler.lltokenizer
    for text, ok in [('"red"', True), ('"blue"', True), ('"green"', False), ("3", False)]:
        m = matcher.copy()
        assert (m.consume_tokens(lltok.tokenize_str(text)) and m.accepts_eos()) == ok, text
    exc = _error(compiler, ConstraintSpec.json_schema({"enum": [1, 2], "not": {"enum": [1, 2]}}))
    assert "no value satisfies" in str(exc)


@pytest.mark.parametrize(
    "regex,cause",
    [("[a-z", "unclosed character class"), ("a(?=b)", "look-around"), (r"(\w)\1", "backreferences"), ("a{3,1}", "")],
)
def test_bad_regex_names_the_problem(compiler, regex, cause):
    exc = _error(compiler, ConstraintSpec("regex", regex))
    assert exc.param == "regex"
    assert cause in str(exc)
    assert "regular expression" in str(exc)


def test_bad_grammar_has_line_and_column(compiler):
    grammar = 'start: item+\nitem: "a" | \n  bar ) \n'
    exc = _error(compiler, ConstraintSpec("grammar", grammar))
    assert exc.param == "grammar"
    assert (exc.line, exc.column) == (3, 7)
    assert "line 3, column 7" in str(exc) and "\n      bar ) \n          ^" in str(exc)
    exc = _error(compiler, ConstraintSpec("grammar", "start: foo\n"))
    assert (exc.line, exc.column) == (1, 8) and "foo" in str(exc)
    exc = _error(compiler, ConstraintSpec("grammar", 'start: "a" B\nB: /[a-z/\n'))
    assert exc.line == 2 and "unclosed character class" in str(exc)


def test_unknown_special_token_is_reported_at_compile(compiler):
    check_lark_grammar('start: "a" <|no_such_token|>')  # tokenizer-free check cannot know
    exc = _error_compile_only(compiler, ConstraintSpec("grammar", 'start: "a" <|no_such_token|>'))
    assert exc.line == 1 and "no_such_token" in str(exc)


def _error_compile_only(compiler, spec) -> ConstraintError:
    with pytest.raises(ConstraintError) as info:
        compiler.compile(spec)
    return info.value


def test_lark_check_policy():
    # llguidance extensions lark rejects are accepted (llguidance runs the grammar)
    check_lark_grammar('start: %json {"type": "object"}')
    check_lark_grammar('start: x{2,3}\nx: "a"')
    check_lark_grammar('start: "a" <|im_end|>')
    check_lark_grammar("start: /[a-z]*/")
    check_lark_grammar("start: A\nA: /[a-z]+/ & ~/(?s:.*)bad(?s:.*)/")
    # standard Lark features pass too
    check_lark_grammar('%import common.NUMBER\n%import common.WS\n%ignore WS\nstart: NUMBER ("," NUMBER)*')
    for bad, line, column in [('start: "a"\nstart: "b"', 2, 8), ('start "a"', 1, 7), ('start: "abc', 1, 12)]:
        with pytest.raises(ConstraintError) as info:
            check_lark_grammar(bad)
        assert (info.value.line, info.value.column) == (line, column), info.value
    with pytest.raises(ConstraintError, match="empty"):
        check_lark_grammar("  \n")
    with pytest.raises(ConstraintError, match="start"):
        check_lark_grammar('rule: "a"')


def test_lark_position_fallback_when_llguidance_has_none():
    from radixserve.runtime.constraints.lark_check import grammar_error

    exc = grammar_error("something went wrong", 'start: "a"\n  | @@@\n')
    assert (exc.line, exc.column) == (2, 5)  # lark's position
    assert "something went wrong" in str(exc)


def test_choice_errors(compiler):
    assert "at least one" in str(_error(compiler, ConstraintSpec.choices([])))
    with pytest.raises(ConstraintError):
        ConstraintSpec("choice", "abc")
    with pytest.raises(ConstraintError):
        ConstraintSpec("choice", ("a", 1))
    with pytest.raises(ConstraintError):
        ConstraintSpec("nonsense", "x")


def test_limits(tokenizer):
    small = ConstraintCompiler(tokenizer, VOCAB, ConstraintLimits(max_spec_bytes=100, max_choices=3))
    with pytest.raises(ConstraintError, match="over the limit"):
        small.compile(ConstraintSpec("regex", "a" * 101))
    with pytest.raises(ConstraintError, match="over the limit"):
        small.compile(ConstraintSpec.choices(["a", "b", "c", "d"]))
    tiny = ConstraintCompiler(tokenizer, VOCAB, ConstraintLimits(max_grammar_size=50))
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40)}}
    with pytest.raises(ConstraintError, match="too complex|limit"):
        tiny.compile(ConstraintSpec.json_schema(big))
    with pytest.raises(ValueError):
        ConstraintLimits(json_max_whitespace=-1)
    with pytest.raises(ValueError):
        ConstraintLimits(initial_lexer_fuel=0)


def test_errors_are_cached_and_fresh(compiler):
    spec = ConstraintSpec.json_schema({"type": "array", "uniqueItems": True, "description": json.dumps([1])})
    first = _error_compile_only(compiler, spec)
    second = _error_compile_only(compiler, spec)
    assert first is not second and str(first) == str(second)
