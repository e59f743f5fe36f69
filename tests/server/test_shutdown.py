"""SIGTERM: stop accepting, let in-flight streams finish (bounded by the graceful timeout),
stop the engine, exit. Runs the server in a subprocess so the signal is real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "serve_fake.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(graceful_s: float, step_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, SCRIPT, str(port), str(graceful_s), str(step_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.05)


def stream_events(url: str, body: dict, started: threading.Event, events: list[str]) -> None:
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()


def test_sigterm_lets_in_flight_streams_finish():
    proc, url = start(graceful_s=10, step_s=0.02)
    events: list[str] = []
    started = threading.Event()
    body = {"text": "hi", "stream": True, "sampling_params": {"max_tokens": 40, "ignore_eos": True}}
    reader = threading.Thread(target=stream_events, args=(url, body, started, events))
    reader.start()
    assert started.wait(10)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)  # no longer accepting
    reader.join(20)
    output = proc.communicate(timeout=20)[0]
    assert events[-1] == "[DONE]"
    assert sum(len(json.loads(e)["token_ids"]) for e in events[:-1]) == 40
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "stopping the engine" in output


def test_graceful_timeout_bounds_shutdown():
    proc, url = start(graceful_s=0.5, step_s=0.02)
    events: list[str] = []
    started = threading.Event()
    body = {"text": "hi", "stream": True, "sampling_params": {"max_tokens": 1500, "ignore_eos": True}}
    reader = threading.Thread(target=lambda: _swallow(stream_events, url, body, started, events))
    reader.start()
    assert started.wait(10)
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=20)[0]
    assert time.monotonic() - begin < 8, output
    reader.join(10)
    assert "[DONE]" not in events  # cut short, not run to the end (1500 tokens take 30 s)
    assert "stopping the engine" in output


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except httpx.TransportError:
        pass
