"""Readiness and fault isolation, by injecting faults into a real engine.

- A stuck step (the model runner's launch blocks) turns `/health` into a 503 within the stall
  limit and new requests into a 503 with Retry-After; once the step returns, /health is 200
  again and the request that was running completes.
- An exception inside one request (a detokenizer that raises; a grammar matcher that raises
  while filling its mask, inside the batched launch) fails that request alone, with a clean
  error; the requests beside it, in the same batch, complete. A launch that fails once for
  the whole batch is retried in halves, and every request completes.
- A dead engine loop (the scheduler raises) turns /health into a 503 for good, ends the
  requests in flight with an error, and refuses new ones with a 503.

The engine here is this module's own (small pool, 2 s stall limit); the last test kills it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from benchmarks.loadgen import check_server, pool_state

from .conftest import API_KEY, Served, serve

STALL_S = 2.0


@pytest.fixture(scope="module")
def faulty() -> Iterator[Served]:
    from radixserve.runtime import Engine

    engine = Engine(model="default", num_pages=4096, max_running=16, max_waiting=64, stall_timeout_s=STALL_S)
    served = serve(engine, api_key=API_KEY)
    yield served
    served.thread.stop()
    engine.shutdown()


def _chat(content: str, max_tokens: int = 6, **extra) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _health(served: Served) -> httpx.Response:
    return httpx.get(served.url + "/health", timeout=10)


def _assert_clean(served: Served) -> None:
    problems, state = check_server(served.engine, served.url, api_key=served.api_key, idle_timeout_s=60)
    assert not problems, problems
    assert state.clean, state


async def _stream(client: httpx.AsyncClient, body: dict, headers: dict | None = None) -> dict:
    """One streamed chat completion: its finish reasons, error events and whether [DONE] came."""
    out: dict = {"finish": {}, "errors": [], "done": False, "text": ""}
    async with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}, headers=headers or {}) as r:
        out["status"] = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out["done"] = True
                break
            event = json.loads(data)
            if "error" in event:
                out["errors"].append(event["error"])
                continue
            for choice in event["choices"]:
                out["text"] += choice["delta"].get("content") or ""
                if choice.get("finish_reason"):
                    out["finish"][choice["index"]] = choice["finish_reason"]
    return out


def _client(served: Served) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {served.api_key}"}, timeout=120)


class _Collector:
    """Deltas of engine requests submitted directly, by request id."""

    def __init__(self) -> None:
        self.final: dict[str, object] = {}
        self.tokens: dict[str, int] = {}
        self.lock = threading.Lock()

    def on_delta(self, delta) -> None:
        with self.lock:
            self.tokens[delta.request_id] = self.tokens.get(delta.request_id, 0) + len(delta.token_ids)
            if delta.finish_reason is not None:
                self.final[delta.request_id] = delta


def _submit_in_one_batch(engine, jobs: list[tuple[str, object]], collector: _Collector) -> None:
    """Submit every (prompt, params) while the engine thread is held between two steps, so
    they are admitted together and share their first batch."""
    gate = threading.Event()
    held = threading.Event()

    def hold() -> None:
        held.set()
        gate.wait(5)

    holder = threading.Thread(target=engine.call_on_loop, args=(hold, 30))
    holder.start()
    assert held.wait(10)
    try:
        for rid, (prompt, params) in zip([j[0] for j in jobs], [j[1] for j in jobs]):
            engine.submit(prompt, params, on_delta=collector.on_delta, request_id=rid)
    finally:
        gate.set()
        holder.join(30)


# ---------------------------------------------------------------- a stuck step


def test_stuck_step_turns_health_503_and_recovers(faulty, monkeypatch):
    engine = faulty.engine
    runner = engine._loop.runner
    real_launch = runner.launch
    entered, release = threading.Event(), threading.Event()

    def hanging_launch(batch, carry=None):
        entered.set()
        release.wait(60)
        return real_launch(batch, carry)

    monkeypatch.setattr(runner, "launch", hanging_launch)
    result: dict = {}

    def run_stream() -> None:
        async def go() -> None:
            async with _client(faulty) as client:
                result.update(await _stream(client, _chat("Say something short.")))

        asyncio.run(go())

    streamer = threading.Thread(target=run_stream)
    streamer.start()
    try:
        assert entered.wait(30), "the step never started"
        _wait_for(lambda: _health(faulty).status_code == 503, STALL_S + 10, "/health to report the stuck engine")
        body = _health(faulty).json()
        assert body["error"]["code"] == "engine_unhealthy"
        with faulty.client() as client:
            refused = client.post("/v1/chat/completions", json=_chat("Another one."))
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert "not responding" in refused.json()["error"]["message"]
    finally:
        release.set()
    _wait_for(lambda: _health(faulty).status_code == 200, 30, "/health to recover")
    streamer.join(60)
    assert result.get("done") and result["finish"].get(0) in ("stop", "length"), result
    assert not result["errors"]
    monkeypatch.undo()
    _assert_clean(faulty)


# ---------------------------------------------------------------- one request fails alone


class _ExplodingDetokenizer:
    def __init__(self, inner) -> None:
        self.inner = inner

    def push(self, ids):
        raise RuntimeError("injected detokenizer failure")

    def flush(self) -> str:
        return self.inner.flush()


def test_detokenizer_failure_fails_only_its_request(faulty, monkeypatch):
    engine = faulty.engine
    real_prepare = engine._prepare

    def prepare(prompt, params, on_delta, request_id, cache_salt):
        requests = real_prepare(prompt, params, on_delta, request_id, cache_salt)
        if request_id and request_id.startswith("poison"):
            for req in requests:
                req.detokenizer = _ExplodingDetokenizer(req.detokenizer)
        return requests

    monkeypatch.setattr(engine, "_prepare", prepare)

    async def go():
        async with _client(faulty) as client:
            good = [_stream(client, _chat(f"Tell me about the number {i}.", max_tokens=6)) for i in range(6)]
            bad_stream = _stream(client, _chat("This one breaks."), headers={"X-Request-Id": "poison-stream"})
            bad_whole = client.post("/v1/chat/completions", json=_chat("This one breaks too."),
                                    headers={"X-Request-Id": "poison-whole"})
            return await asyncio.gather(bad_stream, bad_whole, *good)

    bad_stream, bad_whole, *good = asyncio.run(go())
    for out in good:
        assert out["status"] == 200 and out["done"] and not out["errors"], out
        assert out["finish"].get(0) in ("stop", "length"), out
    # The broken requests end with a clean error, not a hang, a broken stream or a traceback.
    assert bad_stream["status"] == 200 and bad_stream["done"] and bad_stream["errors"], bad_stream
    assert bad_stream["errors"][0]["code"] == "generation_error"
    assert bad_whole.status_code == 500 and bad_whole.json()["error"]["code"] == "generation_error"
    assert "injected" not in bad_whole.text  # the detail goes to the log only
    assert engine.healthy()
    monkeypatch.undo()
    _assert_clean(faulty)


class _ExplodingMatcher:
    """A real matcher that raises while filling its mask (inside the batched launch)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def fill_bitmask(self, bitmask, row) -> None:
        raise RuntimeError("injected matcher failure")

    def copy(self):
        return _ExplodingMatcher(self._inner.copy())

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_matcher_failure_in_a_batch_fails_only_its_request(faulty, monkeypatch, caplog):
    from radixserve.runtime import SamplingParams
    from radixserve.runtime.constraints.spec import ConstraintSpec

    engine = faulty.engine
    real_prepare = engine._prepare

    def prepare(prompt, params, on_delta, request_id, cache_salt):
        requests = real_prepare(prompt, params, on_delta, request_id, cache_salt)
        if request_id == "poison-matcher":
            for req in requests:
                req.matcher = _ExplodingMatcher(req.matcher)
        return requests

    monkeypatch.setattr(engine, "_prepare", prepare)
    regex = SamplingParams(max_tokens=5, temperature=0, constraint=ConstraintSpec("regex", "[a-z ]{1,20}"))
    plain = SamplingParams(max_tokens=5, temperature=0)
    jobs = [(f"plain-{i}", (f"Number {i} is", plain)) for i in range(4)]
    jobs += [(f"regex-{i}", (f"Word {i}:", regex)) for i in range(2)]
    jobs.append(("poison-matcher", ("Broken:", regex)))
    collector = _Collector()
    caplog.set_level(logging.WARNING, logger="radixserve.runtime.engine_loop")
    _submit_in_one_batch(engine, jobs, collector)
    _wait_for(lambda: len(collector.final) == len(jobs), 60, "every request to finish")
    poisoned = collector.final["poison-matcher"]
    assert poisoned.finish_reason == "error" and "forward pass" in (poisoned.error or ""), poisoned
    for rid, _ in jobs[:-1]:
        delta = collector.final[rid]
        assert delta.finish_reason in ("stop", "length"), (rid, delta)
        assert collector.tokens[rid] > 0, rid
    assert any("retrying in halves" in r.getMessage() for r in caplog.records), "the failing batch was not split"
    assert engine.healthy()
    monkeypatch.undo()
    _assert_clean(faulty)


def test_transient_launch_failure_is_retried_in_halves(faulty, monkeypatch):
    from radixserve.runtime import SamplingParams

    engine = faulty.engine
    runner = engine._loop.runner
    real_launch = runner.launch
    failures = {"left": 1}

    def flaky_launch(batch, carry=None):
        if failures["left"] and len(batch) > 1:
            failures["left"] -= 1
            raise RuntimeError("injected transient failure")
        return real_launch(batch, carry)

    monkeypatch.setattr(runner, "launch", flaky_launch)
    params = SamplingParams(max_tokens=4, temperature=0)
    jobs = [(f"flaky-{i}", (f"Item {i}:", params)) for i in range(4)]
    collector = _Collector()
    _submit_in_one_batch(engine, jobs, collector)
    _wait_for(lambda: len(collector.final) == len(jobs), 60, "every request to finish")
    assert failures["left"] == 0, "the injected failure never happened"
    assert {rid: d.finish_reason for rid, d in collector.final.items()} == {rid: "length" for rid, _ in jobs}
    monkeypatch.undo()
    _assert_clean(faulty)


# ---------------------------------------------------------------- a dead engine (last: it stays dead)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_dead_engine_loop_turns_health_503_for_good(faulty, monkeypatch):
    engine = faulty.engine
    assert _health(faulty).status_code == 200
    first_token, result = threading.Event(), {}

    async def go() -> None:
        async with _client(faulty) as client:
            body = _chat("Count from one to fifty, slowly.", max_tokens=200) | {"stream": True, "ignore_eos": True}
            out: dict = {"errors": [], "done": False, "finish": {}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        out["done"] = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        out["errors"].append(event["error"])
                    elif any(c["delta"].get("content") for c in event["choices"]):
                        first_token.set()
            result.update(out)

    streamer = threading.Thread(target=lambda: asyncio.run(go()))
    streamer.start()
    assert first_token.wait(60), "the stream never started"

    def broken_schedule():
        raise RuntimeError("injected scheduler failure")

    monkeypatch.setattr(engine.scheduler, "schedule", broken_schedule)
    streamer.join(60)
    assert result["done"] and result["errors"], result  # ended with a clean error event
    assert result["errors"][0]["code"] == "generation_error"
    assert not engine.healthy()
    health = _health(faulty)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unhealthy"
    with faulty.client() as client:
        refused = client.post("/v1/chat/completions", json=_chat("Anyone there?"))
    assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
    assert "not running" in refused.json()["error"]["message"]
    state = pool_state(engine)  # the dead loop released what its requests held
    assert (state.private, state.locked, state.running) == (0, 0, 0), state
