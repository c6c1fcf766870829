"""Fixtures for the integration tests: the API in-process (TestClient) or served over real HTTP."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from tests.helpers import free_port, wait_until

from taskscheduler.api import create_app
from taskscheduler.config import Settings


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@dataclass
class LiveApi:
    url: str
    settings: Settings


def serve_api(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-api", daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=15, what="the API server to start")
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def live_api_factory(settings: Settings) -> Iterator[Callable[..., LiveApi]]:
    """Serve the API with uvicorn from a thread of this process, on a free port: real HTTP, real
    concurrency. Keyword arguments change the settings (`api_keys="k"`)."""
    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**changes: Any) -> LiveApi:
        app_settings = settings.model_copy(update=changes)
        server, thread, url = serve_api(app_settings)
        running.append((server, thread))
        return LiveApi(url=url, settings=app_settings)

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def live_api(live_api_factory: Callable[..., LiveApi]) -> LiveApi:
    return live_api_factory()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that run CLI commands in-process: they configure the root logger; put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
