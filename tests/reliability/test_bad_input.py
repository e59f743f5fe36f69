"""Bad input: every malformed, out-of-range or hostile request is a 4xx whose message says
what is wrong (and `param` names the field where there is one), never a 5xx, and the engine
is left as it was. Runs against the session's real engine.
"""

from __future__ import annotations

import json

import pytest

from .conftest import MAX_WAITING

USER = [{"role": "user", "content": "Hello there."}]
CHAT = "/v1/chat/completions"


def chat(**extra):
    return {"model": "default", "messages": USER, "max_tokens": 2, **extra}


def _deep_json(depth: int) -> str:
    return '{"type": "array", "items": ' * depth + "{}" + "}" * depth


def _schema_rf(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# (id, path, body: dict or raw bytes, status, words the message must contain, param)
CASES = [
    # -- the body itself
    ("malformed-json", CHAT, b'{"messages": [{"role": "user", "content": "hi"}', 400, "not valid JSON", None),
    ("not-an-object", CHAT, b"[1, 2, 3]", 400, "should be an object", None),
    ("empty-body", CHAT, b"", 400, "body is empty", None),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}', 400, "not valid JSON", None),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid JSON", None),
    ("nesting-past-depth-limit", CHAT, ('{"messages": [{"role": "user", "content": "x"}], "json_schema": %s}' % _deep_json(400)).encode(),
     400, "recursion limit", None),
    # -- wrong types (validation is strict: no coercion)
    ("messages-a-string", CHAT, {"model": "default", "messages": "hi"}, 400, "valid array", "messages"),
    ("temperature-a-string", CHAT, chat(temperature="hot"), 400, "valid number", "temperature"),
    ("stream-a-string", CHAT, chat(stream="yes"), 400, "valid boolean", "stream"),
    ("n-a-float", CHAT, chat(n=1.5), 400, "valid integer", "n"),
    ("role-unknown", CHAT, {"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role", "messages[0].role"),
    ("content-a-number", CHAT, {"model": "default", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content: Input should be a valid string", "messages[0].content"),
    # -- unknown fields where they matter (our own /generate schema)
    ("generate-misspelt-param", "/generate", {"text": "hi", "sampling_params": {"max_token": 3}}, 400,
     "Extra inputs are not permitted", "sampling_params.max_token"),
    ("generate-unknown-field", "/generate", {"text": "hi", "prompt": "hi"}, 400, "Extra inputs are not permitted", "prompt"),
    ("generate-text-and-ids", "/generate", {"text": "hi", "input_ids": [1, 2]}, 400, "exactly one of text and input_ids", "text"),
    # -- empty input
    ("empty-messages", CHAT, {"model": "default", "messages": []}, 400, "at least 1 item", "messages"),
    ("empty-prompt", "/v1/completions", {"model": "default", "prompt": ""}, 400, "at least 1 character", "prompt"),
    ("empty-token-list", "/v1/completions", {"model": "default", "prompt": []}, 400, "prompt", "prompt"),
    # -- lengths and ranges
    ("prompt-over-context", "/v1/completions", {"model": "default", "prompt": "hello " * 9000, "max_tokens": 1}, 400,
     "maximum context length", "prompt"),
    ("max-tokens-over-context", CHAT, chat(max_tokens=10**9), 400, "maximum context length", "messages"),
    ("max-tokens-zero-chat", CHAT, chat(max_tokens=0), 400, "greater than or equal to 1", "max_tokens"),
    ("max-tokens-negative", "/v1/completions", {"model": "default", "prompt": "x", "max_tokens": -1}, 400,
     "greater than or equal to 0", "max_tokens"),
    ("n-zero", CHAT, chat(n=0), 400, "greater than or equal to 1", "n"),
    ("n-over-schema", CHAT, chat(n=129), 400, "less than or equal to 128", "n"),
    ("n-over-queue", CHAT, chat(n=MAX_WAITING + 1), 400, "queue limit", "n"),
    ("temperature-over", CHAT, chat(temperature=101), 400, "less than or equal to 100", "temperature"),
    ("repetition-penalty-near-zero", CHAT, chat(repetition_penalty=1e-300), 400, "greater than or equal to 0.01",
     "repetition_penalty"),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "greater than 0", "top_p"),
    ("top-k-huge", CHAT, chat(top_k=2**70), 400, "less than or equal to", "top_k"),
    ("seed-over-uint64", CHAT, chat(seed=2**64), 400, "less than", "seed"),
    ("top-logprobs-over", CHAT, chat(logprobs=True, top_logprobs=21), 400, "less than or equal to 20", "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "requires logprobs", "top_logprobs"),
    ("too-many-stops", CHAT, chat(stop=["x"] * 65), 400, "at most 64", "stop"),
    ("token-id-out-of-vocab", "/v1/completions", {"model": "default", "prompt": [1, 2, 10**7]}, 400, "out of range", "prompt"),
    ("detokenize-negative-id", "/detokenize", {"tokens": [-1]}, 400, "greater than or equal to 0", "tokens[0]"),
    ("cache-salt-too-long", CHAT, chat(cache_salt="s" * 300), 400, "at most 256", "cache_salt"),
    ("logit-bias", CHAT, chat(logit_bias={"5": 1.0}), 400, "logit_bias is not supported", "logit_bias"),
    ("template-kwargs-reserved", CHAT, chat(chat_template_kwargs={"messages": []}), 400, "may not set messages",
     "chat_template_kwargs"),
    ("unknown-model", CHAT, chat(model="gpt-17"), 404, "does not exist", "model"),
    # -- constraints
    ("invalid-regex", CHAT, chat(regex="(unclosed"), 400, "regular expression", "regex"),
    ("regex-bad-repeat", CHAT, chat(regex="a{5,2}"), 400, "regular expression", "regex"),
    ("two-constraints", CHAT, chat(regex="a+", choice=["a"]), 400, "at most one output constraint", "choice"),
    ("schema-not-json", CHAT, chat(json_schema="{not json"), 400, "not valid JSON", "json_schema"),
    ("schema-a-boolean", CHAT, chat(json_schema=False), 400, "json_schema: Input should be an object", "json_schema"),
    ("schema-invalid", CHAT, chat(response_format=_schema_rf({"type": "nope"})), 400, "invalid JSON Schema",
     "response_format.json_schema.schema"),
    ("schema-unsupported-keyword", CHAT, chat(response_format=_schema_rf({"type": "object", "not": {"required": ["a"]}})),
     400, "unsupported JSON Schema keyword 'not'", "response_format.json_schema.schema"),
    ("schema-unknown-format", CHAT, chat(json_schema={"type": "string", "format": "ipv9"}), 400, "unsupported string format",
     "json_schema"),
    ("schema-enum-bomb", CHAT, chat(json_schema={"enum": [f"value-{i}" for i in range(100_000)]}), 400,
     "over the limit of 1048576", "json_schema"),
    ("schema-missing", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "needs json_schema.schema", "response_format.json_schema.schema"),
    ("grammar-does-not-parse", CHAT, chat(grammar="start: ( \"a\""), 400, "line 1", "grammar"),
    ("grammar-undefined-rule", CHAT, chat(grammar="start: missing_rule"), 400, "missing_rule", "grammar"),
    ("choice-empty", CHAT, chat(choice=[]), 400, "at least 1 item", "choice"),
    ("tool-invalid-schema", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
     400, "tools[0]", "tools"),
    ("tool-schema-unsupported", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}]), 400, "tools[0]", "tools"),
    ("tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "no spaces allowed"}}]), 400,
     "should match pattern", "tools[0].function.name"),
    ("tool-choice-unknown-function", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                               tool_choice={"type": "function", "function": {"name": "g"}}), 400, "g", "tool_choice"),
]

# Hostile constraints. Some are refused when compiled; the others compile, pass the first-mask
# probe, then trip llguidance's limits while decoding: each is a 400 on the constraint's field
# either way (code "constraint_error" for those found while decoding), never a 5xx.
CONSTRAINT_LIMIT_CASES = [
    ("regex-repetition-bomb", chat(regex="(a|aa){1000}{1000}"), "regex"),
    ("grammar-20000-alternatives", chat(grammar="start: " + " | ".join(f'"w{i}"' for i in range(20000))), "grammar"),
    ("schema-anyof-3000-wide", chat(json_schema={"anyOf": [
        {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]} for i in range(3000)]}),
     "json_schema"),
    ("schema-ref-loop-without-base", chat(json_schema={"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
     "json_schema"),
    ("tool-schema-integer-past-64-bits", chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "maximum": 2**100}}}}}]), "tools"),
]


def _post(client, path: str, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def _assert_error(response, status: int, words: str, param: str | None) -> dict:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert words.lower() in error["message"].lower(), error
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("case_id, path, body, status, words, param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(server, case_id, path, body, status, words, param):
    with server.client() as client:
        _assert_error(_post(client, path, body), status, words, param)


def test_tiny_temperature_samples_greedily(server):
    """A temperature of 1e-50 would overflow the logits to inf (NaN probabilities, garbage
    tokens that a grammar then rejects); the engine treats it as greedy."""
    with server.client() as client:
        greedy = _post(client, "/v1/completions", {"prompt": "One, two, three,", "max_tokens": 4, "temperature": 0})
        tiny = _post(client, "/v1/completions", {"prompt": "One, two, three,", "max_tokens": 4, "temperature": 1e-50})
        constrained = _post(client, CHAT, chat(temperature=1e-50, regex="[a-z]{1,6}", max_tokens=4))
    assert greedy.status_code == tiny.status_code == constrained.status_code == 200, (tiny.text, constrained.text)
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert constrained.json()["choices"][0]["message"]["content"].isalpha()


def test_body_over_the_size_limit_is_413(server):
    limit = server.settings.max_body_bytes
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * (limit + 10)}])).encode()
    with server.client() as client:
        error = _assert_error(_post(client, CHAT, body), 413, "larger than the limit", None)
    assert str(limit) in error["message"]


def test_chunked_body_over_the_size_limit_is_413(server):
    """No Content-Length: the limit is enforced while reading."""
    limit = server.settings.max_body_bytes

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(limit // 4096 + 2):
            yield b"y" * 4096
        yield b'"}]}'

    with server.client() as client:
        response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    _assert_error(response, 413, "larger than the limit", None)


def test_wrong_content_type_is_415(server):
    with server.client() as client:
        response = client.post(CHAT, content=json.dumps(chat()), headers={"content-type": "text/plain"})
    _assert_error(response, 415, "application/json", None)


# Found by fuzzing: regexes with characters outside the Basic Multilingual Plane whose UTF-8
# bytes this vocabulary cannot spell (no token holds the byte 0xF2): the grammar admits a
# token its own mask allowed and then refuses it. The constraint cannot be followed with this
# model, which is the request's problem: a 400 on `regex`.
UNICODE_CONSTRAINT_CASES = [
    ("regex-unassigned-astral-char", chat(regex="\U000BAE5A")),
    ("regex-text-then-astral-char", chat(regex="k%\U000B948A")),
]


@pytest.mark.parametrize("case_id, body", UNICODE_CONSTRAINT_CASES, ids=[c[0] for c in UNICODE_CONSTRAINT_CASES])
def test_unspellable_constraints_are_a_400(server, case_id, body):
    with server.client() as client:
        response = _post(client, CHAT, body)
        assert client.get("/health").status_code == 200
    server.engine.wait_idle(60)
    _assert_error(response, 400, "constraint", "regex")


@pytest.mark.parametrize("case_id, body, param", CONSTRAINT_LIMIT_CASES, ids=[c[0] for c in CONSTRAINT_LIMIT_CASES])
def test_constraint_over_engine_limits_is_a_400(server, case_id, body, param):
    with server.client() as client:
        response = _post(client, CHAT, body)
        streamed = _post(client, CHAT, {**body, "stream": True})
    server.engine.wait_idle(60)
    _assert_error(response, 400, "", param)
    # Streamed: refused before the stream starts, or the stream carries the error event.
    assert streamed.status_code == 400 or (streamed.status_code == 200 and '"error"' in streamed.text), streamed.text[:300]


# -- the configurable per-request limits, each a 400 naming the field


def test_limit_max_n(limited):
    with limited.client() as client:
        _assert_error(_post(client, CHAT, chat(n=3)), 400, "over this server's limit of 2", "n")
        _assert_error(_post(client, "/generate", {"text": "hi", "sampling_params": {"n": 3}}), 400, "limit of 2",
                      "sampling_params.n")
        assert _post(client, CHAT, chat(n=2)).status_code == 200


def test_limit_max_tokens(limited):
    with limited.client() as client:
        _assert_error(_post(client, CHAT, chat(max_tokens=9)), 400, "limit of 8 completion tokens", "max_tokens")
        _assert_error(_post(client, CHAT, chat(max_tokens=None, max_completion_tokens=9)), 400, "limit of 8",
                      "max_completion_tokens")
        _assert_error(_post(client, "/v1/completions", {"prompt": "x", "max_tokens": 9}), 400, "limit of 8", "max_tokens")
        # Requests that send no max_tokens get at most the limit.
        body = chat()
        del body["max_tokens"]
        r = _post(client, CHAT, body | {"ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        r = _post(client, "/v1/completions", {"prompt": "x", "ignore_eos": True})  # the schema's default, 16
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_limit_prompt_tokens(limited):
    with limited.client() as client:
        _assert_error(_post(client, "/v1/completions", {"prompt": "word " * 100, "max_tokens": 1}), 400,
                      "over this server's limit of 64 prompt tokens", "prompt")
        _assert_error(_post(client, CHAT, chat(messages=[{"role": "user", "content": "word " * 100}])), 400,
                      "limit of 64 prompt tokens", "messages")
        _assert_error(_post(client, "/generate", {"input_ids": [100] * 65, "sampling_params": {"max_tokens": 1}}),
                      400, "limit of 64", "input_ids")


def test_limit_body_size(limited):
    with limited.client() as client:
        _assert_error(_post(client, CHAT, chat(messages=[{"role": "user", "content": "z" * 9000}])), 413,
                      "limit of 8192 bytes", None)


def test_limit_constraint_size(limited):
    with limited.client() as client:
        _assert_error(_post(client, CHAT, chat(regex="a" * 600)), 400, "over the limit of 512", "regex")
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(40)}}
        _assert_error(_post(client, CHAT, chat(response_format=_schema_rf(schema))), 400, "over the limit of 512",
                      "response_format.json_schema.schema")


def test_limit_constraint_compile_time(limited, monkeypatch):
    """A constraint that takes longer than `constraint_timeout_s` to compile is a 400; the
    request queued by the late compile is aborted at once (nothing runs for it)."""
    import time as _time

    from radixserve.server import sampling

    real = sampling.constraint_from_fields

    def slow(*args, **kwargs):
        _time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "constraint_from_fields", slow)
    with limited.client() as client:
        body = {"prompt": "x", "max_tokens": 2, "regex": "[a-z]+"}
        _assert_error(_post(client, "/v1/completions", body), 400, "did not compile within 0.5 s", "regex")
    _time.sleep(1.2)  # let the abandoned compile finish
    limited.engine.wait_idle(30)


def test_engine_compile_timeout_aborts_the_late_request(limited, monkeypatch):
    """The engine compiles the constraint again at submission (against the tokenizer). When
    that outlives the timeout, the client gets its 400 and the request the worker thread
    queues afterwards is aborted as soon as it is queued."""
    import threading
    import time as _time

    engine = limited.engine
    compiler = engine.constraints
    real_compile = compiler.compile
    real_submit, real_abort = engine.submit, engine.abort
    submitted: list[str] = []
    aborted: list[tuple[str, float]] = []
    done = threading.Event()

    def slow_compile(spec):
        _time.sleep(1.5)
        return real_compile(spec)

    def submit(*args, **kwargs):
        rid = real_submit(*args, **kwargs)
        submitted.append(rid)
        done.set()
        return rid

    def abort(rid):
        aborted.append((rid, _time.monotonic()))
        real_abort(rid)

    monkeypatch.setattr(compiler, "compile", slow_compile)
    monkeypatch.setattr(engine, "submit", submit)
    monkeypatch.setattr(engine, "abort", abort)
    with limited.client() as client:
        body = {"prompt": "x", "max_tokens": 8, "ignore_eos": True, "regex": "[a-z ]+"}
        _assert_error(_post(client, "/v1/completions", body), 400, "did not compile within 0.5 s", "regex")
    assert done.wait(10), "the late submission never happened"
    (rid,) = submitted
    deadline = _time.monotonic() + 5
    while not any(r == rid for r, _ in aborted) or len([r for r, _ in aborted if r == rid]) < 2:
        assert _time.monotonic() < deadline, f"{rid} was not aborted after its late submission: {aborted}"
        _time.sleep(0.01)
    engine.wait_idle(30)
