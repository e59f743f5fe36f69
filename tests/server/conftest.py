"""Fixtures: real uvicorn servers on 127.0.0.1 in background threads.

`ServerThread` runs an app on a socket bound before start (no free-port race). The fake
engine server is module-scoped (cheap); the real-engine server lives in
test_real_engine.py, where one `Engine(model="default")` serves the whole module.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from radixserve.server.app import create_app
from radixserve.server.settings import ServerSettings

from .fake_engine import FakeEngine

API_KEY = "test-key-123"


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 from a thread; `stop()` is a graceful shutdown."""

    def __init__(self, app, graceful_s: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


async def stream_and_hang_up(http: httpx.AsyncClient, path: str, body: dict) -> None:
    """POST a streaming request and disconnect once its first event arrives (a client that
    leaves mid-stream). Raw httpx with the chunk iterator closed before the response: the
    OpenAI SDK's stream, left mid-iteration, keeps nested async generators that the event
    loop finalizes at shutdown, all at once, and httpx then reports "async generator already
    executing" as an unraisable exception (a client-side warning, seen 1 run in ~15)."""
    async with http.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.status_code
        async with contextlib.aclosing(resp.aiter_raw()) as chunks:
            async for chunk in chunks:
                if chunk.startswith(b"data:"):
                    return
    raise AssertionError("the stream ended without an event")


class FakeServer:
    def __init__(self, engine: FakeEngine, thread: ServerThread, settings: ServerSettings) -> None:
        self.engine = engine
        self.thread = thread
        self.url = thread.url
        self.settings = settings

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)


def start_fake_server(**settings_kwargs) -> tuple[FakeServer, FakeEngine]:
    engine = FakeEngine(**settings_kwargs.pop("engine_kwargs", {}))
    settings = ServerSettings(api_key=API_KEY, served_model_name="fake", model_aliases=("fake-alias",),
                              max_body_bytes=64 * 1024, **settings_kwargs)
    thread = ServerThread(create_app(engine, settings)).start()
    return FakeServer(engine, thread, settings), engine


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    server, engine = start_fake_server()
    yield server
    server.thread.stop()
    assert not engine.healthy(), "the app's lifespan shutdown must stop the engine"


@pytest.fixture()
def fake(fake_server: FakeServer) -> Iterator[FakeServer]:
    """The module's fake server, with the engine's knobs reset after each test."""
    yield fake_server
    engine = fake_server.engine
    engine.paused = False
    engine.unhealthy = False
    engine.wait_idle()
