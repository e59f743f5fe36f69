"""Fixtures of the reliability suite: one real engine for the session, and several apps over it.

Loading `Engine(model="default")` is the expensive part, so one engine (small queue limits,
so the overflow phase can fill its waiting queue) serves every test here; each server is a
separate app over it (`shutdown_engine=False`) with its own settings: the main server for
load and bad input, a server with tight per-request limits, and one for fuzzing whose limits
keep each generated request cheap on a CPU. Tests that kill or hang an engine build their own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder of the repository
    sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import ServerThread  # noqa: E402

from radixserve.server.app import create_app  # noqa: E402
from radixserve.server.settings import ServerSettings  # noqa: E402

API_KEY = "reliability-key-0123"

# The session engine's queue limits (sequences): small, so a burst fills the waiting queue.
MAX_RUNNING = 16
MAX_WAITING = 24
NUM_PAGES = 8192


class Served:
    """A running app over the session engine."""

    def __init__(self, engine, thread: ServerThread, settings: ServerSettings) -> None:
        self.engine = engine
        self.thread = thread
        self.url = thread.url
        self.settings = settings
        self.api_key = settings.api_key

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)


def serve(engine, **settings_kwargs) -> Served:
    settings = ServerSettings(shutdown_engine=False, **settings_kwargs)
    thread = ServerThread(create_app(engine, settings)).start()
    return Served(engine, thread, settings)


@pytest.fixture(scope="session")
def engine():
    from radixserve.runtime import Engine

    engine = Engine(model="default", num_pages=NUM_PAGES, max_running=MAX_RUNNING, max_waiting=MAX_WAITING)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(engine) -> Iterator[Served]:
    """The main server: an API key, default limits except n (the overflow burst uses n=8)."""
    served = serve(engine, api_key=API_KEY, max_body_bytes=2 << 20)
    yield served
    served.thread.stop()


@pytest.fixture(scope="session")
def limited(engine) -> Iterator[Served]:
    """Every per-request limit set low, to see each one answered with a 400 naming it."""
    served = serve(
        engine, api_key=API_KEY, max_body_bytes=8 * 1024, max_prompt_tokens=64, max_n=2, max_tokens_limit=8,
        max_constraint_bytes=512, constraint_timeout_s=0.5,
    )
    yield served
    served.thread.stop()


@pytest.fixture(scope="session")
def fuzz_server(engine) -> Iterator[Served]:
    """For schemathesis: limits that keep every accepted request to a few tokens."""
    served = serve(engine, api_key=API_KEY, max_prompt_tokens=512, max_n=2, max_tokens_limit=4,
                   max_constraint_bytes=16 * 1024, constraint_timeout_s=5.0)
    yield served
    served.thread.stop()
