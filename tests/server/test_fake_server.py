"""The HTTP server against the fake engine: protocol, errors, disconnects, metrics.

A real uvicorn server on 127.0.0.1 (module-scoped), called through the official `openai` SDK
and raw httpx. The fake engine generates in milliseconds, so every error path and every
lifecycle edge (queued-then-disconnected, queue full, engine failing a request) is cheap.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time

import httpx
import openai
import pytest

from radixserve.runtime.constraints.spec import ConstraintSpec

from .conftest import API_KEY, FakeServer, start_fake_server, stream_and_hang_up
from .fake_engine import REPLY, TOOL_REPLY

MESSAGES = [{"role": "user", "content": "hi"}]


@functools.lru_cache(maxsize=8)
def _sdk(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)


def sdk(server: FakeServer, api_key: str = API_KEY) -> openai.OpenAI:
    """An SDK client (one per server and key: building one costs a few hundred ms)."""
    return _sdk(server.url, api_key)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def last_params(engine):
    return engine.submitted[-1][1]


# ---------------------------------------------------------------------------- chat


def test_chat_completion(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.model == "fake"
    assert r.choices[0].message.content == REPLY[:5]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_prompt_goes_through_the_template(fake):
    client = sdk(fake)
    client.chat.completions.create(model="fake", messages=[{"role": "developer", "content": "sys"}, *MESSAGES], max_tokens=1)
    rid, params, _ = fake.engine.submitted[-1]
    tokens = httpx.post(f"{fake.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"messages": [{"role": "system", "content": "sys"}, *MESSAGES]}).json()
    assert tokens["count"] > 0
    text = fake.engine.detokenize(tokens["tokens"])
    assert text == "<s><|system|>sys\n<|user|>hi\n<|assistant|>"


def test_chat_sampling_fields_reach_the_engine(fake):
    sdk(fake).chat.completions.create(
        model="fake", messages=MESSAGES, max_completion_tokens=3, max_tokens=99, temperature=0.5, top_p=0.9, seed=7,
        stop=["zz", "yy"], presence_penalty=0.5, frequency_penalty=-0.5, logprobs=True, top_logprobs=2, n=2, user="u",
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True, "cache_salt": "tenant-a"},
    )
    rid, p, salt = fake.engine.submitted[-1]
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.n) == (3, 0.5, 0.9, 7, ("zz", "yy"), 2)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs) == (0.5, -0.5, 2)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.ignore_eos) == (5, 0.1, 1.2, True)
    assert salt == "tenant-a"


def test_chat_default_max_tokens_is_rest_of_context(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=MESSAGES)
    p = last_params(fake.engine)
    assert p.max_tokens == fake.engine.max_model_len - r.usage.prompt_tokens
    assert r.choices[0].finish_reason == "stop"


def test_chat_n_and_logprobs(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=3, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice in r.choices:
        content = choice.logprobs.content
        assert [t.token for t in content] == list(REPLY[:3])
        assert content[0].logprob == -0.25 and content[0].bytes == list(REPLY[0].encode())
        assert len(content[0].top_logprobs) == 2
    assert r.usage.completion_tokens == 9


def test_chat_stream_with_usage(fake):
    stream = sdk(fake).chat.completions.create(
        model="fake", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY[:6]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 6
    assert usage.prompt_tokens_details.cached_tokens is not None


def test_chat_stream_raw_sse_ends_with_done(fake):
    with fake.client() as client:
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_chat_stream_n2_interleaves_choices(fake):
    stream = sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=4, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: REPLY[:4], 1: REPLY[:4]}


def test_chat_stop_string(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=20, stop="fro")
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.startswith("Hello ")  # the fake does not hold back partial stops


def test_chat_content_parts_and_tool_messages(fake):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    r = sdk(fake).chat.completions.create(model="fake", messages=messages, max_tokens=1)
    assert r.choices[0].message.content == REPLY[0]


def test_chat_extension_constraints_reach_the_engine(fake):
    client = sdk(fake)
    client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, extra_body={"regex": "[a-z]+"})
    assert last_params(fake.engine).constraint == ConstraintSpec("regex", "[a-z]+")
    client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, extra_body={"choice": ["yes", "no"]})
    assert last_params(fake.engine).constraint == ConstraintSpec("choice", ("yes", "no"))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, extra_body={"json_schema": schema})
    assert json.loads(last_params(fake.engine).constraint.value) == schema
    client.chat.completions.create(
        model="fake", messages=MESSAGES, max_tokens=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    spec = last_params(fake.engine).constraint
    assert spec.kind == "json_schema" and json.loads(spec.value) == schema
    client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, response_format={"type": "json_object"})
    assert last_params(fake.engine).constraint.kind == "json_object"


def test_two_constraints_are_refused(fake):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1,
                                          response_format={"type": "json_object"}, extra_body={"regex": "a"})
    assert "at most one output constraint" in exc.value.body["message"].lower()


@pytest.mark.parametrize("extra, param", [
    ({"regex": "("}, "regex"),  # refused by the server's early check
    ({"regex": "ENGINE_REJECTS"}, "regex"),  # refused by the engine at submission
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "frobnicate"}}}}, "json_schema"),
    ({"grammar": "start: ("}, "grammar"),
])
def test_bad_constraint_is_400(fake, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, extra_body=extra)
    assert exc.value.body["param"] == param and exc.value.body["code"] == "invalid_constraint"
    with fake.client() as client:
        r = client.post("/generate", json={"text": "a", "sampling_params": extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_MESSAGES = [{"role": "user", "content": "CALL_TOOL: weather in Paris?"}]


def test_tool_calls(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=TOOL_MESSAGES, tools=[WEATHER_TOOL], max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # tool_choice "auto": the output is constrained by the tool-call grammar; tools go in the system prompt.
    assert last_params(fake.engine).constraint.kind == "grammar"
    prompt = fake.engine.detokenize(fake.engine.prompts[-1])
    assert prompt.startswith("<s><|system|>") and "get_weather" in prompt and "<tool_call>" in prompt


def test_tool_calls_streamed(fake):
    stream = sdk(fake).chat.completions.create(model="fake", messages=TOOL_MESSAGES, tools=[WEATHER_TOOL],
                                               tool_choice="required", max_tokens=200, stream=True)
    name, arguments, content, finish = None, "", "", None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                name = name or (d.function.name if d.function else None)
                arguments += (d.function.arguments or "") if d.function else ""
            finish = c.finish_reason or finish
    assert (name, json.loads(arguments), content, finish) == ("get_weather", {"city": "Paris"}, "", "tool_calls")


def test_tool_choice_none_leaves_output_alone(fake):
    r = sdk(fake).chat.completions.create(model="fake", messages=TOOL_MESSAGES, tools=[WEATHER_TOOL],
                                          tool_choice="none", max_tokens=200)
    assert r.choices[0].message.content == TOOL_REPLY and r.choices[0].message.tool_calls is None
    assert last_params(fake.engine).constraint is None


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"extra_body": {"regex": "a"}}, "regex"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
])
def test_invalid_tool_requests(fake, kwargs, param):
    kwargs.setdefault("tools", [WEATHER_TOOL])
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=TOOL_MESSAGES, max_tokens=5, **kwargs)
    assert exc.value.body["param"] == param


# ---------------------------------------------------------------------------- completions


def test_completion_prompt_forms(fake):
    client = sdk(fake)
    ids = fake.engine.tokenize("abc")
    for prompt, count in [("abc", 1), (["abc", "de"], 2), (ids, 1), ([ids, ids[:2]], 2)]:
        r = client.completions.create(model="fake", prompt=prompt, max_tokens=2)
        assert len(r.choices) == count and all(c.text == REPLY[:2] for c in r.choices)
    assert r.usage.prompt_tokens == 5


def test_completion_echo_logprobs_and_n(fake):
    r = sdk(fake).completions.create(model="fake", prompt=["ab", "cd"], max_tokens=2, n=2, echo=True, logprobs=1)
    assert [c.text for c in r.choices] == ["ab" + REPLY[:2]] * 2 + ["cd" + REPLY[:2]] * 2
    lp = r.choices[2].logprobs
    assert lp.tokens == ["c", "d", *REPLY[:2]]
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1] == -1.0
    assert lp.text_offset == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 4


def test_completion_stream_with_echo(fake):
    stream = sdk(fake).completions.create(model="fake", prompt="xy", max_tokens=3, echo=True, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "xy" + REPLY[:3]
    assert chunks[-1].usage.completion_tokens == 3


def test_completion_stream_echo_with_logprobs(fake):
    stream = sdk(fake).completions.create(model="fake", prompt="xy", max_tokens=2, echo=True, logprobs=0, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == "xy" + REPLY[:2]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == ["x", "y", *REPLY[:2]]


def test_completion_max_tokens_zero_scores_prompt(fake):
    r = sdk(fake).completions.create(model="fake", prompt="abc", max_tokens=0, echo=True, logprobs=0)
    assert r.choices[0].text == "abc"
    assert r.choices[0].logprobs.token_logprobs == [None, -1.0, -1.0]


def test_completion_suffix_is_refused(fake):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).completions.create(model="fake", prompt="a", suffix="b", max_tokens=1)
    assert exc.value.body["param"] == "suffix"


def test_completion_token_id_out_of_vocab(fake):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).completions.create(model="fake", prompt=[5, 100000], max_tokens=1)
    assert "100000" in exc.value.body["message"]


# ---------------------------------------------------------------------------- native /generate


def test_generate_text_and_ids(fake):
    with fake.client() as client:
        r = client.post("/generate", json={"text": "abc", "sampling_params": {"max_tokens": 3, "logprobs": 1, "n": 2}})
        body = r.json()
        assert r.status_code == 200, body
        assert body["text"] == REPLY[:3] and len(body["token_ids"]) == 3 and body["finish_reason"] == "length"
        assert body["prompt_token_ids"] == fake.engine.tokenize("abc")
        assert len(body["outputs"]) == 2 and body["logprobs"][0]["top"][0][0] == body["token_ids"][0]
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "cached_tokens": body["usage"]["cached_tokens"]}
        r = client.post("/generate", json={"input_ids": [10, 11, 12], "sampling_params": {"max_tokens": 1}})
        assert r.json()["prompt_token_ids"] == [10, 11, 12]


def test_generate_scores_a_continuation(fake):
    prefix, candidate = "The answer: ", "yes"
    ids = fake.engine.tokenize(prefix + candidate)
    start = len(fake.engine.tokenize(prefix))
    with fake.client() as client:
        r = client.post("/generate", json={"input_ids": ids, "sampling_params": {
            "max_tokens": 0, "prompt_logprobs": 0, "prompt_logprobs_start": start}})
    body = r.json()
    assert body["prompt_logprobs_start"] == start and body["token_ids"] == []
    assert [lp["token_id"] for lp in body["prompt_logprobs"]] == ids[start:]


def test_generate_prompt_logprobs_from_zero(fake):
    with fake.client() as client:
        body = client.post("/generate", json={"text": "abc", "sampling_params": {"max_tokens": 0, "prompt_logprobs": 0}}).json()
    assert body["prompt_logprobs_start"] == 0
    assert body["prompt_logprobs"][0] is None and [lp["token_id"] for lp in body["prompt_logprobs"][1:]] == body["prompt_token_ids"][1:]


def test_generate_stream(fake):
    with fake.client() as client:
        r = client.post("/generate", json={"text": "abc", "stream": True, "sampling_params": {"max_tokens": 3}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e) for e in events[:-1]]
    assert "".join(d["text"] for d in deltas) == REPLY[:3]
    assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["usage"]["completion_tokens"] == 3


def test_generate_constraint_and_fields(fake):
    with fake.client() as client:
        r = client.post("/generate", json={"text": "a", "cache_salt": "s", "sampling_params": {
            "max_tokens": 1, "json_object": True, "stop_token_ids": [3], "skip_special_tokens": False}})
    assert r.status_code == 200
    rid, p, salt = fake.engine.submitted[-1]
    assert p.constraint == ConstraintSpec("json_object") and p.stop_token_ids == (3,) and not p.skip_special_tokens
    assert salt == "s"


@pytest.mark.parametrize("body, param", [
    ({"sampling_params": {"max_tokens": 1}}, "text"),
    ({"text": "a", "input_ids": [3]}, "text"),
    ({"text": "a", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
    ({"text": "a", "sampling_params": {"regex": "a", "choice": ["b"]}}, "choice"),
    ({"text": "ab", "sampling_params": {"prompt_logprobs": 0, "prompt_logprobs_start": 5}}, "sampling_params.prompt_logprobs_start"),
])
def test_generate_invalid(fake, body, param):
    with fake.client() as client:
        r = client.post("/generate", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


# ---------------------------------------------------------------------------- utility endpoints


def test_models_and_model_info(fake):
    models = sdk(fake).models.list()
    assert [m.id for m in models.data] == ["fake"]
    with fake.client() as client:
        info = client.get("/model_info").json()
    assert info["model"] == "fake" and info["max_model_len"] == 2048
    assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and info["eos_token_ids"] == [1]
    assert "messages" in info["chat_template"] and info["vocab_size"] == 258
    assert {"default", "fake-alias", "fake-model"} <= set(info["aliases"])


def test_model_aliases_are_accepted(fake):
    for name in ["fake", "fake-alias", "fake-model", "default"]:
        assert sdk(fake).chat.completions.create(model=name, messages=MESSAGES, max_tokens=1).model == "fake"


def test_tokenize_detokenize(fake):
    with fake.client() as client:
        ids = client.post("/tokenize", json={"prompt": "héllo"}).json()
        assert ids["count"] == len("héllo".encode()) and ids["max_model_len"] == 2048
        assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": "héllo"}
        assert client.post("/detokenize", json={"tokens": [999999]}).status_code == 400
        assert client.post("/tokenize", json={}).status_code == 400


def test_health(fake):
    assert httpx.get(f"{fake.url}/health").status_code == 200  # no API key needed
    fake.engine.unhealthy = True
    r = httpx.get(f"{fake.url}/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unhealthy"


def test_metrics(fake):
    sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=3, stream=True).close()
    sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=3)
    text = httpx.get(f"{fake.url}/metrics").text
    for name in [
        "radixserve_num_requests_running", "radixserve_num_requests_waiting", "radixserve_kv_cache_usage_ratio",
        "radixserve_prefix_cache_queried_tokens_total", "radixserve_prefix_cache_hit_tokens_total",
        "radixserve_prompt_tokens_total", "radixserve_generation_tokens_total", "radixserve_num_preemptions_total",
        "radixserve_time_to_first_token_seconds_count", "radixserve_inter_token_latency_seconds_count",
        "radixserve_e2e_request_latency_seconds_count", "radixserve_http_requests_total",
    ]:
        assert name in text, name
    count = next(line for line in text.splitlines() if line.startswith("radixserve_e2e_request_latency_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_two_apps_have_separate_registries(fake):
    sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1)
    other, engine = start_fake_server()
    try:
        body = httpx.get(f"{other.url}/metrics").text
        assert 'route="/v1/chat/completions"' not in body
        assert "radixserve_time_to_first_token_seconds_count 0.0" in body
    finally:
        other.thread.stop()


def test_openapi_document(fake):
    jsonschema = pytest.importorskip("jsonschema")
    doc = httpx.get(f"{fake.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert {("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/generate", "post"), ("/v1/models", "get"),
            ("/health", "get"), ("/tokenize", "post"), ("/detokenize", "post"), ("/model_info", "get"), ("/metrics", "get")} <= ops
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    schemas = doc["components"]["schemas"]
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    # Every schema is valid JSON Schema 2020-12, and a real request validates against its own.
    registry_doc = {"components": {"schemas": schemas}}
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ChatCompletionRequest", **registry_doc})
    validator.validate({"model": "fake", "messages": MESSAGES, "max_tokens": 3, "stream": True})
    assert not validator.is_valid({"messages": []})


# ---------------------------------------------------------------------------- errors


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in r.text
    return error


def test_auth_errors(fake):
    with pytest.raises(openai.AuthenticationError):
        sdk(fake, api_key="wrong").models.list()
    r = httpx.post(f"{fake.url}/v1/chat/completions", json={"messages": MESSAGES})
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(f"{fake.url}/v1/models", headers={"x-api-key": API_KEY})
    assert r.status_code == 200


def test_unknown_model_is_404(fake):
    with pytest.raises(openai.NotFoundError) as exc:
        sdk(fake).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        sdk(fake).completions.create(model="nope", prompt="a", max_tokens=1)


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs=true
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"tool_choice": "auto"}, "tool_choice"),  # without tools
])
def test_invalid_parameters_are_400(fake, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, **kwargs)
    assert exc.value.body["param"].startswith(param)
    assert exc.value.body["type"] == "invalid_request_error"


def test_validation_error_names_the_field_path(fake):
    with fake.client() as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    error = assert_error(r, 400, "invalid_value")
    assert error["param"] == "messages[0].role" and "messages[0].role" in error["message"]


def test_context_length_error_gives_numbers(fake):
    long = "x" * 2100
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=[{"role": "user", "content": long}])
    message = exc.value.body["message"]
    assert "maximum context length is 2048 tokens" in message and exc.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).completions.create(model="fake", prompt="x" * 2000, max_tokens=60)
    assert "2060 tokens (2000 in the prompt, 60 for the completion)" in exc.value.body["message"]
    assert exc.value.body["param"] == "prompt"


@pytest.mark.parametrize("content, headers, status, code", [
    (b"{not json", {"content-type": "application/json"}, 400, "invalid_json"),
    (b"", {"content-type": "application/json"}, 400, "invalid_json"),
    (b"[1, 2]", {"content-type": "application/json"}, 400, None),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {"content-type": "application/json"}, 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', {"content-type": "application/json"}, 400, "invalid_json"),
    (b'{"messages": []}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    (b"a=b", {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
])
def test_malformed_bodies(fake, content, headers, status, code):
    with fake.client() as client:
        r = client.post("/v1/chat/completions", content=content, headers=headers)
    assert_error(r, status, code)


def test_missing_content_type_is_read_as_json(fake):
    with fake.client() as client:
        r = client.post("/v1/chat/completions", content=json.dumps({"messages": MESSAGES, "max_tokens": 1}).encode())
    assert r.status_code == 200


def test_oversized_body_declared(fake):
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    with fake.client() as client:
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large")


def test_oversized_body_chunked(fake):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 8192
        yield b'"}]}'

    with fake.client() as client:
        r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "request_too_large")


def test_unknown_route_and_method(fake):
    with fake.client() as client:
        assert_error(client.get("/v1/nothing"), 404)
        assert_error(client.get("/v1/chat/completions"), 405)


def test_queue_full_is_503_with_retry_after():
    server, engine = start_fake_server(engine_kwargs={"max_waiting": 2})
    try:
        engine.paused = True
        client = sdk(server)
        with server.client() as raw:
            engine.submit("a", None, on_delta=lambda d: None)
            engine.submit("b", None, on_delta=lambda d: None)
            r = raw.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
        error = assert_error(r, 503, "server_overloaded")
        assert r.headers["retry-after"] == "1" and "2 requests are already waiting" in error["message"]
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1)
    finally:
        engine.paused = False
        server.thread.stop()


def test_engine_failure_is_a_generic_500(fake):
    with pytest.raises(openai.InternalServerError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=[{"role": "user", "content": "FAIL_ME"}], max_tokens=3)
    assert "secret internal detail" not in str(exc.value.body) and exc.value.body["code"] == "generation_error"
    with fake.client() as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "FAIL_ME"}], "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_error"
    assert "secret" not in r.text


def test_unexpected_exception_is_a_generic_500(fake, monkeypatch, caplog):
    def explode(self, text):
        raise RuntimeError("kaboom /etc/secret")

    monkeypatch.setattr(type(fake.engine), "tokenize", explode)
    with fake.client() as client:
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    error = assert_error(r, 500, "internal_error")
    assert "kaboom" not in r.text and error["type"] == "server_error"
    assert r.headers["x-request-id"]
    assert any("kaboom" in (rec.exc_text or "") or "kaboom" in str(rec.exc_info) for rec in caplog.records)


def test_dead_engine_is_503(fake, monkeypatch):
    from radixserve.runtime.errors import EngineDead

    def dead(*args, **kwargs):
        raise EngineDead("the engine is not running")

    monkeypatch.setattr(fake.engine, "submit", dead)
    with fake.client() as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert_error(r, 503)
    assert "retry-after" in r.headers


# ---------------------------------------------------------------------------- request ids


def test_request_id_echoed_and_used(fake):
    with fake.client() as client:
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42"
        assert fake.engine.submitted[-1][0].startswith("trace-42-")
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        generated = r.headers["x-request-id"]
        assert len(generated) >= 16 and fake.engine.submitted[-1][0].startswith(generated)
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"X-Request-Id": "bad id\twith spaces"})
        assert r.headers["x-request-id"] != "bad id\twith spaces"
        assert client.get("/v1/nope").headers["x-request-id"]


# ---------------------------------------------------------------------------- disconnects


def raw_stream_then_disconnect(url: str, path: str, body: dict, read_events: int) -> None:
    """Send a streaming request over a bare socket, read a few events, then drop it."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    received = b""
    while received.count(b"data: ") < read_events:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts(fake):
    before = len(fake.engine.aborted)
    raw_stream_then_disconnect(fake.url, "/v1/chat/completions",
                               {"messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}, 3)
    wait_for(lambda: len(fake.engine.aborted) > before)
    fake.engine.wait_idle()
    stats = fake.engine.stats()
    assert stats.free_pages == stats.total_pages


def test_disconnect_while_queued_aborts(fake):
    fake.engine.paused = True
    before = len(fake.engine.aborted)
    raw_stream_then_disconnect(fake.url, "/generate", {"text": "a", "stream": True, "sampling_params": {"max_tokens": 5}}, 0)
    wait_for(lambda: len(fake.engine.aborted) > before)
    fake.engine.paused = False


def test_disconnect_non_streaming_aborts(fake):
    fake.engine.paused = True
    before = len(fake.engine.aborted)
    with pytest.raises(httpx.ReadTimeout):
        with fake.client() as client:
            client.post("/v1/completions", json={"prompt": "a", "max_tokens": 5}, timeout=0.3)
    wait_for(lambda: len(fake.engine.aborted) > before)
    fake.engine.paused = False


def test_concurrent_streams_with_early_disconnects(fake):
    async def reader(i: int, client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": f"user {i}"}], max_tokens=8, stream=True)
        text = ""
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        return text

    async def main() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key=API_KEY, max_retries=0)
        http = httpx.AsyncClient(base_url=fake.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        try:
            return await asyncio.gather(*(
                stream_and_hang_up(http, "/v1/chat/completions", {
                    "model": "fake", "messages": [{"role": "user", "content": f"user {i}"}], "max_tokens": 8,
                    "stream": True})
                if i % 4 == 0 else reader(i, client) for i in range(64)))
        finally:
            await client.close()
            await http.aclose()

    results = asyncio.run(main())
    assert all(text == REPLY[:8] for i, text in enumerate(results) if i % 4)
    fake.engine.wait_idle()
    stats = fake.engine.stats()
    assert (stats.running, stats.waiting, stats.free_pages) == (0, 0, stats.total_pages)


def test_logit_bias_is_refused(fake):
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, logit_bias={"5": 10})
    assert exc.value.body["param"] == "logit_bias"
    assert sdk(fake).chat.completions.create(model="fake", messages=MESSAGES, max_tokens=1, logit_bias={}).choices
