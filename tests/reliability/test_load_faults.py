"""The CI form of the load and fault suite (the long form: `python -m benchmarks.load_test`).

A real server on loopback over the session's `Engine(model="default")` (max_running 16,
max_waiting 24) gets, phase after phase: concurrent streaming clients with a mix of prompt
lengths, shared prefixes, json_schema / regex outputs and n > 1; clients that disconnect
mid-stream or while queued; clients that give up on short client-side timeouts; and a burst
past the queue limit. After each phase (benchmarks/loadgen.py): every accepted request ended
with a finish_reason or a clean error, no 5xx, /health stayed 200, the engine went idle with
its KV pool back to its start (no private or locked pages, free + evictable == total,
check_integrity) and the server still answers.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from benchmarks.loadgen import (
    Mix,
    PhaseConfig,
    check_server,
    disconnect_mix,
    overflow_body,
    pool_state,
    run_burst,
    run_phase,
    timeout_mix,
)

from .conftest import MAX_RUNNING, MAX_WAITING

# Small enough for two shared CPU cores: a handful of tokens, few long prompts.
CI_MIX = Mix(max_tokens=(2, 8), max_n=3, long_share=0.05, long_filler_words=120)
CLIENTS = 12


def _phase(server, name: str, duration_s: float, mix: Mix, seed: int) -> PhaseConfig:
    return PhaseConfig(name, CLIENTS, duration_s, mix, seed, server.api_key, request_timeout_s=120, grace_s=120)


def _check_after(server, report) -> None:
    problems = report.problems()
    server_problems, state = check_server(server.engine, server.url, api_key=server.api_key)
    summary = report.summary() | {"pages_leaked": state.leaked}
    print(summary)
    assert not problems, f"{report.name}: client-side problems {problems}; {summary}"
    assert not server_problems, f"{report.name}: server-side problems {server_problems}; {summary}"
    assert state.leaked == 0 and state.private == 0 and state.locked == 0


@pytest.fixture(scope="module")
def loaded(server):
    server.engine.wait_idle(60)
    start = pool_state(server.engine)
    assert start.clean, start
    return server


def test_mixed_load(loaded):
    report = asyncio.run(run_phase(loaded.url, _phase(loaded, "mixed", 15, CI_MIX, seed=11)))
    assert report.served >= CLIENTS, report.summary()
    assert report.ttft_s, "no streamed request produced a token"
    _check_after(loaded, report)


def test_disconnects_mid_stream(loaded):
    report = asyncio.run(run_phase(loaded.url, _phase(loaded, "disconnects", 6, disconnect_mix(CI_MIX), seed=12)))
    assert report.kinds["disconnected"] >= CLIENTS // 2, report.summary()
    _check_after(loaded, report)


def test_client_timeouts(loaded):
    report = asyncio.run(run_phase(loaded.url, _phase(loaded, "timeouts", 6, timeout_mix(CI_MIX), seed=13)))
    assert report.kinds["client_timeout"] >= CLIENTS // 2, report.summary()
    _check_after(loaded, report)


def test_queue_overflow_gets_503_with_retry_after(loaded):
    n = 8
    count = math.ceil(1.5 * (MAX_RUNNING + MAX_WAITING) / n)
    report = asyncio.run(run_burst(loaded.url, "overflow", count, overflow_body(n), api_key=loaded.api_key))
    assert report.kinds["rejected"] >= 1, report.summary()
    assert report.kinds["ok"] >= 1, report.summary()
    assert all(value >= 1 for value in report.retry_after_values)
    _check_after(loaded, report)


def _server_errors(served) -> float:
    """All 5xx responses the server counted so far (from /metrics)."""
    with served.client() as client:
        text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("radixserve_http_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_leaving_while_uploading_is_not_a_server_error(loaded, caplog):
    """A client that declares a body, sends part of it and leaves: nothing to answer, and
    neither a 500 in the metrics nor an error in the log."""
    import logging
    import socket
    import time

    before = _server_errors(loaded)
    caplog.set_level(logging.INFO, logger="radixserve.server.middleware")
    host, port = loaded.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {loaded.api_key}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            sock.sendall(head.encode() + b'{"messages": [{"role": "user", "content": "')
            time.sleep(0.2)
    time.sleep(0.5)
    assert _server_errors(loaded) == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert any("disconnected before its request was read" in r.getMessage() for r in caplog.records)
    _, state = check_server(loaded.engine, loaded.url, api_key=loaded.api_key)
    assert state.clean
