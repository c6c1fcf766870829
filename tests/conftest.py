"""Shared fixtures: one private database and one Redis key space per test run.

Which servers:
- TEST_DATABASE_URL / TEST_REDIS_URL (or DATABASE_URL / REDIS_URL) when set;
- else, with TASKSCHEDULER_REQUIRE_SERVICES=1 (CI), the machine's PostgreSQL and Redis on 127.0.0.1;
- else the embedded servers (`taskscheduler.embedded`), started once for the run, so `pytest` works
  on a fresh machine with nothing installed.
When given servers are not reachable the tests that need them are skipped, unless
TASKSCHEDULER_REQUIRE_SERVICES=1, which makes that a failure.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest
import redis

from taskscheduler.config import Settings, get_settings
from taskscheduler.store.db import libpq_url
from tests import harness
from tests.harness import Services

REQUIRE_SERVICES = os.environ.get("TASKSCHEDULER_REQUIRE_SERVICES") == "1"
RUN_ID = uuid.uuid4().hex[:10]


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} not reachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (TASKSCHEDULER_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    """(database URL to administer, Redis URL) of the servers this run uses."""
    database_url, redis_url = harness.given_server_urls()
    if REQUIRE_SERVICES:
        yield database_url or harness.LOCAL_DATABASE_URL, redis_url or harness.LOCAL_REDIS_URL
    elif database_url and redis_url:
        yield database_url, redis_url
    else:
        from taskscheduler.embedded import start_embedded

        # Not under pytest's basetemp: each new pytest session (as root) resets the permissions of
        # /tmp/pytest-of-root, which would cut the embedded server (another user) off from its data.
        data_dir = Path(tempfile.mkdtemp(prefix="taskscheduler-test-"))
        servers = start_embedded(data_dir)
        try:
            yield database_url or servers.database_url, redis_url or servers.redis_url
        finally:
            servers.stop()
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def services(server_urls: tuple[str, str]) -> Iterator[Services]:
    admin_url, redis_url = server_urls
    try:
        psycopg.connect(libpq_url(admin_url), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    try:
        with harness.redis_client(redis_url) as client:
            client.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)

    with (
        harness.private_database(admin_url, f"taskscheduler_test_{RUN_ID}") as database_url,
        harness.private_redis_prefix(redis_url, f"tstest-{RUN_ID}:") as prefix,
    ):
        svc = Services(database_url=database_url, redis_url=redis_url, redis_key_prefix=prefix)
        saved = {k: os.environ.get(k) for k in svc.env()}
        os.environ.update(svc.env())
        get_settings.cache_clear()
        try:
            yield svc
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            get_settings.cache_clear()


@pytest.fixture
def clean_db(services: Services) -> Iterator[Services]:
    """The run's database and broker key space, emptied before the test."""
    from taskscheduler.store import db

    with db.transaction(services.database_url) as conn:
        conn.exec_driver_sql("TRUNCATE tasks, task_events, dlq_events, process_heartbeats, schedules RESTART IDENTITY")
    harness.delete_redis_keys(services.redis_url, services.redis_key_prefix)
    yield services


@pytest.fixture
def settings(clean_db: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for this run's servers; a test may change fields with `monkeypatch.setenv` + cache_clear."""
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def typed_tasks() -> Iterator[ModuleType]:
    """The typed tasks of tests/typed_tasks.py, registered for one test only: registered for good,
    they would change what every later test sees (the schema's task names, say)."""
    from taskscheduler import handlers

    saved = dict(handlers._registry)
    module = importlib.import_module("tests.typed_tasks")
    for registered in module.TASKS:
        handlers._registry[registered.name] = registered  # imported before: registered no more
    yield module
    handlers._registry.clear()
    handlers._registry.update(saved)


@pytest.fixture
def redis_client(services: Services) -> Iterator[redis.Redis]:
    client = harness.redis_client(services.redis_url)
    yield client
    client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Lets fixtures see whether the test failed (request.node.rep_call), to print process logs.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
