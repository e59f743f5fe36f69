"""Tool calls: the constraint's outputs (random walks through the real mask) parse into tool
calls whose arguments validate against the tools' schemas; tool validation names the tool; the
streaming parser's deltas, in any chunking, concatenate to the non-streamed result."""

from __future__ import annotations

import itertools
import json
import random

import jsonschema
import pytest

from radixserve.runtime.constraints import ConstraintError, ConstraintSpec
from radixserve.server.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCallStreamParser,
    merge_stream,
    parse_tool_calls,
    resolve_tool_choice,
    tool_call_constraint,
    tools_system_prompt,
    validate_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "number", "minimum": 0}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
WITH_REFS = {
    "type": "function",
    "function": {
        "name": "book.flight",
        "parameters": {
            "type": "object",
            "$defs": {"airport": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "properties": {"from": {"$ref": "#/$defs/airport"}, "to": {"$ref": "#/$defs/airport"}},
            "required": ["from", "to"],
            "additionalProperties": False,
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "ping"}}
TOOLS = [WEATHER, ADD, WITH_REFS, NO_ARGS]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "additionalProperties": False}) for t in TOOLS}


def _walk_outputs(compiler, walker, spec, n, **kwargs):
    matcher = compiler.compile(spec)
    return [walker.text(walker.walk(matcher.copy(), random.Random(seed), **kwargs)[0]) for seed in range(n)]


def _check_calls(parsed, allowed_names, *, exactly_one=False):
    assert parsed.tool_calls, parsed
    if exactly_one:
        assert len(parsed.tool_calls) == 1
    for call in parsed.tool_calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in allowed_names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_outputs_are_valid_calls(compiler, walker, parallel):
    spec = tool_call_constraint(TOOLS, "required", parallel)
    assert spec is not None and spec.kind == "grammar"
    for text in _walk_outputs(compiler, walker, spec, 8, budget=40):
        assert text.startswith(TOOL_CALL_START) and text.endswith(TOOL_CALL_END), text
        parsed = parse_tool_calls(text)
        assert parsed.content is None
        _check_calls(parsed, set(SCHEMAS), exactly_one=not parallel)


def test_named_tool_choice_restricts_to_that_tool(compiler, walker):
    spec = tool_call_constraint(TOOLS, {"type": "function", "function": {"name": "book.flight"}}, False)
    for text in _walk_outputs(compiler, walker, spec, 6, budget=30):
        _check_calls(parse_tool_calls(text), {"book.flight"}, exactly_one=True)


def test_auto_allows_text_or_constrained_call(compiler, walker):
    spec = tool_call_constraint(TOOLS, "auto", True)
    matcher = compiler.compile(spec)
    lltok = compiler.lltokenizer
    # plain text is fine and may end anywhere
    text_only = matcher.copy()
    assert text_only.consume_tokens(lltok.tokenize_str("The capital of France is Paris."))
    assert text_only.accepts_eos()
    # once the tag appears, the call is constrained: a bad name or bad arguments are rejected
    bad = matcher.copy()
    assert bad.consume_tokens(lltok.tokenize_str("Let me check. " + TOOL_CALL_START))
    assert not bad.accepts_eos()
    assert bad.validate_tokens(lltok.tokenize_str('[{"name": "nope"')) < len(lltok.tokenize_str('[{"name": "nope"'))
    wrong_args = lltok.tokenize_str('[{"name": "add", "arguments": {"a": "one", "b": 2}}]')
    assert bad.copy().validate_tokens(wrong_args) < len(wrong_args)
    # random walks from inside the call produce valid calls with the text kept as content
    for seed in range(6):
        m = matcher.copy()
        prefix = lltok.tokenize_str("Let me check. " + TOOL_CALL_START)
        assert m.consume_tokens(prefix)
        ids, _ = walker.walk(m, random.Random(seed), budget=30)
        parsed = parse_tool_calls(walker.text(prefix + ids))
        assert parsed.content == "Let me check."
        _check_calls(parsed, set(SCHEMAS))


def test_auto_with_json_response_format(compiler):
    rf = ConstraintSpec.json_schema({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    spec = tool_call_constraint(TOOLS, "auto", True, response_format=rf)
    matcher = compiler.compile(spec)
    lltok = compiler.lltokenizer
    answer = matcher.copy()
    assert answer.consume_tokens(lltok.tokenize_str('{"answer": "42"}')) and answer.accepts_eos()
    call = matcher.copy()
    assert call.consume_tokens(lltok.tokenize_str('<tool_call>[{"name": "ping", "arguments": {}}]</tool_call>'))
    assert call.is_finished()
    assert matcher.copy().validate_tokens(lltok.tokenize_str("plain text")) == 0
    with pytest.raises(ConstraintError):
        tool_call_constraint(TOOLS, "auto", True, response_format=ConstraintSpec("regex", "a+"))
    # forced calls ignore the response format for this turn
    assert tool_call_constraint(TOOLS, "required", True, response_format=rf) == tool_call_constraint(TOOLS, "required", True)


def test_tool_choice_none_and_resolution():
    assert tool_call_constraint(TOOLS, "none") is None
    assert tool_call_constraint(None, None) is None
    specs = validate_tools(TOOLS)
    assert resolve_tool_choice(None, specs)[0] == "auto"
    assert resolve_tool_choice({"type": "function", "function": {"name": "add"}}, specs) == ("required", [specs[1]])
    with pytest.raises(ConstraintError) as info:
        resolve_tool_choice({"type": "function", "function": {"name": "missing"}}, specs)
    assert info.value.param == "tool_choice" and "missing" in str(info.value)
    with pytest.raises(ConstraintError):
        resolve_tool_choice("required", [])
    with pytest.raises(ConstraintError):
        resolve_tool_choice("sometimes", specs)


@pytest.mark.parametrize(
    "tool,needle",
    [
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strng"}}}}}, "/properties/x/type"),
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}}}, "'uniqueItems'"),
        ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}, "object"),
        ({"type": "function", "function": {"name": "bad name!", "parameters": {}}}, "name"),
        ({"type": "function", "function": {"name": "f", "parameters": [1]}}, "parameters"),
        ({"type": "retrieval"}, "function"),
    ],
)
def test_invalid_tools_name_the_tool(tool, needle):
    with pytest.raises(ConstraintError) as info:
        validate_tools([WEATHER, tool])
    exc = info.value
    assert exc.param == "tools" and "tools[1]" in str(exc) and needle in str(exc), str(exc)


def test_duplicate_tool_names():
    with pytest.raises(ConstraintError, match="duplicate"):
        validate_tools([ADD, ADD])


def test_system_prompt_describes_tools_and_format():
    prompt = tools_system_prompt(TOOLS, parallel_tool_calls=False)
    assert "get_weather" in prompt and "book.flight" in prompt and TOOL_CALL_START in prompt and "exactly one function call" in prompt
    listed = json.loads(prompt.split("<tools>")[1].split("</tools>")[0])
    assert [t["name"] for t in listed] == ["get_weather", "add", "book.flight", "ping"]


TEXTS = [
    "Just an answer, no tools.  ",
    'Sure. <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, {"name": "add", "arguments": {"a": 1, "b": 2.5}}]</tool_call>',
    '<tool_call>\n[\n  {"name": "add", "arguments": {"a": 1, "b": {"nested": [1, "}]"]}}}\n]</tool_call>',
    '<tool_call>{"name": "ping", "arguments": {}}</tool_call>',
    '<tool_call>[{"arguments": {"from": "SEA", "to": "JFK"}, "name": "book.flight"}]</tool_call> trailing note',
    'Text <tool_call> that is not a call',
    'cut off <tool_call>[{"name": "add", "arguments": {"a": 1, "b"',
    'a <tool_cal then <tool_call>[{"name": "ping", "arguments": {"é": "ü\\"q"}}]</tool_call>',
    'bad escape <tool_call>[{"na\\xme": 1}]</tool_call> then <tool_call>[{"name": "ping", "arguments": {}}]</tool_call>',
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_concatenate_to_parse(text):
    counter = itertools.count()
    expected = parse_tool_calls(text, id_factory=lambda: f"call_{next(counter)}")
    for trial in range(60):
        rng = random.Random(trial)
        if trial == 0:
            parts = list(text)  # one character at a time
        else:
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 15))))
            parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        ids = itertools.count()
        parser = ToolCallStreamParser(id_factory=lambda: f"call_{next(ids)}")
        chunks = [parser.feed(p) for p in parts] + [parser.finish()]
        assert merge_stream(chunks) == expected, parts
        for _, deltas in chunks:
            for d in deltas:
                assert set(d) <= {"index", "id", "type", "function"}
                if "id" in d:
                    assert d["type"] == "function" and d["function"]["name"]


def test_parse_examples():
    parsed = parse_tool_calls(TEXTS[1])
    assert parsed.content == "Sure."
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "add"]
    assert json.loads(parsed.tool_calls[1]["function"]["arguments"]) == {"a": 1, "b": 2.5}
    assert parse_tool_calls(TEXTS[0]) .content == TEXTS[0] and not parse_tool_calls(TEXTS[0]).tool_calls
    assert parse_tool_calls(TEXTS[5]).content == TEXTS[5] and not parse_tool_calls(TEXTS[5]).tool_calls
    assert parse_tool_calls(TEXTS[4]).content == "trailing note"
    only_known = parse_tool_calls(TEXTS[1], tool_names={"add"})
    assert [c["function"]["name"] for c in only_known.tool_calls] == ["add"]
    assert len({c["id"] for c in parse_tool_calls(TEXTS[1]).tool_calls}) == 2


def test_stream_first_delta_then_fragments():
    parser = ToolCallStreamParser(id_factory=lambda: "call_x")
    text = TEXTS[1]
    out = [parser.feed(text[:40]), parser.feed(text[40:90]), parser.feed(text[90:]), parser.finish()]
    deltas = [d for _, ds in out for d in ds]
    assert deltas[0] == {"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": deltas[0]["function"]["arguments"]}}
    assert all("id" not in d for d in deltas[1:] if d["index"] == 0)
    assert parser.tool_calls_started == 2
    assert "".join(c for c, _ in out) == "Sure."


def test_walk_outputs_stream_like_they_parse(compiler, walker):
    spec = tool_call_constraint(TOOLS, "required", True)
    for text in _walk_outputs(compiler, walker, spec, 4, budget=30):
        counter = itertools.count()
        expected = parse_tool_calls(text, id_factory=lambda: f"c{next(counter)}")
        ids = itertools.count()
        parser = ToolCallStreamParser(id_factory=lambda: f"c{next(ids)}")
        rng = random.Random(0)
        chunks, i = [], 0
        while i < len(text):
            j = i + rng.randint(1, 6)
            chunks.append(parser.feed(text[i:j]))
            i = j
        chunks.append(parser.finish())
        assert merge_stream(chunks) == expected


def test_tool_call_json_whitespace_is_capped(compiler):
    lltok = compiler.lltokenizer
    matcher = compiler.compile(tool_call_constraint(TOOLS, "required", True))
    assert matcher.consume_tokens(lltok.tokenize_str(TOOL_CALL_START + "["))
    space = lltok.tokenize_str(" ")[0]
    ok = matcher.copy()
    for _ in range(compiler.limits.json_max_whitespace):
        assert ok.consume(space)
    assert not ok.consume(space)
