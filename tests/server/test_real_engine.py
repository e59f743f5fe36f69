"""The server end to end with the real engine: `Engine(model="default")` (SmolLM2-135M on
CPU) behind a real uvicorn server, called with the official `openai` SDK.

One engine serves the whole module (loading it is the expensive part); generations stay
short (max_tokens <= 8) to keep CPU time low.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from radixserve.server.app import create_app
from radixserve.server.settings import ServerSettings

from .conftest import API_KEY, ServerThread, stream_and_hang_up


class RealServer:
    def __init__(self, engine, thread: ServerThread) -> None:
        self.engine = engine
        self.url = thread.url
        self.thread = thread
        self.sdk = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)
        self.model = engine.model_name

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.fixture(scope="module")
def real() -> Iterator[RealServer]:
    from radixserve.runtime import Engine

    engine = Engine(model="default", num_pages=4096)
    thread = ServerThread(create_app(engine, ServerSettings(api_key=API_KEY))).start()
    yield RealServer(engine, thread)
    thread.stop()


def pool_is_clean(engine) -> bool:
    s = engine.stats()
    return (s.running, s.waiting, s.private_pages, s.locked_pages) == (0, 0, 0, 0) and s.free_pages + s.evictable_pages == s.total_pages


def test_chat_completion(real):
    r = real.sdk.chat.completions.create(
        model=real.model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6
    assert r.usage.prompt_tokens > 5 and r.usage.prompt_tokens_details.cached_tokens >= 0
    # The same request again is served from the prefix cache (all but the last prompt token).
    again = real.sdk.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_chat_stream(real):
    stream = real.sdk.chat.completions.create(
        model=real.model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 8 or any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    assert text and usage.prompt_tokens_details.cached_tokens is not None
    whole = real.sdk.chat.completions.create(
        model=real.model, messages=[{"role": "user", "content": "Count to three."}], max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == text


def test_completions(real):
    r = real.sdk.completions.create(model=real.model, prompt=["The capital of France is", "1, 2, 3,"],
                                    max_tokens=4, temperature=0, logprobs=2, echo=True)
    assert len(r.choices) == 2
    first = r.choices[0]
    assert first.text.startswith("The capital of France is")
    assert first.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in first.logprobs.token_logprobs[1:])
    assert all(len(top) >= 1 for top in first.logprobs.top_logprobs[1:])
    ids = real.engine.tokenize("Once upon a time")
    r = real.sdk.completions.create(model=real.model, prompt=ids, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 3


def test_models_and_model_info(real):
    assert [m.id for m in real.sdk.models.list().data] == [real.model]
    with real.http() as client:
        info = client.get("/model_info").json()
    assert info["max_model_len"] == real.engine.max_model_len and info["chat_template"]
    assert info["eos_token"] and info["eos_token_ids"]


def test_multi_turn_cached_tokens_rise(real):
    messages = [{"role": "system", "content": "You are a terse assistant."}]
    cached, prompts = [], []
    for question in ["What is 2+2?", "And 3+3?", "And 4+4?"]:
        messages.append({"role": "user", "content": question})
        r = real.sdk.chat.completions.create(model=real.model, messages=messages, max_tokens=6, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        prompts.append(r.usage.prompt_tokens)
    assert cached[0] < cached[1] < cached[2], cached
    # Each turn reuses at least the whole previous prompt.
    assert cached[1] >= prompts[0] and cached[2] >= prompts[1]


def test_generate_scores_candidates(real):
    prefix = "The capital of France is"
    with real.http() as client:
        gen = client.post("/generate", json={"text": prefix, "sampling_params": {"max_tokens": 1, "temperature": 0, "logprobs": 0}}).json()
        token, logprob = gen["token_ids"][0], gen["logprobs"][0]["logprob"]
        ids = real.engine.tokenize(prefix)
        scored = client.post("/generate", json={"input_ids": ids + [token], "sampling_params": {
            "max_tokens": 0, "prompt_logprobs": 0, "prompt_logprobs_start": len(ids)}}).json()
    assert scored["token_ids"] == [] and scored["usage"]["completion_tokens"] == 0
    (entry,) = scored["prompt_logprobs"]
    assert entry["token_id"] == token
    assert math.isclose(entry["logprob"], logprob, abs_tol=0.05)
    with real.http() as client:
        whole = client.post("/generate", json={"input_ids": ids + [token], "sampling_params": {
            "max_tokens": 0, "prompt_logprobs": 1}}).json()
    first, *rest = whole["prompt_logprobs"]
    assert first is None and len(rest) == len(ids)  # prompt_logprobs[i] is token i
    assert rest[-1]["token_id"] == token and math.isclose(rest[-1]["logprob"], logprob, abs_tol=0.05)
    assert all(len(lp["top"]) == 1 for lp in rest)


def test_context_length_error(real):
    long = "hello " * (real.engine.max_model_len + 100)
    with pytest.raises(openai.BadRequestError) as exc:
        real.sdk.chat.completions.create(model=real.model, messages=[{"role": "user", "content": long}], max_tokens=4)
    body = exc.value.body
    assert f"maximum context length is {real.engine.max_model_len} tokens" in body["message"]
    assert body["code"] == "context_length_exceeded"


def test_errors_with_real_engine(real):
    with pytest.raises(openai.NotFoundError):
        real.sdk.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=real.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        real.sdk.chat.completions.create(model=real.model, messages=[{"role": "user", "content": "x"}], temperature=-2)


def test_structured_output_and_tool_call(real):
    """Constrained decoding end to end: a JSON-schema response format and a forced tool call."""
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": False}
    r = real.sdk.chat.completions.create(
        model=real.model, messages=[{"role": "user", "content": "What is 2+2? Reply in JSON."}], max_tokens=16, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"], "additionalProperties": False}}}
    r = real.sdk.chat.completions.create(
        model=real.model, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=40,
        temperature=0, tools=[tool], tool_choice="required",
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)


def test_64_concurrent_streams_with_disconnects(real):
    """64 streaming clients, a quarter of them leaving after their first token: every other
    stream completes, /health answers meanwhile, and the KV pool ends as it started."""
    real.engine.wait_idle()
    health_latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.monotonic()
            assert httpx.get(f"{real.url}/health", timeout=10).status_code == 200
            health_latencies.append(time.monotonic() - start)
            time.sleep(0.05)

    def request(i: int) -> dict:
        return dict(model=real.model, messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
                    max_tokens=8, temperature=0.7, seed=i, stream=True)

    async def one(i: int, client: openai.AsyncOpenAI) -> str | None:
        finish = None
        async for chunk in await client.chat.completions.create(**request(i)):
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    async def main() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=real.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        http = httpx.AsyncClient(base_url=real.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
        try:
            return await asyncio.gather(*(
                stream_and_hang_up(http, "/v1/chat/completions", request(i)) if i % 4 == 0 else one(i, client)
                for i in range(64)))
        finally:
            await client.close()
            await http.aclose()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        finishes = asyncio.run(main())
    finally:
        stop.set()
        prober.join()
    assert all(finishes[i] in ("stop", "length") for i in range(64) if i % 4), finishes
    assert health_latencies and max(health_latencies) < 2.0, max(health_latencies)
    real.engine.wait_idle()
    deadline = time.monotonic() + 10
    while not pool_is_clean(real.engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool_is_clean(real.engine), real.engine.stats()
    real.engine.check_integrity()
    with real.http() as client:
        metrics = client.get("/metrics").text
    assert 'radixserve_request_finished_total{finish_reason="abort"}' in metrics
