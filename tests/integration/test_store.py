"""Every allowed transition, and that a stale attempt or a wrong status changes nothing."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from tests.helpers import dispatch_all, events, new_task, task_row, to_dead, to_started

from taskscheduler.lifecycle import DlqReason
from taskscheduler.store import db, sweeps, transitions
from taskscheduler.store import dlq as dlq_store


@pytest.fixture(autouse=True)
def _db(settings):
    return settings


def test_create_writes_pending_and_its_event():
    task_id = new_task(payload={"a": 1}, priority=9)
    row = task_row(task_id)
    assert row["status"] == "PENDING" and row["attempt"] == 0 and row["queue"] == "high"
    assert row["payload"] == {"a": 1}
    assert events(task_id) == [(None, "PENDING", 0)]


def test_dispatch_moves_due_tasks_to_enqueued_and_increments_attempt():
    due = new_task()
    future = new_task(run_at=datetime.now(UTC) + timedelta(hours=1))
    with db.transaction() as conn:
        batch = sweeps.dispatch_due(conn, limit=10)
    assert [d.id for d in batch] == [due]
    assert batch[0].attempt == 1 and batch[0].queue == "default"
    assert task_row(due)["status"] == "ENQUEUED"
    assert task_row(future)["status"] == "PENDING"
    assert events(due)[-1] == ("PENDING", "ENQUEUED", 1)


def test_claim_moves_enqueued_to_started_once():
    task_id = new_task(name="demo_fail", payload={"fail": True}, max_retries=2)
    (item,) = dispatch_all()
    with db.transaction() as conn:
        claimed = transitions.claim(conn, task_id=task_id, attempt=item.attempt)
    assert claimed is not None and claimed.name == "demo_fail" and claimed.payload == {"fail": True}
    assert claimed.max_retries == 2
    with db.transaction() as conn:  # the same message delivered twice
        assert transitions.claim(conn, task_id=task_id, attempt=item.attempt) is None
    assert events(task_id)[-1] == ("ENQUEUED", "STARTED", 1)
    row = task_row(task_id)
    assert row["status"] == "STARTED" and row["started_at"] is not None and row["heartbeat_at"] is not None


def test_claim_with_a_stale_attempt_changes_nothing():
    task_id = new_task()
    dispatch_all()
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=task_id, attempt=0) is None
        assert transitions.claim(conn, task_id=task_id, attempt=2) is None
    assert task_row(task_id)["status"] == "ENQUEUED"
    assert len(events(task_id)) == 2


def test_succeed_stores_the_result_and_finishes():
    task_id = new_task()
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result={"ok": [1, 2]})
    row = task_row(task_id)
    assert row["status"] == "SUCCEEDED" and row["result"] == {"ok": [1, 2]} and row["finished_at"] is not None
    with db.transaction() as conn:  # a second completion of the same attempt is fenced
        assert not transitions.succeed(conn, task_id=task_id, attempt=attempt, result="again")
    assert task_row(task_id)["result"] == {"ok": [1, 2]}
    assert [e[1] for e in events(task_id)].count("SUCCEEDED") == 1


def test_succeed_with_a_null_result():
    task_id = new_task()
    attempt = to_started(task_id)
    with db.transaction() as conn:
        assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result=None)
    assert task_row(task_id)["result"] is None


def test_fail_schedules_the_retry_and_is_dispatchable_again():
    task_id = new_task()
    attempt = to_started(task_id)
    before = datetime.now(UTC)
    with db.transaction() as conn:
        assert transitions.fail(conn, task_id=task_id, attempt=attempt, error="E: x", retry_in_sec=30)
    row = task_row(task_id)
    assert row["status"] == "FAILED" and row["last_error"] == "E: x"
    assert before + timedelta(seconds=29) < row["run_at"] < before + timedelta(seconds=32)
    with db.transaction() as conn:
        assert sweeps.dispatch_due(conn, limit=10) == []  # not due yet
    (item,) = dispatch_all()
    assert item.attempt == 2
    assert events(task_id)[-2:] == [("STARTED", "FAILED", 1), ("FAILED", "ENQUEUED", 2)]


def test_kill_moves_started_to_dead_with_a_reason():
    task_id = new_task(name="demo_fail")
    attempt = to_started(task_id)
    with db.transaction() as conn:
        name = transitions.kill(
            conn, task_id=task_id, attempt=attempt, error="boom", reason=DlqReason.STUCK_TASK_TIMEOUT
        )
    assert name == "demo_fail"
    row = task_row(task_id)
    assert row["status"] == "DEAD" and row["dead_reason"] == "stuck_task_timeout" and not row["dlq_recorded"]
    assert row["finished_at"] is not None


@pytest.mark.parametrize("transition", ["succeed", "fail", "kill", "heartbeat"])
def test_stale_attempt_changes_nothing(transition):
    task_id = new_task()
    attempt = to_started(task_id)
    before = task_row(task_id)
    with db.transaction() as conn:
        changed = _apply(conn, transition, task_id, attempt - 1)
    assert not changed
    after = task_row(task_id)
    assert after == before
    assert len(events(task_id)) == 3


@pytest.mark.parametrize("transition", ["succeed", "fail", "kill", "heartbeat"])
@pytest.mark.parametrize("status", ["PENDING", "ENQUEUED", "SUCCEEDED", "FAILED", "DEAD"])
def test_wrong_status_changes_nothing(transition, status):
    task_id = _task_in(status)
    before = task_row(task_id)
    n_events = len(events(task_id))
    with db.transaction() as conn:
        changed = _apply(conn, transition, task_id, before["attempt"])
    assert not changed
    assert task_row(task_id) == before
    assert len(events(task_id)) == n_events


def test_unknown_task_changes_nothing():
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=uuid.uuid4(), attempt=1) is None
        assert not transitions.succeed(conn, task_id=uuid.uuid4(), attempt=1, result=None)


def test_dlq_record_is_idempotent_and_flags_the_task():
    task_id = new_task()
    attempt = to_dead(task_id)
    with db.transaction() as conn:
        assert dlq_store.record_dlq_event(
            conn, task_id=task_id, attempt=attempt, task_name="demo_ok", reason="max_retries_exceeded", error="boom"
        )
    with db.transaction() as conn:
        assert not dlq_store.record_dlq_event(
            conn, task_id=task_id, attempt=attempt, task_name="demo_ok", reason="max_retries_exceeded", error="boom"
        )
        rows = dlq_store.list_dlq_events(conn)
    assert len(rows) == 1 and rows[0]["task_id"] == task_id and rows[0]["attempt"] == attempt
    assert task_row(task_id)["dlq_recorded"]


def test_database_refuses_an_inconsistent_finished_state():
    task_id = new_task()
    with pytest.raises(Exception, match="tasks_finished_iff_terminal"), db.transaction() as conn:
        conn.execute(text("UPDATE tasks SET finished_at = now() WHERE id = :id"), {"id": task_id})


def _apply(conn, transition: str, task_id: uuid.UUID, attempt: int) -> bool:
    if transition == "succeed":
        return transitions.succeed(conn, task_id=task_id, attempt=attempt, result={"late": True})
    if transition == "fail":
        return transitions.fail(conn, task_id=task_id, attempt=attempt, error="late", retry_in_sec=0)
    if transition == "kill":
        return (
            transitions.kill(
                conn, task_id=task_id, attempt=attempt, error="late", reason=DlqReason.MAX_RETRIES_EXCEEDED
            )
            is not None
        )
    return transitions.heartbeat(conn, task_id=task_id, attempt=attempt)


def _task_in(status: str) -> uuid.UUID:
    task_id = new_task()
    if status == "PENDING":
        return task_id
    if status == "ENQUEUED":
        dispatch_all()
        return task_id
    if status == "DEAD":
        to_dead(task_id)
        return task_id
    attempt = to_started(task_id)
    with db.transaction() as conn:
        if status == "SUCCEEDED":
            assert transitions.succeed(conn, task_id=task_id, attempt=attempt, result=None)
        else:
            assert transitions.fail(conn, task_id=task_id, attempt=attempt, error="x", retry_in_sec=3600)
    return task_id
