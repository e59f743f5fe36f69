"""Fixtures for the DSL tests.

pytest runs with --import-mode=importlib (pyproject.toml), so this folder is put on sys.path
for the sibling helper module `lang_fake_backend`.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def engine():
    """One in-process engine (default model, page size 1) for every DSL test of the session."""
    from radixserve.runtime import Engine

    eng = Engine(model="default", page_size=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def runtime(engine):
    """The session engine as a DSL backend (`Runtime(engine=...)` leaves it running)."""
    from radixserve.lang import Runtime

    return Runtime(engine=engine)


@pytest.fixture(scope="session")
def server_url(engine):
    """A real uvicorn server on loopback serving the session engine; yields its base URL."""
    import uvicorn

    from radixserve.server.app import create_app
    from radixserve.server.settings import ServerSettings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServerSettings(host="127.0.0.1", port=port, shutdown_engine=False, log_level="warning")
    app = create_app(engine, settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="lang-test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
