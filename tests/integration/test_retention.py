"""Retention: finished tasks after RETENTION_DAYS, dlq_events after DLQ_RETENTION_DAYS, nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from tests.helpers import backdate, events, new_task, to_dead, to_started

from taskscheduler.broker import DeadMessage
from taskscheduler.config import Settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.scheduler import retention
from taskscheduler.scheduler.service import SchedulerService
from taskscheduler.store import creation, db, operations, sweeps, transitions
from taskscheduler.store import dlq as dlq_store

DAY = timedelta(days=1)


def _succeeded() -> uuid.UUID:
    task_id = new_task()
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result={"ok": True})
    return task_id


def _dead() -> uuid.UUID:
    task_id = new_task()
    to_dead(task_id)
    return task_id


def _cancelled() -> uuid.UUID:
    task_id = new_task()
    with db.transaction() as conn:
        assert operations.cancel(conn, task_id).row is not None
    return task_id


def _exists(task_id: uuid.UUID) -> bool:
    with db.transaction() as conn:
        return operations.get_task(conn, task_id) is not None


def _dlq_row(task_id: uuid.UUID, attempt: int, age: timedelta) -> None:
    with db.transaction() as conn:
        dlq_store.record_dlq_event(
            conn, task_id=task_id, attempt=attempt, task_name="demo_ok", reason="max_retries_exceeded", error="x"
        )
        conn.execute(
            text("UPDATE dlq_events SET created_at = now() - :age WHERE task_id = :id AND attempt = :attempt"),
            {"age": age, "id": task_id, "attempt": attempt},
        )


def _dlq_attempts() -> set[tuple[uuid.UUID, int]]:
    with db.transaction() as conn:
        return {(r.task_id, r.attempt) for r in conn.execute(text("SELECT task_id, attempt FROM dlq_events"))}


def test_deletes_old_finished_tasks_and_nothing_else(settings: Settings) -> None:
    assert (settings.retention_days, settings.dlq_retention_days) == (30, 180)
    old = [make() for make in (_succeeded, _dead, _cancelled)]
    young = [make() for make in (_succeeded, _dead, _cancelled)]
    for task_id in old:
        backdate(task_id, finished_at=31 * DAY)
    for task_id in young:
        backdate(task_id, finished_at=29 * DAY)
    # Old, but not finished: never deleted, whatever their age.
    started = new_task()
    to_started(started)
    backdate(started, created_at=90 * DAY, started_at=90 * DAY, heartbeat_at=90 * DAY)
    pending = new_task()
    backdate(pending, created_at=90 * DAY, run_at=90 * DAY)
    # The audit trail: kept for DLQ_RETENTION_DAYS, whether its task is still there or not.
    _dlq_row(old[1], 1, 31 * DAY)
    _dlq_row(young[1], 1, 181 * DAY)
    _dlq_row(uuid.uuid4(), 3, 179 * DAY)

    counts = retention.run_once(database=db.database_for(), settings=settings)

    assert (counts.tasks, counts.dlq_events) == (3, 1)
    assert [_exists(t) for t in old] == [False] * 3
    assert all(_exists(t) for t in [*young, started, pending])
    assert all(events(t) == [] for t in old), "the events are not shown without the task"
    assert all(events(t) for t in young)
    assert {attempt for _, attempt in _dlq_attempts()} == {1, 3}
    assert (old[1], 1) in _dlq_attempts(), "a DLQ row outlives its task"
    assert retention.run_once(database=db.database_for(), settings=settings) == retention.RetentionCounts()


def test_keeps_a_dead_task_whose_dlq_row_is_not_written_yet(settings: Settings) -> None:
    unrecorded = new_task()
    attempt = to_dead(unrecorded)  # its DLQ message is still owed (the DLQ worker is down)
    backdate(unrecorded, finished_at=31 * DAY)
    assert retention.run_once(database=db.database_for(), settings=settings).tasks == 0
    assert _exists(unrecorded)
    _dlq_row(unrecorded, attempt, age=timedelta(0))  # recorded at last: the task may go now
    assert retention.run_once(database=db.database_for(), settings=settings).tasks == 1
    assert not _exists(unrecorded)


def test_deletes_in_bounded_batches(settings: Settings) -> None:
    old = [_succeeded() for _ in range(5)]
    for task_id in old:
        backdate(task_id, finished_at=31 * DAY)
    assert retention.run_once(database=db.database_for(), settings=settings, batch_size=2, max_batches=2).tasks == 4
    assert sum(_exists(t) for t in old) == 1
    assert retention.run_once(database=db.database_for(), settings=settings, batch_size=2, max_batches=2).tasks == 1


def test_a_run_goes_on_while_batches_come_back_full(settings: Settings) -> None:
    # More than the 10 batches a run used to stop at: a run keeps up with any rate.
    old = [_succeeded() for _ in range(25)]
    for task_id in old:
        backdate(task_id, finished_at=31 * DAY)
    counts = retention.run_once(database=db.database_for(), settings=settings, batch_size=2)
    assert (counts.tasks, counts.more) == (25, False)
    assert not any(_exists(t) for t in old)


class Ticking:
    """A clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_a_run_stops_on_its_time_budget_and_says_there_is_more(settings: Settings) -> None:
    old = [_succeeded() for _ in range(9)]
    for task_id in old:
        backdate(task_id, finished_at=31 * DAY)
    database = db.database_for()
    # Read once for the deadline (1 + 2.5), then after each full batch (2, 3, 4): the third stops it.
    counts = retention.run_once(database=database, settings=settings, batch_size=2, budget_sec=2.5, clock=Ticking())
    assert (counts.tasks, counts.more) == (6, True)
    counts = retention.run_once(database=database, settings=settings, batch_size=2, budget_sec=2.5, clock=Ticking())
    assert (counts.tasks, counts.more) == (3, False), "the last batch is not full: done"


def test_the_scheduler_comes_back_at_the_next_tick_while_work_is_left(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH_SIZE", 2)
    monkeypatch.setattr(retention, "BUDGET_SEC", 0.0)  # one batch per tick
    service = SchedulerService(settings, RecordingPublisher())
    old = [_succeeded() for _ in range(5)]
    for task_id in old:
        backdate(task_id, finished_at=31 * DAY)
    left = []
    for _ in range(3):
        service.tick()
        left.append(sum(_exists(t) for t in old))
    assert left == [3, 1, 0]
    late = _succeeded()
    backdate(late, finished_at=31 * DAY)
    service.tick()
    assert _exists(late), "caught up: the next run is RETENTION_INTERVAL_SEC away"


def test_zero_days_keeps_everything(settings: Settings) -> None:
    task_id = _succeeded()
    backdate(task_id, finished_at=3650 * DAY)
    _dlq_row(task_id, 1, 3650 * DAY)
    keep = settings.model_copy(update={"retention_days": 0, "dlq_retention_days": 0})
    assert retention.run_once(database=db.database_for(), settings=keep) == retention.RetentionCounts()
    assert _exists(task_id) and _dlq_attempts() == {(task_id, 1)}


def test_a_retention_of_hours(settings: Settings) -> None:
    # 0.05 days: 72 minutes.
    task_id = _succeeded()
    backdate(task_id, finished_at=timedelta(hours=2))
    assert (
        retention.run_once(
            database=db.database_for(), settings=settings.model_copy(update={"retention_days": 0.05})
        ).tasks
        == 1
    )


def test_an_idempotency_key_is_free_again_once_its_task_is_deleted(settings: Settings) -> None:
    spec = creation.NewTask(
        name="demo_ok", payload={}, priority=5, queue="default", run_at=None, max_retries=0, timeout_sec=None,
        idempotency_key="monthly-report", request_hash="h",
    )  # fmt: skip
    with db.transaction() as conn:
        (first,) = creation.create_tasks(conn, [spec])
    with db.transaction() as conn:
        assert operations.cancel(conn, first.row["id"]).row is not None
    backdate(first.row["id"], finished_at=31 * DAY)
    retention.run_once(database=db.database_for(), settings=settings)
    with db.transaction() as conn:
        (second,) = creation.create_tasks(conn, [spec])
    assert second.created and second.row["id"] != first.row["id"]


def test_forgets_processes_silent_for_a_day(settings: Settings) -> None:
    gone = ProcessHeartbeat("worker", interval_sec=10, database=db.database_for())
    alive = ProcessHeartbeat("worker", interval_sec=10, database=db.database_for())
    assert gone.beat() and alive.beat()
    with db.transaction() as conn:
        conn.execute(
            text("UPDATE process_heartbeats SET seen_at = now() - interval '25 hours' WHERE id = :id"),
            {"id": gone.process_id},
        )
    assert retention.run_once(database=db.database_for(), settings=settings).processes == 1
    with db.transaction() as conn:
        assert [r.id for r in conn.execute(text("SELECT id FROM process_heartbeats"))] == [alive.process_id]


class RecordingPublisher:
    def __init__(self) -> None:
        self.attempts: list[Any] = []

    def publish_attempts(self, items: Sequence[sweeps.Dispatched]) -> int:
        self.attempts += items
        return len(items)

    def publish_dead(self, items: Sequence[DeadMessage]) -> int:
        return len(items)


def test_the_scheduler_runs_retention_every_interval_and_beats(settings: Settings) -> None:
    heartbeat = ProcessHeartbeat("scheduler", interval_sec=settings.process_heartbeat_sec, database=db.database_for())
    service = SchedulerService(settings, RecordingPublisher(), heartbeat=heartbeat)
    first = _succeeded()
    backdate(first, finished_at=31 * DAY)
    service.tick()
    assert not _exists(first)
    second = _succeeded()
    backdate(second, finished_at=31 * DAY)
    service.tick()
    assert _exists(second), "not again before RETENTION_INTERVAL_SEC"
    service._retention_due = 0.0  # as if the interval had passed
    service.tick()
    assert not _exists(second)
    with db.transaction() as conn:
        roles = [r.role for r in conn.execute(text("SELECT role FROM process_heartbeats"))]
    assert roles == ["scheduler"]


@pytest.mark.parametrize("name", ["retention_days", "dlq_retention_days"])
def test_negative_days_are_refused(name: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(_env_file=None, **{name: -1})  # type: ignore[call-arg]
