"""The partitions of task_events: created ahead, dropped when old, and a task's audit trail kept whole
while the task exists (store/partitions.py). Time travels through `now`; nothing sleeps."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from tests.helpers import backdate, events, new_task, to_started

from taskscheduler.config import Settings
from taskscheduler.scheduler import retention
from taskscheduler.store import db, operations, partitions, transitions

DAY = timedelta(days=1)
WIDTH = DAY.total_seconds()


def _drop_range_partitions() -> None:
    with db.transaction() as conn:
        for p in partitions.range_partitions(conn):
            conn.exec_driver_sql(f"DROP TABLE {p.name}")


@pytest.fixture
def no_partitions(settings: Settings) -> Iterator[Settings]:
    """Only the DEFAULT partition, before and after the test (other tests share the database)."""
    _drop_range_partitions()
    yield settings
    _drop_range_partitions()


def _maintain(now: datetime | None = None, retention_days: float = 30) -> partitions.Maintenance:
    return partitions.maintain(
        db.database_for(), width_sec=WIDTH, ahead=3, retention_sec=retention_days * 86400, now=now
    )


def _homes(task_id: uuid.UUID) -> list[str]:
    with db.transaction() as conn:
        rows = conn.execute(
            text("SELECT tableoid::regclass::text FROM task_events WHERE task_id = :id ORDER BY id"), {"id": task_id}
        )
        return [r[0] for r in rows]


def _raw_events(task_id: uuid.UUID) -> list[tuple[int, datetime, str]]:
    with db.transaction() as conn:
        rows = conn.execute(
            text("SELECT id, at, to_status FROM task_events WHERE task_id = :id ORDER BY id"), {"id": task_id}
        )
        return [(r.id, r.at, r.to_status) for r in rows]


def _age_events(task_id: uuid.UUID, age: timedelta) -> None:
    # An UPDATE of the partition key moves the rows into the partition of their new time.
    with db.transaction() as conn:
        conn.execute(text("UPDATE task_events SET at = at - :age WHERE task_id = :id"), {"age": age, "id": task_id})


def test_partitions_are_created_ahead_and_events_land_in_them(no_partitions: Settings) -> None:
    now = datetime.now(UTC)
    assert _maintain(now).created == 4, "the current day and the 3 ahead"
    assert _maintain(now).created == 0, "nothing again"
    with db.transaction() as conn:
        ranges = [(p.lower, p.upper) for p in partitions.range_partitions(conn)]
    today = partitions.floor_to(now, WIDTH)
    assert ranges == [(today + i * DAY, today + (i + 1) * DAY) for i in range(4)]
    task_id = new_task()
    assert _homes(task_id) == [partitions.partition_name(today)]
    # A day later, one more: there are always 3 ahead.
    assert _maintain(now + DAY).created == 1


def test_an_event_never_fails_for_want_of_a_partition(no_partitions: Settings) -> None:
    task_id = new_task()
    assert _homes(task_id) == [partitions.DEFAULT_PARTITION]
    # The DEFAULT partition holds an event of today: the partitions start after it.
    assert _maintain().created == 3
    with db.transaction() as conn:
        first = partitions.range_partitions(conn)[0]
    assert first.lower == partitions.floor_to(datetime.now(UTC), WIDTH) + DAY


def test_old_partitions_go_but_a_living_task_keeps_its_whole_audit_trail(no_partitions: Settings) -> None:
    now = datetime.now(UTC)
    assert _maintain(now - 60 * DAY).created == 4  # the days around 60 days ago, as then
    pending = new_task(run_at=now + 90 * DAY)  # waiting for 60 days, and more to come
    retried = new_task()  # busy for weeks: events 60 days old and of today
    done = new_task()  # finished 60 days ago: deleted by retention, its events with their partition
    attempt = to_started(done)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=done, attempt=attempt, result=None)
    backdate(done, finished_at=60 * DAY)
    for task_id in (pending, retried, done):
        _age_events(task_id, 60 * DAY)
    with db.transaction() as conn:  # an event of today, in the DEFAULT partition (ENQUEUED by to_started)
        assert operations.cancel(conn, retried).row is not None
    trail = {t: _raw_events(t) for t in (pending, retried)}
    assert all(home.startswith(partitions.PARTITION_PREFIX) for home in _homes(pending))

    counts = retention.run_once(database=db.database_for(), settings=no_partitions)

    assert counts.tasks == 1 and counts.partitions_dropped == 4
    assert counts.events_kept == 3, "the old events of the two that still exist"
    with db.transaction() as conn:
        assert all(p.lower > now - DAY for p in partitions.range_partitions(conn)), "the old ones are gone"
    assert {t: _raw_events(t) for t in (pending, retried)} == trail, "every event, same id, same time"
    assert set(_homes(pending)) == {partitions.DEFAULT_PARTITION}
    assert events(done) == [] and _raw_events(done) == []


def test_a_deleted_tasks_events_are_not_shown_and_leave_the_default_partition(no_partitions: Settings) -> None:
    task_id = new_task()
    with db.transaction() as conn:
        assert operations.cancel(conn, task_id).row is not None
    backdate(task_id, finished_at=31 * DAY)
    assert _homes(task_id) == [partitions.DEFAULT_PARTITION] * 2
    with db.transaction() as conn:
        conn.execute(text("DELETE FROM tasks WHERE id = :id"), {"id": task_id})
    # Deleted, its events still stored: nobody reads them.
    assert len(_raw_events(task_id)) == 2 and events(task_id) == []
    assert _maintain().orphans_deleted == 2
    assert _raw_events(task_id) == []


def test_the_api_answers_404_for_the_events_of_a_deleted_task(no_partitions: Settings) -> None:
    from fastapi.testclient import TestClient

    from taskscheduler.api.app import create_app

    task_id = new_task()
    _maintain()
    with db.transaction() as conn:
        conn.execute(text("DELETE FROM tasks WHERE id = :id"), {"id": task_id})
    assert len(_raw_events(task_id)) == 1, "kept until its partition goes"
    with TestClient(create_app(no_partitions)) as client:
        assert client.get(f"/tasks/{task_id}/events").status_code == 404
        assert client.get(f"/ui/tasks/{task_id}").status_code == 404


def test_two_schedulers_do_not_race(no_partitions: Settings) -> None:
    with db.database_for().engine.connect() as other:
        other.exec_driver_sql(f"SELECT pg_advisory_lock({partitions.PARTITIONS_LOCK_ID})")
        try:
            assert _maintain() == partitions.Maintenance(), "the other one is at it"
        finally:
            other.exec_driver_sql(f"SELECT pg_advisory_unlock({partitions.PARTITIONS_LOCK_ID})")
            other.commit()
    assert _maintain().created == 4


def test_gives_up_behind_a_long_query_instead_of_blocking_event_inserts(no_partitions: Settings) -> None:
    with db.database_for().engine.connect() as other:
        other.exec_driver_sql("SELECT count(*) FROM task_events")  # holds ACCESS SHARE until it ends
        try:
            assert _maintain().created == 0
        finally:
            other.rollback()
    assert _maintain().created == 4
