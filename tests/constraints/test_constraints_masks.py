"""Every constraint kind masks correctly with the real tokenizer: random walks through the mask
always produce text the oracle accepts (re.fullmatch, json.loads + jsonschema, lark, membership),
EOS is allowed exactly where the grammar accepts, forced tokens are canonical, whitespace in JSON
is capped, and the matcher/bitmask plumbing (copy, rollback, batched fill, apply) is exact."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import lark
import pytest
import torch

from radixserve.runtime.constraints import (
    ConstraintCompiler,
    ConstraintLimits,
    ConstraintSpec,
    allocate_bitmask,
    apply_bitmask,
    compile_constraint,
    unpack_bitmask,
)

VOCAB = 49152
WALKS = 12

# (regex, characters that help a walk finish: what ends its unbounded parts)
REGEXES = [
    (r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)", ("@", ".", "com")),
    (r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?", (".", "0")),
    (r"(yes|no|maybe)( please)?", ("please",)),
    (r"[A-Z][a-z]+ [A-Z][a-z]+, age [0-9]{1,2}", ("", ",", "age", "1")),
    (r"\d{3}-\d{4}", ("-",)),
    (r"(ab|cd)*e", ("e",)),
]

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "object", "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}}, "required": ["x"]},
        "minItems": 1,
        "maxItems": 3,
    },
    {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "exclusiveMinimum": 0}}, "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1}}, "required": ["kind", "side"], "additionalProperties": False},
        ]
    },
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}}, "required": ["v", "next"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
]

GRAMMARS = [
    # arithmetic with whitespace
    """
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
""",
    # key=value lines
    """
start: pair ("\\n" pair)*
pair: KEY "=" VALUE
KEY: /[a-z]{1,6}/
VALUE: /[a-z0-9]{1,6}/ | "true" | "false"
""",
    # a tiny list language
    """
start: "[" [item ("," item)*] "]"
item: WORD | start
WORD: /[a-z]{1,5}/
""",
]


def _walk_texts(walker, matcher, n, **kwargs):
    out = []
    for seed in range(n):
        ids, forced = walker.walk(matcher.copy(), random.Random(seed), **kwargs)
        out.append((walker.text(ids), forced))
    return out


@pytest.mark.parametrize("regex,closers", REGEXES)
def test_regex_walks_fullmatch(compiler, walker, regex, closers):
    matcher = compiler.compile(ConstraintSpec("regex", regex))
    for text, _ in _walk_texts(walker, matcher, WALKS, budget=12, closers=closers):
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_walks_are_members(compiler, walker):
    choices = ["yes", "no", "maybe", "yes please", "négatif", 'quote " and \\ back', "line\nbreak", "日本"]
    matcher = compiler.compile(ConstraintSpec.choices(choices))
    seen = set()
    for text, _ in _walk_texts(walker, matcher, 40, budget=6, p_stop=0.5):
        assert text in choices, text
        seen.add(text)
    assert len(seen) >= 4  # the walks explore the alternatives


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_json_schema_walks_validate(compiler, walker, index):
    schema = SCHEMAS[index]
    matcher = compiler.compile(ConstraintSpec.json_schema(schema))
    for text, _ in _walk_texts(walker, matcher, WALKS, budget=30):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_walks_are_objects(compiler, walker):
    matcher = compiler.compile(ConstraintSpec("json_object"))
    for text, _ in _walk_texts(walker, matcher, WALKS, budget=25):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("index", range(len(GRAMMARS)))
def test_grammar_walks_parse_with_lark(compiler, walker, index):
    grammar = GRAMMARS[index]
    oracle = lark.Lark(grammar, parser="earley", lexer="dynamic")
    matcher = compiler.compile(ConstraintSpec("grammar", grammar))
    for text, _ in _walk_texts(walker, matcher, WALKS, budget=15, closers=(")", "]", "1")):
        oracle.parse(text)


def test_eos_only_when_accepting(compiler, walker):
    eos = compiler.eos_token_ids[0]
    matcher = compiler.compile(ConstraintSpec("regex", "[a-c]{3}x?"))
    a = walker.lltok.tokenize_str("a")
    assert len(a) == 1
    for consumed in range(3):
        assert eos not in walker.allowed(matcher)
        assert not matcher.accepts_eos()
        assert matcher.consume(a[0])
    assert eos in walker.allowed(matcher) and matcher.accepts_eos() and not matcher.is_finished()
    assert matcher.consume(walker.lltok.tokenize_str("x")[0])
    assert matcher.is_finished() and matcher.accepts_eos()
    assert walker.allowed(matcher) == [eos]  # nothing but EOS may follow a finished grammar


def test_rejected_token_puts_matcher_in_error(compiler, walker):
    matcher = compiler.compile(ConstraintSpec("regex", "[0-9]+"))
    letter = walker.lltok.tokenize_str("z")[0]
    assert letter not in walker.allowed(matcher)
    assert not matcher.consume(letter)
    assert matcher.is_error() and matcher.is_finished() and not matcher.accepts_eos()
    assert matcher.error()


def test_rollback_restores_state(compiler, walker):
    matcher = compiler.compile(ConstraintSpec("regex", "(ab)+c"))
    a, b, c = (walker.lltok.tokenize_str(x)[0] for x in "abc")
    start_mask = walker.allowed(matcher)
    assert matcher.consume_tokens([a, b])
    after_ab = walker.allowed(matcher)
    assert matcher.consume(a)
    assert matcher.rollback(1)
    assert walker.allowed(matcher) == after_ab
    assert matcher.rollback(2)
    assert walker.allowed(matcher) == start_mask
    assert matcher.consume_tokens([a, b, c]) and matcher.is_finished()


def test_forced_tokens_are_canonical_and_consumable(tokenizer):
    # Compact JSON: with whitespace allowed after "{", nothing would be forced there.
    compiler = ConstraintCompiler(tokenizer, VOCAB, ConstraintLimits(json_max_whitespace=0))
    schema = {
        "type": "object",
        "properties": {"temperature_celsius": {"type": "number"}, "condition": {"enum": ["sunny_and_warm"]}},
        "required": ["temperature_celsius", "condition"],
        "additionalProperties": False,
    }
    matcher = compiler.compile(ConstraintSpec.json_schema(schema))
    lltok = compiler.lltokenizer
    forced = matcher.forced_tokens()
    text = lltok.decode_str(forced)
    assert text.startswith('{"temperature_c'), text
    assert forced == tokenizer.encode(text, add_special_tokens=False)  # canonical tokenization
    assert matcher.forced_tokens() == forced  # a query, not a step
    assert matcher.consume_tokens(forced)
    for tok in tokenizer.encode('":21.5,"condition":', add_special_tokens=False):
        assert matcher.consume(tok)
    rest = lltok.decode_str(matcher.forced_tokens())
    assert rest.startswith('"sunny_and_warm"'), rest


def test_choice_forces_shared_prefix(compiler):
    matcher = compiler.compile(ConstraintSpec.choices(["The quick brown fox jumps", "The quick brown fox sleeps"]))
    forced = compiler.lltokenizer.decode_str(matcher.forced_tokens())
    assert forced and "The quick brown fox".startswith(forced), forced


def test_walks_fast_forward_json(compiler, walker):
    schema = {
        "type": "object",
        "properties": {"first_name": {"type": "string", "maxLength": 5}, "last_name": {"type": "string", "maxLength": 5}},
        "required": ["first_name", "last_name"],
        "additionalProperties": False,
    }
    matcher = compiler.compile(ConstraintSpec.json_schema(schema))
    forced_total = sum(f for _, f in _walk_texts(walker, matcher, 6, budget=20))
    assert forced_total > 0


@pytest.mark.parametrize("cap", [0, 3, 20])
def test_json_whitespace_is_capped(tokenizer, cap):
    limits = ConstraintLimits(json_max_whitespace=cap)
    compiler = ConstraintCompiler(tokenizer, VOCAB, limits)
    lltok = compiler.lltokenizer
    space = lltok.tokenize_str(" ")
    assert len(space) == 1
    matcher = compiler.compile(ConstraintSpec("json_object"))
    assert matcher.consume(lltok.tokenize_str("{")[0])
    bitmask = allocate_bitmask(1, VOCAB)
    for _ in range(cap):
        assert matcher.consume(space[0])
    matcher.fill_bitmask(bitmask, 0)
    allowed = unpack_bitmask(bitmask, VOCAB)[0]
    assert not allowed[space[0]]  # no more whitespace here
    assert not matcher.copy().consume(space[0])
    assert matcher.consume_tokens(lltok.tokenize_str('"a":1}'))
    assert matcher.accepts_eos()


def test_whitespace_cap_walks_stay_within_cap(tokenizer, walker):
    compiler = ConstraintCompiler(tokenizer, VOCAB, ConstraintLimits(json_max_whitespace=4))
    matcher = compiler.compile(ConstraintSpec.json_schema(SCHEMAS[0]))
    inner = walker.__class__(compiler)
    for text, _ in _walk_texts(inner, matcher, 6, budget=25):
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert not re.search(r"[ \t\r\n]{5}", outside_strings), text
        jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_schema_x_guidance_cannot_loosen_strictness(compiler):
    from radixserve.runtime.constraints import ConstraintError

    loose = {"x-guidance": {"lenient": True, "whitespace_pattern": "[ ]*"}, "type": "array", "uniqueItems": True}
    with pytest.raises(ConstraintError, match="uniqueItems"):
        compiler.compile(ConstraintSpec.json_schema(loose))
    ok = compiler.compile(ConstraintSpec.json_schema({"x-guidance": {"whitespace_pattern": "[ ]*"}, "type": "array"}))
    lltok = compiler.lltokenizer
    assert ok.consume(lltok.tokenize_str("[")[0])
    assert not ok.consume_tokens(lltok.tokenize_str(" " * 40))


def test_copy_is_independent_and_cache_hits(compiler, tokenizer):
    spec = ConstraintSpec("regex", "(cat|dog)s?")
    first = compiler.compile(spec)
    second = compiler.compile(spec)
    cat = compiler.lltokenizer.tokenize_str("cat")
    assert first.consume_tokens(cat)
    assert second.validate_tokens(compiler.lltokenizer.tokenize_str("dog")) > 0  # fresh state
    clone = first.copy()
    assert clone.consume(compiler.lltokenizer.tokenize_str("s")[0]) and clone.is_finished()
    assert not first.is_finished() and first.accepts_eos()
    assert compile_constraint(spec, tokenizer, VOCAB).validate_tokens(cat) == len(cat)


def test_fill_bitmasks_parallel_matches_sequential(compiler):
    specs = [ConstraintSpec("regex", r) for r, _ in REGEXES] + [ConstraintSpec.json_schema(s) for s in SCHEMAS]
    matchers = [compiler.compile(s) for s in specs]
    sequential = allocate_bitmask(len(matchers), VOCAB)
    for row, m in enumerate(matchers):
        m.fill_bitmask(sequential, row)
    parallel = allocate_bitmask(len(matchers), VOCAB)
    compiler.fill_bitmasks([(m, row) for row, m in enumerate(matchers)], parallel)
    assert torch.equal(sequential, parallel)


def test_apply_bitmask_matches_reference():
    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
    rows = [0, 2, 3]
    expected = logits.clone()
    for r in rows:
        for t in range(vocab):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, bitmask, rows)
    assert torch.equal(got, expected)
    everything = logits.clone()
    apply_bitmask(everything, bitmask, range(5))
    assert torch.equal(everything[rows], expected[rows])
    untouched = logits.clone()
    apply_bitmask(untouched, bitmask, [])
    assert torch.equal(untouched, logits)


def test_masked_greedy_sampling_yields_valid_json(compiler, walker):
    """End to end with apply_bitmask: greedy decoding of random logits under the mask."""
    schema = SCHEMAS[2]
    matcher = compiler.compile(ConstraintSpec.json_schema(schema))
    gen = torch.Generator().manual_seed(1)
    bitmask = allocate_bitmask(1, VOCAB)
    ids: list[int] = []
    eos = compiler.eos_token_ids[0]
    for step in range(200):
        if matcher.is_finished():
            break
        logits = torch.randn(1, VOCAB, generator=gen)
        if step > 30:  # push towards closing the structure
            for t in compiler.lltokenizer.tokenize_str('}"'):
                logits[0, t] += 100
            logits[0, eos] += 200
        matcher.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask, [0])
        token = int(logits.argmax())
        if token == eos:
            assert matcher.accepts_eos()
            break
        assert matcher.consume(token)
        ids.append(token)
        forced = matcher.forced_tokens()
        assert matcher.consume_tokens(forced)
        ids.extend(forced)
    jsonschema.validate(json.loads(walker.text(ids)), schema)
