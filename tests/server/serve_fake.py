"""Serve the app over the fake engine from the main thread, as `radixserve serve` does (so
uvicorn installs its signal handlers): `python serve_fake.py PORT GRACEFUL_S STEP_S`.
Used by test_shutdown.py to send real signals."""

import logging
import sys

from fake_engine import FakeEngine

from radixserve.server.app import create_app
from radixserve.server.cli import run_server
from radixserve.server.settings import ServerSettings

if __name__ == "__main__":
    port, graceful_s, step_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(port=port, graceful_shutdown_s=graceful_s, log_level="info")
    run_server(create_app(FakeEngine(step_s=step_s), settings), settings)
