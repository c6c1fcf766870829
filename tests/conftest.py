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

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from taskscheduler.config import Settings, get_settings, normalize_database_url, redis_client_url

REQUIRE_SERVICES = os.environ.get("TASKSCHEDULER_REQUIRE_SERVICES") == "1"
RUN_ID = uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class Services:
    database_url: str  # SQLAlchemy URL of this run's private database
    redis_url: str
    redis_key_prefix: str

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": self.redis_key_prefix,
        }


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} not reachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (TASKSCHEDULER_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


def _libpq(url: str) -> str:
    return normalize_database_url(url).replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    """(database URL to administer, Redis URL) of the servers this run uses."""
    database_url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if REQUIRE_SERVICES:
        yield (
            database_url or "postgresql://postgres@127.0.0.1:5432/postgres",
            redis_url or "redis://127.0.0.1:6379/0",
        )
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
    admin_url = _libpq(server_urls[0])
    redis_url = server_urls[1]
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    try:
        client = redis.Redis.from_url(redis_client_url(redis_url), socket_connect_timeout=5)
        client.ping()
    except redis.RedisError as exc:
        admin.close()
        _unavailable("Redis", exc)

    db_name = f"taskscheduler_test_{RUN_ID}"
    admin.execute(f'CREATE DATABASE "{db_name}"')
    database_url = make_url(normalize_database_url(admin_url)).set(database=db_name).render_as_string(False)
    svc = Services(database_url=database_url, redis_url=redis_url, redis_key_prefix=f"tstest-{RUN_ID}:")

    from taskscheduler.migrations import run_migrations

    run_migrations(database_url)
    saved = {k: os.environ.get(k) for k in svc.env()}
    os.environ.update(svc.env())
    get_settings.cache_clear()
    try:
        yield svc
    finally:
        from taskscheduler.store import db

        db.dispose_engines()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        admin.close()
        for key in client.scan_iter(match=f"{svc.redis_key_prefix}*", count=1000):
            client.delete(key)
        client.close()


@pytest.fixture
def clean_db(services: Services) -> Iterator[Services]:
    """The run's database and broker key space, emptied before the test."""
    from taskscheduler.store import db

    with db.transaction(services.database_url) as conn:
        conn.exec_driver_sql("TRUNCATE tasks, task_events, dlq_events, process_heartbeats, schedules RESTART IDENTITY")
    client = redis.Redis.from_url(redis_client_url(services.redis_url))
    for key in client.scan_iter(match=f"{services.redis_key_prefix}*", count=1000):
        client.delete(key)
    client.close()
    yield services


@pytest.fixture
def settings(clean_db: Services, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings for this run's servers; a test may change fields with `monkeypatch.setenv` + cache_clear."""
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def redis_client(services: Services) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_client_url(services.redis_url))
    yield client
    client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # Lets fixtures see whether the test failed (request.node.rep_call), to print process logs.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
