"""`submit(..., connection=conn)` against a real scheduler and worker: a task in a transaction still
open is not dispatched (the scheduler cannot see it) and runs once right after the commit, woken by
the NOTIFY the commit delivers; a rolled-back one never runs. The handlers are typed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine

from taskscheduler import Client
from taskscheduler.store import db, operations
from tests.e2e.conftest import Cluster
from tests.harness import Services
from tests.helpers import events, task_row, wait_until

pytestmark = pytest.mark.e2e

# Long enough that a task run within it was dispatched on the commit's NOTIFY, not by a poll.
POLL_INTERVAL_SEC = 60


@pytest.fixture
def cluster(cluster_factory: type[Cluster], typed_tasks: ModuleType) -> Cluster:
    cluster = cluster_factory(TASK_MODULES="tests.typed_tasks", POLL_INTERVAL_SEC=str(POLL_INTERVAL_SEC))
    cluster.start("scheduler")
    cluster.start_worker("default")
    return cluster


@pytest.fixture
def engine(services: Services) -> Iterator[Engine]:
    engine = create_engine(services.database_url)
    yield engine
    engine.dispose()


def _lines(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines()] if path.exists() else []


def _exists(task_id: uuid.UUID) -> bool:
    with db.transaction() as conn:
        return operations.get_task(conn, task_id) is not None


def _finished(task_id: uuid.UUID, timeout: float) -> dict[str, Any]:
    finished: dict[str, Any] = wait_until(
        lambda: (row := task_row(task_id))["status"] in ("SUCCEEDED", "DEAD") and row,
        timeout=timeout,
        what=f"task {task_id} to finish",
    )
    return finished


def test_a_task_in_an_open_transaction_waits_for_the_commit_then_runs_once(
    cluster: Cluster, services: Services, engine: Engine, typed_tasks: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "runs"
    with Client(database_url=services.database_url) as direct, engine.connect() as conn:
        conn.begin()
        held = typed_tasks.record_typed.submit({"path": str(path), "key": "held"}, connection=conn)
        # Meanwhile a committed task is dispatched and run: the scheduler and the worker were at work.
        # (Its wait allows a poll: the scheduler may have started listening just after its commit.)
        other = direct.submit("record_dict", {"path": str(path), "key": "other"})
        assert _finished(other.id, timeout=POLL_INTERVAL_SEC + 30)["status"] == "SUCCEEDED"
        assert _lines(path) == ["other"]
        assert not _exists(held.id), "visible outside its transaction"
        conn.commit()
    row = _finished(held.id, timeout=POLL_INTERVAL_SEC / 3)
    assert row["status"] == "SUCCEEDED" and row["attempt"] == 1
    assert row["result"] == {"type": "Record"}, "the typed handler gets its model"
    assert task_row(other.id)["result"] == {"type": "dict"}
    assert _lines(path) == ["other", "held"]
    assert [to for _, to, _ in events(held.id)] == ["PENDING", "ENQUEUED", "STARTED", "SUCCEEDED"]


def test_a_task_whose_transaction_rolls_back_never_runs(
    cluster: Cluster, services: Services, engine: Engine, typed_tasks: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "runs"
    with engine.connect() as conn:
        conn.begin()
        dropped = typed_tasks.record_typed.submit({"path": str(path), "key": "dropped"}, connection=conn)
        conn.rollback()
    # A task submitted after it runs; the rolled-back one, due before it, would have run first.
    with Client(database_url=services.database_url) as direct:
        after = direct.submit(typed_tasks.record_typed, {"path": str(path), "key": "after"})
    assert _finished(after.id, timeout=POLL_INTERVAL_SEC + 30)["status"] == "SUCCEEDED"
    assert _lines(path) == ["after"]
    assert not _exists(dropped.id) and events(dropped.id) == []
