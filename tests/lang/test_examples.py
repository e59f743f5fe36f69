"""Smoke tests of examples/: import each example and run its main() with tiny settings on the
session engine (the examples themselves default to a fresh in-process engine)."""

from __future__ import annotations

import importlib.util
import io
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"radixserve_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chat_multi_turn(runtime) -> None:
    out = io.StringIO()
    messages = load("chat_multi_turn").main(runtime, max_tokens=4, turns=["Hi!", "Tell me more."], out=out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "cached" in out.getvalue()


def test_few_shot_classification(runtime) -> None:
    mod = load("few_shot_classification")
    labels = mod.main(runtime, reviews=mod.REVIEWS[:2], out=io.StringIO())
    assert len(labels) == 2 and set(labels) <= {"positive", "negative", "neutral"}


def test_tree_of_thought(runtime) -> None:
    summary = load("tree_of_thought").main(runtime, branches=2, max_tokens=4, out=io.StringIO())
    assert len(summary["ideas"]) == 2 and summary["best"] in (0, 1)
    assert isinstance(summary["answer"], str)


def test_react_agent(runtime) -> None:
    mod = load("react_agent")
    assert mod.calculator("17*3 + 12") == "63"
    assert mod.calculator("2**1000").startswith("error")
    assert mod.calculator("__import__('os')").startswith("error")
    result = mod.main(runtime, max_steps=2, max_tokens=6, out=io.StringIO())
    assert 1 <= len(result["steps"]) <= 2
    for step in result["steps"]:
        assert step["action"] in ("calculator", "finish")


def test_rag(runtime) -> None:
    mod = load("rag")
    rows = mod.main(runtime, max_tokens=4, questions=mod.QUESTIONS[:2], out=io.StringIO())
    assert [r["source"] in mod.DOCUMENTS for r in rows] == [True, True]
    # The documents are the shared prefix: the second question reuses them from the cache.
    assert rows[1]["cached_tokens"] > len(runtime.tokenize(mod._context()))


def test_json_extraction(runtime) -> None:
    mod = load("json_extraction")
    records = mod.main(runtime, max_tokens=40, texts=mod.TEXTS[:1], out=io.StringIO())
    assert set(records[0]) == {"name", "age", "city"}  # schema-constrained, so it parses
