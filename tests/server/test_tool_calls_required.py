"""tool_choice "required" end to end: a real uvicorn server around `Engine(model="default")`,
called with the official `openai` SDK, returns tool calls whose arguments validate against the
tool's parameters, streamed and not streamed.

CI-sized (5 + 5 requests, all three tools of the benchmark); the full-size run is
`python -m benchmarks.tool_calls_bench` (50 + 50).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from benchmarks.tool_calls_bench import TOOLS, questions, reassemble, request_kwargs, run_mode, tool_validators
from radixserve.server.app import create_app
from radixserve.server.settings import ServerSettings

from .conftest import API_KEY, ServerThread


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[openai.OpenAI, str]]:
    from radixserve.runtime import Engine

    engine = Engine(model="default", num_pages=2048)
    thread = ServerThread(create_app(engine, ServerSettings(api_key=API_KEY))).start()
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    yield client, engine.model_name
    thread.stop()  # the lifespan stops the engine


@pytest.mark.parametrize("streamed", [False, True], ids=["not-streamed", "streamed"])
def test_required_tool_calls_have_valid_arguments(served, streamed):
    client, model = served
    outcomes, _ = run_mode(client, model, questions(5), max_tokens=160, concurrency=5, streamed=streamed)
    failures = [(o.question, o.problem, o.calls) for o in outcomes if not o.ok]
    assert not failures
    assert {name for o in outcomes for name, _ in o.calls} == {t["function"]["name"] for t in TOOLS}


def test_json_bounds_end_a_repeating_array(served):
    """Greedy, the model repeats itself inside the arguments until max_tokens (an unfinished
    call, finish_reason "length"); on a server whose engine sets the JSON bounds of
    `ConstraintLimits` (`Engine(constraints=...)`, `radixserve serve --json-max-items ...`),
    arrays and strings end at the caps, the calls complete, and their arguments validate
    against the tool's own schema."""
    from radixserve.runtime import Engine
    from radixserve.runtime.constraints import ConstraintLimits

    client, model = served
    validators = tool_validators(TOOLS)
    question = "Add 4 socks to my cart."
    plain = client.chat.completions.create(**request_kwargs(model, question, 96))
    assert plain.choices[0].finish_reason == "length"  # the repetition this guards against

    engine = Engine(model="default", num_pages=2048, constraints=ConstraintLimits(json_max_items=3, json_max_string_length=24))
    thread = ServerThread(create_app(engine, ServerSettings(api_key=API_KEY))).start()
    try:
        bounded_client = openai.OpenAI(base_url=thread.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        bounded = bounded_client.chat.completions.create(**request_kwargs(model, question, 160))
    finally:
        thread.stop()
    choice = bounded.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        assert validators[call.function.name].is_valid(arguments), arguments
        assert len(arguments.get("items", [])) <= 3 and all(len(i["product"]) <= 24 for i in arguments.get("items", []))


def test_named_tool_choice_calls_that_tool(served):
    client, model = served
    validators = tool_validators(TOOLS)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "I am flying to Oslo tomorrow."}], tools=TOOLS, temperature=0,
        max_tokens=160, tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"] * len(choice.message.tool_calls)
    for call in choice.message.tool_calls:
        assert validators["get_weather"].is_valid(json.loads(call.function.arguments))


def test_reassemble_folds_deltas_like_a_client():
    """The benchmark's reassembly on hand-made chunks: ids and names from the first delta of
    each index, arguments concatenated, two calls interleaved."""
    from openai.types.chat import ChatCompletionChunk

    def chunk(delta: dict, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate({
            "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    ]
    finish, calls, content, ids = reassemble(chunks)
    assert finish == "tool_calls" and content == "" and ids == ["call_a", "call_b"]
    assert calls == [("f", '{"x": 1}'), ("g", "{}")]
