"""Constrained generation with the real default model (SmolLM2-135M-Instruct on the CPU).

CI-sized versions of the structured-output must-shows (the full-size runs are
benchmarks/schema_generation.py and benchmarks/tool_calls_bench.py):
  * MaskBench schemas: every output ends by the grammar and validates with `jsonschema`
    (the schema's own draft, with formats);
  * Lark grammars: `lark` itself parses every output, greedy and sampled; a malformed grammar
    is a 400 naming its line and column;
  * a grammar matcher that hits an llguidance resource limit while decoding ends the request
    with finish_reason "error" and llguidance's message, never as a normal "stop".

One engine serves the module; generations are batched and short.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import lark
import pytest

from radixserve.runtime import Engine, SamplingParams
from radixserve.runtime.chat_template import render_chat
from radixserve.runtime.constraints import ConstraintCompiler, ConstraintError, ConstraintLimits, ConstraintSpec

from benchmarks.maskbench import data_dir
from benchmarks.schema_generation import build_prompt, check_output


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(model="default", num_pages=2048)
    yield engine
    engine.shutdown()


def _pool_at_rest(engine: Engine) -> None:
    engine.wait_idle()
    engine.check_integrity()
    s = engine.stats()
    assert (s.running, s.waiting, s.private_pages, s.locked_pages) == (0, 0, 0, 0)


def chat_prompt(engine: Engine, question: str) -> str:
    return render_chat(engine.chat_template, [{"role": "user", "content": question}])


# ---------------------------------------------------------------- JSON Schema (MaskBench)

# Ten MaskBench schemas, one per source family, whose greedy outputs are short (from a run of
# benchmarks/schema_generation.py); the full run covers 100 schemas.
CI_SCHEMAS = (
    "BFCL_javascript_18.json",
    "BFCL_multiple_106.json",
    "BFCL_parallel_10.json",
    "BFCL_simple_10.json",
    "BFCL_sql_12.json",
    "BFCL_parallel_multiple_10.json",
    "JME_0.json",
    "Kubernetes---kb_100_Normalized.json",
    "WashingtonPost---wp_102_Normalized.json",
    "BFCL_java_0.json",
)


def test_maskbench_schemas_generate_valid_json(engine):
    folder = data_dir()
    cases = []
    for name in CI_SCHEMAS:
        schema = json.loads((folder / name).read_text(encoding="utf-8"))["schema"]
        cases.append((name, schema))
    prompts = [build_prompt(engine, schema) for _, schema in cases]
    params = [SamplingParams(max_tokens=160, temperature=0.0, constraint=ConstraintSpec.json_schema(schema)) for _, schema in cases]
    results = engine.generate(prompts, params)
    for (name, schema), result in zip(cases, results):
        out = result.outputs[0]
        assert out.finish_reason == "stop", (name, out.finish_reason, out.text[-200:])
        ok, why = check_output(schema, out.text)
        assert ok, (name, why, out.text)
    _pool_at_rest(engine)


# ---------------------------------------------------------------- Lark grammars

GRAMMARS = {
    "arithmetic": (
        "Write an arithmetic expression that equals 10.",
        r"""
start: expr
expr: term | term OP term | term OP term OP term
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*" | "/"
NUMBER: /[0-9]{1,3}/
""",
    ),
    "csv": (
        "Write a small CSV table of three fruits with their colors and prices.",
        r"""
start: header "\n" row "\n" row "\n" row
header: NAME "," NAME "," NAME
row: FIELD "," FIELD "," FIELD
NAME: /[a-z]{1,10}/
FIELD: /[A-Za-z0-9.]{1,10}/
""",
    ),
    "list": (
        "List three things to pack for a beach trip.",
        r"""
start: item item item
item: "- " WORD (" " WORD)? (" " WORD)? "\n"
WORD: /[A-Za-z]{1,12}/
""",
    ),
}


def test_lark_grammar_outputs_parse_with_lark(engine):
    """Each grammar greedy and with three sampling seeds: lark parses every output."""
    runs = []
    for name, (question, grammar) in GRAMMARS.items():
        for seed in (None, 1, 2, 3):
            params = SamplingParams(max_tokens=64, temperature=0.0 if seed is None else 1.0, seed=seed,
                                    constraint=ConstraintSpec("grammar", grammar))
            runs.append((name, seed, chat_prompt(engine, question), params))
    results = engine.generate([r[2] for r in runs], [r[3] for r in runs])
    texts = set()
    for (name, seed, _, _), result in zip(runs, results):
        out = result.outputs[0]
        assert out.finish_reason == "stop", (name, seed, out.finish_reason, out.text)
        lark.Lark(GRAMMARS[name][1], parser="earley").parse(out.text)  # raises if it does not parse
        texts.add(out.text)
    assert len(texts) > len(GRAMMARS)  # the sampled runs are not all the greedy output
    _pool_at_rest(engine)


def test_malformed_grammar_is_a_400_with_line_and_column(engine):
    from starlette.testclient import TestClient

    from radixserve.server.app import create_app
    from radixserve.server.settings import ServerSettings

    grammar = 'start: item+\nitem: "a" | ( "b"\n'
    app = create_app(engine, ServerSettings(shutdown_engine=False))
    with TestClient(app) as client:
        body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "grammar": grammar}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "grammar" and error["code"] == "invalid_constraint", error
        assert "line 2, column" in error["message"], error
        # the same through the native endpoint, and a grammar that works is served
        response = client.post("/generate", json={"text": "a", "sampling_params": {"max_tokens": 4, "grammar": grammar}})
        assert response.status_code == 400 and "line 2, column" in response.json()["error"]["message"], response.text
        good = {**body, "grammar": GRAMMARS["list"][1], "max_tokens": 64, "temperature": 0}
        response = client.post("/v1/chat/completions", json=good)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["message"]["content"]
        lark.Lark(GRAMMARS["list"][1], parser="earley").parse(text)
    assert engine.healthy()


# ---------------------------------------------------------------- matcher errors while decoding

# Ambiguous: llguidance's Earley items grow with the output, so a low `step_max_items` is hit
# after a few tokens (while filling a mask) rather than at compile time.
AMBIGUOUS = 'start: s\ns: s s | "a" | "b"\n'


@pytest.fixture()
def limited_engine(engine) -> Iterator[Engine]:
    """The module's engine compiling with llguidance's per-step item limit lowered to 300."""
    saved = engine.constraints
    engine._constraints = ConstraintCompiler(engine.tokenizer, engine.vocab_size, ConstraintLimits(step_max_items=300),
                                             eos_token_ids=engine.eos_token_ids)
    try:
        yield engine
    finally:
        engine._constraints = saved


def test_matcher_error_while_decoding_ends_with_error(limited_engine):
    engine = limited_engine
    prompt = chat_prompt(engine, "Write a long string of the letters a and b.")
    result = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0.0, constraint=ConstraintSpec("grammar", AMBIGUOUS)))
    out = result.outputs[0]
    assert out.finish_reason == "error", (out.finish_reason, out.text)
    assert out.error is not None and out.error.startswith("constraint: ") and "Too many items (limit 300" in out.error, out.error
    assert 0 < len(out.token_ids) < 200 and set(out.text) <= {"a", "b"}  # it got some way first
    # streamed: the last delta carries the error; the engine goes on serving
    import asyncio

    async def stream() -> list:
        return [d async for d in engine.stream(prompt, SamplingParams(max_tokens=200, temperature=0.0,
                                                                      constraint=ConstraintSpec("grammar", AMBIGUOUS)))]

    deltas = asyncio.run(stream())
    assert deltas[-1].finish_reason == "error" and "Too many items" in (deltas[-1].error or "")
    assert all(d.finish_reason is None for d in deltas[:-1])
    ok = engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0, constraint=ConstraintSpec("regex", "[ab]{3}")))
    assert ok.finish_reason == "stop" and len(ok.text) == 3
    _pool_at_rest(engine)


def test_matcher_error_at_the_first_mask_is_refused_at_compile(engine):
    """Over the limit at the very first mask: the compiler's probe refuses the constraint up
    front (a client error, 400 over HTTP), so no request is admitted to end empty or failed."""
    saved = engine.constraints
    engine._constraints = ConstraintCompiler(engine.tokenizer, engine.vocab_size, ConstraintLimits(step_max_items=20),
                                             eos_token_ids=engine.eos_token_ids)
    try:
        with pytest.raises(ConstraintError, match="Too many items"):
            engine.generate(chat_prompt(engine, "ab"), SamplingParams(max_tokens=8, temperature=0.0,
                                                                      constraint=ConstraintSpec("grammar", AMBIGUOUS)))
    finally:
        engine._constraints = saved
    _pool_at_rest(engine)


class _RefusingMatcher:
    """A matcher stub whose consume fails the way llguidance does on a limit."""

    def __init__(self, fail_on: str) -> None:
        self.fail_on = fail_on
        self.state_error = False

    def is_error(self) -> bool:
        return self.state_error

    def error(self) -> str | None:
        return "parser error: lexer fuel exhausted\n<non-verbose/>" if self.state_error else None

    def consume(self, token: int) -> bool:
        if self.fail_on == "sampled":
            self.state_error = True
            return False
        return True

    def is_finished(self) -> bool:
        return self.state_error

    def forced_tokens(self) -> list[int]:
        if self.fail_on == "forced_tokens":
            self.state_error = True
            return []
        return [7] if self.fail_on == "forced" else []


@pytest.mark.parametrize("fail_on", ["sampled", "forced_tokens", "forced"])
def test_output_processor_turns_matcher_errors_into_error(fail_on):
    from radixserve.runtime.output_processor import OutputLimits, process_sampled_token
    from radixserve.runtime.request import Request

    matcher = _RefusingMatcher(fail_on)
    if fail_on == "forced":
        # consume succeeds for the sampled token, then refuses the forced one
        calls = {"n": 0}

        def consume(token: int) -> bool:
            calls["n"] += 1
            if calls["n"] > 1:
                matcher.state_error = True
                return False
            return True

        matcher.consume = consume  # type: ignore[method-assign]
    req = Request("r", 0, [1, 2, 3], SamplingParams(max_tokens=8), lambda d: None)
    req.matcher = matcher
    delta = process_sampled_token(req, 5, None, OutputLimits(frozenset({0}), 100))
    assert delta.finish_reason == "error" and req.finish_reason == "error"
    assert delta.error == req.error and delta.error.startswith("constraint: ") and "lexer fuel exhausted" in delta.error
    assert "<non-verbose/>" not in delta.error
    assert req.output_ids == [] and delta.token_ids == []
