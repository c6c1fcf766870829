"""Fixtures for the fault-injection suite: clusters of real processes and private servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskscheduler.config import normalize_database_url
from taskscheduler.migrations import run_migrations
from taskscheduler.store import db
from tests.chaos.invariants import status_counts, unfinished, violations
from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.e2e.conftest import Cluster
from tests.harness import Services, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHAOS_ENV = {"TASK_MODULES": "tests.chaos.handlers", "PYTHONPATH": str(ROOT)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.chaos)


@pytest.fixture(autouse=True)
def _chaos_handlers() -> None:
    import tests.chaos.handlers  # noqa: F401  (the API in this process validates names too)


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(services: Services, **extra_env: str) -> Cluster:
        cluster = Cluster(services=services, tmp=tmp_path, extra_env={**CHAOS_ENV, **extra_env})
        clusters.append(cluster)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in clusters:
        cluster.stop_all()
        if failed:
            print(cluster.dump_logs())


@pytest.fixture
def private_servers(tmp_path: Path) -> Iterator[tuple[Services, PrivatePostgres, PrivateRedis]]:
    """A PostgreSQL and a Redis of this test's own, which it may stop and restart."""
    folder = tmp_path / "pg"
    folder.mkdir()
    pg = PrivatePostgres(folder)
    pg.init()
    rd = PrivateRedis(tmp_path)
    rd.start()
    url = normalize_database_url(pg.admin_url)
    run_migrations(url)
    try:
        yield Services(database_url=url, redis_url=rd.url, redis_key_prefix=""), pg, rd
    finally:
        db.dispose_engines()
        rd.stop()
        pg.destroy()


def settle(database_url: str, *, timeout: float) -> dict[str, int]:
    """Wait until every task is finished and every DEAD one has its DLQ row; returns status counts."""

    def done() -> bool:
        with db.transaction(database_url) as conn:
            dead_unrecorded = conn.exec_driver_sql(
                "SELECT count(*) FROM tasks WHERE status = 'DEAD' AND NOT dlq_recorded"
            ).scalar_one()
            return unfinished(conn) == 0 and dead_unrecorded == 0

    wait_until(done, timeout=timeout, interval=0.25, what="every task to settle")
    with db.transaction(database_url) as conn:
        return status_counts(conn)


def assert_invariants(database_url: str) -> None:
    with db.transaction(database_url) as conn:
        broken = violations(conn)
    assert broken == {}, broken
